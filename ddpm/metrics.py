"""Sample-quality scores: Frechet distance and precision/recall/density/coverage on LeNet features, distances to
class-mean images, label balance.

All statistics are float64 numpy. The networks only enter through `extract_lenet_outputs`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ddpm.pixels import model_to_unit


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and sample covariance [D, D] (N - 1 denominator, as in pytorch-fid) of features [N, D]."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N, D] with N >= 2, got shape {f.shape}")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix via `eigh`.

    Eigenvalues below the rounding floor (D * eps * largest) are set to 0, not just clipped at 0: an exact
    zero (a dead unit) comes out of eigh as +-1e-17, whose square root, 3e-9, would otherwise leak into the
    result.
    """
    w, v = np.linalg.eigh((s + s.T) / 2)
    w = np.where(w > w.max() * len(w) * np.finfo(np.float64).eps, w, 0.0)
    return (v * np.sqrt(w)) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):

        |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

    LeNet's ReLU features have dead units, so S1 and S2 are singular and `scipy.linalg.sqrtm(S1 @ S2)` can
    return NaN or junk. Instead: with R1 = S1^(1/2) and R2 = S2^(1/2) (symmetric, via eigh), S1 S2 has the
    same eigenvalues as the symmetric PSD matrix R1 S2 R1 = (R1 R2)(R1 R2)^T, so tr((S1 S2)^(1/2)) is the sum
    of the singular values of R1 R2. Taking singular values directly, rather than square roots of eigenvalues
    of R1 S2 R1, keeps rounding-level zeros at ~1e-16 instead of ~1e-8, and the result is exactly symmetric
    in the two distributions.
    """
    mu1, mu2 = np.asarray(mu1, np.float64).ravel(), np.asarray(mu2, np.float64).ravel()
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = len(mu1)
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    tr_covmean = np.linalg.svd(_psd_sqrt(s1) @ _psd_sqrt(s2), compute_uv=False).sum()
    diff = mu1 - mu2
    dist = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    return float(max(dist, 0.0))  # the distance is >= 0; identical inputs can round to -1e-13


def frechet_lenet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between two feature sets [N, D] (e.g. LeNet penultimate features)."""
    return frechet_distance(*feature_stats(feats_a), *feature_stats(feats_b))


def fld_by_digit(features: np.ndarray, labels: np.ndarray, test_features: np.ndarray, test_labels: np.ndarray,
                 num_classes: int = 10) -> dict[str, Any]:
    """Each digit's FLD: the features of the images labelled d against those of the test images of digit d.

    A digit with fewer than two images on either side has no covariance, and no FLD (None). `worst` names the
    digit of the largest FLD: where a model is weak, which one FLD over all digits cannot say.
    """
    labels, test_labels = np.asarray(labels).ravel(), np.asarray(test_labels).ravel()
    flds: dict[str, float | None] = {}
    for digit in range(num_classes):
        mine, theirs = features[labels == digit], test_features[test_labels == digit]
        flds[str(digit)] = frechet_lenet_distance(mine, theirs) if min(len(mine), len(theirs)) >= 2 else None
    scored = {d: v for d, v in flds.items() if v is not None}
    return {"fld": flds, "images": {str(d): int((labels == d).sum()) for d in range(num_classes)},
            "worst": max(scored, key=scored.get) if scored else None}


PRDC_K = 5  # each point's ball reaches its 5th nearest neighbour: the papers' choice, kept for comparable numbers


def _pairwise(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a, b)  # float64 in, float64 out: rounding far below any gap between two images' features


def kth_neighbour_radii(features: np.ndarray | torch.Tensor, k: int, chunk: int = 1000) -> torch.Tensor:
    """Each point's distance to its k-th nearest other point of the same set (the point itself is the nearest),
    float64 [N]: a set's balls, computed once where one real set meets several fake ones."""
    features = torch.as_tensor(np.asarray(features, dtype=np.float64))
    return torch.cat([_pairwise(rows, features).topk(k + 1, dim=1, largest=False).values[:, k]
                      for rows in features.split(chunk)])


def precision_recall_density_coverage(real: np.ndarray, fake: np.ndarray, k: int = PRDC_K, chunk: int = 1000,
                                      real_radii: torch.Tensor | None = None) -> dict[str, float]:
    """Precision and recall (Kynkaanniemi et al. 2019), density and coverage (Naeem et al. 2020) of `fake`
    against `real` features [N, D], each point's neighbourhood the ball to its k-th nearest neighbour.

    precision: the share of fake points inside some real ball (fidelity); recall: the share of real points inside
    some fake ball (diversity); density: real balls holding each fake point, / k, averaged (1 for a copy of the
    real distribution); coverage: the share of real balls holding a fake point. As the `prdc` package computes
    them (tests/test_metrics.py checks it), one chunk of real rows at a time, so 10,000 x 10,000 distances are
    never held at once. `real_radii` (`kth_neighbour_radii(real, k)`) saves computing them again.
    """
    real_t = torch.as_tensor(np.asarray(real, dtype=np.float64))
    fake_t = torch.as_tensor(np.asarray(fake, dtype=np.float64))
    if real_t.ndim != 2 or fake_t.ndim != 2 or real_t.shape[1] != fake_t.shape[1]:
        raise ValueError(f"features must be [N, D] with one D, got {tuple(real_t.shape)} and {tuple(fake_t.shape)}")
    if min(len(real_t), len(fake_t)) <= k:
        raise ValueError(f"k = {k} needs more than {k} points in each set, got {len(real_t)} and {len(fake_t)}")
    real_radii = kth_neighbour_radii(real_t, k, chunk) if real_radii is None else real_radii
    fake_radii = kth_neighbour_radii(fake_t, k, chunk)
    fake_in_real_balls = torch.zeros(len(fake_t), dtype=torch.long)
    recalled = covered = 0
    for rows, radii in zip(real_t.split(chunk), real_radii.split(chunk), strict=True):
        d = _pairwise(rows, fake_t)  # [chunk of real, fake]
        fake_in_real_balls += (d < radii[:, None]).sum(dim=0)
        recalled += int((d < fake_radii[None, :]).any(dim=1).sum())
        covered += int((d.min(dim=1).values < radii).sum())
    return {"precision": float((fake_in_real_balls > 0).double().mean()),
            "recall": recalled / len(real_t),
            "density": float(fake_in_real_balls.double().mean()) / k,
            "coverage": covered / len(real_t)}


def predicted_class_mean_distance(
    images: torch.Tensor | np.ndarray,
    predicted_labels: torch.Tensor | np.ndarray,
    class_means: torch.Tensor | np.ndarray,
) -> float:
    """Mean Euclidean (pixel-space L2) distance from each image to the mean image of its LeNet-predicted class,
    on [-1, 1] pixels and not divided by the pixel count (this project's own figure; test images read about 12.6).

    `class_means` [K, 1, 28, 28] must be in the same range as `images` ([-1, 1]), e.g. test-set class means.
    """
    x = torch.as_tensor(np.asarray(images), dtype=torch.float64).flatten(1)
    means = torch.as_tensor(np.asarray(class_means), dtype=torch.float64).flatten(1)
    labels = torch.as_tensor(np.asarray(predicted_labels), dtype=torch.long)
    if len(labels) != len(x) or x.shape[1] != means.shape[1]:
        raise ValueError(f"{len(x)} images of {x.shape[1]} pixels, {len(labels)} labels, means {means.shape}")
    return float((x - means[labels]).norm(dim=1).mean())


def _class_mean_distances(images: torch.Tensor | np.ndarray, class_means: torch.Tensor | np.ndarray,
                          chunk: int = 500) -> torch.Tensor:
    """L2 distance of each image to each class mean on [0, 1] pixels, float64 [N, K].

    Both come in the project's [-1, 1] convention and are mapped to [0, 1] here, so no caller can mix the
    ranges. Direct differences (not the |x|^2 + |m|^2 - 2 x.m expansion), one chunk of images at a time: exact,
    and [chunk, K, 784] float64 stays small.
    """
    means = (torch.as_tensor(np.asarray(class_means), dtype=torch.float64).flatten(1) + 1) / 2
    x = torch.as_tensor(np.asarray(images)).flatten(1)
    if x.shape[1] != means.shape[1]:
        raise ValueError(f"images of {x.shape[1]} pixels, means {tuple(means.shape)}")
    if len(x) == 0:
        raise ValueError("no images")
    return torch.cat([((q.double()[:, None] + 1) / 2 - means).norm(dim=2) for q in x.split(chunk)])


def nearest_class_mean_distance(images: torch.Tensor | np.ndarray, class_means: torch.Tensor | np.ndarray) -> float:
    """DenoisingDiffusion.jl's class-mean distance: the mean over images of min_k |x - m_k|_2 / (W H), with x and
    the class means m_k on [0, 1] pixels (the original reports test 0.0080, generated 0.0084).

    `images` [N, 1, 28, 28] and `class_means` [K, 1, 28, 28] are both in [-1, 1], the project's convention.
    """
    pixels = math.prod(np.shape(class_means)[1:])  # W H = 784; the images were checked to match
    return float(_class_mean_distances(images, class_means).min(dim=1).values.mean()) / pixels


def nearest_mean_labels(images: torch.Tensor | np.ndarray, class_means: torch.Tensor | np.ndarray) -> np.ndarray:
    """The class of the nearest class mean, argmin_k |x - m_k|_2, int64 [N]: a classifier with no training,
    whose accuracy on the test labels the original reports as 82%. Inputs in [-1, 1], as above."""
    return _class_mean_distances(images, class_means).argmin(dim=1).numpy().astype(np.int64)


def nearest_distances(queries: torch.Tensor, reference: torch.Tensor, chunk: int = 1000) -> np.ndarray:
    """Pixel-space L2 distance from each query image to its nearest reference image, float64 [N].

    Squared distances come from |q|^2 + |r|^2 - 2 q.r, one matrix product per chunk of queries (float32: an
    exact copy then reads about 1e-3 instead of 0, far below any distance between two different digits).
    """
    ref = reference.flatten(1).float()
    ref_sq = (ref * ref).sum(1)
    out = []
    for q in queries.flatten(1).float().split(chunk):
        d2 = (q * q).sum(1, keepdim=True) + ref_sq - 2 * q @ ref.T
        out.append(d2.min(dim=1).values.clamp(min=0).sqrt())
    return torch.cat(out).double().numpy()


def memorisation(generated_nn: np.ndarray, heldout_nn: np.ndarray, quantile: float = 0.01) -> dict[str, float]:
    """How close generated images sit to the training set, measured against held-out real images.

    `generated_nn`, `heldout_nn`: each image's distance to its nearest training image (`nearest_distances`).
    A generated image is a near-copy when it is closer to a training image than all but `quantile` of the
    held-out test images are: a model that memorised would put far more than `quantile` of its samples there.
    """
    threshold = float(np.quantile(heldout_nn, quantile))
    return {
        "generated_median_nn": float(np.median(generated_nn)),
        "heldout_median_nn": float(np.median(heldout_nn)),
        "near_copy_threshold": threshold,
        "near_copy_share": float(np.mean(generated_nn < threshold)),
        "heldout_share_below": float(np.mean(heldout_nn < threshold)),
    }


def label_histogram(pred_labels: torch.Tensor | np.ndarray, num_classes: int = 10) -> np.ndarray:
    """Counts per class, int64 [num_classes]."""
    labels = np.asarray(pred_labels).astype(np.int64).ravel()
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in 0..{num_classes - 1}")
    return np.bincount(labels, minlength=num_classes)


def histogram_imbalance(gen_counts: np.ndarray, ref_counts: np.ndarray) -> float:
    """Total variation distance between the two normalised histograms: 0.5 * sum |p - q|.

    0 means the same class proportions, 1 means disjoint support (e.g. a collapsed generator against the
    balanced test set gives 1 - p_ref(that class) = 0.9). It is the largest difference in probability that the
    two distributions give to any set of classes.
    """
    p, q = np.asarray(gen_counts, np.float64), np.asarray(ref_counts, np.float64)
    if p.shape != q.shape or p.sum() <= 0 or q.sum() <= 0 or (p < 0).any() or (q < 0).any():
        raise ValueError("histograms must have the same shape, non-negative counts and a positive total")
    return float(0.5 * np.abs(p / p.sum() - q / q.sum()).sum())


def extract_lenet_outputs(
    lenet: torch.nn.Module,
    images: torch.Tensor,
    batch_size: int,
    device: torch.device | str,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features (float64 [N, D]) and predicted labels (int64 [N]) of images [N, 1, 28, 28].

    Images are in [-1, 1]; the classifier was trained on [0, 1] pixels, so they are mapped there first.
    `lenet.features(x)` gives the 84-d ReLU features and `lenet(x)` the logits.
    """
    was_training = lenet.training
    lenet.eval()
    feats, preds = [], []
    try:
        with torch.inference_mode():
            for batch in tqdm(images.split(batch_size), desc="LeNet", disable=not progress, leave=False):
                x = model_to_unit(batch).to(device)
                feats.append(lenet.features(x).double().cpu())
                preds.append(lenet(x).argmax(dim=1).cpu())
    finally:
        lenet.train(was_training)
    return torch.cat(feats).numpy(), torch.cat(preds).numpy().astype(np.int64)
