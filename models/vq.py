"""The VQ image tokenizer of LlamaGen (``tokenizer/tokenizer_image/vq_model.py``: VQ-16), our own code (docs/imagegen.md).

A convolutional encoder maps ``[b, c, H, W]`` pixels in [-1, 1] to a ``[b, e, H/f, W/f]`` grid (``f = 2^(levels-1)``),
each vector is replaced by its nearest codebook entry (entries and vectors L2-normalised when ``l2_norm``), and the
decoder maps the quantized grid back to pixels. Module names are LlamaGen's, so an official ``vq_ds16_c2i.pt`` loads as
it is (its ``quantize.codebook_used`` usage counter, a training statistic, is dropped). ``in_channels`` /
``out_channels`` are configurable (LlamaGen: 3) so that the bundled tiny tokenizer works on grey images.

The folder layout is ``config.json`` + ``model.safetensors`` (:meth:`VQModel.save_pretrained`); a LlamaGen checkpoint
folder keeps its tokenizer in the ``vq`` subfolder (``LlamaGenConfig.vq``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


@dataclass
class VQConfig:
    """LlamaGen's VQ ``ModelArgs`` (defaults: VQ-16) plus the encoder's width and the image channels."""

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    encoder_ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    decoder_ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    z_channels: int = 256
    ch: int = 128
    num_res_blocks: int = 2
    in_channels: int = 3
    out_channels: int = 3
    norm_groups: int = 32
    image_size: int = 256  # the resolution it is used at (informational: the network is fully convolutional)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.encoder_ch_mult) - 1)


def swish(x):
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv2(swish(self.norm2(self.conv1(swish(self.norm1(x))))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the spatial positions (1x1 convolutions for q, k, v, out)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        b, c, hh, ww = x.shape
        q = self.q(h).reshape(b, c, -1).permute(0, 2, 1)
        k = self.k(h).reshape(b, c, -1)
        w = torch.softmax(torch.bmm(q, k) * c**-0.5, dim=2)
        out = torch.bmm(self.v(h).reshape(b, c, -1), w.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (no asymmetric padding in torch's conv)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(cin: int, cout: int, blocks: int, groups: int, attention: bool) -> tuple[nn.Module, int]:
    level = nn.Module()
    level.res, level.attn = nn.ModuleList(), nn.ModuleList()
    for _ in range(blocks):
        level.res.append(ResnetBlock(cin, cout, groups))
        cin = cout
        if attention:
            level.attn.append(AttnBlock(cin, groups))
    return level, cin


def _middle(channels: int, groups: int) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(channels, channels, groups), AttnBlock(channels, groups),
                          ResnetBlock(channels, channels, groups)])


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for i, res in enumerate(level.res):
        h = res(h)
        if len(level.attn):
            h = level.attn[i](h)
    return h


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        mult, ch, g = cfg.encoder_ch_mult, cfg.ch, cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        cin = ch
        for i, m in enumerate(mult):
            level, cin = _level(cin, ch * m, cfg.num_res_blocks, g, attention=i == len(mult) - 1)
            if i != len(mult) - 1:
                level.downsample = Downsample(cin)
            self.conv_blocks.append(level)
        self.mid = _middle(cin, g)
        self.norm_out = nn.GroupNorm(g, cin, eps=1e-6)
        self.conv_out = nn.Conv2d(cin, cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        mult, ch, g = cfg.decoder_ch_mult, cfg.ch, cfg.norm_groups
        cin = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = _middle(cin, g)
        self.conv_blocks = nn.ModuleList()
        for i in reversed(range(len(mult))):
            level, cin = _level(cin, ch * mult[i], cfg.num_res_blocks + 1, g, attention=i == len(mult) - 1)
            if i != 0:
                level.upsample = Upsample(cin)
            self.conv_blocks.append(level)
        self.norm_out = nn.GroupNorm(g, cin, eps=1e-6)
        self.conv_out = nn.Conv2d(cin, cfg.out_channels, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    def __init__(self, size: int, dim: int, l2_norm: bool):
        super().__init__()
        self.embedding = nn.Embedding(size, dim)
        self.l2_norm = l2_norm

    def codebook(self) -> torch.Tensor:
        return F.normalize(self.embedding.weight, dim=-1) if self.l2_norm else self.embedding.weight

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Codebook index of each vector of ``z`` ``[n, e]``: argmin of ``|z|^2 + |e|^2 - 2 z.e`` (after L2
        normalisation of both when ``l2_norm``), as LlamaGen computes it."""
        book = self.codebook()
        if self.l2_norm:
            z = F.normalize(z, dim=-1)
        d = (z * z).sum(1, keepdim=True) + (book * book).sum(1) - 2 * z @ book.t()
        return d.argmin(dim=1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        return self.codebook()[codes]


class VQModel(nn.Module):
    """Encoder, quantizer, decoder; the image tokenizer of a LlamaGen model."""

    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config.codebook_size, config.codebook_embed_dim, config.codebook_l2_norm)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, 1)

    def latents(self, images: torch.Tensor) -> torch.Tensor:
        """``[b, e, h, w]`` encoder output before quantization."""
        return self.quant_conv(self.encoder(images))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels ``[b, c, H, W]`` in [-1, 1] -> codes ``[b, h * w]`` (row-major grid, LlamaGen's token order)."""
        z = self.latents(images)
        b, e, h, w = z.shape
        return self.quantize.nearest(z.permute(0, 2, 3, 1).reshape(-1, e)).view(b, h * w)

    def decode_code(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[b, h * w]`` (a square grid) -> pixels ``[b, c, H, W]`` (about [-1, 1])."""
        b, n = codes.shape
        side = int(round(n**0.5))
        if side * side != n:
            raise ValueError(f"vq: {n} codes per image are not a square grid")
        z = self.quantize.lookup(codes.reshape(-1)).view(b, side, side, -1).permute(0, 3, 1, 2).contiguous()
        return self.decoder(self.post_quant_conv(z))

    # --- storage --------------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(json.dumps({"model_type": "llamagen-vq", **asdict(self.config)},
                                                        indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(directory / WEIGHTS_FILE))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> VQModel:
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{directory}: no VQ tokenizer ({CONFIG_FILE} missing)")
        raw = json.loads((directory / CONFIG_FILE).read_text())
        raw.pop("model_type", None)
        model = cls(VQConfig(**raw))
        model.load_official(load_file(str(directory / WEIGHTS_FILE)))
        return model.eval()

    def load_official(self, state: dict[str, torch.Tensor]) -> None:
        """Load a LlamaGen VQ state dict strictly (its training-only usage counter dropped)."""
        state = {k: v for k, v in state.items() if k != "quantize.codebook_used"}
        self.load_state_dict(state, strict=True)


class VQTokenizer:
    """The tokenizer of an image generator: its VQ model, kept in ``subfolder`` of the generator's checkpoint (a
    saved pruned generator carries its tokenizer as a saved text model carries its tokenizer files)."""

    def __init__(self, vq: VQModel, subfolder: str = "vq", name_or_path: str = ""):
        self.vq, self.subfolder, self.name_or_path = vq, subfolder, name_or_path

    @classmethod
    def from_pretrained(cls, directory: str | Path, subfolder: str = "vq") -> VQTokenizer:
        return cls(VQModel.from_pretrained(Path(directory) / subfolder), subfolder, str(directory))

    def save_pretrained(self, directory: str | Path) -> None:
        self.vq.save_pretrained(Path(directory) / self.subfolder)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.vq.encode(images)

    def decode_code(self, codes: torch.Tensor) -> torch.Tensor:
        return self.vq.decode_code(codes)
