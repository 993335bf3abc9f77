"""Counter-based per-image noise (Philox4x32-10): the published known answers, and the contract the samplers need."""

import math
import random

import pytest
import torch
from scipy import stats

from ddpm.noise import PerImageNoise, PhiloxNoise, image_seeds, make_noise, philox4x32

M32 = 0xFFFFFFFF

# Random123's known-answer vectors for Philox4x32-10 (its tests/kat_vectors): counter, key, output.
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32,) * 4, (M32,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def philox_reference(counter, key, rounds=10):
    """Philox4x32 on Python integers, written from the paper: no 16-bit splitting, no tensors."""
    c, k = list(counter), list(key)
    for r in range(rounds):
        if r:
            k = [(k[0] + 0x9E3779B9) & M32, (k[1] + 0xBB67AE85) & M32]
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k[0], p1 & M32, (p0 >> 32) ^ c[3] ^ k[1], p0 & M32]
    return tuple(c)


def words(values):
    return [torch.tensor(v, dtype=torch.int64) for v in values]


@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_philox_gives_the_published_known_answers(counter, key, expected):
    assert tuple(int(w) for w in philox4x32(words(counter), words(key))) == expected
    assert philox_reference(counter, key) == expected  # the reference below is right too


def test_vectorised_philox_matches_the_integer_reference_on_random_words():
    rng = random.Random(0)
    counters = [[rng.getrandbits(32) for _ in range(4)] for _ in range(500)]
    keys = [[rng.getrandbits(32) for _ in range(2)] for _ in range(500)]
    out = philox4x32(words(list(zip(*counters, strict=True))), words(list(zip(*keys, strict=True))))
    got = list(zip(*[w.tolist() for w in out], strict=True))
    assert got == [philox_reference(c, k) for c, k in zip(counters, keys, strict=True)]


def test_philox_rows_depend_on_their_own_seed_and_draw_only():
    seeds = image_seeds(3, 0, 6)
    whole = PhiloxNoise(seeds, (1, 5, 7))  # 35 values: not a multiple of the 4 words one call gives
    part = PhiloxNoise(seeds[2:5], (1, 5, 7))
    for _ in range(3):
        a, b = whole.randn(), part.randn()
        assert a.shape == (6, 1, 5, 7) and a.dtype == torch.float32
        assert torch.equal(a[2:5], b)  # the same images in other company, on every draw
    again = PhiloxNoise(seeds, (1, 5, 7))
    first, second = again.randn(), again.randn()
    assert not torch.allclose(first, second)  # each draw is new
    assert torch.equal(first, PhiloxNoise(seeds, (1, 5, 7)).randn())  # and reproducible


def test_philox_noise_is_standard_normal_and_uncorrelated():
    noise = PhiloxNoise(image_seeds(11, 0, 256), (1, 28, 28))
    first, second = noise.randn(), noise.randn()
    values = first.flatten().double()
    assert abs(values.mean()) < 0.01 and abs(values.std() - 1) < 0.01
    assert stats.kstest(values.numpy(), "norm").pvalue > 1e-3
    for a, b in ((first, second), (first[:-1], first[1:])):  # across draws, across neighbouring images
        r = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
        assert abs(r) < 4 / math.sqrt(a.numel())
    # Box-Muller's tails: |z| > 4 about 6e-5 of the time, and no infinities.
    assert torch.isfinite(first).all() and 0 < (values.abs() > 4).sum() < 60


def test_noise_sources_are_chosen_by_name():
    seeds = [1, 2]
    assert isinstance(make_noise("generator", seeds, (1, 2, 2)), PerImageNoise)
    assert isinstance(make_noise("philox", seeds, (1, 2, 2)), PhiloxNoise)
    with pytest.raises(ValueError, match="philox"):
        make_noise("numpy", seeds, (1, 2, 2))
    with pytest.raises(ValueError, match="at least one seed"):
        PhiloxNoise([], (1, 2, 2))
