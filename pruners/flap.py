"""FLAP: fluctuation-based adaptive structured pruning (An et al., AAAI'24; docs/methods.md §3.7).

Statistics on the **dense** model (one pass, no propagation of pruned outputs): for every input
channel ``j`` of each unit's reader (o_proj / out_proj, down_proj / fc2, Mamba's out_proj), the mean
``x̄_j`` and the sample variance over tokens (the "fluctuation"). Channel metric (``metric``):

    IFV  = var_j,     WIFV = var_j * ||W_:,j||^2  (default),     WIFN = mean_i |W_ij| * ||X_j||_2

Attention channels' metrics are squared (as the reference does for o_proj). Every (block, kind) of
channel metrics is standardized, ``(m - mean) / std`` across its channels, then a head (KV group under
GQA) averages its channels. ``allocation: global`` is FLAP's AL-AM: one sort of all heads and channels,
the threshold where the removed parameters are closest to ``ratio`` (the reference weighs a head as
512/3 channels, i.e. 4 * head_dim / 3 for LLaMA-7B; here each unit weighs its real parameter count);
``uniform`` is UL-UM. Compensation ("bias"): the removed channels' mean contribution
``W[:, P] x̄_P`` is added to the reader's output bias (a bias is created where the model has none).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models import add_bias

from .base import register
from .stats import ChannelMoments
from .structured import StructuredPruner, unit_mean

METRICS = ("IFV", "WIFV", "WIFN")


def flap_metric(weight: torch.Tensor, moments: ChannelMoments, metric: str = "WIFV") -> torch.Tensor:
    """Channel metric of a reader weight ``W`` [d_out, D] from its input moments (§3.7)."""
    W = weight.to(moments.variance.dtype)
    if metric == "IFV":
        return moments.variance
    if metric == "WIFV":
        return moments.variance * W.pow(2).sum(0)
    if metric == "WIFN":
        return (W.abs() * moments.mean_square.sqrt().unsqueeze(0)).mean(0)
    raise ValueError(f"FLAP metric '{metric}' is not one of: {', '.join(METRICS)}")


def standardize(values: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` across channels (the reference's ``standarlization``, unbiased std)."""
    return (values - values.mean()) / values.std().clamp_min(torch.finfo(values.dtype).tiny)


def bias_compensation(weight: torch.Tensor, mean_input: torch.Tensor, prune_cols: torch.Tensor) -> torch.Tensor:
    """``W[:, P] x̄_P``: what the removed channels contributed on average, to be added to the output bias."""
    return weight[:, prune_cols].to(mean_input.dtype) @ mean_input[prune_cols]


@register
@dataclass
class FLAP(StructuredPruner):
    name = "flap"
    statistic = ChannelMoments
    metric: str = "WIFV"  # IFV | WIFV | WIFN
    allocation: str = "global"  # global (AL-AM) | uniform (UL-UM)
    bias_compensation: bool = True  # add the removed channels' mean contribution to the reader's bias
    attention_unit: str = "kv_group"  # kv_group (whole GQA groups; = heads without GQA) | query_head
    min_units: int = 1  # units of each kind every block keeps
    rounding: str = "floor"  # uniform: int(ratio * count) units per module, as the reference (nearest: round())
    blocks: list | None = None  # [start, stop) of the blocks pruned (as pruner=goa; the reference: all); null = all

    def check(self, pattern):
        super().check(pattern)
        if self.metric not in METRICS:
            raise ValueError(f"pruner.metric='{self.metric}' is not one of: {', '.join(METRICS)}")

    def unit_scores(self, block, group, stat, pattern):
        channels = flap_metric(block.get_submodule(group.reader).weight.data, stat, self.metric)
        if group.reader_columns().shape[1] > 1:  # attention units (several channels each): squared
            channels = channels.pow(2)
        return unit_mean(standardize(channels.double()), group)

    def compensate_reader(self, reader, removed_cols, stat):
        if self.bias_compensation:
            shift = bias_compensation(reader.weight.data, stat.mean.to(reader.weight.device), removed_cols)
            bias = add_bias(reader)
            bias.data += shift.to(bias.dtype)
        return None
