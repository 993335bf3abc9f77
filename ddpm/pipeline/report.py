"""The evaluation report: evaluation.json rendered as Markdown (evaluation.md, and the flow's Prefect artifact),
and the small reductions it shows (digit shares, samples by digit)."""

from __future__ import annotations

from typing import Any

import numpy as np


def digit_share_deviation(hist: np.ndarray, test_hist: np.ndarray) -> float:
    """The largest relative deviation of a digit's share from its test share (0.25: some digit off by 25%)."""
    shares = hist / hist.sum() / (test_hist / test_hist.sum())
    return float(np.abs(shares - 1).max())


def digit_rows(images: np.ndarray, labels: np.ndarray, per_digit: int = 10) -> np.ndarray:
    """Ten rows, one per digit (as LeNet reads them), of the first `per_digit` images; blank where too few."""
    rows = np.zeros((10, per_digit, *images.shape[1:]), dtype=np.uint8)
    for digit in range(10):
        found = images[labels == digit][:per_digit]
        rows[digit, : len(found)] = found
    return rows.reshape(-1, *images.shape[1:])


def _sampler_label(name: str, steps: int, guidance: float | None) -> str:
    """'dpm++2m-sde, 25 steps, guidance 2': guidance only where the model is conditional."""
    return name + (f", {steps} steps" if name != "ddpm" else "") + \
        (f", guidance {guidance:g}" if guidance is not None else "")


def _fidelity_rows(result: dict[str, Any]) -> list[str]:
    """Precision, recall, density and coverage (reports before them have none)."""
    prdc = result.get("prdc")
    if not prdc:
        return []
    rows = ["## Fidelity and diversity", "",
            f"In the evaluator's features, against the test set, each point's ball reaching its {prdc['k']}th "
            "nearest neighbour. Precision: generated images inside the test set's balls (fidelity); recall: test "
            "images inside the generated set's balls (diversity); density and coverage: the robust forms (Naeem "
            "et al. 2020). Train against test is the reference row.", "",
            "| set | precision | recall | density | coverage |", "| --- | ---: | ---: | ---: | ---: |"]
    for name in ("generated", "train"):
        s = prdc.get(f"{name}_vs_test")
        if s:
            rows.append(f"| {name} | {s['precision']:.4f} | {s['recall']:.4f} | {s['density']:.4f} | "
                        f"{s['coverage']:.4f} |")
    return rows


def _digit_fld_rows(result: dict[str, Any]) -> list[str]:
    """Each digit's FLD against that digit's test images (reports before them have none)."""
    by_digit = result.get("fld_by_digit")
    if not by_digit:
        return []
    names = {"generated": "generated, by the evaluator's label",
             "generated_requested": "generated, by the label asked for", "train": "train (the floor)"}
    rows = ["## FLD by digit", "", "| set | " + " | ".join(map(str, range(10))) + " | worst |",
            "| --- |" + " ---: |" * 11]
    for name, row in by_digit.items():
        cells = ["-" if row["fld"][str(d)] is None else f"{row['fld'][str(d)]:.2f}" for d in range(10)]
        rows.append(f"| {names.get(name, name)} | " + " | ".join(cells) + f" | {row['worst']} |")
    return rows


def evaluation_markdown(result: dict[str, Any], links: dict[str, str | None] | None = None) -> str:
    """evaluation.json as a readable report (the flow adds links and shows it as a Prefect artifact)."""
    s, counts, m, chosen = result["sampler"], result["counts"], result["memorisation"], result.get("model")
    conditional = s.get("conditional", False)
    steps = s.get("steps", s.get("ddim_steps"))  # reports before sample.steps have only the old name
    sampler = _sampler_label(s["name"], steps, s["guidance_scale"] if conditional else None)
    names = {"test": "test (vs itself)", "train": "train", "generated": f"generated ({sampler})",
             "uniform_noise": "uniform noise"}
    rows = ["| set | images | FLD vs test | FLD / train-vs-test | nearest class-mean distance | "
            "predicted class-mean distance |",
            "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, label in names.items():
        rows.append(f"| {label} | {counts[name]:,} | {result['fld'][f'{name}_vs_test']:.3f} | "
                    f"{result['fld_ratio_to_train'][f'{name}_vs_test']:.2f} | "
                    f"{result['nearest_class_mean_distance'][name]:.4f} | "
                    f"{result['predicted_class_mean_distance'][name]:.3f} |")
    rows += [
        "",
        "Nearest class-mean distance: DenoisingDiffusion.jl's measure, min over the ten test-set class means of "
        "|x - mean|_2 / 784 on [0, 1] pixels, averaged over the images. The original reports test 0.0080, train "
        "0.0080, generated 0.0084 and uniform noise 0.0913 (above 28 / 784 = 0.036, the farthest any [0, 1] image "
        "can lie from a mean, so its noise set differs from ours), and 82% of test images nearest the mean of their "
        f"own digit; here {result['nearest_mean_label_accuracy']:.1%}. Predicted class-mean distance: this "
        "project's own, |x - mean|_2 to the mean of the digit LeNet reads, on [-1, 1] pixels and not divided.",
    ]
    rows += ["", *_fidelity_rows(result), "", *_digit_fld_rows(result)]
    gen, test = result["label_histogram"]["generated"], result["label_histogram"]["test"]

    def share_row(name: str, hist: list[int]) -> str:
        return f"| {name} | " + " | ".join(f"{h / sum(hist):.1%}" for h in hist) + " |"

    compare = result.get("compare", [])
    shares = ["| digit | " + " | ".join(map(str, range(10))) + " |", "| --- |" + " ---: |" * 10,
              share_row("generated", gen), *(share_row(c["name"], c["label_histogram"]) for c in compare),
              share_row("test", test)]
    comparison = []
    if compare:
        comparison = [
            "## Samplers on the same seeds", "",
            f"Each set beside the main set's ({sampler}) images of the same seeds: FLD depends on the set size, "
            "so compare within a row.", "",
            "| set | images | FLD vs test | FLD / train-vs-test | main set, same seeds | largest digit deviation | "
            "images/s |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for c in compare:
            label = _sampler_label(c["sampler"], c["steps"], c["guidance_scale"] if conditional else None)
            comparison.append(
                f"| {label} | {c['images']:,} | {c['fld']:.3f} | {c['fld_ratio_to_train']:.2f} | "
                f"{c['main_fld_same_seeds']:.3f} | {c['digit_share_max_deviation']:.1%} | {c['images_per_s']:.1f} |")
        comparison.append("")
    return "\n".join([
        "# mnist-ddpm evaluation", "", *rows, "", *comparison,
        "## Digits (as the LeNet reads them)", "", *shares, "",
        f"- label imbalance (total variation vs test): {result['label_imbalance_tv']:.4f}; largest relative "
        f"deviation of a digit's share: {result['digit_share_max_deviation']:.1%}",
        "", "## Memorisation", "",
        f"- distance to the nearest of {counts['memorisation_reference']:,} training images (median): generated "
        f"{m['generated_median_nn']:.2f}, held-out test images {m['heldout_median_nn']:.2f}",
        f"- near-copies (closer than all but {m['heldout_share_below']:.0%} of test images, "
        f"< {m['near_copy_threshold']:.2f}): {m['near_copy_share']:.2%} of generated images",
        *(["", f"- model: epoch {chosen['epoch']} of {chosen['epochs']} ({chosen['reason']})"] if chosen else []),
        "", f"- evaluator: {result['lenet']['evaluator_id']} (LeNet test accuracy "
        f"{result['lenet']['test_accuracy']:.4f})",
        "", *(f"- {name}: {link}" for name, link in (links or {}).items() if link),
    ]) + "\n"
