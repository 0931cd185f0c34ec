"""Small synthetic image sets in the layouts c01 recognises (tests and benchmarks).

Each class is a distinct, learnable texture: stripes of a class-specific frequency and
mean brightness, with random phase, orientation (0/90 degrees) and noise, so flips and
90-degree rotations keep the label, as they do for the real defects.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("crazing", "inclusion", "patches")
PRESPLIT_FOLDERS = {"crazing": "Crazing", "inclusion": "Inclusion", "patches": "Patches", "pitted_surface": "Pitted",
                    "rolled-in_scale": "Rolled", "scratches": "Scratches"}
PREFIXES = {"crazing": "Cr", "inclusion": "In", "patches": "Pa", "pitted_surface": "PS", "rolled-in_scale": "RS", "scratches": "Sc"}


def texture(label_index: int, n_classes: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A uint8 grayscale image [size, size] for class `label_index`."""
    frequency = 2 + 3 * label_index
    y, x = np.mgrid[0:size, 0:size] / size
    axis = x if rng.random() < 0.5 else y
    stripes = np.sin(2 * np.pi * frequency * axis + rng.uniform(0, 2 * np.pi))
    mean = 60 + 130 * label_index / max(n_classes - 1, 1)
    image = mean + 40 * stripes + rng.normal(0, 8, (size, size))
    return np.clip(image, 0, 255).astype(np.uint8)


def make_dataset(root: Path, classes: tuple[str, ...] = CLASSES, per_class: int = 12, size: int = 32, layout: str = "class-folders",
                 ext: str = ".png", seed: int = 0, split_counts: dict[str, int] | None = None) -> Path:
    """Write `per_class` images per class under `root` in `layout`; returns root.

    layouts: class-folders (root/<class>/<class>_<n>.ext), pre-split
    (root/{train,valid,test}/<Folder>/..., counts per split from `split_counts`),
    flat (root/<Prefix>_<n>.ext, as NEU-CLS).
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    for k, label in enumerate(classes):
        if layout == "pre-split":
            counts = split_counts or {"train": per_class - 4, "valid": 2, "test": 2}
            targets = [(root / split / PRESPLIT_FOLDERS.get(label, label), n) for split, n in counts.items()]
        elif layout == "flat":
            targets = [(root, per_class)]
        elif layout == "class-folders":
            targets = [(root / label, per_class)]
        else:
            raise ValueError(f"unknown layout {layout}")
        number = 0
        for folder, count in targets:
            folder.mkdir(parents=True, exist_ok=True)
            for _ in range(count):
                number += 1
                name = f"{PREFIXES.get(label, label)}_{number}{ext}" if layout != "class-folders" else f"{label}_{number}{ext}"
                Image.fromarray(texture(k, len(classes), size, rng)).save(folder / name)
    return root


def exposure_batches_dataset(root: Path, per_class: int = 18, size: int = 32, batches: int = 6, seed: int = 0) -> Path:
    """Three classes told apart by their stripes' frequency only, photographed in `batches` exposure batches (a
    gain of 0.35 to 1.15 on the whole image; every class has its images spread evenly over the batches), as the
    magnetic tiles were: an image's brightness and contrast tell nothing of its class."""
    rng = np.random.default_rng(seed)
    gains = np.linspace(0.35, 1.15, batches)
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            y, x = np.mgrid[0:size, 0:size] / size
            axis = x if rng.random() < 0.5 else y
            surface = 0.55 + 0.25 * np.sin(2 * np.pi * (2 + 3 * label) * axis + rng.uniform(0, 2 * np.pi)) + rng.normal(0, 0.03, (size, size))
            image = np.clip(surface * gains[index % batches], 0, 1)
            Image.fromarray((image * 255).astype(np.uint8)).save(root / name / f"exp{index % batches + 1}_{name}_{index:03d}.png")
    return root


def small_defect_dataset(root: Path, per_class: int = 30, size: int = 128, spot: int = 3, seed: int = 0) -> Path:
    """Two classes where the difference is a few pixels in a large image: `free` (a striped,
    unevenly lit, noisy surface) and `spot` (the same with one dark `spot` x `spot` px blob at a
    random place, a blowhole's share of the image). The surface statistics are the same in
    both classes, so a global texture histogram cannot tell them apart: only a detector of the
    local pattern can (the case the magnetic tiles' blowholes and cracks pose)."""
    rng = np.random.default_rng(seed)
    y = np.linspace(-1, 1, size)[:, None]
    x = np.linspace(0, 1, size)[None, :]
    for cls in ("free", "spot"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            light = rng.uniform(0.3, 0.6) + 0.15 * rng.uniform(-1, 1) * y
            stripes = 0.06 * np.sin(2 * np.pi * rng.uniform(10, 20) * x + rng.uniform(0, 2 * np.pi))
            image = light + stripes + rng.normal(0, 0.03, (size, size))
            if cls == "spot":
                cy, cx = rng.integers(spot, size - 2 * spot, size=2)
                image[cy:cy + spot, cx:cx + spot] -= 0.25
            Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(root / cls / f"{cls}_{index:03d}.png")
    return root
