"""An offline stand-in for "another plant's images", built from NEU and its defect boxes.

The data sets this product is judged on beyond NEU are not here. What is known of one of
them: 6 classes with 32-300 images each, a majority "no defect" class (43 %), grayscale,
222-632 px and not square, small defects. This module makes a set with those traits from
the NEU images and their Pascal VOC boxes, deterministically from a seed:

* `no_defect`: crops that touch no defect box of an image whose defects are objects on a clean
  surface (`NO_DEFECT_SOURCES`);
* one class per NEU defect type: crops that hold only a small part of a box (2-20 % of
  the crop is inside boxes), so the defect is a small detail in a large background;
* every crop is non-square (aspect 1.1-2.5) and scaled so that both sides lie in 222-632 px;
* imbalanced counts (`PROXY_COUNTS`).

Nothing of it is committed: `python main.py proxy-data` regenerates it.
"""

from __future__ import annotations

import json
import logging
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from metal_defect.artifacts import staging_dir
from metal_defect.errors import DataError

log = logging.getLogger(__name__)

NO_DEFECT = "no_defect"
# imbalanced like the data set it stands in for: a 43 % majority, the rarest class 32 images
PROXY_COUNTS: dict[str, int] = {NO_DEFECT: 300, "inclusion": 110, "scratches": 90, "patches": 70, "rolled-in_scale": 50, "crazing": 32}
# `no_defect` crops come only from these classes' images. In NEU crazing, rolled-in scale, pitted surface and patches are
# textures of the whole surface with a few places boxed, so a crop outside their boxes still shows the defect: with
# them as sources, all 16 `no_defect` errors on the proxy's test split (seed 42) were answered as the source image's class.
NO_DEFECT_SOURCES = ("inclusion", "scratches")
SIDE_RANGE = (222, 632)  # both sides of every output image lie in this range
ASPECT_RANGE = (1.1, 2.5)
BOX_SHARE_RANGE = (0.02, 0.20)  # share of a defect crop's area inside defect boxes
MIN_VISIBLE_PX = 8  # the part of a box inside a defect crop is at least this wide and high (source pixels)
ATTEMPTS_PER_IMAGE = 60

Box = tuple[int, int, int, int]  # xmin, ymin, xmax, ymax (exclusive max)


def read_voc_boxes(path: Path) -> list[Box]:
    """The object boxes of a Pascal VOC annotation file."""
    root = ET.parse(path).getroot()
    boxes = []
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        if bb is None:
            continue
        values = [int(float(bb.findtext(k, "0"))) for k in ("xmin", "ymin", "xmax", "ymax")]
        boxes.append((values[0], values[1], values[2] + 1, values[3] + 1))
    return boxes


def _box_mask(shape: tuple[int, int], boxes: list[Box]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    for x0, y0, x1, y1 in boxes:
        mask[max(y0, 0):y1, max(x0, 0):x1] = True
    return mask


def _random_crop_size(rng: np.random.Generator, width: int, height: int) -> tuple[int, int] | None:
    aspect = rng.uniform(*ASPECT_RANGE)
    long_side = int(rng.uniform(0.45, 1.0) * min(width, height))
    short_side = round(long_side / aspect)
    if short_side < 40:
        return None
    return (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)


def _find_crop(rng: np.random.Generator, mask: np.ndarray, defect: bool) -> tuple[int, int, int, int] | None:
    height, width = mask.shape
    for _ in range(ATTEMPTS_PER_IMAGE):
        size = _random_crop_size(rng, width, height)
        if size is None:
            continue
        cw, ch = size
        x0, y0 = int(rng.integers(0, width - cw + 1)), int(rng.integers(0, height - ch + 1))
        window = mask[y0:y0 + ch, x0:x0 + cw]
        share = float(window.mean())
        if not defect:
            if share == 0.0:
                return x0, y0, cw, ch
            continue
        rows, cols = np.flatnonzero(window.any(axis=1)), np.flatnonzero(window.any(axis=0))
        visible = len(rows) >= MIN_VISIBLE_PX and len(cols) >= MIN_VISIBLE_PX
        if BOX_SHARE_RANGE[0] <= share <= BOX_SHARE_RANGE[1] and visible:
            return x0, y0, cw, ch
    return None


def manifest_path(out_dir: Path) -> Path:
    """Where the proxy's summary (counts, seed, the source and crop of every file) is written."""
    return Path(out_dir).with_name(Path(out_dir).name + ".json")


def make_proxy(images_dir: Path, annotations_dir: Path, out_dir: Path, seed: int = 0,
               counts: dict[str, int] | None = None) -> dict[str, Any]:
    """Write the proxy set to `out_dir/<class>/*.png` (replacing it whole); returns its summary.

    Same inputs and seed -> byte-identical files. A class whose images cannot give enough
    crops gets fewer (the summary says how many).
    """
    counts = dict(counts or PROXY_COUNTS)
    rng = np.random.default_rng(seed)
    images_dir, annotations_dir, out_dir = Path(images_dir), Path(annotations_dir), Path(out_dir)
    by_class: dict[str, list[Path]] = {}
    for path in sorted(images_dir.glob("*/*")):
        if path.suffix.lower() in {".jpg", ".jpeg", ".png", ".bmp"} and (annotations_dir / f"{path.stem}.xml").is_file():
            by_class.setdefault(path.parent.name, []).append(path)
    missing = [c for c in counts if c != NO_DEFECT and c not in by_class]
    if counts.get(NO_DEFECT) and not any(c in by_class for c in NO_DEFECT_SOURCES):
        missing += [f"{NO_DEFECT} (from {' or '.join(NO_DEFECT_SOURCES)})"]
    if missing:
        raise DataError(f"{images_dir}: no annotated images for {missing}; expected NEU's class folders, with annotations in {annotations_dir}")
    made: dict[str, int] = {}
    sources: list[dict[str, Any]] = []
    with staging_dir(out_dir) as tmp:  # nothing half-written replaces an earlier set
        clean_surfaces = [p for c in sorted(by_class) if c in NO_DEFECT_SOURCES for p in by_class[c]]
        for label, wanted in counts.items():
            pool = clean_surfaces if label == NO_DEFECT else by_class[label]
            order = rng.permutation(len(pool))
            (tmp / label).mkdir()
            made[label] = 0
            for index in order:
                if made[label] >= wanted:
                    break
                path = pool[index]
                image = np.asarray(Image.open(path).convert("L"))
                mask = _box_mask(image.shape, read_voc_boxes(annotations_dir / f"{path.stem}.xml"))
                crop = _find_crop(rng, mask, defect=label != NO_DEFECT)
                if crop is None:
                    continue
                x0, y0, cw, ch = crop
                low = SIDE_RANGE[0] / min(cw, ch)
                high = SIDE_RANGE[1] / max(cw, ch)
                scale = float(rng.uniform(low, high)) if high > low else low
                size = (round(cw * scale), round(ch * scale))
                name = f"{label}_{made[label] + 1:04d}.png"
                Image.fromarray(image[y0:y0 + ch, x0:x0 + cw]).resize(size, Image.Resampling.BICUBIC).save(tmp / label / name)
                sources.append({"file": f"{label}/{name}", "source": path.name, "crop_xywh": [x0, y0, cw, ch], "size": list(size)})
                made[label] += 1
    summary = {"seed": seed, "counts": made, "wanted": counts, "images": sum(made.values()),
               "majority_share": round(made.get(NO_DEFECT, 0) / max(sum(made.values()), 1), 3), "sources": sources}
    # beside the folder, not in it: the folder holds only class folders, as a user's data would
    manifest_path(out_dir).write_text(json.dumps(summary, indent=1))
    short = {c: f"{made[c]}/{n}" for c, n in counts.items() if made[c] < n}
    log.info("proxy data set: %d images in %s (%s)%s", summary["images"], out_dir, ", ".join(f"{c}={n}" for c, n in made.items()),
             f"; fewer than wanted: {short}" if short else "")
    return summary
