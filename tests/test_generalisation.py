"""The recipe adapts to the data: aspect ratio kept, imbalance handled, an honest quality gate,
the proxy data set made deterministically, and the EDA a user needs first on new data."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, TINY_SCHEMA, _deep_merge, tiny_training_params, write_config
from PIL import Image

from metal_defect import proxy, synthetic
from metal_defect import served as served_model
from metal_defect.artifacts import ArtifactStore, read_json
from metal_defect.cli import main
from metal_defect.components import c06_training
from metal_defect.components.c02_data_preprocessing import to_model_input
from metal_defect.config import load_config
from metal_defect.errors import DataError
from metal_defect.pipeline import Runner


def test_a_wide_image_keeps_its_aspect_ratio():
    wide = np.zeros((30, 90), np.uint8)
    wide[:, 30:60] = 255  # a white square in the middle third of a 3:1 image
    out = to_model_input(Image.fromarray(wide), 30, "grayscale")[..., 0]
    band = out[10:20]  # the 3:1 content fills a 30x10 band, centred
    assert (band[:, 11:19] == 255).all() and (band[:, :9] == 0).all() and (band[:, 21:] == 0).all()
    pad = np.concatenate([out[:10], out[20:]])
    assert len(np.unique(pad)) == 1 and 80 <= pad[0, 0] <= 90  # the image's mean grey, no invented structure
    squashed = to_model_input(Image.fromarray(wide), 30, "grayscale", resize="stretch")[..., 0]
    assert (squashed[:, 11:19] == 255).all()  # stretched, the square becomes a tall bar over every input row


def test_by_default_a_non_square_image_fills_the_whole_input():
    # padding left a 2.6:1 magnetic tile a 160 x 62 band (a 9 px blowhole 2-3 px across): test macro F1 0.70; stretched 0.89
    wide = np.repeat((40 + 4 * np.arange(30)).astype(np.uint8)[:, None], 90, axis=1)  # a 3:1 part, lit from dark to bright
    out = to_model_input(Image.fromarray(wide), 30, "grayscale", resize=load_config(REPO).base.resize)[..., 0]
    # every one of the 30 input rows holds its own row of the part (padded: 10 rows of it between two flat bands)
    assert len(np.unique(out[:, 15])) >= 25 and abs(int(out[0, 15]) - 40) <= 2 and abs(int(out[-1, 15]) - 156) <= 2


def test_class_weights_switch_on_by_themselves_only_for_imbalanced_data():
    balanced, imbalanced = np.repeat([0, 1, 2], 10), np.repeat([0, 1, 2], [30, 10, 10])
    assert not c06_training.use_class_weights("auto", balanced) and c06_training.use_class_weights("auto", imbalanced)
    assert c06_training.use_class_weights(True, balanced) and not c06_training.use_class_weights(False, imbalanced)
    full, root = c06_training.class_weights(imbalanced, 3), c06_training.class_weights(imbalanced, 3, power=0.5)
    assert full[0] == pytest.approx(50 / 90) and root[0] == pytest.approx((50 / 90) ** 0.5) and root[1] == pytest.approx((50 / 30) ** 0.5)


def test_auto_input_normalization_standardises_each_image_only_when_brightness_tells_nothing_of_the_class():
    # magnetic tiles: six exposure batches (mean grey 67 to 153) alike for every class; NEU: inclusion dark and flat,
    # pitted surface bright. Standardising each image took magnetic tiles seed 42 from 0.846 to 0.954 test macro F1.
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 40)
    gain = rng.uniform(0.4, 1.2, len(labels))
    pixels = np.full(len(labels), 1024.0)
    exposures = np.stack([0.45 * gain, 0.12 * gain, pixels], axis=1)
    by_class = np.stack([0.25 + 0.15 * labels + rng.normal(0, 0.05, len(labels)), 0.05 + 0.03 * labels + rng.normal(0, 0.01, len(labels)), pixels], 1)
    mode, record = c06_training.input_normalization("auto", exposures, labels)
    assert mode == "per_image" and record["brightness_information"] < c06_training.BRIGHTNESS_UNINFORMATIVE
    mode, record = c06_training.input_normalization("auto", by_class, labels)
    assert mode == "dataset" and record["brightness_information"] > 0.5
    assert c06_training.input_normalization("dataset", exposures, labels)[0] == "dataset"  # a mode named in params is kept
    assert c06_training.brightness_information(exposures, np.zeros(len(labels), int)) == 1.0  # one class: nothing to decide
    # a large set is decided from at most BRIGHTNESS_IMAGES_PER_CLASS images of each class, in bounded time
    many = np.repeat(np.arange(2), 3000)
    gains = rng.uniform(0.4, 1.2, len(many))
    started = time.perf_counter()
    assert c06_training.input_normalization("auto", np.stack([0.45 * gains, 0.12 * gains, np.full(len(many), 1024.0)], 1), many)[0] == "per_image"
    assert time.perf_counter() - started < 30


def test_pixel_statistics_from_each_images_statistics_are_the_training_splits(tmp_path):
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((8, 8), (8, 8), (16, 4))]
    files = []
    for i, array in enumerate(arrays):
        Image.fromarray(array).save(tmp_path / f"{i}.png")
        files.append(tmp_path / f"{i}.png")
    every_pixel = np.concatenate([a.ravel() for a in arrays]) / 255.0
    assert c06_training.pixel_statistics(files) == pytest.approx((every_pixel.mean(), every_pixel.std()))


def test_a_set_photographed_at_several_exposures_trains_on_standardised_images(tmp_path):
    import keras

    from metal_defect.components.c07_hyper_tuning import trials
    from metal_defect.config import Recipe
    from metal_defect.serving.keras_objects import PixelPreprocess

    data = synthetic.exposure_batches_dataset(tmp_path / "data")
    params = _deep_merge(tiny_training_params(epochs=1), {"data_ingestion": {"source": str(data)}})
    config = load_config(write_config(tmp_path / "cfg", params, TINY_SCHEMA))
    assert config.model.custom_cnn.input_normalization == "auto"  # the default
    manifest = Runner(config).run("1-3")
    info = read_json(Path(manifest["stages"]["train"]["output"]) / "train_summary.json")["models"]["custom_cnn"]
    assert info["input_normalization"]["mode"] == "per_image" and info["input_normalization"]["setting"] == "auto"
    saved = keras.saving.load_model(Path(manifest["stages"]["train"]["output"]) / "models" / "custom_cnn" / "model.keras")
    assert [layer.mode for layer in saved.layers if isinstance(layer, PixelPreprocess)] == ["per_image"]
    # a tuning trial decides as the train stage does
    assert trials.trial_setup(Path(manifest["stages"]["data_preprocessing"]["output"]), Recipe.of(config)).input_normalization == "per_image"


def test_an_imbalanced_training_set_is_trained_with_balanced_weights(tmp_path):
    data = synthetic.make_dataset(tmp_path / "data", per_class=12)
    for extra in range(12):  # patches gets three times the images of the others
        Image.fromarray(synthetic.texture(2, 3, 32, np.random.default_rng(100 + extra))).save(data / "patches" / f"more_{extra}.png")
    params = _deep_merge(tiny_training_params(epochs=1), {"data_ingestion": {"source": str(data)}, "data_loader": {"class_sampling": "shuffle"}})
    folder = write_config(tmp_path / "cfg", params, TINY_SCHEMA)
    manifest = Runner(load_config(folder)).run("1-3")
    info = read_json(Path(manifest["stages"]["train"]["output"]) / "train_summary.json")["models"]["custom_cnn"]
    weights = {int(k): v for k, v in info["class_weights"].items()}
    assert weights[2] < 1 < weights[0] and weights[0] == pytest.approx(weights[1])


def test_random_labels_raise_the_weak_model_flag_everywhere(tmp_path, capsys, caplog):
    data = synthetic.make_dataset(tmp_path / "data", per_class=24)
    files = sorted(data.glob("*/*.png"))
    rng = np.random.default_rng(3)
    classes = sorted(p.name for p in data.iterdir())
    for index, path in enumerate(files):  # every image moves to a random class: nothing to learn
        path.rename(data / classes[rng.integers(len(classes))] / f"r{index}.png")
    folder = write_config(tmp_path / "cfg", _deep_merge(tiny_training_params(), {"data_ingestion": {"source": str(data)}}), TINY_SCHEMA)
    with caplog.at_level(logging.INFO):
        manifest = Runner(load_config(folder)).run()
    assert manifest["metrics"]["weak_model"] is True
    assert "WEAK MODEL: the served model custom_cnn is flagged weak_model" in caplog.text  # the banner, for the served model
    out = Path(manifest["stages"]["evaluation"]["output"])
    gate = read_json(out / "quality_gate.json")
    assert gate["weak_model"] and gate["reasons"] and set(gate) >= {"model", "classical", "majority", "train_accuracy", "train_accuracy_last_epoch"}
    assert "WEAK MODEL" in (out / "model_card.md").read_text()
    served = served_model.read_pointer(ArtifactStore(folder / "artifacts"))
    assert served["weak_model"] is True and served["weak_reasons"] == gate["reasons"]
    assert main(["runs", "--config", str(folder)]) == 0
    assert "custom_cnn (WEAK)" in capsys.readouterr().out


def _neu_like(root: Path, classes: tuple[str, ...], per_class: int) -> tuple[Path, Path]:
    """Tiny NEU-DET-like folders: 200 px images and one small Pascal VOC box each."""
    images, annotations = root / "images", root / "annotations"
    rng = np.random.default_rng(0)
    for label in classes:
        (images / label).mkdir(parents=True)
        for i in range(per_class):
            name = f"{label}_{i}"
            pixels = rng.normal(120, 20, (200, 200)).clip(0, 255).astype(np.uint8)
            x0, y0 = int(rng.integers(20, 120)), int(rng.integers(20, 120))
            pixels[y0:y0 + 40, x0:x0 + 40] = 30
            Image.fromarray(pixels).convert("RGB").save(images / label / f"{name}.jpg")
            annotations.mkdir(exist_ok=True)
            (annotations / f"{name}.xml").write_text(
                f"<annotation><size><width>200</width><height>200</height></size><object><name>{label}</name>"
                f"<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x0 + 39}</xmax><ymax>{y0 + 39}</ymax></bndbox></object></annotation>")
    return images, annotations


def _digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


def test_the_proxy_data_set_is_deterministic_and_has_the_traits_it_stands_for(tmp_path):
    images, annotations = _neu_like(tmp_path / "neu", ("inclusion", "scratches"), per_class=12)
    counts = {proxy.NO_DEFECT: 10, "inclusion": 6, "scratches": 4}
    first = proxy.make_proxy(images, annotations, tmp_path / "a", seed=1, counts=counts)
    proxy.make_proxy(images, annotations, tmp_path / "b", seed=1, counts=counts)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert proxy.make_proxy(images, annotations, tmp_path / "c", seed=2, counts=counts) and _digest(tmp_path / "c") != _digest(tmp_path / "a")
    assert first["counts"] == counts and first["majority_share"] == 0.5
    for path in (tmp_path / "a").rglob("*.png"):
        width, height = Image.open(path).size
        assert min(width, height) >= 222 and max(width, height) <= 632 and width != height, path
    for source in first["sources"]:
        x0, y0, cw, ch = source["crop_xywh"]
        box = proxy.read_voc_boxes(annotations / f"{Path(source['source']).stem}.xml")[0]
        inter = max(0, min(x0 + cw, box[2]) - max(x0, box[0])) * max(0, min(y0 + ch, box[3]) - max(y0, box[1]))
        share = inter / (cw * ch)
        if source["file"].startswith(proxy.NO_DEFECT):
            assert share == 0
        else:
            assert proxy.BOX_SHARE_RANGE[0] <= share <= proxy.BOX_SHARE_RANGE[1]
    assert json.loads(proxy.manifest_path(tmp_path / "a").read_text())["counts"] == counts


def test_proxy_no_defect_crops_come_only_from_surfaces_whose_defects_are_objects(tmp_path):
    """A crop outside the boxes of a texture class (NEU's crazing) still shows that texture: it is no "no defect"."""
    images, annotations = _neu_like(tmp_path / "neu", ("crazing", "inclusion", "scratches"), per_class=12)
    summary = proxy.make_proxy(images, annotations, tmp_path / "p", seed=0, counts={proxy.NO_DEFECT: 12, "crazing": 4})
    sources = {Path(s["source"]).stem.rsplit("_", 1)[0] for s in summary["sources"] if s["file"].startswith(proxy.NO_DEFECT)}
    assert summary["counts"][proxy.NO_DEFECT] == 12 and sources <= set(proxy.NO_DEFECT_SOURCES), sources
    texture_only, annotations = _neu_like(tmp_path / "textures", ("crazing",), per_class=4)
    with pytest.raises(DataError, match="no_defect"):
        proxy.make_proxy(texture_only, annotations, tmp_path / "q", seed=0, counts={proxy.NO_DEFECT: 2, "crazing": 2})


def test_proxy_data_command_writes_the_set_or_says_what_is_missing(tmp_path, capsys):
    config = str(write_config(tmp_path / "cfg"))
    images, _ = _neu_like(tmp_path / "partial", ("inclusion",), per_class=2)
    assert main(["proxy-data", "--config", config, "--neu", str(images.parent), "--out", str(tmp_path / "x")]) == 3
    assert "no annotated images for" in capsys.readouterr().err
    images, _ = _neu_like(tmp_path / "neu", tuple(c for c in proxy.PROXY_COUNTS if c != proxy.NO_DEFECT), per_class=3)
    out = tmp_path / "proxy"
    assert main(["proxy-data", "--config", config, "--neu", str(images.parent), "--out", str(out)]) == 0
    assert "proxy data set" in capsys.readouterr().out and len(list((out / proxy.NO_DEFECT).glob("*.png"))) > 0


def test_eda_shows_sizes_aspect_ratios_imbalance_duplicates_and_class_means(tiny_config):
    folder = tiny_config()
    data = Path(load_config(folder).data_ingestion.source)
    Image.fromarray(synthetic.texture(0, 3, 32, np.random.default_rng(7)).repeat(2, axis=1)).save(data / "crazing" / "wide.png")
    manifest = Runner(load_config(folder)).run("1-2")
    eda = Path(manifest["stages"]["data_preprocessing"]["output"]) / "eda"
    overview = read_json(eda / "dataset_overview.json")
    assert overview["class_counts"] == {"crazing": 13, "inclusion": 12, "patches": 12}
    assert overview["imbalance_ratio"] == pytest.approx(13 / 12, abs=1e-3) and overview["width"]["max"] == 64
    assert overview["width"]["min"] == overview["height"]["min"] == 32 and overview["aspect_ratio"]["max"] == 2.0
    assert overview["non_square_share"] == pytest.approx(1 / 37, abs=1e-4) and overview["duplicates_dropped"] == 0
    for png in ("image_sizes.png", "class_mean_images.png"):
        assert (eda / png).stat().st_size > 5000, png


def test_the_plain_lbp_baseline_tells_fine_from_coarse_texture():
    from metal_defect import baselines

    rng = np.random.default_rng(0)
    fine = rng.integers(0, 256, (40, 48, 48, 1)).astype(np.float32)
    coarse = np.repeat(np.repeat(rng.integers(0, 256, (40, 12, 12, 1)), 4, axis=1), 4, axis=2).astype(np.float32)
    images = np.concatenate([fine, coarse]).astype(np.uint8)  # the same grey levels, texture at another scale
    labels = np.repeat([0, 1], 40)
    train = np.r_[0:30, 40:70]
    held_out = np.r_[30:40, 70:80]
    assert baselines.plain_lbp_features(images).shape == (80, 256 * len(baselines.PLAIN_LBP_RADII))
    predicted = baselines.plain_lbp_predictions(images[train], labels[train], images[held_out])
    assert (predicted == labels[held_out]).mean() == 1.0


def judge_by_the_gate(tmp_path, monkeypatch, y: np.ndarray, model_pred: np.ndarray, classical: np.ndarray, plain_lbp: np.ndarray) -> dict:
    """The quality gate on a two-class split whose model and baseline answers are given (a model that fits its training images)."""
    from types import SimpleNamespace

    from metal_defect.components.c06_evaluation import gate

    monkeypatch.setitem(gate.YARDSTICKS, "classical", (gate.YARDSTICKS["classical"][0], lambda xt, yt, xe: classical))
    monkeypatch.setitem(gate.YARDSTICKS, "plain_lbp", (gate.YARDSTICKS["plain_lbp"][0], lambda xt, yt, xe: plain_lbp))
    predictor = SimpleNamespace(spec=SimpleNamespace(model_name="cnn"), raw_probabilities=lambda x, b: np.eye(2)[y])
    images = np.zeros((len(y), 8, 8, 1), np.uint8)
    return gate.quality_gate(predictor, images, y, ["a", "b"], "test", y, model_pred, images, tmp_path, load_config(REPO).evaluation)


def flipped(labels: np.ndarray, where: list[int]) -> np.ndarray:
    answers = labels.copy()
    answers[where] = 1 - answers[where]
    return answers


def test_the_gate_judges_the_models_lead_over_each_baseline_by_a_paired_interval(tmp_path, monkeypatch):
    # By the overlapping-interval rule a magnetic-tile model 0.199 ahead of the plain LBP baseline was flagged
    # (intervals overlapping by 0.017 on 202 images): most of each interval's width is which images were drawn,
    # which both share. Judged on the same resampled images, a model ahead on nearly every resample passes.
    y = np.repeat([0, 1], 30)
    model_pred = flipped(y, [0, 1, 2, 30, 31, 32])  # 90 % right: macro F1 0.9, below gate_good_macro_f1
    behind = flipped(model_pred, [3, 4, 5, 33, 34, 35])  # wrong wherever the model is, and on 6 more: 0.8

    def judge(classical: np.ndarray, plain_lbp: np.ndarray) -> dict:
        return judge_by_the_gate(tmp_path, monkeypatch, y, model_pred, classical, plain_lbp)

    result = judge(behind, np.zeros(60, int))
    assert result["model"]["macro_f1_ci95"][0] <= result["classical"]["macro_f1_ci95"][1]  # the two intervals overlap: the old rule flagged this model...
    assert result["lead"]["classical"] == pytest.approx(0.1) and result["lead_ci95"]["classical"][0] > 0  # ...its lead is clear
    assert result["lead"]["plain_lbp"] > 0.5 and not result["weak_model"], result["reasons"]
    # a model behind either baseline is flagged, and the reason names that baseline and the paired interval
    result = judge(behind, y.copy())
    assert result["weak_model"] and len(result["reasons"]) == 1 and result["lead"]["plain_lbp"] == pytest.approx(-0.1)
    assert "plain multi-scale LBP" in result["reasons"][0] and "paired 95% CI" in result["reasons"][0]
    result = judge(model_pred.copy(), behind)  # as good as the classical baseline: no lead at all
    assert result["weak_model"] and "classical texture baseline" in result["reasons"][0] and result["lead_ci95"]["classical"] == [0.0, 0.0]


def test_the_gate_does_not_flag_a_good_model_on_data_easy_for_texture_features(tmp_path, monkeypatch):
    # X-SDD: macro F1 0.973 (3 errors in 203 images) was flagged weak: its own interval started at 0.938,
    # under 0.95, and its leads of +0.046 and +0.056 over the texture baselines were not clear on so few images.
    y = np.repeat([0, 1], 100)
    model_pred = flipped(y, [0, 1, 2, 3, 100, 101, 102, 103])  # 96 % right
    close_behind = flipped(model_pred, [4, 104])  # two more errors
    result = judge_by_the_gate(tmp_path, monkeypatch, y, model_pred, close_behind, close_behind)
    assert result["model"]["macro_f1"] >= 0.95 > result["model"]["macro_f1_ci95"][0]  # the old exemption did not apply
    assert result["lead_ci95"]["classical"][0] <= 0 < result["lead"]["classical"]  # nor was the lead clear
    assert not result["weak_model"], result["reasons"]
    assert "easy for texture features" in result["note"]
    # a baseline clearly better than a good model still flags it
    result = judge_by_the_gate(tmp_path, monkeypatch, y, model_pred, close_behind, y.copy())
    assert result["lead_ci95"]["plain_lbp"][1] < 0
    assert result["weak_model"] and "plain multi-scale LBP" in result["reasons"][0]


def test_readme_states_the_quality_gate_rule():
    readme = (REPO / "README.md").read_text()
    assert "weak_model" in readme and "classical" in readme


def test_auto_image_size_follows_the_data_up_to_the_cap(tmp_path):
    from metal_defect.components.c02_data_preprocessing import auto_image_size

    paths = []
    for i, (w, h) in enumerate([(300, 200), (250, 190), (100, 90), (500, 400), (280, 300)]):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("L", (w, h)).save(paths[-1])
    assert auto_image_size(paths, max_size=1024) == 288  # median long side 300 -> a multiple of 32
    assert auto_image_size(paths, max_size=160) == 160
    assert auto_image_size(paths[2:3], max_size=160) == 96  # small images are not blown up past what they hold


def test_small_data_sets_train_enough_steps():
    train = load_config(REPO).train
    assert c06_training.epochs_for(train, steps_per_epoch=15) == -(-train.min_steps // 15) > train.epochs
    assert c06_training.epochs_for(train, steps_per_epoch=1000) == train.epochs


def test_bench_datasets_runs_each_seed_apart_and_reports_mean_and_spread(tmp_path, monkeypatch):
    # one run of a 98-image proxy test split moves by ~0.1 macro F1: recipe choices need the spread over seeds
    import argparse

    from metal_defect import bench, pipeline

    calls, resizes = [], []

    class FakeRunner:
        def __init__(self, config, command):
            self.config = config

        def run(self, stages, force):
            seed, out = self.config.base.seed, Path(self.config.paths.artifacts)
            calls.append((seed, out))
            resizes.append(self.config.base.resize)
            (out / "eval").mkdir(parents=True)
            f1 = {42: 0.6, 43: 0.7}[seed]
            (out / "eval" / "quality_gate.json").write_text(json.dumps({
                "classical": {"accuracy": 0.5, "macro_f1": 0.5, "macro_f1_ci95": [0.4, 0.6]},
                "plain_lbp": {"accuracy": 0.45, "macro_f1": 0.45, "macro_f1_ci95": [0.3, 0.55]}, "majority": {"accuracy": 0.4, "macro_f1": 0.1},
                "weak_model": seed == 42, "reasons": [], "train_accuracy": 0.97, "train_accuracy_last_epoch": 0.9}))
            (out / "eval" / "test").mkdir()
            (out / "eval" / "test" / "pointing.json").write_text(json.dumps({"overall": {"n": 8, "strict": 0.75, "chance": 0.05}}))
            return {"run_id": f"run-{seed}", "metrics": {"test_n": 10, "test_accuracy": f1 + 0.05, "test_macro_f1": f1},
                    "stages": {"data_preprocessing": {"summary": {"images_prepared": 100}, "duration_s": 1.0},
                               "evaluation": {"output": str(out / "eval"), "summary": {"metrics": {"test_macro_f1": f1, "valid_macro_f1": f1 - 0.1}},
                                              "duration_s": 1.0},
                               "tune": {"summary": tune_summary[seed], "duration_s": 0.0}}}

    # seed 42 was not searched; seed 43's search trained a finalist that was evaluated on both splits and not served
    tune_summary = {42: {}, 43: {"trials_completed": 3, "metrics": {"tuned_valid_macro_f1": 0.65, "tuned_test_macro_f1": 0.68}}}

    monkeypatch.setattr(pipeline, "Runner", FakeRunner)
    config = load_config(REPO, [f"paths.artifacts={tmp_path}"])
    # the command line's overrides reach every run (a recipe variant measured on each data set), the run's own win
    args = argparse.Namespace(datasets="neu", seeds="42,43", tuning="off", resolved_overrides=["base.resize=stretch", "base.seed=7"])
    result = bench.bench_datasets(config, args)
    assert [seed for seed, _ in calls] == [42, 43] and calls[0][1] != calls[1][1]  # each seed its own artifacts
    assert resizes == ["stretch", "stretch"]
    summary = result["datasets"]["neu"]["summary"]
    assert summary["mean_test_macro_f1"] == pytest.approx(0.65) and summary["sd_test_macro_f1"] == pytest.approx(0.0707, abs=1e-4)
    assert summary["weak_model_runs"] == 1
    assert "| **neu** | mean of 2 |" in result["table"] and "0.650 ± 0.071" in result["table"]
    assert "| base (0.500 / -; 0.600 / -; 0) |" in result["table"] and "| base (0.600 / 0.650; 0.700 / 0.680; 3) |" in result["table"]
    assert "0.500 (0.400–0.600) | 0.450 |" in result["table"] and "| 0.970 | 0.750 (0.050, n=8) |" in result["table"]  # the columns
    tiles = bench.dataset_overrides(config, "magnetic-tile")
    assert "evaluation.annotations=null" in tiles and any(o.startswith("evaluation.masks=") and o.endswith("magnetic-tile/masks") for o in tiles)
    with pytest.raises(ValueError, match="--seeds"):
        bench.parse_seeds("42,x")


def test_bench_data_times_the_stages_with_the_command_lines_overrides(tmp_path, monkeypatch):
    # `bench data base.resize=pad` rebuilt each timed run's config from the YAML alone and measured the default
    import argparse

    from metal_defect import bench, pipeline, synthetic

    seen = []

    class FakeRunner:
        def __init__(self, config, command):
            self.config = config

        def run(self, stages, force):
            seen.append((self.config.base.resize, Path(self.config.data_ingestion.source).name))
            return {"stages": {"data_ingestion": {"summary": {"images_found": 10}, "duration_s": 0.1},
                               "data_preprocessing": {"summary": {"images_per_second": 100.0}, "duration_s": 0.1}}}

    def tiny_dataset(root, **_):
        Path(root).mkdir(parents=True)
        return Path(root)

    monkeypatch.setattr(pipeline, "Runner", FakeRunner)
    monkeypatch.setattr(synthetic, "make_dataset", tiny_dataset)
    config = load_config(REPO, [f"paths.artifacts={tmp_path}", f"data_ingestion.source={tmp_path / 'mine'}"])
    args = argparse.Namespace(resolved_overrides=["base.resize=pad", f"data_ingestion.source={tmp_path / 'mine'}"])
    bench.bench_data(config, args)
    assert seen == [("pad", "mine"), ("pad", "synthetic1"), ("pad", "synthetic10")]  # each run's own source wins


@pytest.mark.slow
def test_the_default_recipe_learns_a_defect_of_a_few_pixels_in_a_large_image(tmp_path):
    """A 4 px dark spot in a 256 px striped, unevenly lit image (2.5 px at the 160 px input), 30
    images per class: the repository's own params, only the step budget cut to 160 steps. With
    `pool_from: last_block` this recipe fits its training images but answers the test split at
    chance (macro F1 0.42 when measured); pooling every block's output finds the spot."""
    data = synthetic.small_defect_dataset(tmp_path / "data", per_class=30, size=256)
    config = load_config(None, [f"data_ingestion.source={data}", "schema.classes=auto", "schema.aliases={}",
                                f"paths.artifacts={tmp_path / 'artifacts'}", f"paths.logs={tmp_path / 'logs'}", "tuning.enabled=false",
                                "train.min_steps=160", "train.verbose=0", "callbacks.tensorboard=false", "evaluation.annotations=null"])
    manifest = Runner(config).run("1-4")
    gate = read_json(next(Path(manifest["stages"]["evaluation"]["output"]).rglob("quality_gate.json")))
    assert gate["classical"]["macro_f1"] < 0.75  # global texture statistics do not see the spot...
    # ...the network does: it fits, and misses at most one of the ~9 test images (with adaptive regularisation
    # it scored 0.889, one miss, where the recipe before it scored 1.0; on 9 test images no lead over a baseline is
    # clear by the gate's paired interval (plain LBP 0.775: lead +0.114, -0.299 to +0.562), so the flag is not asserted)
    assert gate["train_accuracy"] >= 0.95 and gate["model"]["macro_f1"] >= 0.85
    assert gate["model"]["macro_f1"] >= gate["classical"]["macro_f1"] + 0.1


def test_a_benchmark_names_the_cpu_it_ran_on():
    # two machines of the same kind here (2 cores each) trained several times apart: an Intel part with AVX-512
    # BF16/VNNI and an AMD EPYC part with AVX2 only; a timing is read against the CPU that made it
    from metal_defect import artifacts, bench

    amd = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2\n"
    assert artifacts.cpu_description(amd) == {"cpu_model": "AMD EPYC", "cpu_vector_extensions": ["avx2", "fma"]}
    intel = "model name\t: Intel(R) Xeon(R) Platinum\nflags\t\t: avx2 fma avx512f avx512_vnni avx512_bf16 amx_tile\n"
    assert artifacts.cpu_description(intel)["cpu_vector_extensions"] == ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"]
    assert artifacts.cpu_description("") == {"cpu_model": None, "cpu_vector_extensions": []}
    for here in (bench.machine(), artifacts.host_info()):  # a benchmark's JSON and a run's manifest
        assert here["cpu_count"] >= 1 and "cpu_model" in here and isinstance(here["cpu_vector_extensions"], list)
