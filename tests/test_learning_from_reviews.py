"""Issue 26: reviewed images train the next model, are measured on their own slice, and two runs compare on the same images."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
from pathlib import Path

import pytest
from conftest import TINY_SCHEMA, _deep_merge, tiny_training_params, write_config

from metal_defect import synthetic
from metal_defect.artifacts import read_json
from metal_defect.config import load_config
from metal_defect.errors import DataError
from metal_defect.pipeline import Runner
from metal_defect.review import LABELS_LOG, NOT_VALID, REVIEWED_SPLIT, ReviewStore, reviewed_split


def _config(tmp_path: Path, per_class: int = 12) -> Path:
    data = synthetic.make_dataset(tmp_path / "data", per_class=per_class)
    params = _deep_merge(tiny_training_params(epochs=3), {"data_ingestion": {"source": str(data)}})
    return write_config(tmp_path / "cfg", params, TINY_SCHEMA, {"paths": {"review": str(tmp_path / "review")}})


def _queue_and_label(store: ReviewStore, tmp_path: Path, per_class: int, labels: dict[int, str] | None = None) -> list[str]:
    """New synthetic images (another seed) queued as flagged answers and labelled with their true class."""
    fresh = synthetic.make_dataset(tmp_path / "fresh", per_class=per_class, seed=7)
    shas = []
    for number, path in enumerate(sorted(fresh.rglob("*.png"))):
        data = path.read_bytes()
        store.add(data, path.name, {"label": "crazing", "verdict": "uncertain", "confidence": 0.4, "model_run": "r"}, "uncertain", "cli")
        sha = hashlib.sha256(data).hexdigest()
        store.label(sha, (labels or {}).get(number, path.parent.name), list(synthetic.CLASSES), reviewer="Ana")
        shas.append(sha)
    return shas


def _test_files(manifest: dict) -> list[str]:
    records = read_json(Path(manifest["stages"]["data_preprocessing"]["output"]) / "records.json")["records"]
    return sorted(r["source"] for r in records if r["split"] == "test")


def test_reviewed_images_join_training_by_their_sha256_and_leave_the_source_split_alone(tmp_path):
    folder = _config(tmp_path)
    before = Runner(load_config(folder)).run("1-2")
    store = ReviewStore(tmp_path / "review")
    shas = _queue_and_label(store, tmp_path, per_class=5, labels={0: NOT_VALID})
    after = Runner(load_config(folder)).run("1-2")
    assert not after["stages"]["data_ingestion"]["reused"]  # a new decision changes the data fingerprint
    assert _test_files(after) == _test_files(before)  # the source's test split is the same
    records = read_json(Path(after["stages"]["data_preprocessing"]["output"]) / "records.json")["records"]
    reviewed = {Path(r["source"]).stem: r for r in records if r.get("origin") == "reviewed"}
    assert set(reviewed) == set(shas[1:])  # the not-valid one is left out
    assert all(r["split"] == reviewed_split(sha) for sha, r in reviewed.items())
    assert {r["split"] for r in reviewed.values()} == {"train", REVIEWED_SPLIT}  # 14 images: both sides (by sha256)
    from metal_defect.components.c03_dataset_loader import build_datasets

    config = load_config(folder)
    train = build_datasets(Path(after["stages"]["data_preprocessing"]["output"]), config.data_loader, 42)["train"]
    reviewed_train = [r for r in reviewed.values() if r["split"] == "train"]
    source_train = sum(1 for r in records if r["split"] == "train" and r.get("origin") != "reviewed")
    drawn = sum(1 for f in train.files if Path(f).stem in shas)
    assert drawn >= config.data_loader.reviewed_share * train.size and drawn % len(reviewed_train) == 0  # repeated, whole
    assert train.size - drawn == source_train
    again = Runner(load_config(folder)).run("1-2")
    assert again["stages"]["data_ingestion"]["reused"] and again["stages"]["data_preprocessing"]["reused"]  # unchanged queue: reused
    plain = Runner(load_config(folder, ["data_ingestion.reviewed=false"])).run("1-2")
    # the same prepared data as before anything was reviewed (reused: the same content)
    assert plain["stages"]["data_preprocessing"]["output"] == before["stages"]["data_preprocessing"]["output"]


def test_a_reviewed_class_the_data_set_does_not_have_is_refused_with_its_name(tmp_path):
    folder = _config(tmp_path)
    store = ReviewStore(tmp_path / "review")
    (sha,) = _queue_and_label(store, tmp_path, per_class=1)[:1]
    with open(tmp_path / "review" / LABELS_LOG, "a") as handle:  # a decision made for a model with another class
        handle.write(json.dumps({"sha256": sha, "class": "rust", "reviewer": "Bo", "name": "x.png"}) + "\n")
    with pytest.raises(DataError, match=r"'rust'.*schema\.yaml"):
        Runner(load_config(folder)).run("1")


@pytest.mark.slow
def test_the_next_run_reports_the_reviewed_slice_beside_the_model_it_replaced_and_compare_sets_runs_side_by_side(tmp_path, caplog):
    from metal_defect.cli import main

    folder = _config(tmp_path)
    first = Runner(load_config(folder)).run()
    _queue_and_label(ReviewStore(tmp_path / "review"), tmp_path, per_class=6)
    with caplog.at_level(logging.INFO):
        second = Runner(load_config(folder)).run()
    assert second["metrics"]["reviewed_n"] >= 1 and 0 <= second["metrics"]["reviewed_accuracy"] <= 1
    manifest = Runner(load_config(folder)).store.manifest(second["run_id"])
    on_disk = read_json(Path(manifest["stages"]["evaluation"]["output"]) / REVIEWED_SPLIT / "metrics.json")
    assert on_disk["macro_f1"] == second["metrics"]["reviewed_macro_f1"]  # the slice's file and the run's summary agree
    previous = second["served"]["previous"]
    assert previous["run_id"] == first["run_id"] and {"test", REVIEWED_SPLIT} <= set(previous)
    assert previous["test"]["before"]["n"] == previous["test"]["now"]["n"] == first["metrics"]["test_n"]
    assert any("the model served before (run " + first["run_id"] in r.getMessage() for r in caplog.records)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(["compare", first["run_id"], second["run_id"], "--config", str(folder)]) == 0
    table = out.getvalue()
    for run_id in (first["run_id"], second["run_id"]):
        assert f"| test | {run_id} |" in table and f"| {REVIEWED_SPLIT} | {run_id} |" in table
    assert "recall crazing" in table and "flagged" in table
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(["runs", "--config", str(folder)]) == 0
    assert f"(run {first['run_id']})" in out.getvalue() and "reviewed acc" in out.getvalue()


def test_the_lighting_gradient_darkens_one_side_and_brightens_the_other():
    import numpy as np
    from PIL import Image

    from metal_defect.review_loop import lighting_gradient

    flat = Image.new("L", (40, 40), 100)
    lit = np.asarray(lighting_gradient(flat, np.random.default_rng(0)), dtype=float)
    assert lit.min() == pytest.approx(45, abs=2) and lit.max() == pytest.approx(155, abs=2)  # 45 % to 155 % of the grey level
    assert abs(lit.mean() - 100) < 3 and lit.shape == (40, 40)


def test_a_small_slices_macro_f1_counts_only_the_classes_it_holds_or_was_answered():
    import numpy as np

    from metal_defect.metrics import classification_metrics, present_macro_f1

    probs = np.eye(6)[[2, 5, 5]]  # three images of two classes, all answered right, out of six classes
    result = classification_metrics(np.array([2, 5, 5]), probs, [f"c{i}" for i in range(6)])
    assert result["macro_f1"] == pytest.approx(2 / 6) and present_macro_f1(result) == 1.0
    wrong = classification_metrics(np.array([2, 5, 5]), np.eye(6)[[0, 5, 5]], [f"c{i}" for i in range(6)])
    assert present_macro_f1(wrong) == pytest.approx((0 + 0 + 1) / 3)  # c0 answered (wrongly) counts; c2 missed counts


def test_reviewed_images_are_repeated_to_their_share_of_an_epoch_and_drawn_once_at_zero():
    from metal_defect.components.c03_dataset_loader import with_reviewed_share

    rows = [{"file": f"s{i}"} for i in range(90)] + [{"file": f"r{i}", "origin": "reviewed"} for i in range(3)]
    repeated = with_reviewed_share(rows, 0.1)
    reviewed = [r for r in repeated if r.get("origin") == "reviewed"]
    assert len(reviewed) == 12 and len(reviewed) / len(repeated) >= 0.1 and len(repeated) - len(reviewed) == 90  # each 4 times
    assert with_reviewed_share(rows, 0.0) == rows and with_reviewed_share(rows[:90], 0.1) == rows[:90]


def test_the_reviewed_slices_metrics_file_holds_the_macro_f1_the_run_reports(tmp_path):
    """A slice of two of six classes, all answered right: its file said 0.33 (absent classes as 0) while the run said 1.0."""
    import types

    import numpy as np
    from PIL import Image

    from metal_defect.components.c06_evaluation.evaluate import report_reviewed

    classes = [f"c{i}" for i in range(6)]
    labels = [2, 5, 5]
    (tmp_path / "prep" / "images").mkdir(parents=True)
    records = []
    for i, label in enumerate(labels):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / "prep" / "images" / f"{i}.png")
        records.append({"file": f"images/{i}.png", "split": REVIEWED_SPLIT, "label_index": label, "source": f"{i}.png"})
    (tmp_path / "prep" / "records.json").write_text(json.dumps({"classes": classes, "records": records}))
    answer = types.SimpleNamespace(verdict="ok", flagged=False)
    served = types.SimpleNamespace(
        forward=lambda x, batch: (np.eye(6)[labels], None), calibrate=lambda raw: raw,
        answers_from=lambda probs, feats, x, names: [types.SimpleNamespace(**vars(answer), label=classes[p.argmax()]) for p in probs])
    params = load_config(write_config(tmp_path / "cfg", tiny_training_params(epochs=1), TINY_SCHEMA)).evaluation
    report = report_reviewed(served, tmp_path / "prep", classes, "m", params, tmp_path / "out")
    assert report["macro_f1"] == 1.0
    assert read_json(tmp_path / "out" / REVIEWED_SPLIT / "metrics.json")["macro_f1"] == 1.0
