"""LlamaGen class-conditional image generators (FoundationVision/LlamaGen ``c2i``), our own code (docs/imagegen.md).

LlamaGen is not in transformers. This is its GPT as a transformers model of its own ``model_type`` (``llamagen``), so
that loading, saving and the pruners' block execution work as for every text family. Module names are LlamaGen's
(``layers.{i}.attention.wqkv``, ``feed_forward.w1`` ...), so an official checkpoint's ``model`` state dict loads
as it is (:func:`convert_checkpoint`).

A sequence is ``input_ids = [class, t_0, ..., t_{n-1}]``: position 0 holds the class label (embedded by
``cls_embedding``; the null class of classifier-free guidance is id ``num_classes``), the others hold VQ image tokens,
and the logits at position i predict ``t_i``, so the usual next-token loss of a causal LM applies unchanged.
Positions use LlamaGen's 2-D rotary embedding (:func:`rope_2d`). Generation (:func:`generate`) keeps a KV cache per
layer, sized from that layer's own heads (pruned layers differ), and drops it afterwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

# LlamaGen's class-conditional sizes (autoregressive/models/gpt.py: GPT_models)
SIZES = {
    "GPT-B": dict(n_layer=12, n_head=12, dim=768),
    "GPT-L": dict(n_layer=24, n_head=16, dim=1024),
    "GPT-XL": dict(n_layer=36, n_head=20, dim=1280),
    "GPT-XXL": dict(n_layer=48, n_head=24, dim=1536),
    "GPT-XXXL": dict(n_layer=48, n_head=40, dim=2560),
    "GPT-1B": dict(n_layer=22, n_head=32, dim=2048),
    "GPT-3B": dict(n_layer=24, n_head=32, dim=3200),
    "GPT-7B": dict(n_layer=32, n_head=32, dim=4096),
}


def _multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


def swiglu_width(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """LlamaGen's (LLaMA's) SwiGLU width: 2/3 of 4 * dim, times the multiplier, rounded up to ``multiple_of``."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return _multiple(hidden, multiple_of)


class LlamaGenConfig(PretrainedConfig):
    """LlamaGen's ``ModelArgs`` (c2i) plus ``head_dim`` / ``intermediate_size`` (explicit, so that uniformly pruned
    sizes can be written back), ``vq``: the folder of the VQ tokenizer, relative to the checkpoint, and ``cfg_scale``:
    the classifier-free guidance the model is published with (XXL 1.75, 3B 1.65), the default of every sampler;
    ``image_reference``: the reference statistics ``eval=image`` compares with by default."""

    model_type = "llamagen"
    attribute_map = {"hidden_size": "dim", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head"}

    def __init__(self, vocab_size: int = 16384, dim: int = 1536, n_layer: int = 48, n_head: int = 24,
                 n_kv_head: int | None = None, head_dim: int | None = None, intermediate_size: int | None = None,
                 multiple_of: int = 256, ffn_dim_multiplier: float | None = None, rope_base: float = 10000.0,
                 norm_eps: float = 1e-5, num_classes: int = 1000, class_dropout_prob: float = 0.1,
                 cls_token_num: int = 1, block_size: int = 576, initializer_range: float = 0.02,
                 image_size: int = 384, downsample: int = 16, vq: str | None = "vq", cfg_scale: float = 1.0,
                 image_reference: str | None = None, **kwargs):
        self.vocab_size, self.dim, self.n_layer, self.n_head = vocab_size, dim, n_layer, n_head
        self.n_kv_head = n_kv_head or n_head
        self.head_dim = head_dim or dim // n_head
        self.multiple_of, self.ffn_dim_multiplier = multiple_of, ffn_dim_multiplier
        self.intermediate_size = intermediate_size or swiglu_width(dim, multiple_of, ffn_dim_multiplier)
        self.rope_base, self.norm_eps = rope_base, norm_eps
        self.num_classes, self.class_dropout_prob, self.cls_token_num = num_classes, class_dropout_prob, cls_token_num
        self.block_size, self.initializer_range = block_size, initializer_range
        self.image_size, self.downsample, self.vq = image_size, downsample, vq
        self.cfg_scale = cfg_scale  # the guidance the model is published with (a default for sampling)
        self.image_reference = image_reference  # eval=image's default reference statistics (a folder, bundled:<name>)
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
        if cls_token_num != 1:
            raise ValueError("llamagen: only cls_token_num = 1 (class-conditional) is supported")
        if int(math.isqrt(block_size)) ** 2 != block_size:
            raise ValueError(f"llamagen: block_size {block_size} is not a square grid of tokens")

    @property
    def grid(self) -> int:
        return math.isqrt(self.block_size)


# --- the math: 2-D rotary positions (docs/imagegen.md §1) -----------------------------------------------------
def rope_2d(grid: int, head_dim: int, base: float = 10000.0, cls_token_num: int = 1) -> torch.Tensor:
    """``[cls_token_num + grid**2, head_dim // 2, 2]`` (cos, sin) per rotated pair: ``head_dim / 4`` frequencies
    ``base^(-2i / (head_dim/2))``; the first half of the pairs rotate with the token's row, the second half with its
    column; the class positions get (0, 0), so their queries and keys vanish (LlamaGen's ``precompute_freqs_cis_2d``)."""
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    angles = torch.outer(torch.arange(grid, dtype=torch.float32), freqs)  # [grid, head_dim / 4]
    rows = angles[:, None, :].expand(-1, grid, -1)
    cols = angles[None, :, :].expand(grid, -1, -1)
    grid_angles = torch.cat([rows, cols], dim=-1).flatten(0, 1)  # [grid^2, head_dim / 2]
    cache = torch.stack([torch.cos(grid_angles), torch.sin(grid_angles)], dim=-1)
    return torch.cat([torch.zeros(cls_token_num, half, 2), cache])


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of ``x`` ``[b, s, heads, head_dim]`` by ``freqs`` ``[s, head_dim // 2, 2]`` (in fp32)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    f = freqs.view(1, pairs.size(1), 1, pairs.size(3), 2)
    out = torch.stack([pairs[..., 0] * f[..., 0] - pairs[..., 1] * f[..., 1],
                       pairs[..., 1] * f[..., 0] + pairs[..., 0] * f[..., 1]], dim=-1)
    return out.flatten(3).type_as(x)


# --- modules (LlamaGen's names) ---------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt((xf * xf).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LabelEmbedder(nn.Module):
    """Class labels -> one embedding row each; row ``num_classes`` is the null class (present when the model was
    trained with class dropout, as every LlamaGen c2i model is)."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def forward(self, labels: torch.Tensor) -> torch.Tensor:  # [b, 1] -> [b, 1, dim]
        if self.training and self.dropout_prob > 0:  # class dropout: training for classifier-free guidance
            drop = torch.rand(labels.shape, device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


@dataclass
class KVCache:
    """One layer's keys and values ``[batch, kv heads, length, head_dim]``, sized from the layer's own heads."""

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def empty(cls, batch: int, heads: int, length: int, head_dim: int, dtype, device) -> KVCache:
        shape = (batch, heads, length, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    def update(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.k[:, :, pos] = k
        self.v[:, :, pos] = v
        return self.k, self.v


class Attention(nn.Module):
    """Fused ``wqkv`` (rows: queries, keys, values) and ``wo``. Head counts are read off the weights, so a layer
    with heads removed needs no attribute updated."""

    def __init__(self, config: LlamaGenConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.wqkv = nn.Linear(config.dim, (config.n_head + 2 * config.n_kv_head) * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_head * config.head_dim, config.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def heads(self) -> tuple[int, int]:
        """(query heads, key / value heads) as the layer is now."""
        heads = self.wo.in_features // self.head_dim
        return heads, (self.wqkv.out_features // self.head_dim - heads) // 2

    def forward(self, x, freqs_cis, input_pos=None, mask=None):
        b, s, _ = x.shape
        heads, kv_heads = self.heads()
        d = self.head_dim
        q, k, v = self.wqkv(x).split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
        q = apply_rope(q.view(b, s, heads, d), freqs_cis).transpose(1, 2)
        k = apply_rope(k.view(b, s, kv_heads, d), freqs_cis).transpose(1, 2)
        v = v.view(b, s, kv_heads, d).transpose(1, 2)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        if heads != kv_heads:
            k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.wo(out.transpose(1, 2).reshape(b, s, heads * d))


class FeedForward(nn.Module):
    def __init__(self, config: LlamaGenConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.intermediate_size, bias=False)
        self.w3 = nn.Linear(config.dim, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: LlamaGenConfig):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x, freqs_cis=None, input_pos=None, mask=None):
        h = x + self.attention(self.attention_norm(x), freqs_cis, input_pos, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Rope2D(nn.Module):
    """The 2-D rotary table (no parameters, not in the state dict, as in LlamaGen), computed on first use per device
    (a model built on the meta device gets a real table)."""

    def __init__(self, config: LlamaGenConfig):
        super().__init__()
        self.args = (config.grid, config.head_dim, config.rope_base, config.cls_token_num)
        self._tables: dict[str, torch.Tensor] = {}

    def rows(self, positions: torch.Tensor | int, device) -> torch.Tensor:
        """Rows ``[:positions]`` (an int) or at ``positions`` (a tensor)."""
        key = str(device)
        if key not in self._tables:
            with torch.device("cpu"):
                self._tables[key] = rope_2d(*self.args).to(device)
        table = self._tables[key]
        return table[:positions] if isinstance(positions, int) else table[positions.to(device)]


class LlamaGenPreTrainedModel(PreTrainedModel):
    config_class = LlamaGenConfig
    base_model_prefix = "llamagen"
    _no_split_modules = ["TransformerBlock"]
    _supports_sdpa = True

    def _init_weights(self, module):  # LlamaGen's: normal(0, initializer_range) for linears and embeddings
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


class LlamaGenForCausalLM(LlamaGenPreTrainedModel):
    """LlamaGen's ``Transformer`` (c2i) with a causal-LM interface: ``forward(input_ids=[class, tokens...])``."""

    def __init__(self, config: LlamaGenConfig):
        super().__init__(config)
        self.cls_embedding = LabelEmbedder(config.num_classes, config.dim, config.class_dropout_prob)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.rope = Rope2D(config)
        self.post_init()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[b, s]`` ids (class first) -> ``[b, s, dim]``."""
        parts = [self.cls_embedding(input_ids[:, :1])]
        if input_ids.shape[1] > 1:
            parts.append(self.tok_embeddings(input_ids[:, 1:]))
        return torch.cat(parts, dim=1)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **kwargs) -> CausalLMOutput:
        limit = self.config.cls_token_num + self.config.block_size
        if input_ids.shape[1] > limit:
            raise ValueError(f"llamagen: {input_ids.shape[1]} positions, the model has {limit} (class + grid)")
        h = self.embed(input_ids)
        freqs = self.rope.rows(h.shape[1], h.device)
        for layer in self.layers:
            h = layer(h, freqs_cis=freqs, input_pos=None, mask=None)
        logits = self.output(self.norm(h)).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return CausalLMOutput(loss=loss, logits=logits)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes


# --- generation (LlamaGen's autoregressive/models/generate.py, with per-layer caches) ---------------------------
def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k, then nucleus (top-p) filtering: removed entries become -inf (the most likely token always stays)."""
    logits = logits.clone()
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]))[0][..., -1, None]
        logits[logits < kth] = float("-inf")
    if top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        remove = torch.cumsum(F.softmax(ordered, dim=-1), dim=-1) > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits[remove.scatter(-1, order, remove)] = float("-inf")
    return logits


def guided(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on raw logits: ``uncond + scale * (cond - uncond)``."""
    return uncond + (cond - uncond) * scale


def _sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator) -> torch.Tensor:
    probs = F.softmax(filter_logits(logits / max(temperature, 1e-5), top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


def setup_caches(model: LlamaGenForCausalLM, batch: int, length: int) -> torch.Tensor:
    """A KV cache in every layer, each sized from that layer's own key / value heads; returns the causal mask
    ``[length, length]`` (length rounded up to a multiple of 8, as LlamaGen does)."""
    length = _multiple(length, 8)
    weight = model.tok_embeddings.weight
    for layer in model.layers:
        attn = layer.attention
        attn.kv_cache = KVCache.empty(batch, attn.heads()[1], length, attn.head_dim, weight.dtype, weight.device)
    return torch.tril(torch.ones(length, length, dtype=torch.bool, device=weight.device))


def clear_caches(model: LlamaGenForCausalLM) -> None:
    for layer in model.layers:
        layer.attention.kv_cache = None


def _step(model, h: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    freqs = model.rope.rows(pos, h.device)
    step_mask = mask[pos][None, None]  # [1, 1, s, length]
    for layer in model.layers:
        h = layer(h, freqs_cis=freqs, input_pos=pos, mask=step_mask)
    return model.output(model.norm(h[:, -1:])).float()[:, -1]


@torch.no_grad()
def generate(model: LlamaGenForCausalLM, labels: torch.Tensor, cfg_scale: float = 1.0, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, cfg_interval: int = -1, generator: torch.Generator | None = None
             ) -> torch.Tensor:
    """``[b, block_size]`` image tokens for class ``labels`` ``[b]``, KV-cached, one multinomial draw per step
    (``generator``: None = torch's default, as LlamaGen). Guidance (``cfg_scale > 1``) runs the null class beside
    each label; ``cfg_interval >= 0`` stops guiding after that many steps."""
    n = model.config.block_size
    guide = cfg_scale > 1.0
    if guide and model.cls_embedding.embedding_table.num_embeddings <= model.config.num_classes:
        raise ValueError(f"cfg_scale={cfg_scale}: the model has no null class (trained without class dropout); "
                         f"guidance needs it (cfg_scale 1 samples unguided)")
    cond = labels.view(-1, 1).long()
    if guide:
        cond = torch.cat([cond, torch.full_like(cond, model.config.num_classes)])
    mask = setup_caches(model, cond.shape[0], 1 + n)
    try:
        device = model.tok_embeddings.weight.device
        cond = cond.to(device)
        out = torch.empty(labels.shape[0], n, dtype=torch.long, device=device)
        h, pos = model.cls_embedding(cond), torch.arange(1, device=device)
        for i in range(n):
            logits = _step(model, h, pos, mask)
            if guide:
                c, u = logits.chunk(2)
                # (LlamaGen counts cfg_interval in decode steps, after the first token)
                logits = guided(c, u, cfg_scale) if (cfg_interval < 0 or i - 1 <= cfg_interval) else c
            token = _sample(logits, temperature, top_k, top_p, generator)
            out[:, i] = token[:, 0]
            if i + 1 < n:
                h = model.tok_embeddings(torch.cat([token, token]) if guide else token)
                pos = torch.tensor([1 + i], device=device)
        return out
    finally:
        clear_caches(model)


def class_labels(classes: int, count: int, mode: str = "balanced", seed: int = 0) -> torch.Tensor:
    """``count`` class labels: ``balanced``: 0, 0, ..., 1, 1, ... (every class ``count / classes`` times, a remainder
    spread evenly; VAR's 50 per class); ``random``: uniform draws (LlamaGen's sample_c2i_ddp)."""
    if mode == "balanced":
        return torch.arange(count) * classes // count if count >= classes else torch.arange(count) % classes
    if mode == "random":
        return torch.randint(0, classes, (count,), generator=torch.Generator().manual_seed(seed))
    raise ValueError(f"labels: '{mode}' is not one of balanced, random")


def sampling_options(section, config: LlamaGenConfig) -> dict:
    """``generate``'s keyword arguments from a config section (``calib.generate`` / ``eval.image``): its
    ``cfg_scale`` (null: the model's own ``config.cfg_scale``), ``top_k``, ``top_p``, ``temperature``."""
    scale = section.get("cfg_scale")
    return {"cfg_scale": float(config.cfg_scale if scale is None else scale), "top_k": int(section.get("top_k", 0)),
            "top_p": float(section.get("top_p", 1.0)), "temperature": float(section.get("temperature", 1.0))}


@torch.no_grad()
def sample_batches(model: LlamaGenForCausalLM, labels: torch.Tensor, batch_size: int, seed: int,
                   progress: bool = True, desc: str = "generate", **options) -> torch.Tensor:
    """``[n, block_size]`` image tokens for every label, ``batch_size`` at a time, from one generator seeded with
    ``seed`` on the model's device (the same tokens whatever else the process drew before)."""
    from tqdm.auto import tqdm

    device = model.tok_embeddings.weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for start in tqdm(range(0, len(labels), batch_size), desc=desc, unit="batch", disable=not progress):
        out.append(generate(model, labels[start : start + batch_size].to(device), generator=gen, **options).cpu())
    return torch.cat(out)


# --- official checkpoints ---------------------------------------------------------------------------------------
def official_state(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The GPT's state dict inside an official LlamaGen checkpoint file (``model``, ``module`` or ``state_dict``
    entry, as LlamaGen's sample scripts read it)."""
    for key in ("model", "module", "state_dict"):
        if key in checkpoint and isinstance(checkpoint[key], dict):
            return checkpoint[key]
    if all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint
    raise ValueError("not a LlamaGen checkpoint: no 'model', 'module' or 'state_dict' entry")


def config_for(size: str, image_size: int = 384, downsample: int = 16, **overrides) -> LlamaGenConfig:
    """The config of an official c2i model: ``size`` one of :data:`SIZES`, ``block_size = (image_size/downsample)^2``."""
    if size not in SIZES:
        raise ValueError(f"llamagen size '{size}' is unknown (known: {', '.join(SIZES)})")
    grid = image_size // downsample
    return LlamaGenConfig(**SIZES[size], block_size=grid * grid, image_size=image_size, downsample=downsample,
                          **overrides)


def from_official(state: dict[str, torch.Tensor], config: LlamaGenConfig) -> LlamaGenForCausalLM:
    """Our model holding an official checkpoint's weights (strict: every key must match)."""
    model = LlamaGenForCausalLM(config)
    model.load_state_dict(official_state(state), strict=True)
    return model.eval()


AutoConfig.register(LlamaGenConfig.model_type, LlamaGenConfig)
AutoModelForCausalLM.register(LlamaGenConfig, LlamaGenForCausalLM)
