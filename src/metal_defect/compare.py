"""`python main.py compare RUN_A RUN_B`: two runs' models on the same images, side by side.

The images are, by default, the newer run's prepared test split (the source's own, which reviewed
images never enter) and its reviewed slice (reviewed images kept out of training), or any
labelled folder given with `--on DIR`. Each model answers every set through its bundle, as
`evaluate DIR` does; the table holds accuracy, macro F1, the recall of every class and the
flagged share (answers `uncertain` or `out_of_distribution`).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from metal_defect import artifacts as art
from metal_defect import served as served_model
from metal_defect.errors import ArtifactError, DataError
from metal_defect.metrics import present_macro_f1
from metal_defect.review import REVIEWED_SPLIT

COMPARE_FILE = "compare.json"
TABLE_FILE = "compare.md"
PREPARED_IMAGES = "images"  # c02's images/<split>/<class>/*.png


def prepared_folder(store: art.ArtifactStore, run_id: str) -> Path:
    """The prepared data (stage 2's output) run `run_id` trained on."""
    stage = store.manifest(run_id).get("stages", {}).get("data_preprocessing")
    if not stage or not stage.get("output"):
        raise ArtifactError(f"run {run_id} has no prepared data; `compare --on DIR` names the images to use")
    folder = Path(stage["output"])
    if not folder.is_dir():
        raise ArtifactError(f"run {run_id}: its prepared data {folder} is gone; use `compare --on DIR`")
    return folder


def image_sets(store: art.ArtifactStore, newer_run: str, on: Path | None) -> dict[str, Path]:
    """Set name -> labelled folder: `--on DIR`, else the newer run's test split and reviewed slice."""
    if on is not None:
        if not Path(on).is_dir():
            raise DataError(f"compare --on {on}: no such folder (a folder of class folders of images)")
        return {Path(on).name: Path(on)}
    images = prepared_folder(store, newer_run) / PREPARED_IMAGES
    sets = {name: images / name for name in ("test", REVIEWED_SPLIT) if (images / name).is_dir()}
    if not sets:
        raise ArtifactError(f"run {newer_run}'s prepared data has neither a test split nor a reviewed slice; use `compare --on DIR`")
    return sets


def score_on_split(predictor: Any, split: tuple[Any, Any, list[str]], data_classes: list[str], batch_size: int = 64) -> dict[str, Any] | None:
    """A loaded bundle's answers on one prepared split (images, labels, names; test or reviewed): accuracy, macro F1,
    per-class recall, flagged share; None when the split is empty or the bundle's classes are not the data's."""
    from metal_defect.components.c06_evaluation.scores import served_answers
    from metal_defect.components.c06_evaluation.verdicts import verdict_counts
    from metal_defect.metrics import classification_metrics

    images, labels, names = split
    if not len(labels) or list(predictor.class_names) != list(data_classes):
        return None
    _, probs, answers = served_answers(predictor, images, names, batch_size)
    result = classification_metrics(labels, probs, predictor.class_names)
    verdicts = verdict_counts(answers, labels, predictor.class_names)
    return {"n": result["n"], "errors": result["errors"], "accuracy": result["accuracy"], "macro_f1": present_macro_f1(result),
            "recall": present_recall(result), "flagged_share": verdicts["flagged_share"], "model": predictor.spec.model_name}


def data_classes(prepared: Path) -> list[str]:
    """The class names of c02's prepared data, in label order."""
    from metal_defect.components.c02_data_preprocessing import RECORDS_FILE

    return art.read_json(prepared / RECORDS_FILE)["classes"]


def present_recall(result: dict[str, Any]) -> dict[str, float | None]:
    """Each class's recall, None for a class the set has no image of (a small slice often lacks some)."""
    return {c: v["recall"] if v["support"] else None for c, v in result["per_class"].items()}


def against_served_before(store: art.ArtifactStore, before_run: str, run_id: str) -> dict[str, Any]:
    """The model served before run `run_id` and the one it chose, on that run's test split and reviewed slice."""
    from metal_defect.components.c06_evaluation.scores import load_split
    from metal_defect.serving.predictor import Predictor

    prepared = prepared_folder(store, run_id)
    classes = data_classes(prepared)
    before, now = (Predictor.from_bundle(served_model.bundle_of_run(store, run)) for run in (before_run, run_id))
    result: dict[str, Any] = {"run_id": before_run}
    for split_name in ("test", REVIEWED_SPLIT):
        split = load_split(prepared, split_name)
        scores = score_on_split(before, split, classes), score_on_split(now, split, classes)
        if all(scores):
            result[split_name] = {"before": scores[0], "now": scores[1]}
    return result


def compare_runs(config: Any, runs: list[str], on: Path | None = None, out: Path | None = None) -> dict[str, Any]:
    """Evaluate each run's chosen model on the same image sets; rows, a Markdown table, and where they were written."""
    from metal_defect.components.c06_evaluation.scores import load_split
    from metal_defect.folder_evaluation import evaluate_folder
    from metal_defect.serving.predictor import Predictor

    store = art.ArtifactStore(config.paths.artifacts)
    sets = image_sets(store, runs[-1], on)
    out = Path(out or store.root / "compare" / f"{dt.datetime.now():%Y%m%d-%H%M%S}-{'-vs-'.join(runs)}")
    predictors = {run_id: Predictor.from_bundle(served_model.bundle_of_run(store, run_id)) for run_id in runs}
    rows = []
    for set_name, folder in sets.items():
        prepared = folder.parent.parent
        split, classes = (load_split(prepared, set_name), data_classes(prepared)) if on is None else (None, [])
        for run_id, predictor in predictors.items():
            row = score_on_split(predictor, split, classes) if split is not None else None
            if row is None:  # a folder, or a model of other classes: through `evaluate DIR`'s path (schema aliases)
                report = evaluate_folder(folder, predictor, config, out / set_name / run_id)
                row = {"model": predictor.spec.model_name, "n": report["n"], "errors": report["errors"], "accuracy": report["accuracy"],
                       "macro_f1": present_macro_f1(report), "recall": present_recall(report),
                       "flagged_share": report["verdicts"]["flagged_share"]}
            rows.append({"set": set_name, "run": run_id, **row, "folder": str(folder)})
    table = comparison_table(rows)
    art.write_json_atomic(out / COMPARE_FILE, {"runs": runs, "sets": {k: str(v) for k, v in sets.items()}, "rows": rows})
    (out / TABLE_FILE).write_text(table, encoding="utf-8")
    return {"rows": rows, "table": table, "out": str(out)}


def comparison_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one row per (image set, run), the per-class recalls as one column each."""
    classes = list(rows[0]["recall"]) if rows else []
    head = ["images", "run", "model", "n", "accuracy", "macro F1", *[f"recall {c}" for c in classes], "flagged"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["set"], r["run"], r["model"], str(r["n"]), f"{r['accuracy']:.1%} ({r['n'] - r['errors']}/{r['n']})", f"{r['macro_f1']:.3f}",
                 *[f"{r['recall'][c]:.2f}" if r["recall"].get(c) is not None else "-" for c in classes], f"{r['flagged_share']:.1%}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
