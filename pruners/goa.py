"""Greedy Output Approximation (Li, Lei, Dong; CPAL 2025, arXiv 2407.19126; docs/methods.md §7).

Structured pruning of depth-2 modules, block by block on the model as pruned so far:

- a depth-2 module is an adapter unit group: its level-1 linears own the units' rows (attention: q / k / v;
  FFN: gate / up, or fc1) and its reader is level 2 (o_proj / out_proj, down_proj / fc2); whole units go
  (heads or KV groups, MLP neurons), level-1 rows and level-2 columns with the same indices;
- channel scores (Eq. 3 / 4): ``M_j = ||B_:,j||^2 · a_j^T Σ a_j`` with ``Σ`` the level-1 input's second moment on
  the current (pruned-upstream) activations (:func:`channel_scores`; a gated FFN multiplies its two branches'
  scores; the activation's 1/2 ranks nothing differently and is left out); a head sums the scores of its
  channels, ``a_j^T Σ_h a_j`` read off the second moment of the level-2 input (:func:`head_scores`);
- heads: the Jensen-Shannon divergence between every two heads' attention rows, averaged over rows
  (:func:`js_divergence_sum`), Algorithm 2's similar heads (:func:`similar_heads`) first, filled up (or cut
  down) to the target count by head scores (:func:`select_heads`);
- reconstruction (``reconstruct``): before scoring, level 1 is refit to the dense model's level-1 outputs, then
  level 2 to the dense level-2 output, by ridge-damped least squares (:func:`ridge_refit`) on the current inputs;
  ``remedy`` ("w/ remedy") refits on a separate recovery set of ``remedy_samples`` windows drawn after the
  calibration windows (:meth:`GOA.extra_windows`), the criteria staying on the calibration windows.

``sparsity.ratio`` is the fraction of each pruned module's units, in the blocks ``pruner.blocks`` (``sparsity=heads``:
the attention modules alone, Table 3); ``head_count=tau`` removes as many heads as Algorithm 2 finds instead.

``calibration=self-generated`` is the paper's data-free variant: no data is read; the model writes its own
calibration windows (:func:`self_generated_windows`: sampled from its own distribution, each started from a random
token) for the head similarity and the refits, and ``Σ`` comes from windows of random token ids.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from models import Adapter, UnitGroup
from models.blocks import BlockInputs, capture_block_inputs, run_block

from .base import ModuleResult, Pruner, register
from .masks import UNIT_KINDS, Pattern
from .resume import resume_walk
from .settings import EngineSettings
from .structured import ATTENTION_UNITS, ROUNDINGS, check_block_range, remove_kept, units_to_remove

HEAD_COUNTS = ("ratio", "tau")

REFIT_PRIORS = ("zero", "weights")

# --- criteria ----------------------------------------------------------------------------------------------------
def js_divergence_sum(probs: torch.Tensor) -> torch.Tensor:
    """``[h, h]``: for every two heads, the Jensen-Shannon divergence (natural log) between their attention rows,
    summed over the batch's rows (``probs``: ``[batch, h, s, s]``, rows summing to 1); divide by the row count for
    Eq. 1's mean. One head at a time against all: ``batch x h x s x s`` of memory."""
    p = probs.double()
    heads = p.shape[1]
    out = torch.zeros(heads, heads, dtype=torch.float64, device=p.device)
    for i in range(heads):
        mean = (p[:, i : i + 1] + p) / 2
        kl_i = torch.xlogy(p[:, i : i + 1], p[:, i : i + 1]) - torch.xlogy(p[:, i : i + 1], mean)
        kl_j = torch.xlogy(p, p) - torch.xlogy(p, mean)
        out[i] = ((kl_i + kl_j) / 2).sum(dim=(0, 2, 3))
    return out


def similar_heads(D: torch.Tensor, tau: float) -> list[int]:
    """Algorithm 2 (docs/methods.md §7): walk ``D`` row by row; for every pair ``i != j`` closer than ``tau``
    with neither yet chosen, choose ``i``. Returns the chosen heads in the order chosen."""
    chosen: list[int] = []
    close = (D < tau).tolist()
    for i, row in enumerate(close):
        for j, near in enumerate(row):
            if near and i != j and i not in chosen and j not in chosen:
                chosen.append(i)
    return chosen


def select_heads(D: torch.Tensor | None, scores: torch.Tensor, count: int, tau: float) -> torch.Tensor:
    """Indices of the ``count`` heads to remove: Algorithm 2's similar heads first (without ``D``: none); fewer
    than ``count``: the lowest-scoring others fill up; more: the ones closest to a head that stays are taken
    (docs/methods.md §7, [INF])."""
    candidates = similar_heads(D, tau) if D is not None and count > 0 else []
    if len(candidates) > count:
        others = [h for h in range(scores.numel()) if h not in candidates]
        nearest = D[candidates][:, others].min(dim=1).values if others else torch.zeros(len(candidates))
        order = torch.argsort(nearest, stable=True)[:count]
        return torch.tensor(sorted(candidates[i] for i in order.tolist()), dtype=torch.long)
    rest = [h for h in torch.argsort(scores.double().cpu(), stable=True).tolist() if h not in candidates]
    return torch.tensor(sorted(candidates + rest[: count - len(candidates)]), dtype=torch.long)


def channel_scores(level_one: list[torch.Tensor], reader: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Eq. 3 per inner channel ``j``: ``||B_:,j||^2 · a_j^T Σ a_j`` for each level-1 weight ``A`` (rows ``a_j``,
    ``[d_inner, d_in]``, or ``d_in + 1`` with the bias as a column and ``Σ`` augmented to match) and the level-2
    weight ``B`` (``[d_out, d_inner]``); several level-1 weights (a gated FFN's gate and up) multiply their
    scores (Appendix B). ``a_j^T Σ a_j`` is ``E[(a_j^T x)^2]``, the channel's second moment."""
    column = reader.double().pow(2).sum(0)
    score = torch.ones_like(column)
    for A in level_one:
        A = A.double()
        score = score * column * ((A @ sigma.double()) * A).sum(1)
    return score


def head_scores(reader: torch.Tensor, second_moment: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """A head's score (Appendix B, attention): the sum over its channels ``j`` (``columns``: ``[heads, width]`` of
    the level-2 input) of ``||W_O[:, j]||^2 · E[z_j^2]``, ``z`` the level-2 input (the head's attention-mixed
    values: ``E[z_j^2] = v_j^T Σ_h v_j``)."""
    channel = reader.double().pow(2).sum(0) * second_moment.double()
    return channel[columns.to(channel.device)].sum(dim=1)


def ridge_refit(gram: torch.Tensor, cross: torch.Tensor, damp: float, prior: torch.Tensor | None = None
                ) -> torch.Tensor:
    """``argmin_W ||X W - Y||^2 + λ ||W - W_0||^2`` from ``gram = X^T X`` and ``cross = X^T Y``:
    ``(X^T X + λ I)^-1 (X^T Y + λ W_0)`` with ``λ = damp · mean(diag X^T X)`` (the paper's normal equations; the
    ridge is ours, [INF]), in float64. ``prior`` = ``W_0`` (``[d_in, d_out]``): the ridge pulls toward the module's
    current weights (``pruner.refit_prior=weights``) instead of toward zero (None)."""
    gram = gram.double()
    lam = damp * torch.diagonal(gram).mean().clamp_min(torch.finfo(torch.float64).tiny)
    rhs = cross.double() if prior is None else cross.double() + lam * prior.double()
    return torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device), rhs)


# --- data-free calibration ---------------------------------------------------------------------------------------
@torch.no_grad()
def self_generated_windows(model, count: int, seqlen: int, seed: int, device="cpu") -> torch.Tensor:
    """``[count, seqlen]`` token windows the model writes itself: each starts from a token drawn uniformly from the
    vocabulary, then ``seqlen - 1`` tokens sampled from the model's full softmax (temperature 1, no top-k; EOS does
    not stop it) [INF: the paper gives neither the length nor the sampling]. Seeded; the global RNG is left as it
    was."""
    from models.blocks import on_device

    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(seed)  # (its own generator: the global ones are not touched)
    ids = torch.randint(0, vocab, (count, 1), generator=generator)
    with on_device(model, device):
        for _ in range(seqlen - 1):  # (no KV cache: every family's forward, windows are short)
            logits = model(input_ids=ids.to(device), use_cache=False).logits[:, -1].float()
            probs = torch.softmax(logits, dim=-1).cpu()
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return ids


def random_token_windows(vocab: int, count: int, seqlen: int, seed: int) -> torch.Tensor:
    """``[count, seqlen]`` token ids drawn uniformly (the data-free variant's input for ``Σ``, Appendix D)."""
    return torch.randint(0, vocab, (count, seqlen), generator=torch.Generator().manual_seed(seed))


# --- the driver --------------------------------------------------------------------------------------------------
def _augment(x: torch.Tensor, bias: bool) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1]).double()
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1) if bias else x


class _Done(Exception):
    """Raised by a :class:`_Capture` hook once the call has given every value asked for."""


class _Capture:
    """Forward hooks that keep, per call of the block, chosen modules' inputs or outputs. :meth:`run` calls the block
    and stops it as soon as every value is in: what comes after in the block is not computed (the values are the
    same as a full call's; the refits over a remedy set skip the rest of each block, about half its work)."""

    def __init__(self, block: nn.Module, inputs: tuple[str, ...] = (), outputs: tuple[str, ...] = ()):
        self.values: dict[tuple[str, str], torch.Tensor] = {}
        self.wanted = {("in", n) for n in inputs} | {("out", n) for n in outputs}
        self.handles = [block.get_submodule(n).register_forward_pre_hook(
            lambda m, args, n=n: self.keep(("in", n), args[0])) for n in inputs]
        self.handles += [block.get_submodule(n).register_forward_hook(
            lambda m, args, out, n=n: self.keep(("out", n), out[0] if isinstance(out, tuple) else out))
            for n in outputs]
        self.block = block

    def keep(self, key: tuple[str, str], value: torch.Tensor) -> None:
        self.values[key] = value
        if self.wanted.issubset(self.values):
            raise _Done

    def run(self, adapter: Adapter, hidden: torch.Tensor, kwargs: dict) -> dict[tuple[str, str], torch.Tensor]:
        """Call the block on ``hidden`` up to the last value asked for; the values of this call."""
        self.values = {}
        try:
            adapter.call_block(self.block, hidden, kwargs)
        except _Done:
            pass
        if not self.wanted.issubset(self.values):
            raise RuntimeError(f"the block's call did not reach {sorted(self.wanted - set(self.values))}")
        return self.values

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


@register
@dataclass
class GOA(Pruner):
    """``pruner=goa``: Greedy Output Approximation (module docstring)."""

    name = "goa"
    needs_calibration = True  # (not with calibration=self-generated: __post_init__)
    resumes: ClassVar[bool] = True  # each done block kept with every stream's next inputs (engine.resume)
    reads_attention = True  # head similarity: the adapter's query_key / attention_probabilities (checked in validate)
    patterns: ClassVar[tuple[str, ...]] = UNIT_KINDS
    calibration: str = "data"  # data (the calibration windows) | self-generated (data-free: the model's own text)
    generated_samples: int = 16  # self-generated: windows the model writes (the paper's 16 calibration samples)
    generated_seqlen: int = 128  # ... of this many tokens (the paper's calibration length for LLaMA)
    generated_seed: int = 0  # ... and of the random token ids for the second moments
    blocks: list | None = None  # [start, stop) of the blocks pruned (the paper: [4, 30) on LLaMA-7B); null = all
    attention_unit: str = "kv_group"  # kv_group (whole KV groups under GQA; heads otherwise) | query_head
    similarity: bool = True  # heads: Algorithm 2's similar heads first (false: head scores only)
    tau: float = 0.16  # Algorithm 2's threshold on the mean JS divergence (the paper: 0.16 - 0.20)
    head_count: str = "ratio"  # ratio (sparsity.ratio of each module's heads) | tau (Algorithm 2's similar heads,
    #   as many as tau finds: Table 3's "GOA similarity" rows; the ratio then applies to the MLPs only)
    reconstruct: bool = True  # refit level 1, then level 2, to the dense model's outputs before scoring
    final_refit: bool = False  # after the removal, refit level 2's kept columns to the dense output once more [INF]
    remedy: bool = False  # "w/ remedy": the refits use a recovery set of remedy_samples more windows
    remedy_samples: int = 1024  # windows of the recovery set (the paper: 1024 examples of the downstream data)
    damp: float = 0.01  # ridge of the refits, relative to the mean diagonal of X^T X
    refit_prior: str = "zero"  # what the ridge pulls the refit toward: zero | weights (the module's current ones) [INF]
    min_units: int = 1  # units every pruned module keeps
    rounding: str = "nearest"  # units a module loses: round(ratio * count) | floor: int(ratio * count) [INF]
    attention_only: ClassVar[bool] = False  # sparsity=heads: only attention units (set by prune())

    def __post_init__(self):
        self.needs_calibration = self.calibration != "self-generated"

    def check(self, pattern: Pattern) -> None:
        super().check(pattern)
        if self.calibration not in ("data", "self-generated"):
            raise ValueError(f"pruner.calibration='{self.calibration}' is not one of: data, self-generated")
        if self.calibration == "self-generated" and self.remedy:
            raise ValueError("pruner.remedy=true reads a recovery set: not with pruner.calibration=self-generated")
        for key in ("generated_samples", "generated_seqlen"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 2:
                raise ValueError(f"pruner.{key}={value} must be an integer >= 2")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"pruner.rounding='{self.rounding}' is not one of: {', '.join(ROUNDINGS)}")
        if self.attention_unit not in ATTENTION_UNITS:
            raise ValueError(f"pruner.attention_unit='{self.attention_unit}' is not one of: "
                             f"{', '.join(ATTENTION_UNITS)}")
        if not self.tau > 0:
            raise ValueError(f"pruner.tau={self.tau} must be positive")
        if self.head_count not in HEAD_COUNTS:
            raise ValueError(f"pruner.head_count='{self.head_count}' is not one of: {', '.join(HEAD_COUNTS)}")
        if self.head_count == "tau" and not self.similarity:
            raise ValueError("pruner.head_count=tau counts Algorithm 2's similar heads: it needs pruner.similarity=true")
        if self.remedy and not self.reconstruct:
            raise ValueError("pruner.remedy=true refits on a recovery set: it needs pruner.reconstruct=true")
        if self.refit_prior not in REFIT_PRIORS:
            raise ValueError(f"pruner.refit_prior='{self.refit_prior}' is not one of: {', '.join(REFIT_PRIORS)}")
        if self.final_refit and not self.reconstruct:
            raise ValueError("pruner.final_refit=true refits after the removal: it needs pruner.reconstruct=true")
        if not isinstance(self.remedy_samples, int) or self.remedy_samples < 1:
            raise ValueError(f"pruner.remedy_samples={self.remedy_samples} must be a positive integer")
        if not self.damp > 0:
            raise ValueError(f"pruner.damp={self.damp} must be positive")
        if not isinstance(self.min_units, int) or self.min_units < 1:
            raise ValueError(f"pruner.min_units={self.min_units} must be an integer >= 1")
        check_block_range(self.blocks)

    def extra_windows(self) -> int:
        """Calibration windows loaded after the ``calib.nsamples`` ones: the recovery set with ``remedy``."""
        return self.remedy_samples if self.remedy else 0

    def pruned_blocks(self, count: int) -> range:
        if self.blocks is None:
            return range(count)
        start, stop = self.blocks
        if stop > count:
            raise ValueError(f"pruner.blocks={list(self.blocks)}: the model has {count} blocks")
        return range(start, stop)

    def modules(self, adapter: Adapter, block) -> list[UnitGroup]:
        """The depth-2 modules of a block, in forward order: its unit groups (query heads instead of KV groups
        with ``attention_unit=query_head`` where the family has them)."""
        groups = adapter.structure_groups(block, self.attention_unit == "query_head", self.attention_only)
        if any(not g.reader or g.kind.startswith("mamba") for g in groups):
            raise ValueError(f"pruner 'goa' prunes attention + MLP depth-2 modules; model family '{adapter.family}' "
                             "has none")
        return groups

    @staticmethod
    def level_one(adapter: Adapter, block, group: UnitGroup) -> tuple[str, ...]:
        """The level-1 linears of a depth-2 module: the linear group (shared input) holding a linear whose rows
        the units own (attention: q / k / v; FFN: gate / up, or fc1)."""
        owners = {path.rpartition(".")[0] for path, (axis, _) in group.owned.items()
                  if axis == 0 and path.endswith(".weight")}
        for linear_group in adapter.linear_groups(block):
            if owners & set(linear_group.names):
                return linear_group.names
        raise ValueError(f"unit group {group.kind}: no linear group owns its rows")

    @torch.no_grad()
    def prune(self, model, adapter: Adapter, pattern: Pattern, calib_ids, settings: EngineSettings | None = None,
              ratios=None) -> dict[str, ModuleResult]:
        settings = settings or EngineSettings()
        if ratios is not None:
            raise ValueError("pruner 'goa' allocates its own units: sparsity.allocation must be uniform")
        self.check(pattern)
        self.attention_only = pattern.attention_only
        self.modules(adapter, adapter.blocks()[0])  # (a family without depth-2 modules is refused before any work)
        sigma = None  # the windows the second moments come from (None: the criteria's)
        if self.calibration == "self-generated":
            calib_ids = self_generated_windows(model, self.generated_samples, self.generated_seqlen,
                                               self.generated_seed, settings.device)
            vocab = model.get_input_embeddings().weight.shape[0]
            sigma = capture_block_inputs(model, adapter, random_token_windows(
                vocab, self.generated_samples, self.generated_seqlen, self.generated_seed + 1), settings.device,
                settings.batch_size)
        if calib_ids is None:
            raise ValueError("pruner 'goa' needs calibration data")
        # engine.resume: the done blocks loaded (after the data-free windows: the dense model writes them)
        start, kept_batches, results, after_block = resume_walk(model, adapter, settings)
        blocks = adapter.blocks()
        chosen = self.pruned_blocks(len(blocks))
        device = settings.device
        extra = self.extra_windows()
        if extra and calib_ids.shape[0] <= extra:
            raise ValueError(f"pruner.remedy: {calib_ids.shape[0]} windows, expected calib.nsamples + "
                             f"remedy_samples={extra}")
        criteria_ids, fit_ids = (calib_ids[:-extra], calib_ids[-extra:]) if extra else (calib_ids, None)
        current = capture_block_inputs(model, adapter, criteria_ids, device, settings.batch_size)
        fit = None  # the refits' windows: (current, dense) streams
        if self.reconstruct:
            fit_current = current if fit_ids is None else capture_block_inputs(model, adapter, fit_ids, device,
                                                                               settings.batch_size)
            fit = (fit_current, BlockInputs(list(fit_current.batches), fit_current.kwargs_by_batch_size))
        if start and kept_batches is None:  # (never written by GOA: a partial folder of something else)
            raise ValueError(f"engine.resume: block {start} is next but its kept inputs are missing "
                             f"({settings.resume_dir}): delete that folder to start again")
        if kept_batches is not None:  # (a resumed run: every stream as it entered the first block not done)
            current, fit, sigma = _restored_streams(kept_batches, current, fit, sigma, device)
        prefix = adapter.blocks_prefix()
        for index in tqdm(range(start, chosen.stop), desc=f"goa {pattern.describe()}", unit="block", initial=start,
                          total=chosen.stop, disable=not settings.progress):  # (nothing after the last pruned
            # block changes)
            block = blocks[index]
            block.to(device)
            original = (copy.deepcopy(block) if index in chosen else block) if fit is not None else None
            if index in chosen:
                for group in self.modules(adapter, block):
                    group = adapter.unit_group(block, group.kind)  # (as the block is now)
                    if fit is not None:
                        self.refit(adapter, block, original, group, *fit)
                    keep = self.keep(adapter, block, group, current, pattern.ratio, sigma)
                    name, result = remove_kept(adapter, block, group, keep, prefix, index)
                    results[name] = result
                    if fit is not None and self.final_refit:
                        self.refit(adapter, block, original, adapter.unit_group(block, group.kind), *fit,
                                   levels=(2,))
            outputs = run_block(adapter, block, current)
            if fit is not None:
                fit_current = BlockInputs(outputs, current.kwargs_by_batch_size) if fit[0] is current else \
                    BlockInputs(run_block(adapter, block, fit[0]), fit[0].kwargs_by_batch_size)
                fit = (fit_current, BlockInputs(run_block(adapter, original, fit[1]), fit[1].kwargs_by_batch_size))
                original = None
            current = BlockInputs(outputs, current.kwargs_by_batch_size)
            if sigma is not None:
                sigma = BlockInputs(run_block(adapter, block, sigma), sigma.kwargs_by_batch_size)
            if fit is not None and fit_ids is None:
                fit = (current, fit[1])
            if str(device) != "cpu":
                block.to("cpu")
                torch.cuda.empty_cache()
            if after_block is not None:  # (engine.resume: this block done, every stream's inputs of the next)
                after_block(index, block, [b for s in _streams(current, fit, sigma) for b in s.batches])
        return results

    # --- scoring and choosing ----------------------------------------------------------------------------------
    def keep(self, adapter: Adapter, block, group: UnitGroup, inputs: BlockInputs, ratio: float,
             sigma: BlockInputs | None = None) -> torch.Tensor:
        """Keep mask over the module's units from the current inputs (the second moments from ``sigma`` where
        given: the data-free variant's random token ids)."""
        count = max(0, min(units_to_remove(ratio, group.count, self.rounding), group.count - self.min_units))
        level_one = self.level_one(adapter, block, group)
        attention = group.reader_columns().shape[1] > 1
        reader = block.get_submodule(group.reader)
        if attention:
            q_name, k_name = adapter.query_key(block)
            D, rows, moment, tokens = None, 0, None, 0
            with _Capture(block, inputs=(group.reader,), outputs=(q_name, k_name)) as cap:
                for h in inputs.batches:
                    kwargs = inputs.kwargs(h)
                    cap.run(adapter, h, kwargs)
                    if sigma is None:
                        z = cap.values[("in", group.reader)].reshape(-1, reader.in_features).double()
                        moment = z.pow(2).sum(0) if moment is None else moment + z.pow(2).sum(0)
                        tokens += z.shape[0]
                    if self.similarity:
                        probs = adapter.attention_probabilities(block, cap.values[("out", q_name)],
                                                                cap.values[("out", k_name)], kwargs)
                        part = js_divergence_sum(probs)
                        D = part if D is None else D + part
                        rows += probs.shape[0] * probs.shape[2]
                for h in (sigma.batches if sigma is not None else []):
                    cap.run(adapter, h, sigma.kwargs(h))
                    z = cap.values[("in", group.reader)].reshape(-1, reader.in_features).double()
                    moment = z.pow(2).sum(0) if moment is None else moment + z.pow(2).sum(0)
                    tokens += z.shape[0]
            scores = head_scores(reader.weight.data, moment / max(tokens, 1), group.reader_columns())
            if D is not None:
                D = self.unit_divergence(D / rows, group, adapter, block)
            if self.head_count == "tau":  # as many as Algorithm 2 finds (the modules keep min_units)
                count = min(len(similar_heads(D, self.tau)), group.count - self.min_units)
            removed = select_heads(D, scores, count, self.tau)
        else:
            bias = any(block.get_submodule(n).bias is not None for n in level_one)
            moment = self.second_moment(adapter, block, level_one[0], sigma if sigma is not None else inputs, bias)
            owners = [n for n in level_one if f"{n}.weight" in group.owned]
            weights = [_weight(block.get_submodule(n), bias) for n in owners]
            scores = channel_scores(weights, reader.weight.data, moment)
            removed = torch.argsort(scores.cpu(), stable=True)[:count]
        keep = torch.ones(group.count, dtype=torch.bool)
        keep[removed] = False
        # where the family must adjust the choice (query heads: equal counts per KV group), what GOA chose to keep
        # ranks above what it removed, the scores only order within each
        rank = torch.argsort(torch.argsort(scores.double().cpu(), stable=True)).double() / max(group.count, 1)
        return adapter.repair_keep(block, group, keep, keep.double() * 2 + rank)

    def unit_divergence(self, D: torch.Tensor, group: UnitGroup, adapter: Adapter, block) -> torch.Tensor:
        """``D`` between query heads -> between the group's units: a KV group under GQA averages its query heads'
        divergences ([INF]); plain heads and query heads as they are."""
        heads = D.shape[0]
        if group.count == heads:
            return D
        per = heads // group.count
        return D.view(group.count, per, group.count, per).mean(dim=(1, 3))

    def second_moment(self, adapter: Adapter, block, name: str, inputs: BlockInputs, bias: bool) -> torch.Tensor:
        """``Σ = E[x x^T]`` of a linear's input over the current inputs (with a ones entry for a bias)."""
        total, tokens = None, 0
        with _Capture(block, inputs=(name,)) as cap:
            for h in inputs.batches:
                cap.run(adapter, h, inputs.kwargs(h))
                x = _augment(cap.values[("in", name)], bias)
                total = x.T @ x if total is None else total + x.T @ x
                tokens += x.shape[0]
        return total / max(tokens, 1)

    # --- the remedy --------------------------------------------------------------------------------------------
    def refit(self, adapter: Adapter, block, original, group: UnitGroup, current: BlockInputs,
              dense: BlockInputs, levels: tuple[int, ...] = (1, 2)) -> None:
        """Level 1, then level 2 (``levels``), refit by ridge least squares from the current inputs to the dense
        model's outputs of the same linears (docs/methods.md §7); after a removal, level 2's kept columns alone."""
        by_level = {1: self.level_one(adapter, block, group), 2: (group.reader,)}
        for names in (by_level[level] for level in levels):
            bias = any(block.get_submodule(n).bias is not None for n in names)
            gram, cross = None, {n: None for n in names}
            with _Capture(block, inputs=(names[0],)) as cap, _Capture(original, outputs=names) as target:
                for h, d in zip(current.batches, dense.batches, strict=True):
                    cap.run(adapter, h, current.kwargs(h))
                    target.run(adapter, d, dense.kwargs(d))
                    x = _augment(cap.values[("in", names[0])], bias)
                    gram = x.T @ x if gram is None else gram + x.T @ x
                    for n in names:
                        y = target.values[("out", n)].reshape(x.shape[0], -1).double()
                        cross[n] = x.T @ y if cross[n] is None else cross[n] + x.T @ y
            for n in names:
                linear = block.get_submodule(n)
                prior = _weight(linear, bias).T if self.refit_prior == "weights" else None
                solved = ridge_refit(gram, cross[n], self.damp, prior).T  # [d_out, d_in (+1)]
                linear.weight.data.copy_(solved[:, : linear.in_features].to(linear.weight.dtype))
                if linear.bias is not None:
                    linear.bias.data.copy_(solved[:, linear.in_features].to(linear.bias.dtype))


def _streams(current: BlockInputs, fit: tuple | None, sigma: BlockInputs | None) -> list[BlockInputs]:
    """The block-input streams GOA carries from block to block, in a fixed order: the criteria's, the refits' current
    one where it is not the criteria's (``remedy``), the dense one, the data-free second moments'."""
    streams = [current]
    if fit is not None:
        streams += ([fit[0]] if fit[0] is not current else []) + [fit[1]]
    return streams + ([sigma] if sigma is not None else [])


def _restored_streams(batches: list[torch.Tensor], current: BlockInputs, fit: tuple | None,
                      sigma: BlockInputs | None, device) -> tuple:
    """``(current, fit, sigma)`` with the batches a resumed run kept (:func:`_streams`' order and lengths) in place of
    the block-0 inputs; the kwargs stay (they depend on the windows only)."""
    streams = _streams(current, fit, sigma)
    if len(batches) != sum(len(s.batches) for s in streams):
        raise ValueError(f"engine.resume: {len(batches)} kept batches, expected "
                         f"{sum(len(s.batches) for s in streams)} (the partial folder of another setting)")
    restored, at = [], 0
    for stream in streams:
        restored.append(BlockInputs([b.to(device) for b in batches[at : at + len(stream.batches)]],
                                    stream.kwargs_by_batch_size))
        at += len(stream.batches)
    new_current = restored.pop(0)
    if fit is not None:
        fit = (new_current if fit[0] is current else restored.pop(0), restored.pop(0))
    return new_current, fit, restored.pop(0) if sigma is not None else None


def _weight(linear: nn.Linear, bias: bool) -> torch.Tensor:
    """``[W | b]`` when the input moment carries a ones entry (a linear without a bias gets a zero column)."""
    W = linear.weight.data.double()
    if not bias:
        return W
    b = linear.bias.data.double() if linear.bias is not None else torch.zeros(W.shape[0], dtype=W.dtype, device=W.device)
    return torch.cat([W, b[:, None]], dim=1)
