"""The networks: the original's parameter counts, shapes for every U-Net knob, init, conditioning, errors."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

from ddpm.config import UNetConfig
from ddpm.models import LeNet5, UNet, build_unet, count_parameters, summary_table
from ddpm.models.unet import Attention, sinusoidal_table

T = 100


def unet(**overrides) -> UNet:
    torch.manual_seed(0)
    return build_unet(dataclasses.replace(UNetConfig(), **overrides), T)


def run(model: UNet, batch: int = 3, labels: torch.Tensor | None = None) -> torch.Tensor:
    cfg = model.cfg
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    t = torch.randint(0, T, (batch,))
    out = model(x, t, labels)
    assert out.shape == x.shape and torch.isfinite(out).all()
    return out


def perturb(model: torch.nn.Module) -> None:
    """Make every weight non-trivial (the default init zeroes the output conv, which hides everything)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))


def test_reference_unet_has_the_originals_parameter_count():
    assert count_parameters(unet()) == 403_409
    assert count_parameters(unet(init="flux")) == 403_409


def test_lenet_parameters_and_shapes():
    model = LeNet5()
    assert count_parameters(model) == 44_426
    x = torch.rand(5, 1, 28, 28)
    assert model(x).shape == (5, 10)
    feats = model.features(x)
    assert feats.shape == (5, 84) and (feats >= 0).all()  # post-ReLU activations


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"block": "convembed"},
        {"channel_multipliers": (1, 2)},
        {"channel_multipliers": (2, 4), "heads": 8},  # first multiplier != 1
        {"channel_multipliers": (1,), "image_size": 8},  # a single level: only the middle below it
        {"channel_multipliers": (1, 1, 2, 2), "image_size": 32, "base_channels": 8, "groups": 4},
        {"blocks_per_level": 2},
        {"blocks_per_level": 2, "block": "convembed", "middle_attention": False},
        {"middle_attention": False},
        {"in_channels": 3, "image_size": 16},
        {"init": "flux"},
    ],
)
def test_forward_shapes(overrides):
    """Every architecture keeps the input's shape and stays finite, checked on perturbed weights: the default
    init zeroes the output convolution, whose exact zeros would pass any finiteness check."""
    model = unet(**overrides)
    perturb(model)
    assert run(model).abs().max() > 0


def test_more_blocks_and_no_attention_change_the_size():
    base = count_parameters(unet())
    assert count_parameters(unet(blocks_per_level=2)) > base
    assert count_parameters(unet(middle_attention=False)) < base
    assert count_parameters(unet(block="convembed")) < base


def test_default_init_predicts_zero_noise_at_first():
    out = run(unet())
    assert torch.equal(out, torch.zeros_like(out))


def test_flux_init_zeroes_every_bias_and_is_not_trivial():
    model = unet(init="flux")
    biases = [p for name, p in model.named_parameters() if name.endswith("bias")]
    assert biases and all(torch.equal(b, torch.zeros_like(b)) for b in biases)
    assert run(model).abs().max() > 0  # unlike the default, the output conv is not zeroed


def test_conditional_model_uses_labels_and_the_null_label():
    model = unet(num_classes=10)
    assert model.num_classes == 10 and model.null_label == 10
    assert count_parameters(model) == 403_409 + 11 * 64  # one 4d row per class, plus the null label
    perturb(model)
    torch.manual_seed(1)
    x, t = torch.randn(4, 1, 28, 28), torch.randint(0, T, (4,))
    with torch.no_grad():
        unlabelled = model(x, t)
        null = model(x, t, torch.full((4,), model.null_label))
        threes = model(x, t, torch.full((4,), 3))
        sevens = model(x, t, torch.full((4,), 7))
    assert torch.equal(unlabelled, null)
    assert not torch.allclose(threes, sevens, atol=1e-4)
    assert not torch.allclose(threes, null, atol=1e-4)


def test_unconditional_model_rejects_labels():
    model = unet()
    assert model.num_classes == 0 and model.null_label is None
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.randn(2, 1, 28, 28), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))


def test_timestep_changes_the_output():
    model = unet()
    perturb(model)
    x = torch.randn(1, 1, 28, 28).repeat(2, 1, 1, 1)
    with torch.no_grad():
        out = model(x, torch.tensor([0, T - 1]))
    assert not torch.allclose(out[0], out[1], atol=1e-4)


def test_wrong_input_shape_is_rejected():
    model = unet()
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.randn(1, 1, 30, 30), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        model(torch.randn(1, 3, 28, 28), torch.zeros(1, dtype=torch.long))


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"base_channels": 10}, "unet.base_channels=10 is not divisible by unet.groups=8"),
        ({"base_channels": 12, "groups": 4, "channel_multipliers": (1, 3), "heads": 8}, "unet.heads=8"),
        ({"base_channels": 8, "groups": 16}, "unet.base_channels=8 is not divisible by unet.groups=16"),
        ({"channel_multipliers": (1, 1, 1, 1)}, "unet.image_size=28"),
        ({"block": "transformer"}, "unet.block"),
        ({"init": "kaiming"}, "unet.init"),
        ({"channel_multipliers": ()}, "unet.channel_multipliers"),
        ({"channel_multipliers": (1, 0)}, "unet.channel_multipliers"),
        ({"blocks_per_level": 0}, "unet.blocks_per_level"),
        ({"num_classes": -1}, "unet.num_classes"),
        ({"in_channels": 0}, "unet.in_channels"),
    ],
)
def test_invalid_configs_name_the_key(overrides, key):
    with pytest.raises(ValueError, match=re.escape(key)) as err:
        unet(**overrides)
    assert "unet." in str(err.value)


def test_sinusoidal_table_matches_the_original_formula():
    table = sinusoidal_table(T, 64)  # row t holds Julia's position t + 1
    assert table.shape == (T, 64)
    pos, row = 5, 10  # W[row, pos] = sin(pos / 1e4^(row / (dim - 2))), W[row + 1, pos] = cos(...)
    angle = pos / 10_000 ** (row / 62)
    assert table[pos - 1, row].item() == pytest.approx(math.sin(angle), abs=1e-6)
    assert table[pos - 1, row + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_attention_matches_a_per_head_loop():
    torch.manual_seed(0)
    attn, x = Attention(12, heads=3), torch.randn(2, 12, 5, 5)
    q, k, v = attn.to_qkv(x).flatten(2).chunk(3, dim=1)  # [b, c, n] each
    heads = []
    for h in range(3):  # head h owns channels 4h..4h+3 of each of q, k, v
        qh, kh, vh = (z[:, 4 * h : 4 * h + 4] for z in (q, k, v))
        weights = torch.softmax(qh.transpose(1, 2) @ kh / 2.0, dim=-1)  # [b, n_query, n_key], 1/sqrt(4)
        heads.append(vh @ weights.transpose(1, 2))
    expected = attn.to_out(torch.cat(heads, dim=1).view(2, 12, 5, 5))
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-4)


def test_heads_are_ignored_without_attention():
    run(unet(heads=5, middle_attention=False))


def test_summary_table():
    table = summary_table(unet(), "UNet")
    assert "403,409" in table.splitlines()[-1]
    assert "mid_attn.to_qkv" in table and "GroupNorm" in table and "62,208" in table
    assert "44,426" in summary_table(LeNet5(), "LeNet-5")


def test_backward_gives_finite_gradients_everywhere():
    model = unet(num_classes=10)
    perturb(model)
    x, t = torch.randn(2, 1, 28, 28), torch.randint(0, T, (2,))
    loss = (model(x, t, torch.tensor([1, 10])) - torch.randn_like(x)).pow(2).mean()
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["final.weight"].abs().sum() > 0 and grads["time_embed.1.weight"].abs().sum() > 0
