"""Frechet distance against high-precision and analytic references (incl. singular covariances), and the
class-mean, histogram and LeNet-extraction helpers (the class-mean distance also on the real MNIST test set)."""

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from ddpm.data import load_mnist
from ddpm.metrics import (
    extract_lenet_outputs,
    feature_stats,
    fld_by_digit,
    frechet_distance,
    frechet_lenet_distance,
    histogram_imbalance,
    kth_neighbour_radii,
    label_histogram,
    nearest_class_mean_distance,
    nearest_mean_labels,
    precision_recall_density_coverage,
    predicted_class_mean_distance,
)
from ddpm.pixels import uint8_to_model


def random_cov(rng, d, rank=None):
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / d


def reference_fd_mpmath(mu1, s1, mu2, s2, dps=50):
    """tr sqrt(S1 S2) by mpmath's general matrix square root at 50 digits (full-rank inputs)."""
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(dps):
        a, b = mpmath.matrix(s1.tolist()), mpmath.matrix(s2.tolist())
        covmean = mpmath.sqrtm(a * b)
        tr = sum(covmean[i, i] for i in range(len(mu1)))
        diff = mpmath.matrix((mu1 - mu2).tolist())
        value = (diff.T * diff)[0] + sum(a[i, i] + b[i, i] for i in range(len(mu1))) - 2 * tr
        return float(mpmath.re(value))


def test_feature_stats():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(50, 3)).astype(np.float32)
    mu, sigma = feature_stats(f)
    assert mu.dtype == sigma.dtype == np.float64 and mu.shape == (3,) and sigma.shape == (3, 3)
    centred = f.astype(np.float64) - f.astype(np.float64).sum(0) / 50
    np.testing.assert_allclose(mu, f.astype(np.float64).sum(0) / 50)
    np.testing.assert_allclose(sigma, centred.T @ centred / 49)
    _, s1 = feature_stats(rng.normal(size=(10, 1)))
    assert s1.shape == (1, 1)
    with pytest.raises(ValueError):
        feature_stats(np.zeros((1, 3)))


def test_full_rank_against_mpmath_and_scipy():
    rng = np.random.default_rng(1)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = random_cov(rng, d), random_cov(rng, d)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(reference_fd_mpmath(mu1, s1, mu2, s2), rel=1e-10)
    naive = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
    assert ours == pytest.approx(naive, rel=1e-8)


def test_constant_columns_against_mpmath_on_the_live_block():
    """Dead ReLU units: constant columns make both covariances singular. They add only their mean gap."""
    rng = np.random.default_rng(2)
    n, d, dead = 300, 16, [0, 5, 6, 11]
    a, b = np.maximum(rng.normal(size=(n, d)), 0), np.maximum(rng.normal(0.2, 1.3, size=(n, d)), 0)
    a[:, dead], b[:, dead] = 0.0, 0.0
    b[:, 5] = 0.7  # dead in both, but at different constants
    (mu1, s1), (mu2, s2) = feature_stats(a), feature_stats(b)
    assert np.linalg.matrix_rank(s1) == d - len(dead)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(ours)
    live = [j for j in range(d) if j not in dead]
    ref = reference_fd_mpmath(mu1[live], s1[np.ix_(live, live)], mu2[live], s2[np.ix_(live, live)])
    ref += sum((mu1[j] - mu2[j]) ** 2 for j in dead)
    assert ours == pytest.approx(ref, rel=1e-9)
    assert frechet_lenet_distance(a, b) == pytest.approx(ours, rel=1e-12)


@pytest.mark.parametrize("n", [60, 300])
def test_lenet_sized_with_dead_units_against_data_factors(n):
    """84-d ReLU features with dead units; n = 60 < 84 (a smoke run's sample count) is rank-deficient too.

    Independent reference from the data rather than the covariances: with F = centred features / sqrt(n - 1)
    [n, D], S1 S2 = F1^T F1 F2^T F2 has the nonzero eigenvalues of (F1 F2^T)(F1 F2^T)^T, so tr (S1 S2)^(1/2)
    is the sum of the singular values of F1 F2^T (no matrix square root anywhere).
    """
    rng = np.random.default_rng(3)
    w = rng.normal(size=(20, 84))
    w[:, :9] = -np.abs(w[:, :9]) - 1  # these units never fire on positive inputs
    a = np.maximum(np.abs(rng.normal(size=(n, 20))) @ w, 0)
    b = np.maximum(np.abs(rng.normal(0.1, 1.1, size=(n + 7, 20))) @ w, 0)
    (mu1, s1), (mu2, s2) = feature_stats(a), feature_stats(b)
    assert not s1[:9, :9].any() and np.linalg.matrix_rank(s1) <= min(75, n - 1)
    ours = frechet_distance(mu1, s1, mu2, s2)
    f1, f2 = (a - mu1) / np.sqrt(len(a) - 1), (b - mu2) / np.sqrt(len(b) - 1)
    tr = np.linalg.svd(f1 @ f2.T, compute_uv=False).sum()
    ref = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * tr
    assert np.isfinite(ours) and ours == pytest.approx(ref, rel=1e-9)


def test_diagonal_covariances_analytic_incl_zero_variances():
    """Diagonal S1, S2: the distance is |dmu|^2 + sum (sqrt(a_i) - sqrt(b_i))^2, also where a_i or b_i = 0."""
    var1 = np.array([0.0, 0.0, 1.0, 4.0, 0.25, 9.0], dtype=np.longdouble)
    var2 = np.array([0.0, 2.0, 0.0, 1.0, 0.25, 16.0], dtype=np.longdouble)
    mu1, mu2 = np.arange(6.0), np.arange(6.0)[::-1]
    ref = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(var1) - np.sqrt(var2)) ** 2).sum())
    got = frechet_distance(mu1, np.diag(var1.astype(np.float64)), mu2, np.diag(var2.astype(np.float64)))
    assert got == pytest.approx(ref, rel=1e-12)
    # Rotating both covariances by the same orthogonal matrix changes nothing, up to the rounding the rotation
    # itself adds to the zero eigenvalues (the square root turns 1e-16 into 1e-8, so no tighter than that).
    q, _ = np.linalg.qr(np.random.default_rng(4).normal(size=(6, 6)))
    s1, s2 = q @ np.diag(var1.astype(np.float64)) @ q.T, q @ np.diag(var2.astype(np.float64)) @ q.T
    assert frechet_distance(q @ mu1, s1, q @ mu2, s2) == pytest.approx(ref, rel=1e-8)


def test_identical_shifted_and_symmetric():
    rng = np.random.default_rng(5)
    a = np.maximum(rng.normal(size=(500, 30)), 0)
    a[:, :4] = 0
    assert frechet_lenet_distance(a, a) == pytest.approx(0, abs=1e-9)
    shift = rng.normal(size=30)
    assert frechet_lenet_distance(a, a + shift) == pytest.approx(shift @ shift, rel=1e-9)
    b = np.maximum(rng.normal(0.3, 1.0, size=(400, 30)), 0)
    assert frechet_lenet_distance(a, b) == pytest.approx(frechet_lenet_distance(b, a), rel=1e-9)
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_predicted_class_mean_distance():
    means = np.zeros((10, 1, 28, 28))
    means[3] = 1.0
    images = torch.cat([torch.full((1, 1, 28, 28), 0.5), torch.full((1, 1, 28, 28), -1.0)])
    # Image 0 vs class 0 (zeros): 0.5 * 28; image 1 vs class 3 (ones): 2 * 28.
    assert predicted_class_mean_distance(images, torch.tensor([0, 3]), means) == pytest.approx((14 + 56) / 2)
    assert predicted_class_mean_distance(images.numpy(), np.array([3, 3]), torch.from_numpy(means)) == pytest.approx(
        (14 + 56) / 2
    )
    with pytest.raises(ValueError):
        predicted_class_mean_distance(images, torch.tensor([0]), means)


def test_nearest_class_mean_distance_by_hand():
    # 2x2 images (W H = 4), all given in [-1, 1]; in [0, 1] the means are 0000, 1111, 0011.
    means = torch.tensor([[-1.0, -1, -1, -1], [1, 1, 1, 1], [-1, -1, 1, 1]]).view(3, 1, 2, 2)
    images = torch.tensor([[-1.0, -1, 0, 1], [1, 1, 1, -1]]).view(2, 1, 2, 2)
    # In [0, 1]: x0 = (0, 0, .5, 1) lies sqrt(1.25), sqrt(2.25), 0.5 from the means, x1 = (1, 1, 1, 0) lies
    # sqrt(3), 1, sqrt(3). Nearest: 0.5 and 1, mean 0.75, over W H = 4: 0.1875. (Left in [-1, 1] it would read
    # 0.375; without the 1 / (W H), 0.75; averaging all three means rather than the nearest, more again.)
    assert nearest_class_mean_distance(images, means) == pytest.approx(0.1875, rel=1e-12)
    assert nearest_class_mean_distance(images.numpy(), means.double().numpy()) == pytest.approx(0.1875, rel=1e-12)
    assert nearest_mean_labels(images, means).tolist() == [2, 1]
    # At 28 x 28: a flat 0.5 image ([0, 1]: 0.75) is 0.25 * 28 = 7 from a flat white mean, 7 / 784 after dividing.
    flat = torch.full((1, 1, 28, 28), 0.5)
    white_black = torch.stack([torch.full((1, 28, 28), 1.0), torch.full((1, 28, 28), -1.0)])
    assert nearest_class_mean_distance(flat, white_black) == pytest.approx(7 / 784, rel=1e-12)
    assert nearest_mean_labels(flat, white_black).tolist() == [0]
    with pytest.raises(ValueError, match="pixels"):
        nearest_class_mean_distance(images, torch.zeros(3, 1, 3, 3))


def test_nearest_class_mean_across_chunks():
    # More images than one chunk (500): the chunked result must equal a direct numpy computation.
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, size=(1234, 1, 4, 4)).astype(np.float32)
    means = rng.uniform(-1, 1, size=(10, 1, 4, 4))
    d = np.linalg.norm((images.reshape(-1, 1, 16).astype(np.float64) + 1) / 2 - (means.reshape(1, 10, 16) + 1) / 2,
                       axis=2)
    assert nearest_mean_labels(torch.from_numpy(images), means).tolist() == d.argmin(axis=1).tolist()
    assert nearest_class_mean_distance(images, means) == pytest.approx(d.min(axis=1).mean() / 16, rel=1e-12)


def test_nearest_class_mean_on_real_mnist(mirror):
    # DenoisingDiffusion.jl reports 0.0080 for the test set against its own class means, and 82% of test images
    # nearest the mean of their own digit; measured here: 0.00796 and 82.3%.
    mnist = load_mnist(mirror)
    images = uint8_to_model(mnist["test_images"]).unsqueeze(1)
    labels = torch.from_numpy(mnist["test_labels"].astype(np.int64))
    means = torch.zeros(10, 1, 28, 28).index_add_(0, labels, images) / torch.bincount(labels).view(10, 1, 1, 1)
    assert 0.0075 < nearest_class_mean_distance(images, means) < 0.0085
    assert 0.80 < np.mean(nearest_mean_labels(images, means) == labels.numpy()) < 0.84


def test_label_histogram_and_imbalance():
    counts = label_histogram(torch.tensor([0, 0, 3, 9]))
    assert counts.tolist() == [2, 0, 0, 1, 0, 0, 0, 0, 0, 1] and counts.dtype == np.int64
    assert label_histogram(np.array([1, 1]), num_classes=3).tolist() == [0, 2, 0]
    with pytest.raises(ValueError):
        label_histogram(np.array([10]))
    ref = np.full(10, 1000)
    assert histogram_imbalance(np.full(10, 7), ref) == pytest.approx(0)  # same proportions, other total
    collapsed = np.zeros(10)
    collapsed[4] = 50
    assert histogram_imbalance(collapsed, ref) == pytest.approx(0.9)
    assert histogram_imbalance(np.array([1, 0]), np.array([0, 1])) == pytest.approx(1)
    assert histogram_imbalance(np.array([3, 1]), np.array([1, 1])) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        histogram_imbalance(np.zeros(10), ref)


class FakeLeNet(nn.Module):
    """Same two methods as LeNet5: `features` (84-d ReLU) and `forward` (10 logits); records its inputs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head = nn.Linear(784, 84), nn.Linear(84, 10)
        self.inputs = []

    def features(self, x):
        self.inputs.append(x)
        return torch.relu(self.body(x.flatten(1)))

    def forward(self, x):
        return self.head(self.features(x))


def test_extract_lenet_outputs():
    lenet = FakeLeNet().train()
    images = torch.rand(23, 1, 28, 28) * 2 - 1
    feats, preds = extract_lenet_outputs(lenet, images, batch_size=10, device="cpu", progress=True)
    assert feats.shape == (23, 84) and feats.dtype == np.float64
    assert preds.shape == (23,) and preds.dtype == np.int64
    assert all(0 <= x.min() and x.max() <= 1 for x in lenet.inputs)  # classifier sees [0, 1] pixels
    with torch.no_grad():
        x01 = (images + 1) / 2
        # float32 matmuls round differently for batches of 10 and of 23.
        np.testing.assert_allclose(feats, lenet.features(x01).double().numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(preds, lenet(x01).argmax(1).numpy())
    assert lenet.training  # mode restored


def test_nearest_distances_and_memorisation():
    from ddpm.metrics import memorisation, nearest_distances

    g = torch.Generator().manual_seed(0)
    train = torch.rand(300, 1, 28, 28, generator=g) * 2 - 1
    heldout = torch.rand(200, 1, 28, 28, generator=g) * 2 - 1
    copies = train[:50] + 0.001 * torch.randn(50, 1, 28, 28, generator=g)
    d = nearest_distances(copies, train, chunk=7)  # chunking does not change the answer
    assert d.shape == (50,) and (d < 0.1).all()
    brute = torch.cdist(heldout.flatten(1).double(), train.flatten(1).double()).min(dim=1).values.numpy()
    np.testing.assert_allclose(nearest_distances(heldout, train), brute, rtol=1e-4)
    honest = memorisation(nearest_distances(heldout[:100], train), nearest_distances(heldout[100:], train))
    copied = memorisation(d, nearest_distances(heldout, train))
    assert copied["near_copy_share"] == 1.0 and honest["near_copy_share"] < 0.1
    assert copied["generated_median_nn"] < copied["heldout_median_nn"]


@pytest.mark.parametrize(("n_real", "n_fake", "k", "chunk"), [(300, 250, 5, 64), (200, 400, 3, 1000), (120, 90, 1, 7)])
def test_prdc_matches_the_prdc_package(n_real, n_fake, k, chunk):
    """The reference implementation (Naeem et al.'s `prdc`) on fixed features: one real cloud; fakes partly
    copies, partly shifted and narrower, so no score sits at 0 or 1."""
    import contextlib
    import io

    from prdc import compute_prdc

    rng = np.random.default_rng(n_real + k)
    real = rng.normal(size=(n_real, 6))
    fake = rng.normal(loc=0.8, scale=0.6, size=(n_fake, 6))
    fake[: n_fake // 5] = real[: n_fake // 5] + rng.normal(scale=0.05, size=(n_fake // 5, 6))
    with contextlib.redirect_stdout(io.StringIO()):  # it prints the set sizes
        expected = compute_prdc(real, fake, nearest_k=k)
    found = precision_recall_density_coverage(real, fake, k=k, chunk=chunk)
    assert found == precision_recall_density_coverage(real, fake, k=k, real_radii=kth_neighbour_radii(real, k))
    assert found.keys() == expected.keys()
    for name, value in expected.items():
        assert found[name] == pytest.approx(float(value), rel=1e-12, abs=1e-15), name
    assert 0 < found["precision"] < 1 and 0 < found["recall"] < 1 and 0 < found["coverage"] < 1


def test_prdc_tells_fidelity_from_diversity():
    """A collapsed generator (every image near one real one) is faithful but not diverse; a sharp clone is both."""
    rng = np.random.default_rng(0)
    real = rng.normal(size=(400, 16))
    collapsed = real[0] + rng.normal(scale=0.01, size=(400, 16))
    clone = real + rng.normal(scale=0.01, size=real.shape)
    narrow = precision_recall_density_coverage(real, collapsed)
    assert narrow["precision"] == 1.0 and narrow["recall"] < 0.05 and narrow["coverage"] < 0.05
    same = precision_recall_density_coverage(real, clone)
    assert same["precision"] > 0.95 and same["recall"] > 0.95 and same["coverage"] > 0.95
    with pytest.raises(ValueError, match="k = 5 needs more than 5 points"):
        precision_recall_density_coverage(real, collapsed[:5])


def test_fld_by_digit_names_the_weak_digit():
    rng = np.random.default_rng(1)
    test_labels = np.repeat(np.arange(10), 60)
    test = rng.normal(size=(600, 8)) + test_labels[:, None]
    labels = np.repeat(np.arange(10), 50)
    generated = rng.normal(size=(500, 8)) + labels[:, None]
    generated[labels == 3] += 2.0  # digit 3 drawn off its test images
    generated, labels = generated[labels != 7], labels[labels != 7]  # and no image read as 7
    result = fld_by_digit(generated, labels, test, test_labels)
    assert result["worst"] == "3" and result["fld"]["7"] is None and result["images"]["7"] == 0
    assert result["images"]["1"] == 50
    assert result["fld"]["3"] == pytest.approx(frechet_lenet_distance(generated[labels == 3], test[test_labels == 3]))
    assert all(v < result["fld"]["3"] for d, v in result["fld"].items() if v is not None and d != "3")
