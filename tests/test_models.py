"""c04/c05/c06 training on tiny synthetic data: architectures, weights, phases, resume, strategy."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import REPO, tiny_training_params, write_config

from metal_defect.components import c04_model_builder as builder
from metal_defect.components import c05_callbacks, c06_training
from metal_defect.components.c03_dataset_loader import build_datasets
from metal_defect.config import load_config
from metal_defect.errors import ConfigError, DataError
from metal_defect.serving.bundle import load_model

SHAPE = (32, 32, 1)


def _params(tmp_path: Path, **extra):
    folder = write_config(tmp_path / "cfg", _merge(tiny_training_params(), extra))
    return load_config(folder)


def _merge(a: dict, b: dict) -> dict:
    from conftest import _deep_merge

    return _deep_merge(a, b)


def _batch(n: int = 8, shape=SHAPE, classes: int = 3):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, classes, n)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["custom_cnn", "VGG16", "ResNet50", "MobileNetV2", "EfficientNetB0"])
def test_each_architecture_builds_and_trains_a_step_from_uint8(tmp_path, name):
    config = _params(tmp_path, model={"transfer": {"weights": "none"}})
    built = builder.build_model(name, SHAPE, 3, config.model)
    assert built.pretrained is False and built.schedule == "end_to_end"
    assert built.model.input.dtype == "uint8"
    c06_training.compile_model(built.model, config.train, 1e-3)
    x, y = _batch()
    history = built.model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    probs = built.model.predict(x, verbose=0)
    assert probs.shape == (8, 3) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)


def test_unknown_architecture_suggests_a_name(tmp_path):
    config = _params(tmp_path)
    with pytest.raises(ConfigError, match="did you mean 'ResNet50'"):
        builder.build_model("Resnet50", SHAPE, 3, config.model)


def test_backbone_preprocessing_lives_inside_the_model():
    x = np.full((1, 4, 4, 1), 255, np.uint8)
    caffe = builder.PixelPreprocess("caffe", to_rgb=True)(x)
    assert caffe.shape == (1, 4, 4, 3) and np.allclose(np.asarray(caffe)[0, 0, 0], [255 - 103.939, 255 - 116.779, 255 - 123.68])
    assert np.allclose(np.asarray(builder.PixelPreprocess("tf", to_rgb=True)(x)), 1.0)
    assert np.allclose(np.asarray(builder.PixelPreprocess("none", to_rgb=True)(x)), 255.0)  # EfficientNet takes 0..255
    assert np.allclose(np.asarray(builder.PixelPreprocess("dataset", mean=0.5, std=0.25)(x)), 2.0)


def test_saved_models_reload_with_identical_predictions(tmp_path):
    config = _params(tmp_path, model={"transfer": {"weights": "none"}})
    x, _ = _batch()
    for name in ("custom_cnn", "MobileNetV2"):
        model = builder.build_model(name, SHAPE, 3, config.model).model
        c06_training.compile_model(model, config.train, 1e-3)
        model.save(tmp_path / f"{name}.keras")
        again = load_model(tmp_path / f"{name}.keras")
        np.testing.assert_allclose(model.predict(x, verbose=0), again.predict(x, verbose=0), rtol=1e-5, atol=1e-6)


def test_local_weights_file_loads_and_counts_as_pretrained(tmp_path):
    config = _params(tmp_path, model={"transfer": {"weights": "none"}})
    source = builder.build_model("MobileNetV2", SHAPE, 3, config.model)
    weights_file = tmp_path / "mobilenet_notop.weights.h5"
    source.backbone.save_weights(weights_file)
    local = _params(tmp_path / "b", model={"transfer": {"weights": str(weights_file)}})
    built = builder.build_model("MobileNetV2", SHAPE, 3, local.model)
    assert built.pretrained and built.weights == str(weights_file) and built.schedule == "two_phase"
    for a, b in zip(source.backbone.weights, built.backbone.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    missing = _params(tmp_path / "c", model={"transfer": {"weights": str(tmp_path / "nope.h5")}})
    with pytest.raises(DataError, match="not found"):
        builder.build_model("MobileNetV2", SHAPE, 3, missing.model)


def test_imagenet_offline_falls_back_loudly_or_stops_as_params_choose(tmp_path, caplog):
    fallback = _params(tmp_path, model={"transfer": {"weights": "imagenet", "offline_fallback": "random"}})
    with caplog.at_level(logging.WARNING, logger="metal_defect"):
        built = builder.build_model("MobileNetV2", SHAPE, 3, fallback.model)
    assert built.pretrained is False and built.weights == "random" and built.schedule == "end_to_end"
    assert "RANDOM INITIALISATION" in caplog.text
    strict = _params(tmp_path / "b", model={"transfer": {"weights": "imagenet", "offline_fallback": "error"}})
    with pytest.raises(DataError, match="ImageNet weights could not be downloaded"):
        builder.build_model("MobileNetV2", SHAPE, 3, strict.model)


def test_two_phase_freezes_then_unfreezes_the_top_with_batchnorm_frozen(tmp_path):
    config = _params(tmp_path, model={"transfer": {"weights": "none"}})
    source = builder.build_model("MobileNetV2", SHAPE, 3, config.model)
    weights_file = tmp_path / "w.weights.h5"
    source.backbone.save_weights(weights_file)
    built = builder.build_model("MobileNetV2", SHAPE, 3, _params(tmp_path / "b", model={"transfer": {"weights": str(weights_file)}}).model)
    builder.freeze_backbone(built)
    c06_training.compile_model(built.model, config.train, 1e-2)
    before = [np.asarray(w).copy() for w in built.backbone.weights]
    head_before = np.asarray(built.model.get_layer("probabilities").kernel).copy()
    x, y = _batch()
    built.model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(before, built.backbone.weights))  # frozen base unchanged
    assert not np.array_equal(head_before, np.asarray(built.model.get_layer("probabilities").kernel))  # head learned
    unfrozen = builder.unfreeze_top(built, 10)
    assert 0 < unfrozen <= 10
    trainable = [layer for layer in built.backbone.layers if layer.trainable and layer.weights]
    assert trainable and all(not isinstance(layer, keras.layers.BatchNormalization) for layer in trainable)
    assert all(not layer.trainable for layer in built.backbone.layers[: len(built.backbone.layers) - 10])
    c06_training.compile_model(built.model, config.train, 1e-5)
    built.model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    changed = [not np.array_equal(a, np.asarray(b)) for a, b in zip(before, built.backbone.weights)]
    assert any(changed) and not all(changed)  # only the top moved


@pytest.fixture
def tiny_data(tmp_path, tiny_config):
    from metal_defect.pipeline import Runner

    folder = tiny_config(tiny_training_params(), per_class=18)
    config = load_config(folder)
    manifest = Runner(config).run("1-2")
    prepared = Path(manifest["stages"]["data_preprocessing"]["output"])
    return config, build_datasets(prepared, config.data_loader, config.base.seed)


class _StopAfter(keras.callbacks.Callback):
    def __init__(self, epoch: int):
        super().__init__()
        self.stop_epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.stop_epoch:
            raise KeyboardInterrupt("simulated Ctrl-C")


class _FirstEpoch(keras.callbacks.Callback):
    first: int | None = None

    def on_epoch_begin(self, epoch, logs=None):
        if _FirstEpoch.first is None:
            _FirstEpoch.first = epoch


def test_interrupted_fit_resumes_at_the_next_epoch(tiny_data, tmp_path, monkeypatch):
    config, data = tiny_data
    train = dataclasses.replace(config.train, epochs=5)
    original = c05_callbacks.make_callbacks

    def interrupted(params, work_dir, **kwargs):
        return [*original(params, work_dir, **kwargs), _StopAfter(1)]

    monkeypatch.setattr(c06_training, "make_callbacks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        c06_training.train_one("custom_cnn", data, config.base, config.model, config.callbacks, train, tmp_path / "work")
    monkeypatch.setattr(c06_training, "make_callbacks", lambda params, work_dir, **kwargs: [*original(params, work_dir, **kwargs), _FirstEpoch()])
    info = c06_training.train_one("custom_cnn", data, config.base, config.model, config.callbacks, train, tmp_path / "work")
    assert _FirstEpoch.first == 2  # epochs 0 and 1 finished before the interrupt; not repeated
    rows = c05_callbacks.read_history(tmp_path / "work" / "end_to_end" / c05_callbacks.HISTORY_CSV)
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3, 4] and info["epochs_run"] == 5


@pytest.mark.slow
def test_mirrored_strategy_path_trains_on_cpu(tiny_data, tmp_path):
    config, data = tiny_data
    train = dataclasses.replace(config.train, epochs=2, strategy="mirrored")
    info = c06_training.train_one("custom_cnn", data, config.base, config.model, config.callbacks, train, tmp_path / "work")
    assert info["strategy"] == "MirroredStrategy" and info["replicas"] >= 1 and info["epochs_run"] == 2
    assert (tmp_path / "work" / "model.keras").is_file()


def test_validation_macro_f1_is_the_macro_f1_of_the_epochs_answers_on_validation():
    import tensorflow as tf
    from sklearn.metrics import f1_score

    model = keras.Sequential([keras.Input((3,)), keras.layers.Identity()])  # answers the class its one-hot input names
    inputs = np.eye(3, dtype=np.float32)[[0, 0, 1, 1, 2, 2]]
    labels = np.array([0, 0, 1, 1, 2, 0], dtype=np.int32)  # the last answer (2) is wrong
    callback = c05_callbacks.ValidationMacroF1(tf.data.Dataset.from_tensor_slices((inputs, labels)).batch(4))
    callback.set_model(model)
    logs: dict = {}
    callback.on_epoch_end(0, logs)
    expected = f1_score(labels, inputs.argmax(axis=1), average="macro")
    assert logs["val_macro_f1"] == pytest.approx(expected) and expected < 1  # not accuracy (5/6), not 1
    assert logs["val_macro_f1"] != pytest.approx(5 / 6) and c05_callbacks.monitor_mode("val_macro_f1") == "max"


def test_training_can_keep_the_best_epoch_by_validation_macro_f1(tiny_data, tmp_path):
    config, data = tiny_data
    callbacks = dataclasses.replace(config.callbacks, checkpoint_monitor="val_macro_f1")
    train = dataclasses.replace(config.train, epochs=3)
    c06_training.train_one("custom_cnn", data, config.base, config.model, callbacks, train, tmp_path / "work")
    rows = c05_callbacks.read_history(tmp_path / "work" / "end_to_end" / c05_callbacks.HISTORY_CSV)
    assert len(rows) == 3 and all(0 <= r["val_macro_f1"] <= 1 for r in rows)
    with pytest.raises(ValueError, match="val_macro_f1"):  # no validation split to compute it on
        c05_callbacks.make_callbacks(callbacks, tmp_path / "other")


def test_class_weights_are_balanced():
    weights = c06_training.class_weights(np.array([0, 0, 0, 1]), 3)
    assert weights[1] == pytest.approx(3 * weights[0]) and weights[2] == 1.0


def test_compile_uses_keywords_so_metrics_are_metrics(tmp_path):
    config = _params(tmp_path)
    model = builder.build_model("custom_cnn", SHAPE, 3, config.model).model
    c06_training.compile_model(model, config.train, 1e-3)
    x, y = _batch()
    result = model.evaluate(x, y, verbose=0, return_dict=True)
    assert set(result) >= {"loss", "accuracy"}


def test_repository_defaults_train_only_the_custom_cnn():
    assert load_config(REPO).train.models == ["custom_cnn"]


def test_pool_from_all_blocks_pools_every_block_before_its_pooling(tmp_path):
    config = _params(tmp_path, model={"custom_cnn": {"filters": [4, 8, 16], "pooling": "avg_max", "dense_units": 0, "pool_from": "last_block"}})
    last = builder.build_model("custom_cnn", SHAPE, 3, config.model).model
    every = builder.build_model("custom_cnn", SHAPE, 3, dataclasses.replace(
        config.model, custom_cnn=dataclasses.replace(config.model.custom_cnn, pool_from="all_blocks"))).model
    assert {layer.name for layer in last.layers} >= {"gap", "gmp"}
    assert {f"g{kind}p_block{b}" for kind in "am" for b in (1, 2, 3)} <= {layer.name for layer in every.layers}
    # the classifier sees 2 x (4 + 8 + 16) pooled features instead of 2 x 16
    assert every.get_layer("pooled").output.shape[-1] == 56 and last.get_layer("pooled").output.shape[-1] == 32
    assert every.get_layer("gap_block1").input.shape[1:3] == SHAPE[:2]  # block 1's full-resolution response


@pytest.mark.parametrize("side", [32, 30])
def test_each_blocks_global_max_is_the_maximum_of_its_full_resolution_response(tmp_path, side):
    # taken from the 2x2 max-pooled map where that is exact (even sides), from the map itself where a side is odd
    config = _params(tmp_path, model={"custom_cnn": {"filters": [4, 8, 16], "pooling": "avg_max", "dense_units": 0, "pool_from": "all_blocks"}})
    model = builder.build_model("custom_cnn", (side, side, 1), 3, config.model).model
    names = [f"block{b}_relu1" for b in (1, 2, 3)] + [f"gmp_block{b}" for b in (1, 2, 3)] + [f"gap_block{b}" for b in (1, 2, 3)]
    probe = keras.Model(model.input, [model.get_layer(n).output for n in names])
    x = np.random.default_rng(0).integers(0, 256, (4, side, side, 1)).astype(np.uint8)
    outputs = dict(zip(names, (np.asarray(o) for o in probe(x, training=False))))
    for b in (1, 2, 3):
        response = outputs[f"block{b}_relu1"]
        np.testing.assert_allclose(outputs[f"gmp_block{b}"], response.max(axis=(1, 2)), rtol=1e-6)
        np.testing.assert_allclose(outputs[f"gap_block{b}"], response.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    # the cheap way where it is exact: block 1's maximum read off its pooled map (a quarter of the values)
    assert model.get_layer("gmp_block1").input.shape[1:3] == (side // 2, side // 2)
    if side == 30:  # block 2's response is 15 x 15: pooling drops a row and a column, so its maximum is taken in full
        assert model.get_layer("gmp_block2").input.shape[1:3] == (15, 15)


def test_the_train_stage_adapts_augmentation_and_dropout_to_the_fit_and_logs_the_share(tiny_data, tmp_path, monkeypatch):
    """train_one hands train.regularisation_ramp to Keras: each epoch's logged share is the one before it, moved
    one step up when that epoch's training accuracy reached fit_target and one step down when not; the
    augmentation and the head's dropout follow it."""
    from metal_defect.serving.keras_objects import ScheduledDropout

    config, data = tiny_data
    model = dataclasses.replace(config.model, custom_cnn=dataclasses.replace(config.model.custom_cnn, dropout=0.3))
    train = dataclasses.replace(config.train, epochs=6, regularisation_ramp=0.5, fit_target=0.6)
    seen = []
    original = c05_callbacks.AdaptiveRegularisation._apply

    def record(self):
        original(self)
        seen.append((self.current, float(data["train"].augmented_share.numpy()),
                     [float(layer.share.numpy()) for layer in c05_callbacks.scheduled_dropouts(self.model)]))

    monkeypatch.setattr(c05_callbacks.AdaptiveRegularisation, "_apply", record)
    c06_training.train_one("custom_cnn", data, config.base, model, config.callbacks, train, tmp_path / "work")
    rows = c05_callbacks.read_history(tmp_path / "work" / "end_to_end" / c05_callbacks.HISTORY_CSV)
    assert len(rows) == 6
    before = 0.0
    for row in rows:
        expected = min(1.0, before + 1 / 3) if row["accuracy"] >= 0.6 else max(0.0, before - 1 / 3)
        assert row[c05_callbacks.REGULARISATION_SHARE] == pytest.approx(expected, abs=1e-6)
        before = expected
    assert any(row["accuracy"] >= 0.6 for row in rows)  # it did fit, so the share went up at least once
    assert seen[0] == (0.0, 0.0, [0.0, 0.0])  # the first epoch: no augmentation, no dropout
    assert all(aug == pytest.approx(share) and dropouts == pytest.approx([share, share]) for share, aug, dropouts in seen)
    assert float(data["train"].augmented_share.numpy()) == 1.0  # handed back as built
    assert any(isinstance(layer, ScheduledDropout) for layer in load_model_layers(tmp_path / "work"))


def load_model_layers(work: Path) -> list:
    from metal_defect.serving.bundle import load_model

    return load_model(work / c06_training.TRAINED_MODEL).layers


def test_tensorflow_runs_its_onednn_kernels_on_any_x86_cpu_unless_the_user_said_no(monkeypatch):
    # TensorFlow picks oneDNN by itself only with AVX-512 VNNI/BF16 or AMX; on an AVX2-only AMD EPYC here its
    # Eigen kernels trained at half the speed (1,332 against 693 ms a step)
    import os
    import subprocess
    import sys

    from metal_defect import runtime

    monkeypatch.delenv(runtime.ONEDNN, raising=False)
    runtime.prefer_onednn("aarch64")
    assert runtime.ONEDNN not in os.environ
    runtime.prefer_onednn("x86_64")
    assert os.environ[runtime.ONEDNN] == "1"
    monkeypatch.setenv(runtime.ONEDNN, "0")
    runtime.prefer_onednn("x86_64")
    assert os.environ[runtime.ONEDNN] == "0"  # the user's choice stands
    if runtime.platform.machine().lower() in runtime.X86_64:  # the package's import asks before TensorFlow reads it
        env = {k: v for k, v in os.environ.items() if k != runtime.ONEDNN} | {"TF_CPP_MIN_LOG_LEVEL": "0"}
        started = subprocess.run([sys.executable, "-c", "import metal_defect, tensorflow"], env=env, capture_output=True, text=True, timeout=300)
        assert "oneDNN custom operations are on" in started.stderr, started.stderr[-2000:]


def test_the_fused_batch_normalisation_computes_keras_batch_normalisation(tmp_path):
    # Keras 3's unfused BatchNormalization was about a third of a training step at 160 px on 2 CPU cores
    import tensorflow as tf

    from metal_defect.serving.keras_objects import FusedBatchNormalization

    x = tf.constant(np.random.default_rng(0).normal(2.0, 3.0, (8, 10, 12, 5)).astype("float32"))
    plain, fused = keras.layers.BatchNormalization(momentum=0.9), FusedBatchNormalization(momentum=0.9)
    plain.build(x.shape), fused.build(x.shape)
    plain.set_weights([w + np.arange(5, dtype="float32") * 0.1 for w in plain.get_weights()])
    fused.set_weights(plain.get_weights())
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        losses = [tf.reduce_sum(layer(x, training=True) ** 3) for layer in (plain, fused)]
    for theirs, ours in zip(*(tape.gradient(loss, [x, layer.gamma, layer.beta]) for loss, layer in zip(losses, (plain, fused)))):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-3)
    for theirs, ours in zip(plain.get_weights(), fused.get_weights()):  # the moving statistics moved alike
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fused(x, training=True), plain(x, training=True), atol=1e-5)
    np.testing.assert_allclose(fused(x, training=False), plain(x, training=False), atol=1e-5)
    config = _params(tmp_path)
    model = builder.build_model("custom_cnn", SHAPE, 3, config.model).model
    assert all(type(layer) is FusedBatchNormalization for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization))
    model.save(tmp_path / "m.keras")  # a saved model names it and loads with it
    assert any(type(layer) is FusedBatchNormalization for layer in keras.saving.load_model(tmp_path / "m.keras").layers)
