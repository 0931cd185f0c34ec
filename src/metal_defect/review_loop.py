"""`bench reviews`: does the next model learn from what the engineer labelled? (issue 26's measurement)

1. The pipeline as configured (run A; reused when it has run).
2. `--images` (default 60) images of run A's test split, an equal number per class, are changed in a
   way training never showed: a lighting gradient across the image (one side at 45 % of its grey
   levels, the other at 155 %, in a random direction).
3. Run A's model answers them (`predict`: the flagged ones join the review queue).
4. Half of them (the same number per class) are labelled with their true class (`review add`, the
   command line's "this answer is wrong"); the other half are held out.
5. The pipeline again (run B: the labelled images are a second source, so it retrains).
6. `compare A B` on the held-out changed images, on the test split (all of it, and without the
   originals of the labelled images, whose changed copies B trained on), and on B's reviewed slice.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from metal_defect import artifacts as art

log = logging.getLogger(__name__)


def lighting_gradient(image: Image.Image, rng: np.random.Generator, low: float = 0.45, high: float = 1.55) -> Image.Image:
    """The image under light falling off across it: grey levels times a linear ramp from `low` to `high`."""
    pixels = np.asarray(image.convert("L"), dtype=np.float64)
    height, width = pixels.shape
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width]
    along = (xs - width / 2) * np.cos(angle) + (ys - height / 2) * np.sin(angle)
    ramp = (along - along.min()) / max(along.max() - along.min(), 1e-9)
    return Image.fromarray(np.clip(pixels * (low + (high - low) * ramp), 0, 255).round().astype(np.uint8))


def bench_reviews(config: Any, args: Any) -> dict[str, Any]:
    """Run the whole loop once; the before/after tables and counts."""
    from metal_defect import commands
    from metal_defect.compare import compare_runs, prepared_folder
    from metal_defect.components.c02_data_preprocessing import RECORDS_FILE
    from metal_defect.pipeline import Runner

    count = args.images or 60
    root = Path(config.paths.artifacts) / "bench" / "reviews"
    shutil.rmtree(root, ignore_errors=True)
    first = Runner(config, command="bench").run()
    store = art.ArtifactStore(config.paths.artifacts)
    prepared = prepared_folder(store, first["run_id"])
    records = art.read_json(prepared / RECORDS_FILE)
    classes = records["classes"]
    rng = np.random.default_rng(config.base.seed)
    per_class = count // len(classes)
    labelled, held = root / "labelled", root / "held_out"
    originals: list[str] = []
    for label in classes:
        test = sorted(r["source"] for r in records["records"] if r["split"] == "test" and r["label"] == label)
        chosen = [test[i] for i in rng.choice(len(test), size=min(per_class, len(test)), replace=False)]
        for number, source in enumerate(chosen):
            target = (labelled if number % 2 == 0 else held) / label / f"{Path(source).stem}_lit.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            lighting_gradient(Image.open(source), rng).save(target)
            if number % 2 == 0:
                originals.append(source)
    changed = sorted(root.glob("*/*/*.png"))
    text, _ = commands.predict(config, [str(p) for p in changed], first["run_id"], root / "answers_before.csv", None, None)
    log.info("run %s on the %d changed images:\n%s", first["run_id"], len(changed), text)
    store_review = commands.review_store(config)
    for label in classes:
        files = sorted((labelled / label).glob("*.png"))
        if files:
            commands.review_add(config, store_review, files, label, "bench reviews")
    second = Runner(config, command="bench").run()
    clean_test = root / "test_without_labelled_originals"
    skip = {Path(s).resolve() for s in originals}
    for r in records["records"]:
        if r["split"] == "test" and Path(r["source"]).resolve() not in skip:
            target = clean_test / r["label"] / Path(r["file"]).name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(prepared / r["file"], target)
    runs = [first["run_id"], second["run_id"]]
    tables = {"held_out_changed": compare_runs(config, runs, held, root / "compare-held-out"),
              "test_without_labelled_originals": compare_runs(config, runs, clean_test, root / "compare-clean-test"),
              "test_and_reviewed": compare_runs(config, runs, None, root / "compare-default")}
    headline = {name: {row["run"]: round(row["accuracy"], 4) for row in t["rows"] if row["set"] != "reviewed"} for name, t in tables.items()}
    return {"runs": runs, "labelled": len(list(labelled.rglob("*.png"))), "held_out": len(list(held.rglob("*.png"))),
            "answers_before": text, "tables": {k: v["table"] for k, v in tables.items()}, "headline": headline}
