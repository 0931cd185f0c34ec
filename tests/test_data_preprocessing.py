"""c02: every odd image mode and broken file, duplicates (also pre-split), split determinism, outputs."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import joblib
import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from metal_defect import synthetic
from metal_defect.components import c02_data_preprocessing as c02
from metal_defect.components.c02_data_preprocessing import ImageProblem, to_model_input
from metal_defect.config import load_config
from metal_defect.errors import DataError

CLASSES = list(synthetic.CLASSES)


def _image(mode: str, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(0)
    if mode in ("I;16", "I"):
        image = Image.fromarray(rng.integers(0, 65535, size[::-1], dtype=np.uint16).astype(np.uint16 if mode == "I;16" else np.int32))
        assert image.mode == mode
        return image
    if mode == "F":
        return Image.fromarray(rng.random(size[::-1], dtype=np.float32))
    base = Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8), "RGB")
    return base.convert(mode)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16", "I", "F", "CMYK", "1", "LA", "PA"])
@pytest.mark.parametrize("color_mode, channels", [("grayscale", 1), ("rgb", 3)])
def test_every_mode_becomes_uint8_model_input(mode, color_mode, channels):
    out = to_model_input(_image(mode), 24, color_mode)
    assert out.shape == (24, 24, channels) and out.dtype == np.uint8


def test_16_bit_images_are_scaled_not_clipped():
    arr = np.full((10, 10), 65535, dtype=np.uint16)
    assert to_model_input(Image.fromarray(arr), 10, "grayscale").max() == 255
    arr[:] = 32896
    assert to_model_input(Image.fromarray(arr), 10, "grayscale").max() == 128


@pytest.mark.parametrize("size", [(1, 1), (7, 300), (1000, 3)])
def test_any_size_is_resized(size):
    assert to_model_input(_image("L", size), 32, "grayscale").shape == (32, 32, 1)


def test_same_bytes_give_same_input_from_path_bytes_and_file(tmp_path):
    path = tmp_path / "a.png"
    _image("RGB").save(path)
    from_path = to_model_input(path, 16, "grayscale")
    assert np.array_equal(from_path, to_model_input(path.read_bytes(), 16, "grayscale"))
    assert np.array_equal(from_path, to_model_input(io.BytesIO(path.read_bytes()), 16, "grayscale"))


def test_broken_files_raise_image_problem_with_reason(tmp_path):
    good = io.BytesIO()
    _image("RGB", (200, 200)).save(good, format="JPEG")
    (tmp_path / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image at all")
    expected = {"truncated.jpg": "truncated or corrupt", "empty.png": "empty file", "text.png": "not an image"}
    for name, reason in expected.items():
        with pytest.raises(ImageProblem, match=reason):
            to_model_input(tmp_path / name, 16, "grayscale")
    with pytest.raises(ImageProblem, match="too many pixels"):
        to_model_input(_image("L", (300, 300)), 16, "grayscale", max_pixels=1000)
    with pytest.raises(ImageProblem, match="too large"):
        to_model_input(tmp_path / "text.png", 16, "grayscale", max_bytes=5)


def _prepare(tmp_path: Path, root: Path, *overrides: str, presplit: bool = False):
    from metal_defect.components import c01_data_ingestion as c01

    config = load_config(REPO, [f"data_ingestion.source={root}", "base.image_size=16", f"schema.classes=[{','.join(CLASSES)}]",
                                "schema.aliases={}", "schema.min_images_per_class=2", "data_preprocessing.eda_samples_per_class=2", *overrides])
    items, _, _ = c01.ingest(config.data_ingestion, config.schema, tmp_path, tmp_path / "cache")
    out = tmp_path / "prepared"
    summary = c02.prepare([{"path": i.path, "label": i.label, "split": i.split} for i in items], CLASSES, config.base,
                          config.data_preprocessing, config.schema, out)
    return summary, json.loads((out / c02.REPORT_FILE).read_text()), json.loads((out / c02.RECORDS_FILE).read_text())["records"]


def test_broken_files_are_skipped_and_the_run_goes_on(tmp_path):
    root = synthetic.make_dataset(tmp_path / "d", per_class=10)
    (root / "crazing" / "zero.png").write_bytes(b"")
    (root / "crazing" / "fake.png").write_text("hello")
    good = (root / "inclusion" / "inclusion_1.png").read_bytes()
    (root / "inclusion" / "cut.png").write_bytes(good[: len(good) // 3])
    ramp = np.linspace(0, 1, 400).reshape(20, 20)  # content varies: a flat image would be skipped as blank
    Image.fromarray((np.stack([ramp] * 4, axis=-1) * 200).astype(np.uint8), "CMYK").save(root / "patches" / "cmyk.jpg")
    Image.fromarray((ramp * 40000).astype(np.uint16)).save(root / "patches" / "deep.png")
    summary, report, records = _prepare(tmp_path, root)
    reasons = {Path(s["path"]).name: s["reason"] for s in report["skipped"]}
    assert reasons["zero.png"].startswith("empty file") and reasons["fake.png"].startswith("not an image")
    assert reasons["cut.png"].startswith("truncated or corrupt")
    assert summary["images_prepared"] == 32 and len(records) == 32  # 30 + the CMYK and 16-bit images


def test_exact_duplicate_is_reported_and_kept_once(tmp_path):
    root = synthetic.make_dataset(tmp_path / "d", per_class=10)
    shutil.copy(root / "patches" / "patches_1.png", root / "patches" / "patches_copy.png")
    summary, report, records = _prepare(tmp_path, root)
    assert summary["duplicates_dropped"] == 1
    (dup,) = report["duplicates"]
    assert dup["kept"].endswith("patches_1.png") and dup["dropped"][0].endswith("patches_copy.png")
    assert len({r["sha256"] for r in records}) == len(records)


def test_same_picture_with_two_labels_is_dropped_entirely(tmp_path):
    root = synthetic.make_dataset(tmp_path / "d", per_class=10)
    shutil.copy(root / "patches" / "patches_1.png", root / "crazing" / "confused.png")
    _, report, records = _prepare(tmp_path, root)
    assert "labelled" in report["duplicates"][0]["reason"] and not any(r["source"].endswith("patches_1.png") for r in records)


def test_presplit_source_keeps_its_split_and_drops_test_copies_of_training_images(tmp_path):
    root = synthetic.make_dataset(tmp_path / "d", layout="pre-split", ext=".bmp", split_counts={"train": 8, "valid": 3, "test": 3})
    shutil.copy(root / "train" / "Crazing" / "Cr_1.bmp", root / "test" / "Crazing" / "Cr_leak.bmp")
    _, report, records = _prepare(tmp_path, root, "schema.aliases={crazing: [Crazing], inclusion: [Inclusion], patches: [Patches]}")
    (dup,) = report["duplicates"]
    assert dup["kept"].endswith("train/Crazing/Cr_1.bmp") and dup["dropped"][0].endswith("Cr_leak.bmp")
    assert "kept the train copy" in dup["reason"]
    counts = {s: sum(r["split"] == s for r in records) for s in ("train", "valid", "test")}
    assert counts == {"train": 24, "valid": 9, "test": 9}


def test_presplit_without_valid_gets_one_carved_from_train(tmp_path):
    root = synthetic.make_dataset(tmp_path / "d", layout="pre-split", split_counts={"train": 20, "test": 4})
    _, _, records = _prepare(tmp_path, root, "schema.aliases={crazing: [Crazing], inclusion: [Inclusion], patches: [Patches]}")
    counts = {s: sum(r["split"] == s for r in records) for s in ("train", "valid", "test")}
    assert counts["test"] == 12 and counts["valid"] > 0 and counts["train"] + counts["valid"] == 60


def _items(n_per_class: int) -> list[dict]:
    return [{"path": f"/x/{c}/{i}.png", "label": c, "split": None} for c in CLASSES for i in range(n_per_class)]


def test_split_is_stratified_and_deterministic():
    fractions = load_config(REPO).data_preprocessing.split
    items = _items(40)
    first = c02.assign_splits(items, fractions, seed=42)
    assert first == c02.assign_splits(items, fractions, seed=42)
    assert first != c02.assign_splits(items, fractions, seed=43)
    for label in CLASSES:
        mine = [s for s, i in zip(first, items) if i["label"] == label]
        assert (mine.count("train"), mine.count("valid"), mine.count("test")) == (28, 6, 6)


def test_too_few_images_is_a_clear_error(tmp_path):
    root = synthetic.make_dataset(tmp_path / "d", per_class=3)
    with pytest.raises(DataError, match="too few usable images"):
        _prepare(tmp_path, root, "schema.min_images_per_class=5")


def test_outputs_contract_and_eda(tmp_path):
    root = synthetic.make_dataset(tmp_path / "d", per_class=10)
    _prepare(tmp_path, root)
    out = tmp_path / "prepared"
    assert json.loads((out / c02.CLASS_LABELS_FILE).read_text())["classes"] == CLASSES
    pre = joblib.load(out / c02.PREPROCESSOR_FILE)
    assert (pre.image_size, pre.color_mode, pre.class_names) == (16, "grayscale", tuple(CLASSES))
    source = root / "crazing" / "crazing_1.png"
    stored = next(out.glob("images/*/crazing/crazing_1.png"))
    assert np.array_equal(pre(source)[..., 0], np.asarray(Image.open(stored)))  # lossless: stored == served input
    for name in ("class_counts.png", "class_counts.json", "sample_grid.png", "intensity_stats.json", "intensity_histograms.png"):
        assert (out / "eda" / name).stat().st_size > 0
    stats = json.loads((out / "eda" / "intensity_stats.json").read_text())
    assert set(stats) == set(CLASSES) and stats["crazing"]["mean"] < stats["patches"]["mean"]
