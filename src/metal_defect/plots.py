"""Figures (PNG) that sit beside the JSON numbers. Matplotlib's Agg backend: no display needed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
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
