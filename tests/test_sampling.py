"""Samplers with small stand-in networks: per-image reproducibility, DDIM against an independent update,
an analytic oracle for Gaussian data, classifier-free guidance, animation frames and x0 clipping."""

import math
import re
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

from ddpm.config import DiffusionConfig
from ddpm.diffusion import GaussianDiffusion
from ddpm.noise import PerImageNoise, image_seeds, make_noise
from ddpm.samplers import SAMPLERS, SamplerSpec
from ddpm.sampling import STEPS, ddim_timesteps, guided_eps, sample

# The samplers through the one loop (`ddpm.sampling.sample`), by their registered names.
ddpm_sample = partial(sample, sampler="ddpm")
ddim_sample = partial(sample, sampler="ddim")
dpm_solver_sample = partial(sample, sampler="dpm++2m")

SHAPE = (1, 8, 8)


def diffusion(T=20):
    return GaussianDiffusion.from_config(DiffusionConfig(timesteps=T))


def cosine_alpha_bars(T: int) -> np.ndarray:
    """alpha_bar from the closed form (Nichol & Dhariwal, s = 0.008), independently of the code under test."""
    f = [math.cos(((t / T) + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(T + 1)]
    return np.cumprod([1 - min(1 - f[t + 1] / f[t], 0.999) for t in range(T)])


class TinyNet(nn.Module):
    """A random conv net with time and (optional) label embeddings; each row is processed independently."""

    def __init__(self, T=20, num_classes=0, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.num_classes, self.null_label = num_classes, num_classes
        self.conv1, self.conv2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 1, 3, padding=1)
        self.temb = nn.Embedding(T, 8)
        self.lemb = nn.Embedding(num_classes + 1, 8) if num_classes else None
        self.training_seen = []

    def forward(self, x, t, labels):
        self.training_seen.append(self.training)
        h = self.conv1(x) + self.temb(t)[:, :, None, None]
        if self.lemb is not None and labels is not None:
            h = h + self.lemb(labels)[:, :, None, None]
        return self.conv2(torch.tanh(h))


class GaussianOracle(nn.Module):
    """The exact E[eps | x_t] when the data is N(mu, sigma^2 I): x_t ~ N(sqrt(ab) mu, ab sigma^2 + 1 - ab)."""

    num_classes = 0

    def __init__(self, alpha_bars, mu, sigma):
        super().__init__()
        self.ab, self.mu, self.sigma = alpha_bars, mu, sigma

    def forward(self, x, t, labels):
        ab = self.ab[t].view(-1, 1, 1, 1).to(x.dtype)
        return (1 - ab).sqrt() * (x - ab.sqrt() * self.mu) / (ab * self.sigma**2 + 1 - ab)


# --- per-image noise ----------------------------------------------------------------------------------------


def test_image_seeds_deterministic_and_index_based():
    seeds = image_seeds(1234, 0, 8)
    assert seeds == image_seeds(1234, 0, 8)
    assert image_seeds(1234, 3, 5) == seeds[3:]  # depends on the global index, not on the chunk
    assert len(set(seeds)) == 8 and all(0 <= s < 2**63 for s in seeds)
    assert not set(seeds) & set(image_seeds(1235, 0, 8))
    with pytest.raises(ValueError):
        image_seeds(-1, 0, 1)


def test_per_image_noise_rows_come_from_their_own_generator():
    seeds = [5, 7, 11]
    noise = PerImageNoise(seeds, SHAPE)
    first, second = noise.randn(), noise.randn()
    assert first.shape == (3, *SHAPE) and first.dtype == torch.float32 and len(noise) == 3
    for i, s in enumerate(seeds):
        g = torch.Generator().manual_seed(s)
        assert torch.equal(first[i], torch.randn(SHAPE, generator=g))
        assert torch.equal(second[i], torch.randn(SHAPE, generator=g))
    # Same seed in a different batch position or company: same noise.
    assert torch.equal(PerImageNoise([11], SHAPE).randn()[0], first[2])
    assert torch.equal(
        PerImageNoise.for_range(1, 2, 2, SHAPE).randn(), PerImageNoise.for_range(1, 0, 4, SHAPE).randn()[2:]
    )


def run_registered(name, model, d, noise, **kwargs):
    """Any registered sampler, with the options the tests give it: 10 steps for the few-step samplers, eta 0.5
    for those that take it (DDIM with noise)."""
    chosen = SAMPLERS[name]
    options = ({"steps": 10} if chosen.takes_steps else {}) | ({"eta": 0.5} if "eta" in chosen.options else {})
    return sample(model, d, noise, sampler=name, **options, **kwargs)


@pytest.mark.parametrize("noise_kind", ["generator", "philox"])
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_same_images_in_one_batch_or_two(sampler, noise_kind):
    d, model = diffusion(), TinyNet(num_classes=10)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    kwargs = dict(guidance_scale=3.0, keep_every=5)

    def run(start, count):
        noise = make_noise(noise_kind, image_seeds(42, start, count), SHAPE)
        return run_registered(sampler, model, d, noise, labels=labels[start : start + count], null_label=10, **kwargs)

    whole, parts = run(0, 8), [run(0, 4), run(4, 4)]
    torch.testing.assert_close(whole.images, torch.cat([p.images for p in parts]), atol=1e-6, rtol=0)
    for k in range(len(whole.xt_frames)):
        torch.testing.assert_close(
            whole.xt_frames[k], torch.cat([p.xt_frames[k] for p in parts]), atol=1e-6, rtol=0
        )
    assert not torch.allclose(whole.images[:4], whole.images[4:])  # sanity: the images do differ


# --- DDIM ---------------------------------------------------------------------------------------------------


MNIST_TRAIN_SHARES = (0.0987, 0.1124, 0.0993, 0.1022, 0.0974, 0.0904, 0.0986, 0.1044, 0.0975, 0.0991)


@pytest.mark.parametrize("shares", [(), MNIST_TRAIN_SHARES, (0.5, 0.5, 0, 0, 0, 0, 0, 0, 0, 0)])
def test_labels_follow_the_shares_in_every_window_and_ignore_sharding(shares):
    """Any run of consecutive images (an epoch's first 500, a shard, all 10,000) holds each digit within two
    images of its share; a digit of share 0 never appears; an image's label depends on its index alone."""
    from ddpm.config import UNetConfig
    from ddpm.generate import labels_for

    unet = UNetConfig(num_classes=10, label_shares=shares)
    p = torch.tensor(shares or [1.0] * 10, dtype=torch.float64)
    p /= p.sum()
    for start in (0, 7, 500, 9_999):
        for n in (40, 500, 10_000):
            counts = torch.bincount(labels_for(start, n, unet), minlength=10)
            assert (counts - n * p).abs().max() <= 2 + 1e-9, (start, n, counts.tolist())
            assert (counts[p == 0] == 0).all()
    whole = labels_for(0, 1_000, unet)
    assert torch.equal(whole, torch.cat([labels_for(0, 333, unet), labels_for(333, 667, unet)]))
    assert labels_for(0, 10, UNetConfig()) is None  # unconditional: no labels


def test_ddim_timesteps():
    assert ddim_timesteps(20, 20) == list(range(19, -1, -1))
    assert ddim_timesteps(100, 1) == [99]
    seq = ddim_timesteps(100, 10)
    assert (
        len(seq) == 10
        and seq[0] == 99
        and seq[-1] == 0
        and all(a > b for a, b in zip(seq, seq[1:], strict=False))
    )
    assert max(np.diff(seq)) - min(np.diff(seq)) <= 1  # evenly spaced up to rounding
    for bad in (0, 101):
        with pytest.raises(ValueError):
            ddim_timesteps(100, bad)


def test_ddim_eta0_matches_independent_update():
    T = 20
    d, model = diffusion(T), TinyNet(T)
    ab = cosine_alpha_bars(T)
    seeds = image_seeds(0, 0, 6)
    out = ddim_sample(model, d, PerImageNoise(seeds, SHAPE), steps=T, eta=0.0, clip_x0=False)

    x = PerImageNoise(seeds, SHAPE).randn().double()
    with torch.no_grad():
        for t in range(T - 1, -1, -1):
            eps = model(x.float(), torch.full((6,), t), None).double()
            x0 = (x - math.sqrt(1 - ab[t]) * eps) / math.sqrt(ab[t])
            a_prev = ab[t - 1] if t > 0 else 1.0
            x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    torch.testing.assert_close(out.images, x.clamp(-1, 1).float(), atol=1e-4, rtol=1e-4)


def test_ddim_eta1_full_steps_is_ddpm():
    d, model = diffusion(), TinyNet()
    seeds = image_seeds(9, 0, 4)
    a = ddpm_sample(model, d, PerImageNoise(seeds, SHAPE))
    b = ddim_sample(model, d, PerImageNoise(seeds, SHAPE), steps=20, eta=1.0)
    torch.testing.assert_close(a.images, b.images, atol=1e-4, rtol=1e-4)


# --- analytic oracle ----------------------------------------------------------------------------------------


def exact_output_law(sampler, T, seq, eta, mu, sigma):
    """Mean and std of the sampler's output for N(mu, sigma^2) data and the oracle, in closed form.

    With the oracle each step is x' = k0 + k1 x + s z, so x stays Gaussian: m' = k0 + k1 m, V' = k1^2 V + s^2.
    """
    ab = cosine_alpha_bars(T)
    m, V = 0.0, 1.0
    for i, t in enumerate(seq):
        a = ab[t]
        a_prev = ab[seq[i + 1]] if i + 1 < len(seq) else 1.0
        v = a * sigma**2 + 1 - a
        e1, e0 = math.sqrt(1 - a) / v, -math.sqrt(1 - a) * math.sqrt(a) * mu / v  # eps_hat = e0 + e1 x
        p1, p0 = (1 - math.sqrt(1 - a) * e1) / math.sqrt(a), -math.sqrt(1 - a) * e0 / math.sqrt(a)  # x0_hat
        if sampler == "ddpm":  # posterior q(x_{t-1} | x_t, x0_hat) of Ho et al.
            beta = 1 - a / a_prev
            c1, c2 = beta * math.sqrt(a_prev) / (1 - a), (1 - a_prev) * math.sqrt(1 - beta) / (1 - a)
            k0, k1, s = c1 * p0, c1 * p1 + c2, math.sqrt(beta * (1 - a_prev) / (1 - a))
        else:
            s = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
            c = math.sqrt(1 - a_prev - s**2)
            k0, k1 = math.sqrt(a_prev) * p0 + c * e0, math.sqrt(a_prev) * p1 + c * e1
        m, V = k0 + k1 * m, k1**2 * V + s**2
    return m, math.sqrt(V)


@pytest.mark.parametrize(
    "sampler, steps, eta",
    [("ddpm", 100, None), ("ddim", 100, 0.0), ("ddim", 100, 1.0), ("ddim", 25, 0.0), ("ddim", 40, 0.5)],
)
def test_oracle_recovers_gaussian_data(sampler, steps, eta):
    """Data ~ N(mu, sigma^2 I): the exact eps predictor is known, so the output law is too."""
    T, mu, sigma = 100, 0.3, 0.5
    d = diffusion(T)
    oracle = GaussianOracle(d.alpha_bars, mu, sigma)
    noise = PerImageNoise(image_seeds(7, 0, 512), SHAPE)  # 32,768 independent pixels
    # keep_every > steps keeps only the last, unclamped x; `images` is clamped to [-1, 1], a bias here.
    if sampler == "ddpm":
        out = ddpm_sample(oracle, d, noise, clip_x0=False, keep_every=1000)
    else:
        out = ddim_sample(oracle, d, noise, steps=steps, eta=eta, clip_x0=False, keep_every=1000)
    (x,) = out.xt_frames
    # 1. The sampler implements its recursion: matches the closed-form law within sampling error (sd < 0.003).
    seq = list(range(T - 1, -1, -1)) if sampler == "ddpm" else ddim_timesteps(T, steps)
    m, s = exact_output_law(sampler, T, seq, eta, mu, sigma)
    assert x.mean().item() == pytest.approx(m, abs=0.012)
    assert x.std().item() == pytest.approx(s, abs=0.012)
    # 2. With all T steps the law is close to the data's (fewer steps shrink the variance: a known bias).
    if steps == T:
        assert x.mean().item() == pytest.approx(mu, abs=0.02)
        assert x.std().item() == pytest.approx(sigma, abs=0.03)


# --- guidance -----------------------------------------------------------------------------------------------


class LabelEcho(nn.Module):
    """eps = 1 for the null label and 2 + label for a real one; records the batch of each call."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.num_classes, self.null_label = num_classes, num_classes
        self.calls = []

    def forward(self, x, t, labels):
        self.calls.append(None if labels is None else labels.clone())
        if labels is None:
            return torch.full_like(x, -1.0)
        value = torch.where(labels == self.null_label, 1.0, 2.0 + labels.float())
        return value.view(-1, 1, 1, 1).expand_as(x).clone()


def test_guided_eps_formula():
    x, t = torch.zeros(3, *SHAPE), torch.zeros(3, dtype=torch.long)
    labels = torch.tensor([0, 4, 9])
    cond, uncond = (2.0 + labels.float()).view(-1, 1, 1, 1), 1.0
    for w, expected in [
        (0.0, uncond),
        (1.0, cond),
        (3.0, uncond + 3 * (cond - uncond)),
        (-0.5, 1.5 - 0.5 * cond),
    ]:
        model = LabelEcho()
        eps = guided_eps(model, x, t, labels, w, null_label=10)
        torch.testing.assert_close(eps, torch.as_tensor(expected).expand_as(x))
        # w = 0 and w = 1 need one branch; otherwise two calls of B (not one of 2B), conditional then null.
        assert len(model.calls) == (1 if w in (0.0, 1.0) else 2)
    assert torch.equal(model.calls[0], torch.tensor([0, 4, 9])) and torch.equal(model.calls[1], torch.tensor([10] * 3))


def test_guided_eps_unconditional_paths():
    x, t = torch.zeros(2, *SHAPE), torch.zeros(2, dtype=torch.long)
    model = LabelEcho()
    assert (guided_eps(model, x, t, None, 3.0, null_label=10) == -1).all()  # no labels: the plain call
    assert model.calls == [None]
    with pytest.raises(ValueError, match="null_label"):  # guidance needs the null label from the caller
        guided_eps(model, x, t, torch.tensor([1, 2]), 3.0)


# --- frames, clipping, modes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "keep_every, expected_t", [(0, []), (5, [15, 10, 5, 0]), (3, [17, 14, 11, 8, 5, 2, 0])]
)
def test_ddpm_keep_every(keep_every, expected_t):
    out = ddpm_sample(TinyNet(), diffusion(), PerImageNoise([1, 2], SHAPE), keep_every=keep_every)
    assert out.timesteps == expected_t
    assert len(out.xt_frames) == len(out.x0_frames) == len(expected_t)
    assert all(f.shape == (2, *SHAPE) for f in out.xt_frames + out.x0_frames)
    if expected_t:
        torch.testing.assert_close(out.xt_frames[-1].clamp(-1, 1), out.images)


def test_ddim_keep_every():
    out = ddim_sample(TinyNet(), diffusion(), PerImageNoise([1], SHAPE), steps=10, keep_every=4)
    seq = ddim_timesteps(20, 10)
    assert out.timesteps == [seq[3], seq[7], seq[9]] and len(out.x0_frames) == 3


class Overshoot(nn.Module):
    """Predicts noise pointing the wrong way, so the raw x0 estimate leaves [-1, 1]."""

    num_classes = 0

    def forward(self, x, t, labels):
        return -3 * x


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_clip_x0(sampler):
    def run(clip):
        return run_registered(sampler, Overshoot(), diffusion(), PerImageNoise([3, 4], SHAPE), clip_x0=clip,
                              keep_every=1)

    clipped, raw = run(True), run(False)
    assert all(f.abs().max() <= 1 for f in clipped.x0_frames)
    assert max(f.abs().max() for f in raw.x0_frames) > 1  # sanity: clipping had something to do
    assert clipped.images.abs().max() <= 1 and raw.images.abs().max() <= 1


def test_eval_mode_restored_and_labels_checked():
    model = TinyNet(num_classes=10).train()
    ddim_sample(
        model, diffusion(), PerImageNoise([1, 2], SHAPE), steps=3, labels=torch.tensor([1, 2]), progress=True
    )
    assert model.training and model.training_seen and not any(model.training_seen)
    with pytest.raises(ValueError, match="labels"):
        ddpm_sample(model, diffusion(), PerImageNoise([1, 2], SHAPE), labels=torch.tensor([1]))


def test_pixel_conversions_round_trip():
    from ddpm.pixels import model_to_uint8, model_to_unit, uint8_to_model

    x = torch.tensor([-1.5, -1.0, -0.999, 0.0, 0.5, 1.0, 2.0])
    out = model_to_uint8(x)
    assert out.dtype == torch.uint8
    assert out.tolist() == [0, 0, 0, 128, 191, 255, 255]
    every = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(model_to_uint8(uint8_to_model(every)), every)  # exact round trip of every pixel value
    assert uint8_to_model(every).min() == -1 and uint8_to_model(every).max() == 1
    torch.testing.assert_close(model_to_unit(uint8_to_model(every)), every.float() / 255)


def test_bf16_sampling_runs_the_network_in_bf16_and_stays_close():
    """sample.bf16 autocasts the network (its convolutions see bf16 inputs) and keeps the sampler in float32:
    images near the float32 ones, not equal to them."""
    from ddpm.config import load_config
    from ddpm.generate import image_noise, run_sampler
    from ddpm.models import build_unet

    torch.manual_seed(0)
    seen = []
    model = build_unet(load_config("smoke").unet, 20).eval()
    with torch.no_grad():  # the output convolution starts at zero: give the network something to say
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    images = {}
    for bf16 in (False, True):
        cfg = load_config("smoke", overrides={"sample.sampler": "dpm++2m-sde", "sample.bf16": str(bf16)})
        images[bf16] = run_sampler(model, GaussianDiffusion.from_config(cfg.diffusion), cfg,
                                   image_noise(cfg, 0, 8), None).images
    assert set(seen[: len(seen) // 2]) == {torch.float32} and set(seen[len(seen) // 2:]) == {torch.bfloat16}
    assert images[True].dtype == torch.float32
    difference = (images[True] - images[False]).abs()
    assert 0 < difference.mean() < 0.05, difference.mean()


# --- the registry and its specs ------------------------------------------------------------------------------


def test_every_registered_sampler_has_a_step_and_every_step_a_name():
    assert list(STEPS) == list(SAMPLERS)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_the_sampler_decides_how_many_steps_it_runs(name):
    """DDPM runs all T whatever it is given; the others run the count they are given and refuse to guess one.
    The loop runs exactly what the sampler decides."""
    chosen, T = SAMPLERS[name], 20
    if chosen.takes_steps:
        assert chosen.num_steps(7, T) == 7
        with pytest.raises(ValueError, match=re.escape(f"the {name} sampler needs a number of steps")):
            chosen.num_steps(None, T)
        with pytest.raises(ValueError, match="needs a number of steps"):
            sample(TinyNet(), diffusion(T), PerImageNoise([1], SHAPE), sampler=name)
    else:
        assert chosen.num_steps(7, T) == chosen.num_steps(None, T) == T
    out = sample(TinyNet(), diffusion(T), PerImageNoise([1], SHAPE), sampler=name, steps=7, keep_every=1)
    assert out.timesteps == ddim_timesteps(T, chosen.num_steps(7, T))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("steps, guidance", [(None, None), (7, None), (None, 0.0), (12, 2.5)])
def test_spec_round_trips_and_names_its_set(name, steps, guidance):
    if not SAMPLERS[name].takes_steps and steps is not None:
        with pytest.raises(ValueError, match="drop ':steps'"):
            SamplerSpec.parse(f"{name}:{steps}")
        return
    spec = SamplerSpec(name, steps, guidance)
    assert SamplerSpec.parse(str(spec)) == spec
    set_name = spec.set_name(steps or 25)
    assert "+" not in set_name and set_name.startswith(name.replace("+", "p"))
    assert ("-w" in set_name) == (guidance is not None)
    if guidance is not None:
        assert set_name.endswith(f"-w{guidance:g}")


@pytest.mark.parametrize("text, problem", [("ddim:", "write sampler"), ("euler:5", "'euler' is not one of"),
                                           ("ddim:5@1.2.3", "not a number"), ("DDIM", "write sampler"),
                                           ("ddim@", "write sampler")])
def test_bad_specs_say_what_is_wrong(text, problem):
    with pytest.raises(ValueError, match=problem):
        SamplerSpec.parse(text)
