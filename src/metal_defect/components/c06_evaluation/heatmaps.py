"""c06 heatmaps: which layer the served heatmaps use, and how often they point into the ground truth
(Pascal VOC boxes in `evaluation.annotations`, or defect masks in `evaluation.masks`)."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from metal_defect.artifacts import write_json_atomic
from metal_defect.serving import explain
from metal_defect.serving.predictor import Predictor

log = logging.getLogger(__name__)


POINTING_FILE = "pointing.json"  # in the evaluation's test folder: what `bench datasets` reads
MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg", ".gif")


def mask_index(masks: str | None) -> dict[str, list[Path]]:
    """Mask files under `masks` (any depth) by file stem."""
    index: dict[str, list[Path]] = {}
    if masks and Path(masks).is_dir():
        for path in sorted(Path(masks).rglob("*")):
            if path.suffix.lower() in MASK_SUFFIXES and path.is_file():
                index.setdefault(path.stem, []).append(path)
    return index


def regions_for(records: list[dict[str, Any]], annotations: str | None, masks: str | None = None) -> tuple[list[int], list[explain.Region]]:
    """Indices of the records with ground truth, matched by file name, and their regions scaled to each
    image's original size: Pascal VOC boxes in `annotations` first, else a non-empty defect mask in
    `masks` (where two masks share a name, the one in a folder named after the image's class).
    An unreadable file is reported and left out; an empty mask (no defect) gives no region."""
    by_stem = mask_index(masks)
    chosen: list[int] = []
    regions: list[explain.Region] = []
    for i, record in enumerate(records):
        stem = Path(record["source"]).stem
        xml = Path(annotations) / f"{stem}.xml" if annotations else None
        try:
            if xml is not None and xml.is_file():
                found: explain.Region = explain.read_voc(xml)
            elif stem in by_stem:
                candidates = by_stem[stem]
                path = next((p for p in candidates if p.parent.name == record.get("label")), candidates[0])
                found = explain.read_mask(path)
                if not found.pixels.any():
                    continue
            else:
                continue
        except ValueError as exc:
            log.warning("heatmap ground truth: %s", exc)
            continue
        chosen.append(i)
        regions.append(found.scaled_to(*(record.get("original_size") or (found.width, found.height))))
    return chosen, regions


def _pointing(predictor: Predictor, images: np.ndarray, records: list[dict[str, Any]], chosen: list[int], boxes: list[explain.Region],
              classes: np.ndarray) -> tuple[dict[str, Any], list[np.ndarray]]:
    sizes = [tuple(records[i].get("original_size") or (b.width, b.height)) for i, b in zip(chosen, boxes)]
    heat = predictor.heatmaps(images[chosen], classes[chosen], sizes)
    return explain.pointing_accuracy([explain.peak(h) for h in heat], boxes, [records[i]["label"] for i in chosen]), heat


def choose_heatmap_layer(predictor: Predictor, x_valid: np.ndarray, predicted: np.ndarray, valid_records: list[dict[str, Any]],
                         annotations: str | None, masks: str | None = None) -> tuple[str, dict[str, Any]]:
    """The heatmap layer: among the deepest layer of each feature-map size, the one whose LayerCAM
    points into the validation boxes most often; without boxes, explain.heatmap_layer's default."""
    size = int(predictor.spec.image_size)
    default = explain.heatmap_layer(predictor.model, size)
    chosen, boxes = regions_for(valid_records, annotations, masks)
    if not chosen:
        return default, {"layer": default, "method": "layercam", "chosen_by": "default rule (no validation ground truth): the deepest layer at stride 4"}
    scores: dict[str, float] = {}
    for layer, _side in explain.candidate_layers(predictor.model, size):
        probe = Predictor(predictor.model, dataclasses.replace(predictor.spec, heatmap_layer=layer, heatmap_method="layercam"))
        scores[layer] = _pointing(probe, x_valid, valid_records, chosen, boxes, predicted)[0]["overall"]["strict"]
    best = max(scores, key=lambda name: (round(scores[name], 6), -list(scores).index(name)))  # ties: the deeper layer
    log.info("heatmap layer %s: LayerCAM validation pointing accuracy %s", best, ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    return best, {"layer": best, "method": "layercam", "chosen_by": f"validation pointing accuracy on {len(chosen)} images with ground truth",
                  "validation_strict": scores}


def pointing_report(predictor: Predictor, images: np.ndarray, records: list[dict[str, Any]], predicted: np.ndarray, class_names: list[str],
                    annotations: str | None, out_dir: Path, masks: str | None = None) -> dict[str, Any] | None:
    """Pointing accuracy of the served heatmaps on the test images that have ground truth (boxes or masks),
    beside plain Grad-CAM at the last spatial layer, and a grid of overlays (hits and misses of every
    class); None when no test image has any."""
    started = time.perf_counter()
    chosen, boxes = regions_for(records, annotations, masks)
    if not chosen:
        if annotations or masks:
            log.info("no test image has boxes in %s or a defect mask in %s: no pointing accuracy", annotations, masks)
        return None
    result, heat = _pointing(predictor, images, records, chosen, boxes, predicted)
    baseline_layer = explain.last_spatial_layer(predictor.model)
    baseline = Predictor(predictor.model, dataclasses.replace(predictor.spec, heatmap_layer=baseline_layer, heatmap_method="gradcam"))
    baseline_result = _pointing(baseline, images, records, chosen, boxes, predicted)[0]
    hits = result.pop("hits")
    baseline_result.pop("hits")
    result |= {"layer": predictor.gradcam().layer, "method": predictor.gradcam().method, "annotations": str(annotations),
               "masks": str(masks) if masks else None, "ground_truth": "masks" if any(isinstance(b, explain.Mask) for b in boxes) else "boxes",
               "images_with_boxes": len(chosen), "of_test_images": len(records),
               "gradcam_last_layer": {"layer": baseline_layer, "overall": baseline_result["overall"]},
               "seconds": round(time.perf_counter() - started, 2)}
    overall = result["overall"]
    log.info("heatmap pointing accuracy on %d test images with ground truth (%s at %s): %.3f strict, %.3f within %d px (chance %.3f); "
             "plain Grad-CAM at %s: %.3f strict", len(chosen), result["method"], result["layer"], overall["strict"], overall["tolerant"],
             result["tolerance_px"], overall["chance"], baseline_layer, baseline_result["overall"]["strict"])
    shown = []
    for label in dict.fromkeys(records[i]["label"] for i in chosen):  # up to 2 hits and 2 misses per class
        of_class = [j for j, i in enumerate(chosen) if records[i]["label"] == label]
        shown += [j for j in of_class if hits[j]][:2] + [j for j in of_class if not hits[j]][:2]
    pictures, captions = [], []
    for j in shown:
        record = records[chosen[j]]
        source = Path(record["source"])
        original = Image.open(source) if source.is_file() else Image.fromarray(images[chosen[j]].squeeze())
        size = tuple(record.get("original_size") or original.size)
        pictures.append(explain.draw_regions(explain.overlay(original.resize(size), heat[j]), boxes[j]))
        captions.append(f"{'HIT' if hits[j] else 'MISS'}: {source.name}\npredicted {class_names[predicted[chosen[j]]]}")
    explain.overlay_grid(pictures, captions, f"{explain.METHOD_NAMES[result['method']]} at {result['layer']} on test images with ground truth: peak on it "
                         f"{overall['strict']:.1%} (chance {overall['chance']:.1%}); ring = peak, white outlines = ground truth",
                         out_dir / "heatmaps.png", columns=8)
    write_json_atomic(out_dir / POINTING_FILE, result)
    return result
