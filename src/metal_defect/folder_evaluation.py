"""`main.py evaluate DIR`: a bundle's model judged on any labelled folder that c01 recognises."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from metal_defect.artifacts import write_json_atomic
from metal_defect.components.c01_data_ingestion import ingest
from metal_defect.components.c06_evaluation.scores import SPLIT_METRICS, report_split
from metal_defect.components.c06_evaluation.verdicts import verdict_counts
from metal_defect.serving.predictor import Predictor


def evaluate_folder(folder: Path, predictor: Predictor, config: Any, out_dir: Path) -> dict[str, Any]:
    """`main.py evaluate DIR`: the served (or a named) model on any labelled folder c01 recognises.

    Classes map onto the model's classes through the schema aliases; every split of a
    pre-split tree counts. Writes the same metrics and plots as the evaluation stage.
    """
    class_names = predictor.class_names
    schema = dataclasses.replace(config.schema, classes=class_names, min_images_per_class=1,
                                 aliases={k: v for k, v in config.schema.aliases.items() if k in class_names})
    source = dataclasses.replace(config.data_ingestion, source=str(folder), sha256=None, reviewed=False)  # the folder alone
    out_dir.mkdir(parents=True, exist_ok=True)
    items, skipped, meta = ingest(source, schema, out_dir / "_ingest", config.paths.download_cache, require_all_classes=False)
    paths = [i.path if Path(i.path).is_absolute() else str(out_dir / "_ingest" / i.path) for i in items]
    images, ok, problems, reasons = predictor.load_images(paths)
    labels = np.array([class_names.index(items[i].label) for i in ok])
    names = [paths[i] for i in ok]
    raw, features = predictor.forward(images, config.evaluation.batch_size)
    probs = predictor.calibrate(raw)
    answers = predictor.answers_from(probs, features, images, names, reasons)
    title = f"{predictor.spec.model_name} on {Path(folder).name}"
    report = report_split(labels, probs, class_names, images, names, out_dir, title, config.evaluation)
    report |= {"verdicts": verdict_counts(answers, labels, class_names), "folder": str(folder), "layout": meta["layout"], "bundle": str(predictor.bundle), "temperature": predictor.temperature,
               "skipped_at_ingestion": [dataclasses.asdict(s) for s in skipped], "unreadable": problems}
    write_json_atomic(out_dir / SPLIT_METRICS, report)
    shutil.rmtree(out_dir / "_ingest", ignore_errors=True)
    return report
