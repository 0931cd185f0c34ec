"""c02 data preprocessing: decode and check every image, de-duplicate, split, store, EDA.

Every image goes through `serving.images.to_model_input`'s halves (decode, check, convert),
the conversion the predictor also uses, so serving cannot drift from training.
`pre_processor.joblib` stays as a record of the input contract for people reading the
stage folder; the served bundle's `serving.json` is the authoritative contract.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import joblib
import numpy as np
from PIL import Image
from sklearn.model_selection import train_test_split
from tqdm import tqdm

from metal_defect import plots
from metal_defect.artifacts import write_json_atomic
from metal_defect.config import BaseParams, DataPreprocessingParams, SchemaConfig, SplitParams
from metal_defect.errors import DataError
from metal_defect.review import REVIEWED_SPLIT
from metal_defect.serving.images import (
    DEFAULT_MAX_PIXELS,
    ImageProblem,
    content_problem,
    convert_decoded,
    decode_image,
    is_colourful,
    to_model_input,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")  # and REVIEWED_SPLIT when the review store's labelled images joined
IMAGES_DIR = "images"
RECORDS_FILE = "records.json"
CLASS_LABELS_FILE = "class_labels.json"  # for people and scripts reading the folder (README); the code reads records.json
PREPROCESSOR_FILE = "pre_processor.joblib"  # the input contract as an object, for people; serving reads the bundle's serving.json
REPORT_FILE = "preprocessing_report.json"
EDA_DIR = "eda"
@dataclass(frozen=True)
class ImagePreprocessor:
    """The input contract saved as pre_processor.joblib (a record; serving reads serving.json, never a pickle)."""

    image_size: int
    color_mode: str
    class_names: tuple[str, ...]
    resample: str = "bilinear"
    dtype: str = "uint8"
    max_pixels: int = DEFAULT_MAX_PIXELS
    resize: str = "pad"

    @property
    def channels(self) -> int:
        return 1 if self.color_mode == "grayscale" else 3

    def __call__(self, source: str | os.PathLike | bytes | BinaryIO | Image.Image) -> np.ndarray:
        return to_model_input(source, self.image_size, self.color_mode, max_pixels=self.max_pixels, resize=self.resize)


# ----------------------------------------------------------------------------- the stage
@dataclass
class _Decoded:
    index: int
    ok: bool
    reason: str = ""
    content_hash: str = ""
    colourful: bool = False
    original_size: tuple[int, int] = (0, 0)
    pending: str = ""
    stats: tuple[float, float] = (0.0, 0.0)
    histogram: np.ndarray | None = field(default=None, repr=False)


AUTO_SIZE_STEP = 32  # base.image_size=auto is a multiple of this (the CNN halves the size once per block)
AUTO_SIZE_MIN = 64


def auto_image_size(paths: list[str], max_size: int) -> int:
    """base.image_size=auto: the median long side of the images (read from their headers), rounded
    down to a multiple of 32, between 64 and base.max_image_size.

    Padded or stretched, the long side maps onto the input size, so at the median
    image nothing is shrunk unless the data is larger than the cap, which keeps CPU training
    affordable; small images are not blown up past what they hold.
    """
    def long_side(path: str) -> int:
        try:
            with Image.open(path) as image:
                return max(image.size)
        except (OSError, ValueError, Image.DecompressionBombError):
            return 0  # unreadable here; decoding will skip it with its reason

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        sides = [s for s in pool.map(long_side, paths) if s]
    median = int(np.median(sides)) if sides else max_size
    size = int(min(max(median // AUTO_SIZE_STEP * AUTO_SIZE_STEP, AUTO_SIZE_MIN), max_size))
    log.info("base.image_size=auto: median long side %d px -> input %d px (cap base.max_image_size=%d)", median, size, max_size)
    return size


def prepare(items: list[dict[str, Any]], classes: list[str], base: BaseParams, params: DataPreprocessingParams,
            schema: SchemaConfig, out_dir: Path) -> dict[str, Any]:
    """Decode, check, de-duplicate, split and store `items` ({path, label, split}) in out_dir."""
    started = time.perf_counter()
    items = sorted(items, key=lambda i: (classes.index(i["label"]), i["path"]))
    if base.image_size == "auto":  # from the source alone: labelling a few images must not change the model's input size
        base = dataclasses.replace(base, image_size=auto_image_size([i["path"] for i in items if not _reviewed(i)], base.max_image_size))
    decoded = _decode_all(items, base, params, schema, out_dir / "_pending")
    elapsed_decode = time.perf_counter() - started

    skipped = [{"path": items[d.index]["path"], "reason": d.reason} for d in decoded if not d.ok]
    usable = [d for d in decoded if d.ok]
    # the source is de-duplicated and split exactly as it would be alone, so its test split stays the same
    # whatever is reviewed; the reviewed images keep the side their sha256 gave them (review.reviewed_split)
    kept, duplicates = _deduplicate([d for d in usable if not _reviewed(items[d.index])], items)
    kept_reviewed, reviewed_duplicates = _reviewed_unique([d for d in usable if _reviewed(items[d.index])], kept, items)
    duplicates += reviewed_duplicates
    counts = Counter(items[d.index]["label"] for d in kept)
    short = {c: counts.get(c, 0) for c in classes if counts.get(c, 0) < schema.min_images_per_class}
    if short:
        raise DataError(f"too few usable images: {short} (schema.min_images_per_class = {schema.min_images_per_class}); "
                        f"{len(skipped)} files were unusable, see the log")
    splits = assign_splits([items[d.index] for d in kept], params.split, base.seed) + [items[d.index]["split"] for d in kept_reviewed]
    records = _place_images(kept + kept_reviewed, splits, items, classes, out_dir)
    shutil.rmtree(out_dir / "_pending")

    all_splits = (*SPLITS, REVIEWED_SPLIT) if kept_reviewed else SPLITS
    split_counts = {s: {c: sum(1 for r in records if r["split"] == s and r["label"] == c) for c in classes} for s in all_splits}
    colour = [items[d.index]["path"] for d in usable if d.colourful] if schema.color_mode == "grayscale" else []
    write_json_atomic(out_dir / RECORDS_FILE, {"classes": classes, "image_size": base.image_size, "color_mode": base.color_mode,
                                               "resize": base.resize, "records": records})
    write_json_atomic(out_dir / CLASS_LABELS_FILE, {"classes": classes, "index_of": {c: i for i, c in enumerate(classes)}})
    joblib.dump(ImagePreprocessor(base.image_size, base.color_mode, tuple(classes), max_pixels=params.max_image_pixels, resize=base.resize),
                out_dir / PREPROCESSOR_FILE)
    write_eda(out_dir / EDA_DIR, records, classes, split_counts, kept, items, duplicates, len(skipped), params.eda_samples_per_class, base.resize)

    elapsed = time.perf_counter() - started
    report = {
        "images_in": len(items),
        "images_prepared": len(records),
        "image_size": base.image_size,
        "color_mode": base.color_mode,
        "split_fractions": asdict(params.split),
        "presplit": any(i.get("split") for i in items if not _reviewed(i)),
        "reviewed_images": len(kept_reviewed),
        "counts": split_counts,
        "skipped": skipped,
        "duplicates": duplicates,
        "colour_in_grayscale_dataset": colour,
    }
    # Timings stay out of the output's files (they go into the stage record's summary):
    # the same data must give the same content, or every rerun would retrain downstream.
    write_json_atomic(out_dir / REPORT_FILE, report)
    images_per_second = round(len(items) / max(elapsed_decode, 1e-9), 1)
    _log_report(report, elapsed, images_per_second)
    return {"images_prepared": len(records), "split_sizes": {s: sum(v.values()) for s, v in split_counts.items()},
            "skipped": len(skipped), "duplicates_dropped": sum(len(d["dropped"]) for d in duplicates),
            "seconds": round(elapsed, 3), "images_per_second": images_per_second}


def _decode_all(items: list[dict[str, Any]], base: BaseParams, params: DataPreprocessingParams, schema: SchemaConfig,
                pending_dir: Path) -> list[_Decoded]:
    """Every item decoded and checked on a few threads (the model input of each usable one waits in `pending_dir`)."""
    pending_dir.mkdir(parents=True)
    max_bytes = int(params.max_file_mb * 1e6)

    def work(position: int) -> _Decoded:
        return _decode_one(position, items[position]["path"], base, params, schema, pending_dir, max_bytes)

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(tqdm(pool.map(work, range(len(items))), total=len(items), desc="preprocessing", unit="img", leave=False))


def _place_images(kept: list[_Decoded], splits: list[str], items: list[dict[str, Any]], classes: list[str], out_dir: Path) -> list[dict[str, Any]]:
    """Move each kept image to images/<split>/<label>/<name>.png (a hash suffix when two sources share a name); its record."""
    records = []
    used_names: set[str] = set()
    for d, split in zip(kept, splits):
        item = items[d.index]
        stem = Path(item["path"]).stem
        rel = f"{IMAGES_DIR}/{split}/{item['label']}/{stem}.png"
        if rel in used_names:
            rel = f"{IMAGES_DIR}/{split}/{item['label']}/{stem}-{d.content_hash[:8]}.png"
        used_names.add(rel)
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(d.pending, out_dir / rel)
        records.append({"file": rel, "label": item["label"], "label_index": classes.index(item["label"]), "split": split,
                        "source": item["path"], "sha256": d.content_hash, "original_size": list(d.original_size),
                        **({"origin": "reviewed"} if _reviewed(item) else {})})
    return records


def _reviewed(item: dict[str, Any]) -> bool:
    return item.get("origin") == "reviewed"


def _reviewed_unique(reviewed: list[_Decoded], kept: list[_Decoded], items: list[dict[str, Any]]) -> tuple[list[_Decoded], list[dict[str, Any]]]:
    """Reviewed images that are not the same picture as a kept source image or an earlier reviewed one (the source's copy
    and label stay: a review never moves a source image out of its split)."""
    seen = {d.content_hash: items[d.index]["path"] for d in kept}
    unique, report = [], []
    for d in reviewed:
        if d.content_hash in seen:
            report.append({"kept": seen[d.content_hash], "dropped": [items[d.index]["path"]],
                           "reason": "a reviewed image is the same picture as one already in the data: kept that one"})
            Path(d.pending).unlink(missing_ok=True)
            continue
        seen[d.content_hash] = items[d.index]["path"]
        unique.append(d)
    return unique, report


def write_eda(eda: Path, records: list[dict[str, Any]], classes: list[str], split_counts: dict[str, dict[str, int]], kept: list[_Decoded],
              items: list[dict[str, Any]], duplicates: list[dict[str, Any]], skipped: int, samples: int, resize: str) -> dict[str, Any]:
    """The EDA folder: class counts, sample grid, intensity statistics, image sizes, class mean images and the overview (PNG + JSON)."""
    out_dir = eda.parent
    eda.mkdir()
    write_json_atomic(eda / "class_counts.json", split_counts)
    plots.class_counts(split_counts, eda / "class_counts.png")
    plots.sample_grid(_samples_per_class(out_dir, records, classes, samples), eda / "sample_grid.png")
    stats = _intensity_stats(kept, items, classes)
    write_json_atomic(eda / "intensity_stats.json", stats)
    plots.intensity_histograms({c: np.asarray(s["histogram"]) for c, s in stats.items()}, eda / "intensity_histograms.png")
    overview = dataset_overview(records, classes, duplicates, skipped)
    write_json_atomic(eda / "dataset_overview.json", overview)
    log.info("data: %d images, median %gx%g px, %.0f%% not square (resize: %s), class imbalance %sx, %d duplicates dropped",
             overview["images"], overview["width"]["median"], overview["height"]["median"], 100 * overview["non_square_share"], resize,
             overview["imbalance_ratio"], overview["duplicates_dropped"])
    plots.image_sizes([tuple(r["original_size"]) for r in records], eda / "image_sizes.png")
    plots.class_mean_images(_class_means(out_dir, records, classes), overview["class_counts"], eda / "class_mean_images.png")
    return overview


def _decode_one(position: int, path: str, base: BaseParams, params: DataPreprocessingParams, schema: SchemaConfig,
                pending_dir: Path, max_bytes: int) -> _Decoded:
    try:
        image = decode_image(path, max_pixels=params.max_image_pixels, max_bytes=max_bytes)
    except ImageProblem as exc:
        return _Decoded(position, False, str(exc))
    except OSError as exc:
        return _Decoded(position, False, f"unreadable: {exc.strerror or exc}")
    problem = content_problem(image, params.min_image_side, params.min_pixel_std)
    if problem:
        return _Decoded(position, False, problem)
    colourful = schema.color_mode == "grayscale" and is_colourful(image)
    # duplicates are judged on the picture (decoded pixels), not the container bytes
    content = np.asarray(image)
    content_hash = hashlib.sha256(f"{image.mode}{image.size}".encode() + content.tobytes()).hexdigest()
    arr = convert_decoded(image, base.image_size, base.color_mode, base.resize)
    pending = pending_dir / f"{position}.png"
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(pending, format="PNG", compress_level=1)
    scaled = arr.astype(np.float32) / 255.0
    histogram = np.bincount(arr.reshape(-1), minlength=256)
    return _Decoded(position, True, "", content_hash, colourful, image.size, str(pending), (float(scaled.mean()), float(scaled.std())), histogram)


def _deduplicate(usable: list[_Decoded], items: list[dict[str, Any]]) -> tuple[list[_Decoded], list[dict[str, Any]]]:
    """Keep one copy of each picture: in the highest split (train > valid > test), first by path.

    A picture labelled with two different classes is dropped entirely: no label is trusted.
    """
    groups: dict[str, list[_Decoded]] = defaultdict(list)
    for d in usable:
        groups[d.content_hash].append(d)
    rank = {"train": 0, "valid": 1, "test": 2, None: 0}
    dropped_ids: set[int] = set()
    report = []
    for group in groups.values():
        if len(group) < 2:
            continue
        labels = sorted({items[d.index]["label"] for d in group})
        paths = [items[d.index]["path"] for d in group]
        if len(labels) > 1:
            dropped_ids.update(d.index for d in group)
            report.append({"kept": None, "dropped": paths, "reason": f"the same picture is labelled {labels}: all copies dropped"})
            continue
        ordered = sorted(group, key=lambda d: (rank[items[d.index].get("split")], items[d.index]["path"]))
        keep, drop = ordered[0], ordered[1:]
        dropped_ids.update(d.index for d in drop)
        where = {items[d.index].get("split") for d in group}
        reason = "exact duplicate" + (f" across splits {sorted(where)}: kept the {items[keep.index].get('split')} copy" if len(where) > 1 else "")
        report.append({"kept": items[keep.index]["path"], "dropped": [items[d.index]["path"] for d in drop], "reason": reason})
    for d in usable:
        if d.index in dropped_ids:
            Path(d.pending).unlink(missing_ok=True)
    return [d for d in usable if d.index not in dropped_ids], report


def assign_splits(items: list[dict[str, Any]], fractions: SplitParams, seed: int) -> list[str]:
    """Split names for `items` (in their order): a pre-split source keeps its split, else stratified.

    Same items, fractions and seed -> same split. A pre-split source missing valid or test
    has them carved out of its train part, stratified.
    """
    labels = np.array([i["label"] for i in items])
    given = [i.get("split") for i in items]
    result = np.array([s or "train" for s in given], dtype=object)
    presplit = any(given)
    carve = [s for s in ("valid", "test") if not presplit or s not in given]
    pool = np.flatnonzero(result == "train")
    remaining = fractions.train + sum(getattr(fractions, s) for s in carve)
    for split in carve:
        fraction = getattr(fractions, split) / remaining
        remaining -= getattr(fractions, split)
        if fraction <= 0:
            continue
        try:
            pool, chosen = train_test_split(pool, test_size=fraction, stratify=labels[pool], random_state=seed)
        except ValueError as exc:
            raise DataError(f"cannot split {len(pool)} images into a stratified {split} part of {fraction:.0%}: {exc}. "
                            "Lower data_preprocessing.split or add images") from exc
        result[chosen] = split
    return result.tolist()


def dataset_overview(records: list[dict[str, Any]], classes: list[str], duplicates: list[dict[str, Any]], skipped: int) -> dict[str, Any]:
    """What a user should see first on new data: sizes, aspect ratios, imbalance, duplicates."""
    sizes = np.array([r["original_size"] for r in records], dtype=float).reshape(-1, 2)
    ratios = sizes[:, 0] / np.maximum(sizes[:, 1], 1) if len(sizes) else np.zeros(1)
    counts = {c: sum(r["label"] == c for r in records) for c in classes}
    present = [n for n in counts.values() if n]

    def spread(values: np.ndarray) -> dict[str, float]:
        if not len(values):
            return {"min": 0.0, "median": 0.0, "max": 0.0}
        return {"min": float(values.min()), "median": float(np.median(values)), "max": float(values.max())}

    return {
        "images": len(records), "class_counts": counts,
        "imbalance_ratio": round(max(present) / min(present), 3) if present else None,
        "width": spread(sizes[:, 0]), "height": spread(sizes[:, 1]),
        "aspect_ratio": {k: round(v, 3) for k, v in spread(ratios).items()},
        "non_square_share": round(float(np.mean(np.abs(ratios - 1) > 0.02)), 4) if len(sizes) else 0.0,
        "duplicate_groups": len(duplicates), "duplicates_dropped": sum(len(d["dropped"]) for d in duplicates), "skipped": skipped,
    }


def _class_means(out_dir: Path, records: list[dict[str, Any]], classes: list[str]) -> dict[str, np.ndarray]:
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {c: 0 for c in classes}
    for record in records:
        image = np.asarray(Image.open(out_dir / record["file"]), dtype=np.float64)
        sums[record["label"]] = sums.get(record["label"], 0) + image
        counts[record["label"]] += 1
    return {c: sums[c] / counts[c] for c in classes if counts[c]}


def _samples_per_class(out_dir: Path, records: list[dict[str, Any]], classes: list[str], n: int) -> dict[str, list[np.ndarray]]:
    samples: dict[str, list[np.ndarray]] = {c: [] for c in classes}
    for record in records:
        bucket = samples[record["label"]]
        if len(bucket) < n:
            bucket.append(np.asarray(Image.open(out_dir / record["file"])))
    return samples


def _intensity_stats(kept: Iterable[_Decoded], items: list[dict[str, Any]], classes: list[str]) -> dict[str, dict[str, Any]]:
    per_class: dict[str, list[_Decoded]] = {c: [] for c in classes}
    for d in kept:
        per_class[items[d.index]["label"]].append(d)
    stats = {}
    for label, group in per_class.items():
        hist = np.sum([d.histogram for d in group], axis=0) if group else np.zeros(256, dtype=np.int64)
        levels = np.arange(256) / 255.0
        total = max(int(hist.sum()), 1)
        mean = float((hist * levels).sum() / total)
        std = float(np.sqrt((hist * (levels - mean) ** 2).sum() / total))
        cdf = np.cumsum(hist) / total
        image_stds = np.array([d.stats[1] for d in group]) if group else np.zeros(1)
        stats[label] = {
            "images": len(group), "mean": round(mean, 4), "std": round(std, 4),
            "p01": round(float(np.searchsorted(cdf, 0.01)) / 255, 4), "median": round(float(np.searchsorted(cdf, 0.5)) / 255, 4),
            "p99": round(float(np.searchsorted(cdf, 0.99)) / 255, 4),
            "per_image_std_mean": round(float(image_stds.mean()), 4), "per_image_std_min": round(float(image_stds.min()), 4),
            "histogram": hist.astype(int).tolist(),
        }
    return stats


def _log_report(report: dict[str, Any], seconds: float, images_per_second: float) -> None:
    log.info("preprocessing: %d of %d images prepared at %d px %s in %.1f s (%.0f images/s)", report["images_prepared"], report["images_in"],
             report["image_size"], report["color_mode"], seconds, images_per_second)
    for split, per_class in report["counts"].items():
        log.info("  %-5s %4d  %s", split, sum(per_class.values()), ", ".join(f"{c}={n}" for c, n in per_class.items()))
    for dup in report["duplicates"]:
        log.warning("  duplicate: %s; dropped %s (%s)", dup["kept"], ", ".join(dup["dropped"]), dup["reason"])
    for skip in report["skipped"]:
        log.warning("  skipped %s: %s", skip["path"], skip["reason"])
    if report["colour_in_grayscale_dataset"]:
        log.warning("  %d image(s) carry colour although schema.color_mode is grayscale, e.g. %s", len(report["colour_in_grayscale_dataset"]),
                    report["colour_in_grayscale_dataset"][0])
