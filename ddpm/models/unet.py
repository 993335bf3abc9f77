"""The denoising U-Net, ported from Lior Sinai's DenoisingDiffusion.jl ("Denoising diffusion on MNIST").

Structure (d = base_channels, chs = [d, d*m1, d*m2, ...], one level per multiplier):

    t -> sinusoidal(4d) -> Dense 4d->4d gelu -> Dense 4d->4d  (+ label embedding)  = emb
    x -> init conv 3x3 -> level 1 -> ... -> level L -> middle -> level L -> ... -> level 1 -> final conv 3x3

Down level i: [4x4 stride-2 conv chs[i-1]->chs[i] if i > 1], blocks_per_level blocks chs[i]->chs[i].
Middle:       3x3 conv chs[L]->chs[L+1], block, [x + attention(x), block].
Up level i:   concat(skip, h), block chs[i]+chs[i+1] -> chs[i+1], more blocks, [nearest x2 + 3x3 conv].

Parameter layouts match Flux's, so the reference config has the original's 403,409 parameters:
Dense and Conv have biases, GroupNorm is affine (gamma, beta), the sinusoidal table is a fixed buffer
(Flux marks it non-trainable), and attention is the original's conv attention (3x3 conv to q, k, v without
bias, 3x3 conv out with bias) rather than torch's nn.MultiheadAttention (linear projections, all biased).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddpm.config import UNetConfig
from ddpm.schema import check_unet


def null_label(cfg: UNetConfig) -> int | None:
    """The reserved label of classifier-free guidance's unconditional branch: the label embedding's last row,
    after the num_classes digits (None: an unconditional model has no labels)."""
    return cfg.num_classes if cfg.num_classes > 0 else None


def sinusoidal_table(timesteps: int, dim: int, n: float = 10_000.0) -> Tensor:
    """[timesteps, dim] table of interleaved (sin, cos) pairs, exactly as the original builds it.

    Julia indexes positions 1..T, so our t = 0..T-1 reads position t + 1; the frequency exponent divides by
    dim - 2 (not dim) so the last pair has frequency 1/n.
    """
    pos = torch.arange(1, timesteps + 1, dtype=torch.float64)[:, None]
    rows = torch.arange(0, dim, 2, dtype=torch.float64)
    angles = pos / n ** (rows / max(dim - 2, 1))
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1).float()


class SinusoidalEmbedding(nn.Module):
    def __init__(self, timesteps: int, dim: int):
        super().__init__()
        # A buffer, not a parameter: it is fixed, and rebuilt on load rather than stored in checkpoints.
        self.register_buffer("table", sinusoidal_table(timesteps, dim), persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        return self.table[t]


class ConvEmbed(nn.Module):
    """act(norm(conv(x)) + dense(swish(emb))): each embedding value is projected onto the output channels."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int):
        super().__init__()
        self.embed = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, c_out))
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm = nn.GroupNorm(groups, c_out)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return F.silu(self.norm(self.conv(x)) + self.embed(emb)[:, :, None, None])


class ResBlock(nn.Module):
    """ConvEmbed -> conv -> norm -> swish, plus a residual (a 3x3 conv when the channel count changes)."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int):
        super().__init__()
        self.in_layers = ConvEmbed(c_in, c_out, emb_dim, groups)
        self.out_layers = nn.Sequential(
            nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(groups, c_out), nn.SiLU()
        )
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 3, padding=1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.out_layers(self.in_layers(x, emb)) + self.skip(x)


class Attention(nn.Module):
    """Multi-head self-attention over pixels, with 3x3 convs as the projections (as in the original)."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Conv2d(channels, 3 * channels, 3, padding=1, bias=False)
        self.to_out = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        # Channels split into q, k, v, then each into heads of c // heads consecutive channels.
        q, k, v = self.to_qkv(x).view(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # [b, heads, hw, dh], softmax over keys, 1/sqrt(dh)
        return self.to_out(out.transpose(-1, -2).reshape(b, c, h, w))


def downsample(c_in: int, c_out: int) -> nn.Module:
    return nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)


def upsample(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, padding=1))


BLOCK_CLASSES = {"resblock": ResBlock, "convembed": ConvEmbed}  # keys: ddpm.schema.BLOCKS


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig, timesteps: int):
        super().__init__()
        check_unet(cfg)  # the config module owns the rules; a hand-made UNetConfig is checked too
        if timesteps < 1:
            raise ValueError(f"timesteps={timesteps} must be >= 1")
        self.cfg, self.timesteps = cfg, timesteps
        self.num_classes = cfg.num_classes
        self.null_label = null_label(cfg)
        d, n, levels = cfg.base_channels, cfg.blocks_per_level, len(cfg.channel_multipliers)
        chs = [d] + [d * m for m in cfg.channel_multipliers]
        emb_dim = 4 * d
        self.factor = 2 ** (levels - 1)

        def block(c_in: int, c_out: int) -> nn.Module:
            return BLOCK_CLASSES[cfg.block](c_in, c_out, emb_dim, cfg.groups)

        # The original embeds straight to 4d (not d) before the MLP; that is part of its 403,409.
        self.time_embed = nn.Sequential(
            SinusoidalEmbedding(timesteps, emb_dim),
            nn.Linear(emb_dim, emb_dim),
            nn.GELU(approximate="tanh"),  # NNlib's gelu is the tanh approximation
            nn.Linear(emb_dim, emb_dim),
        )
        # Added to the time embedding (the original's UNetConditioned can also vcat them, doubling emb_dim).
        self.label_embed = nn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes > 0 else None

        self.init = nn.Conv2d(cfg.in_channels, d, 3, padding=1)
        self.down = nn.ModuleList(
            nn.ModuleList(block(chs[i], chs[i]) for _ in range(n)) for i in range(levels)
        )
        self.downsample = nn.ModuleList(downsample(chs[i - 1], chs[i]) for i in range(1, levels))
        self.mid_conv = nn.Conv2d(chs[-2], chs[-1], 3, padding=1)
        self.mid_block1 = block(chs[-1], chs[-1])
        self.mid_attn = Attention(chs[-1], cfg.heads) if cfg.middle_attention else None
        self.mid_block2 = block(chs[-1], chs[-1]) if cfg.middle_attention else None
        # Going up, a level's first block also takes the skip from its way down.
        self.up = nn.ModuleList(
            nn.ModuleList(block((chs[i] if j == 0 else 0) + chs[i + 1], chs[i + 1]) for j in range(n))
            for i in range(levels)
        )
        self.upsample = nn.ModuleList(upsample(chs[i + 1], chs[i]) for i in range(1, levels))
        # The original maps d -> in_channels, which only fits when channel_multipliers[0] == 1;
        # chs[1] always fits and is the same layer in that case.
        self.final = nn.Conv2d(chs[1], cfg.in_channels, 3, padding=1)
        self._init_weights(cfg.init)

    def _init_weights(self, init: str) -> None:
        if init == "flux":  # Flux's defaults: Glorot-uniform weights, zero biases (norms stay 1, 0)
            for m in self.modules():
                if isinstance(m, nn.Conv2d | nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
        else:  # PyTorch's defaults, but the model starts by predicting zero noise, which trains more stably
            nn.init.zeros_(self.final.weight)
            nn.init.zeros_(self.final.bias)

    def embed(self, t: Tensor, labels: Tensor | None) -> Tensor:
        emb = self.time_embed(t)
        if self.label_embed is None:
            if labels is not None:
                raise ValueError("this UNet is unconditional (unet.num_classes=0): call it without labels")
            return emb
        if labels is None:
            labels = torch.full_like(t, self.null_label)
        return emb + self.label_embed(labels)

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        """Predicted noise for images x [B, C, H, W] at timesteps t [B] in 0..T-1, optionally labelled."""
        c, f = self.cfg.in_channels, self.factor
        if x.ndim != 4 or x.shape[1] != c or x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(
                f"UNet expects [B, {c}, H, W] with H and W divisible by {f}; got {tuple(x.shape)}"
            )
        emb = self.embed(t, labels)
        h = self.init(x)
        skips = []
        for i, blocks in enumerate(self.down):
            if i > 0:
                h = self.downsample[i - 1](h)
            for blk in blocks:
                h = blk(h, emb)
            skips.append(h)
        h = self.mid_block1(self.mid_conv(h), emb)
        if self.mid_attn is not None:
            h = self.mid_block2(h + self.mid_attn(h), emb)
        for i in reversed(range(len(self.up))):
            h = torch.cat([skips.pop(), h], dim=1)  # skip first, as the original's cat(x, h)
            for blk in self.up[i]:
                h = blk(h, emb)
            if i > 0:
                h = self.upsample[i - 1](h)
        return self.final(h)


def build_unet(cfg: UNetConfig, timesteps: int) -> UNet:
    return UNet(cfg, timesteps)
