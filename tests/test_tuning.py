"""c07: the Keras Tuner search (space from params, failed trials, each tuner) and the select stage
(the tuned model served only when strictly better). Searches across processes (resume after a
kill, chief and workers, memory over many trials) are in test_tuning_processes.py."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, TINY_SCHEMA, _deep_merge, tiny_training_params, write_config

from metal_defect import served as served_model
from metal_defect import synthetic
from metal_defect.artifacts import ArtifactStore, read_json
from metal_defect.components.c07_hyper_tuning import distributed, report, space, trials
from metal_defect.config import Recipe, load_config
from metal_defect.errors import ConfigError
from metal_defect.pipeline import Runner
from metal_defect.stages import s5_tune, s6_select

TRIAL_COLUMNS = ["trial_id", "status", "objective", "score", "best_epoch", "duration_s", "worker", "host", "rss_mb", "error"]


def tiny_tuning_params(**tuning) -> dict:
    """A search that takes seconds on the synthetic set: few trials, few epochs, a small space."""
    space = {key: None for key in ("learning_rate", "batch_size", "blocks", "width", "convs_per_block", "pooling", "dropout", "dense_units",
                                   "input_scale", "rotation_degrees", "brightness", "contrast", "noise_std", "resample_blur", "fine_tune_layers")}
    space |= {"learning_rate": {"min": 0.001, "max": 0.01, "log": True}, "width": [0.5, 1.0]}
    settings = {"enabled": True, "tuner": "random", "max_trials": 3, "epochs_per_trial": 3, "max_minutes": 10, "space": space}
    return _deep_merge(tiny_training_params(epochs=4), {"tuning": _deep_merge(settings, tuning)})


def make_config(root: Path, params: dict, per_class: int = 16) -> Path:
    data = synthetic.make_dataset(root / "data", per_class=per_class)
    return write_config(root / "cfg", _deep_merge(params, {"data_ingestion": {"source": str(data)}}), TINY_SCHEMA)


def read_trials(manifest: dict) -> list[dict]:
    with open(Path(manifest["stages"]["tune"]["output"]) / s5_tune.TRIALS_CSV, newline="") as handle:
        return list(csv.DictReader(handle))


# ----------------------------------------------------------------------------- space and recipe
def test_space_is_read_from_params_and_lands_in_the_recipe(tmp_path):
    import keras_tuner as kt

    folder = write_config(tmp_path / "cfg", _deep_merge(tiny_tuning_params(), {"tuning": {"space": {
        "batch_size": [16, 8], "pooling": ["max", "avg_max"], "blocks": [3], "dropout": {"min": 0.0, "max": 0.3, "log": False},
        "brightness": [0.0, 0.2], "fine_tune_layers": [10]}}}))
    config = load_config(folder)
    hp = kt.HyperParameters()
    space.declare_space(hp, config.tuning, "custom_cnn")
    declared = {p.name: p for p in hp.space}
    assert set(declared) == {"learning_rate", "batch_size", "blocks", "width", "pooling", "dropout", "brightness"}  # fine_tune_layers: transfer only
    assert declared["learning_rate"].sampling == "log" and (declared["learning_rate"].min_value, declared["learning_rate"].max_value) == (0.001, 0.01)
    assert declared["batch_size"].values == [8, 16] and declared["pooling"].values == ["max", "avg_max"]
    recipe = Recipe(config.base, config.data_loader, config.model, config.callbacks, config.train)
    tuned = space.apply_hyperparameters(recipe, {"learning_rate": 0.005, "batch_size": 16, "blocks": 3, "width": 0.5, "pooling": "max",
                                                "dropout": 0.25, "brightness": 0.2, "tuner/epochs": 3})
    assert tuned.train.learning_rate == 0.005 and tuned.data_loader.batch_size == 16
    assert tuned.model.custom_cnn.filters == [8, 8, 16]  # [8, 16] + one block at 32, times 0.5, at least 8
    assert tuned.model.custom_cnn.pooling == "max" and tuned.model.custom_cnn.dropout == 0.25
    assert tuned.data_loader.augmentation.brightness == 0.2 and tuned.data_loader.augmentation.rotate90 == recipe.data_loader.augmentation.rotate90
    transfer_hp = kt.HyperParameters()
    space.declare_space(transfer_hp, config.tuning, "MobileNetV2")
    assert "fine_tune_layers" in {p.name for p in transfer_hp.space} and "blocks" not in {p.name for p in transfer_hp.space}


def test_the_trial_setup_reaches_the_trial_process_unchanged():
    import dataclasses

    setup = trials.TrialSetup((32, 32, 1), 3, 40, (0.41, 0.12), {0: 0.8, 1: 1.3, 2: 1.0})
    assert trials.TrialSetup.from_json(json.loads(json.dumps(dataclasses.asdict(setup)))) == setup
    unweighted = dataclasses.replace(setup, class_weights=None)
    assert trials.TrialSetup.from_json(json.loads(json.dumps(dataclasses.asdict(unweighted)))) == unweighted


def test_scaled_filters_extend_cut_and_widen():
    assert space.scaled_filters([32, 64, 128, 256], 5, None) == [32, 64, 128, 256, 512]
    assert space.scaled_filters([32, 64, 128, 512], 6, None) == [32, 64, 128, 512, 512, 512]  # capped
    assert space.scaled_filters([32, 64, 128, 256], 3, 0.75) == [24, 48, 96]
    assert space.scaled_filters([32, 64], None, 0.1) == [8, 8]


@pytest.mark.parametrize(("override", "message"), [
    ("tuning.space.dropout=0.3", "expected a list of number items or a section with keys min, max, log or null"),
    ("tuning.space.learning_rate={min: 0.01, max: 0.001, log: true}", "min (0.01) must be below max (0.001)"),
    ("tuning.space.learning_rate={min: 0, max: 0.01, log: true}", "log sampling needs min > 0"),
    ("tuning.space.batch_size=[]", "an empty list"),
    ("tuning.space.input_scale=[2.0]", "outside 0.25..1"),
    ("tuning.tuner=bayesain", "did you mean 'bayesian'"),
    ("tuning.space.widht=[1.0]", "did you mean 'tuning.space.width'"),
])
def test_a_bad_search_space_is_refused_with_the_key_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError) as caught:
        load_config(REPO, [override])
    assert message in str(caught.value), str(caught.value)


def test_served_only_when_strictly_better_on_validation():
    base = {"valid": {"macro_f1": 0.95}}
    assert s6_select.choose_served(base, {"valid": {"macro_f1": 0.96}}, "macro_f1")[0] == "tuned"
    served, reason = s6_select.choose_served(base, {"valid": {"macro_f1": 0.95}}, "macro_f1")
    assert served == "base" and "equal" in reason and "ties keep the base model" in reason
    assert s6_select.choose_served(base, {"valid": {"macro_f1": 0.90}}, "macro_f1")[0] == "base"
    assert s6_select.choose_served(base, None, "macro_f1") == ("base", "no tuned model (tuning off, or no trial completed)")


# ----------------------------------------------------------------------------- a local search
@pytest.mark.slow
def test_search_tolerates_a_failing_trial_and_writes_csv_plot_summary_and_card(tmp_path):
    # 6 blocks of max-pooling cannot fit a 32 px image: the trial drawing blocks=6 fails to build. A space of
    # two points: both are drawn, then the random oracle finds it exhausted and stops before max_trials.
    params = tiny_tuning_params(max_trials=4, space={"blocks": [2, 6], "width": None, "learning_rate": None})
    folder = make_config(tmp_path, params)
    manifest = Runner(load_config(folder)).run()
    assert manifest["status"] == "succeeded"
    assert list(manifest["stages"])[-2:] == ["tune", "select"]
    rows = read_trials(manifest)
    assert len(rows) == 2 and list(rows[0])[: len(TRIAL_COLUMNS)] == TRIAL_COLUMNS
    failed = [r for r in rows if r["status"] == "FAILED"]
    completed = [r for r in rows if r["status"] == "COMPLETED"]
    assert failed and all(r["hp_blocks"] == "6" and "negative" in r["error"] for r in failed)
    assert completed and all(r["hp_blocks"] == "2" and float(r["score"]) > 0 and r["worker"] == "tuner0" for r in completed)
    tune_out = Path(manifest["stages"]["tune"]["output"])
    assert (tune_out / s5_tune.TRIALS_PLOT).stat().st_size > 10_000
    best = read_json(tune_out / s5_tune.BEST_HP_FILE)
    assert best["hyperparameters"]["blocks"] == 2 and best["score"] == min(float(r["score"]) for r in completed)
    assert (tune_out / "evaluation" / "tuned_models_metrics.json").is_file() and (tune_out / "evaluation" / "served" / "model.keras").is_file()
    select_out = Path(manifest["stages"]["select"]["output"])
    summary = read_json(select_out / s6_select.TUNING_SUMMARY)
    assert summary["trials_completed"] == len(completed) and summary["trials_failed"] == len(failed)
    assert summary["best_hyperparameters"] == best["hyperparameters"] and summary["served"] in ("tuned", "base") and summary["reason"]
    tuned_f1, base_f1 = summary["valid"]["tuned"]["macro_f1"], summary["valid"]["base"]["macro_f1"]
    assert summary["served"] == ("tuned" if tuned_f1 > base_f1 else "base")
    served = served_model.read_pointer(ArtifactStore(folder / "artifacts"))
    assert served["run_id"] == manifest["run_id"] and served["served"] == summary["served"] and served["reason"] == summary["reason"]
    card = (select_out / "served" / "model_card.md").read_text()
    assert "## Which model is served, and why" in card and summary["reason"][1:40] in card
    # the served bundle (with the appended card) still passes its sha256 manifest
    from metal_defect.serving.predictor import Predictor

    assert Predictor.from_bundle(served_model.resolve_bundle(ArtifactStore(folder / "artifacts"), None)).spec.model_name in ("custom_cnn", "custom_cnn_tuned")


@pytest.mark.slow
def test_a_tuned_model_strictly_better_on_validation_is_served(tmp_path):
    # a base model that cannot learn in one epoch at a learning rate of 1e-6, against trials that can
    params = _deep_merge(tiny_tuning_params(max_trials=2, epochs_per_trial=6, space={"width": None,
                                                                                     "learning_rate": {"min": 0.003, "max": 0.01, "log": True}}),
                         {"train": {"epochs": 1, "learning_rate": 0.000001}})
    folder = make_config(tmp_path, params)
    manifest = Runner(load_config(folder)).run()
    summary = read_json(Path(manifest["stages"]["select"]["output"]) / s6_select.TUNING_SUMMARY)
    assert summary["valid"]["tuned"]["macro_f1"] > summary["valid"]["base"]["macro_f1"], summary["valid"]
    assert summary["served"] == "tuned" and "better on validation" in summary["reason"]
    from metal_defect.serving.predictor import Predictor

    store = ArtifactStore(folder / "artifacts")
    assert served_model.read_pointer(store)["served"] == "tuned" and served_model.read_pointer(store)["model_name"] == "custom_cnn_tuned"
    predictor = Predictor.from_bundle(served_model.resolve_bundle(store, None))
    assert predictor.spec.model_name == "custom_cnn_tuned"
    assert manifest["metrics"]["best_model"] == "custom_cnn_tuned" and manifest["metrics"]["served"] == "tuned"


@pytest.mark.slow
@pytest.mark.parametrize("tuner", ["bayesian", "hyperband"])
def test_each_tuner_runs_a_search_with_the_same_outputs(tmp_path, tuner):
    folder = make_config(tmp_path, tiny_tuning_params(tuner=tuner, max_trials=2, epochs_per_trial=3), per_class=10)
    config = load_config(folder)
    manifest = Runner(config).run("data_preprocessing")
    prepared = Path(manifest["stages"]["data_preprocessing"]["output"])
    recipe = Recipe(config.base, config.data_loader, config.model, config.callbacks, config.train)
    job = space.SearchJob("custom_cnn", recipe, config.tuning, prepared, space.data_fingerprint(prepared))
    project = tmp_path / "tuning" / job.key
    tuner_object = distributed.search(job, project)
    rows = report.trial_rows(tuner_object, project, "val_loss")
    assert rows and all(r["status"] == "COMPLETED" and r["score"] > 0 for r in rows)
    assert list(rows[0])[: len(TRIAL_COLUMNS)] == TRIAL_COLUMNS
    if tuner == "hyperband":  # brackets: later trials continue from an earlier trial's weights
        assert any("tuner/trial_id" in t.hyperparameters.values for t in tuner_object.oracle.trials.values())
    best = tuner_object.oracle.get_best_trials(1)[0]
    assert tuner_object.load_model(best).predict(np.zeros((1, 32, 32, 1), np.uint8), verbose=0).shape == (1, 3)
