"""Figures (PNG) that sit beside the JSON numbers. Matplotlib's Agg backend: no display needed."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def class_counts(counts: Mapping[str, Mapping[str, int]], path: Path) -> Path:
    """Grouped bars: images per class for each split."""
    splits = [s for s in counts if sum(counts[s].values())]
    classes = list(next(iter(counts.values())))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(classes)), 4))
    width = 0.8 / max(len(splits), 1)
    x = np.arange(len(classes))
    for i, split in enumerate(splits):
        values = [counts[split][c] for c in classes]
        bars = ax.bar(x + i * width - 0.4 + width / 2, values, width, label=f"{split} (n={sum(values)})")
        ax.bar_label(bars, fontsize=7)
    ax.set_xticks(x, classes, rotation=20, ha="right")
    ax.set_ylabel("images")
    ax.set_title("Images per class and split")
    ax.legend()
    return _save(fig, path)


def sample_grid(samples: Mapping[str, Sequence[np.ndarray]], path: Path) -> Path:
    """One row per class, a few prepared images each."""
    rows = len(samples)
    cols = max((len(v) for v in samples.values()), default=1)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.7 * rows), squeeze=False)
    for r, (label, images) in enumerate(samples.items()):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(images):
                image = images[c]
                ax.imshow(image.squeeze(), cmap="gray" if image.ndim == 2 or image.shape[-1] == 1 else None, vmin=0, vmax=255)
        axes[r][0].set_title(label, fontsize=9, loc="left")
    fig.suptitle("Sample images per class (as the model sees them)")
    return _save(fig, path)


def intensity_histograms(histograms: Mapping[str, np.ndarray], path: Path) -> Path:
    """Pixel intensity distribution per class (normalised counts)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    levels = np.arange(256)
    for label, hist in histograms.items():
        total = max(hist.sum(), 1)
        ax.plot(levels, hist / total, label=label, linewidth=1.2)
    ax.set_xlabel("pixel value (0-255)")
    ax.set_ylabel("fraction of pixels")
    ax.set_title("Pixel intensity per class")
    ax.legend(fontsize=8)
    return _save(fig, path)


def confusion_matrices(cm: np.ndarray, class_names: Sequence[str], caption: str, title: str, path: Path) -> Path:
    """Counts and row-normalised confusion matrices side by side."""
    import seaborn as sns

    cm = np.asarray(cm)
    normalised = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = max(5, 0.9 * len(class_names) + 2)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size, size * 0.85))
    sns.heatmap(cm, annot=True, fmt="d", cmap="Blues", cbar=False, ax=axes[0], xticklabels=class_names, yticklabels=class_names)
    sns.heatmap(normalised, annot=True, fmt=".2f", cmap="Blues", vmin=0, vmax=1, cbar=False, ax=axes[1],
                xticklabels=class_names, yticklabels=class_names)
    for ax, sub in zip(axes, ("counts", "normalised by true class")):
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(sub)
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(f"{title}\n{caption}")
    return _save(fig, path)


def training_curves(history: Sequence[Mapping[str, float]], title: str, caption: str, path: Path) -> Path:
    """Loss and accuracy per epoch, train and validation (phases marked)."""
    epochs = [row.get("global_epoch", i + 1) for i, row in enumerate(history)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), layout="constrained")  # keeps the two-line title clear of the axes titles
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for prefix, style in (("", "-"), ("val_", "--")):
            values = [row.get(prefix + metric, np.nan) for row in history]
            ax.plot(epochs, values, style, label=f"{'validation' if prefix else 'train'} {metric}")
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    phases = [row.get("phase") for row in history]
    for i in range(1, len(phases)):
        if phases[i] != phases[i - 1]:
            for ax in axes:
                ax.axvline(epochs[i] - 0.5, color="grey", linestyle=":")
    fig.suptitle(f"{title}\nbest model on validation: {caption}")
    return _save(fig, path)


def reliability_diagram(table: Sequence[Mapping[str, float]], ece: float, ece_ci: tuple[float, float], caption: str, title: str, path: Path) -> Path:
    """Accuracy vs confidence per bin, with bin counts; the gap to the diagonal is miscalibration."""
    fig, (ax, ax_count) = plt.subplots(2, 1, figsize=(5.5, 6.5), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    centres = [(row["lower"] + row["upper"]) / 2 for row in table]
    width = table[0]["upper"] - table[0]["lower"] if table else 0.1
    accuracy = [row["accuracy"] if row["count"] else 0 for row in table]
    ax.bar(centres, accuracy, width=width * 0.95, edgecolor="black", alpha=0.7, label="accuracy in bin")
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    conf = [row["confidence"] for row in table if row["count"]]
    acc = [row["accuracy"] for row in table if row["count"]]
    ax.plot(conf, acc, "o", color="tab:red", label="mean confidence")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(f"{title}\nECE {ece:.4f} (95% bootstrap CI {ece_ci[0]:.4f}–{ece_ci[1]:.4f})\n{caption}", fontsize=9)
    ax_count.bar(centres, [row["count"] for row in table], width=width * 0.95, color="grey")
    ax_count.set_yscale("symlog")
    ax_count.set_xlabel("confidence")
    ax_count.set_ylabel("images")
    return _save(fig, path)


def misclassified_gallery(images: Sequence[np.ndarray], captions: Sequence[str], title: str, path: Path, columns: int = 6) -> Path:
    """The wrongly classified images with true class, prediction and confidence."""
    count = max(len(images), 1)
    rows = math.ceil(count / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.5 * rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    if not images:
        axes[0][0].text(0, 0.5, "no misclassified images", fontsize=12)
    for ax, image, text in zip(axes.flat, images, captions):
        ax.imshow(image.squeeze(), cmap="gray" if image.shape[-1] == 1 else None, vmin=0, vmax=255)
        ax.set_title(text, fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def image_sizes(sizes: Sequence[tuple[int, int]], path: Path) -> Path:
    """Original image sizes: width against height, and the aspect-ratio distribution."""
    widths = np.array([s[0] for s in sizes], dtype=float)
    heights = np.array([s[1] for s in sizes], dtype=float)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.scatter(widths, heights, s=8, alpha=0.4)
    top = max(widths.max(initial=1), heights.max(initial=1)) * 1.05
    left.plot([0, top], [0, top], color="grey", lw=0.8, ls="--", label="square")
    left.set_xlim(0, top)
    left.set_ylim(0, top)
    left.set_xlabel("width (px)")
    left.set_ylabel("height (px)")
    left.set_title(f"Original sizes (n={len(sizes)})")
    left.legend(loc="lower right")
    ratios = widths / np.maximum(heights, 1)
    right.hist(ratios, bins=30)
    right.set_xlabel("aspect ratio (width / height)")
    right.set_ylabel("images")
    right.set_title(f"Aspect ratio: median {np.median(ratios) if len(ratios) else 0:.2f}, "
                    f"{np.mean(np.abs(ratios - 1) > 0.02) if len(ratios) else 0:.0%} not square")
    return _save(fig, path)


def class_mean_images(means: Mapping[str, np.ndarray], counts: Mapping[str, int], path: Path) -> Path:
    """The mean prepared image of each class (what is common to a class: position bias, vignetting, colour)."""
    cols = min(len(means), 6)
    rows = math.ceil(len(means) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (label, image) in zip(axes.ravel(), means.items()):
        shown = image.squeeze()
        ax.imshow(np.clip(shown, 0, 255).astype(np.uint8), cmap="gray" if shown.ndim == 2 else None, vmin=0, vmax=255)
        ax.set_title(f"{label}\n(n={counts.get(label, 0)})", fontsize=8)
    fig.suptitle("Mean image per class (as the model sees them)", y=1.0 + 0.12 / rows)
    return _save(fig, path)


def tuning_trials(rows: Sequence[Mapping[str, object]], objective: str, influential: str | None, rho: float, path: Path,
                  base_value: float | None = None) -> Path:
    """Left: the objective of every trial in order (failed trials as red crosses on the axis, the best
    marked, the base model's value as a line). Right: the objective against the hyperparameter that
    rank-correlates most with it."""
    done = [r for r in rows if r.get("score") is not None]
    failed = [r for r in rows if r.get("score") is None]
    lower_is_better = objective.endswith("loss")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    order = {r["trial_id"]: i + 1 for i, r in enumerate(rows)}
    xs = [order[r["trial_id"]] for r in done]
    ys = [float(r["score"]) for r in done]
    left.plot(xs, ys, "o-", color="tab:blue", label=f"completed ({len(done)})")
    if done:
        best = (min if lower_is_better else max)(range(len(ys)), key=lambda i: ys[i])
        left.plot([xs[best]], [ys[best]], "*", color="gold", markersize=16, markeredgecolor="black", label=f"best: {ys[best]:.4f}")
        running = np.minimum.accumulate(ys) if lower_is_better else np.maximum.accumulate(ys)
        left.step(xs, running, where="post", color="grey", lw=1, ls="--", label="best so far")
    if failed:
        floor = min(ys) if ys else 0.0
        left.plot([order[r["trial_id"]] for r in failed], [floor] * len(failed), "x", color="red", markersize=10, label=f"failed ({len(failed)})")
    if base_value is not None:
        left.axhline(base_value, color="tab:green", lw=1.2, label=f"base model: {base_value:.4f}")
    left.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    left.set_xlabel("trial (in start order)")
    left.set_ylabel(objective)
    left.set_title(f"{objective} per trial ({'lower' if lower_is_better else 'higher'} is better)")
    left.legend(fontsize=8)
    if influential and done:
        values = [r.get(f"hp_{influential}") for r in done]
        numeric = all(isinstance(v, (int, float)) for v in values)
        if numeric:
            right.scatter(values, ys, color="tab:blue")
            if len(set(values)) > 1 and min(values) > 0 and max(values) / min(values) > 20:
                right.set_xscale("log")
        else:
            labels = sorted(set(map(str, values)))
            right.scatter([labels.index(str(v)) for v in values], ys, color="tab:blue")
            right.set_xticks(range(len(labels)), labels)
        right.set_xlabel(influential)
        right.set_ylabel(objective)
        strength = f"Spearman rho {rho:+.2f}" if np.isfinite(rho) else "too few trials to rank"
        right.set_title(f"{objective} against {influential} ({strength})")
    else:
        right.axis("off")
        right.text(0.5, 0.5, "no completed trial", ha="center", va="center")
    fig.suptitle(f"Keras Tuner search: {len(rows)} trials", y=1.02)
    return _save(fig, path)
