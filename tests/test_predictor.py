"""The predictor on a tiny trained model: formats, bad files, verdicts, export, LiteRT, CLI, log."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from metal_defect import served as served_model
from metal_defect import synthetic
from metal_defect.artifacts import ArtifactStore
from metal_defect.cli import main
from metal_defect.components.c06_evaluation.verdicts import uncertainty_threshold
from metal_defect.errors import ArtifactError
from metal_defect.serving import bundle as bundles
from metal_defect.serving import ood
from metal_defect.serving.images import to_model_input
from metal_defect.serving.predictor import OUT_OF_DISTRIBUTION, UNCERTAIN, Predictor, columns


def _sample(tiny, label: str = "patches", n: int = 1) -> list[Path]:
    return sorted((tiny["data"] / label).glob("*.png"))[:n]


def test_bundle_holds_a_versioned_spec_fitted_thresholds_and_no_pickle(tiny):
    bundle = tiny["bundle"]
    spec = bundles.read_spec(bundle)
    assert spec.spec_version == bundles.SPEC_VERSION and spec.run_id == tiny["run_id"]
    assert spec.class_names == tuple(synthetic.CLASSES) and spec.resize == "stretch"  # the default base.resize
    assert spec.ood and spec.ood.feature_threshold > 0 and spec.ood.statistics_threshold > 0 and spec.ood.reference_count > 0
    assert "nearest" in spec.ood.rule and len(spec.ood.statistics_mean) == len(ood.STATISTICS)
    assert 0.0 <= spec.uncertain_threshold < 1.0 and "validation" in spec.uncertain_rule
    assert not list(bundle.glob("*.joblib")) and not list(bundle.glob("*.pkl"))
    files = bundles.verify_bundle(bundle)
    assert set(files) >= {"model.keras", "serving.json", "ood_reference.npy", "ood_statistics.npy", "ood_texture.npy",
                          "ood_texture_inverted.npy", "model_card.md", "metrics.json"}
    assert spec.ood.texture_layer and spec.ood.texture_threshold > 0 and spec.ood.polarity_threshold > 0
    assert len(spec.ood.texture_mean) == len(spec.ood.texture_scale) == np.load(bundle / "ood_texture.npy").shape[1]
    assert "out of distribution" in (bundle / "model_card.md").read_text().lower()


def test_every_mode_and_format_is_answered(tiny, tmp_path):
    predictor = tiny["predictor"]
    base = np.asarray(Image.open(_sample(tiny)[0]))
    cases = {"grey.png": Image.fromarray(base), "grey.bmp": Image.fromarray(base), "grey.jpg": Image.fromarray(base),
             "grey.tif": Image.fromarray(base), "rgb_grey.png": Image.fromarray(base).convert("RGB"),
             "rgba.png": Image.fromarray(base).convert("RGBA"), "palette.png": Image.fromarray(base).convert("P"),
             "sixteen.png": Image.fromarray(base.astype(np.uint16) * 257), "cmyk.jpg": Image.fromarray(base).convert("CMYK"),
             "webp.webp": Image.fromarray(base)}
    paths = []
    for name, image in cases.items():
        image.save(tmp_path / name)
        paths.append(tmp_path / name)
    answers = predictor.answer_paths(paths)
    assert [a.error for a in answers] == [None] * len(cases)
    assert {a.label for a in answers} == {"patches"}, [(a.path, a.label) for a in answers]


def _bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height pixels (a decompression bomb's signature)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b"")


def test_bad_files_get_an_error_answer_and_the_rest_go_on(tiny, tmp_path):
    good = _sample(tiny)[0]
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "truncated.png").write_bytes(good.read_bytes()[:60])
    (tmp_path / "bomb.png").write_bytes(_bomb_png(30000, 30000))
    names = ["text.png", "empty.jpg", "truncated.png", "bomb.png", "missing.png"]
    answers = tiny["predictor"].answer_paths([tmp_path / n for n in names[:2]] + [good] + [tmp_path / n for n in names[2:]])
    errors = {Path(a.path).name: a.error for a in answers}
    assert errors.pop(good.name) is None
    assert "not an image" in errors["text.png"] and "empty" in errors["empty.jpg"]
    assert "truncated" in errors["truncated.png"] and "too many pixels" in errors["bomb.png"]
    assert "No such file" in errors["missing.png"] or "unreadable" in errors["missing.png"]
    assert all(a.label is None and a.verdict is None for a in answers if a.error)


def test_no_content_and_colour_are_out_of_distribution_not_errors(tiny):
    predictor = tiny["predictor"]
    constant = io.BytesIO()
    Image.new("L", (64, 64), 128).save(constant, format="PNG")
    tiny_image = io.BytesIO()
    Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4) * 16).save(tiny_image, format="PNG")
    colour = io.BytesIO()
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 0], rgb[..., 2] = 220, np.asarray(Image.open(_sample(tiny)[0]))
    Image.fromarray(rgb).save(colour, format="PNG")
    answers = [predictor.answer_file(b.getvalue(), name) for b, name in ((constant, "constant"), (tiny_image, "tiny"), (colour, "colour"))]
    assert [a.verdict for a in answers] == [OUT_OF_DISTRIBUTION] * 3
    assert all(a.error is None and a.label in synthetic.CLASSES for a in answers)
    assert "blank" in answers[0].reason and "too small" in answers[1].reason and "colour" in answers[2].reason


def test_answer_equals_the_model_on_the_converted_array(tiny):
    predictor = tiny["predictor"]
    path = _sample(tiny, "inclusion")[0]
    answer = predictor.answer_file(path)
    array = to_model_input(path, predictor.spec.image_size, predictor.spec.color_mode, resize=predictor.spec.resize)
    raw = np.asarray(predictor.model(array[None], training=False), dtype=np.float64)
    expected = predictor.calibrate(raw)[0]
    np.testing.assert_allclose([answer.probabilities[c] for c in predictor.class_names], expected, atol=1e-6)
    assert answer.label == predictor.class_names[int(expected.argmax())] and answer.confidence == pytest.approx(expected.max(), abs=1e-6)


def test_uncertain_follows_the_threshold_and_ood_the_score(tiny):
    # a high temperature softens the tiny model's near-1.0 confidences, so a threshold can sit above one
    trained = tiny["predictor"]
    predictor = Predictor(trained.model, dataclasses.replace(trained.spec, temperature=50.0), trained.bundle, trained.scorer)
    path = _sample(tiny)[0]
    answer = predictor.answer_file(path)
    assert answer.verdict == "patches" and answer.confidence < 0.99
    strict = predictor.answer_file(path, threshold=answer.confidence + 1e-6)
    assert strict.verdict == UNCERTAIN and strict.label == "patches" and "below" in strict.reason
    # the verdict rule on constructed probabilities and scores
    probs = np.array([[0.5, 0.3, 0.2], [0.98, 0.01, 0.01], [0.98, 0.01, 0.01]])
    scores = np.array([0.0, 0.0, 1.01])  # the OOD score is relative: above 1 is out of distribution
    answers = predictor._answers(probs, (scores, ["semantic", "texture", "polarity"]), 0.6, ["a", "b", "c"], None)
    assert [a.verdict for a in answers] == [UNCERTAIN, "crazing", OUT_OF_DISTRIBUTION]
    assert [a.label for a in answers] == ["crazing"] * 3
    assert answers[2].ood_part == "polarity" and "negatives" in answers[2].reason


def test_inverted_images_are_out_of_distribution_where_polarity_is_evidence(tiny, tmp_path):
    # new images of each class (not the training files, whose exact negatives are the polarity reference):
    # synthetic crazing is dark and patches bright, so their negatives look like no training image
    predictor = tiny["predictor"]
    size = Image.open(_sample(tiny)[0]).size[0]
    rng = np.random.default_rng(123)
    for index, label in enumerate(synthetic.CLASSES):
        images = np.stack([synthetic.texture(index, len(synthetic.CLASSES), size, rng) for _ in range(6)])[..., None]
        originals, inverted = predictor.answer_arrays(images), predictor.answer_arrays(255 - images)
        assert not any(a.verdict == OUT_OF_DISTRIBUTION for a in originals), (label, [(a.ood_score, a.ood_part) for a in originals])
        if label != "inclusion":  # mid-grey: its negative is nearly its own texture, so no verdict is asserted
            assert all(a.verdict == OUT_OF_DISTRIBUTION for a in inverted), (label, [(a.ood_score, a.ood_part) for a in inverted])


def test_a_bundle_older_than_this_spec_version_is_refused_with_what_to_do(tiny, tmp_path):
    copy = tmp_path / "v2"
    shutil.copytree(tiny["bundle"], copy)
    spec = json.loads((copy / "serving.json").read_text())
    (copy / "serving.json").write_text(json.dumps(spec | {"spec_version": bundles.SPEC_VERSION - 1}))
    (copy / bundles.BUNDLE_MANIFEST).unlink()
    bundles.write_manifest(copy)
    with pytest.raises(ArtifactError, match=r"spec_version 2 is older than this program serves \(3.*python main.py"):
        Predictor.from_bundle(copy)


def test_ood_scorer_parts_by_hand():
    # penultimate part: 2 columns; texture part: 1 column; k = 1
    train_features = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 3.0]])
    inverted_features = np.array([[1.0, 0.0, -1.0], [0.0, 1.0, -3.0]])
    images = np.full((2, 8, 8, 1), 100, np.uint8)
    images[1, ::2] = 140
    scorer = ood.fit_scorer(train_features, images, 1, penultimate_size=2, inverted_features=inverted_features)
    # texture standardised by the training mean 2 and std 1: training at -1, +1; negatives at -3, -5
    assert scorer.texture[:, 0].tolist() == pytest.approx([-1.0, 1.0]) and scorer.texture_inverted[:, 0].tolist() == pytest.approx([-3.0, -5.0])
    parts = scorer.components(np.array([[1.0, 0.0, 2.5], [1.0, 0.0, -1.5]]), images[:1].repeat(2, axis=0))
    # texture z = 0.5: nearest training +1 (0.5), nearest negative -3 (3.5); z = -3.5: training -1 (2.5), negative -3 (0.5)
    assert parts[:, 2].tolist() == pytest.approx([0.5, 2.5]) and parts[:, 3].tolist() == pytest.approx([0.5 / 3.5, 2.5 / 0.5])
    scorer.set_thresholds(np.array([[0.1, 1.0, 1.0, 1.0], [0.2, 2.0, 0.5, 0.5]]), 1.0)  # thresholds: the column maxima
    assert scorer.thresholds == (0.2, 2.0, 1.0, 1.0)
    assert scorer.combine(parts).tolist() == pytest.approx([0.5, 5.0]) and scorer.deciding(parts) == ["texture", "polarity"]


def test_ood_scorer_reference_replaced_after_a_call_is_not_scored_against_stale_norms():
    # the scorer keeps each reference's squared norms; a reference replaced later must not reuse them
    train_features = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 3.0]])
    images = np.full((2, 8, 8, 1), 100, np.uint8)
    images[1, ::2] = 140
    scorer = ood.fit_scorer(train_features, images, 1, penultimate_size=2, inverted_features=-train_features)
    probe = (np.array([[1.0, 0.0, 2.5]]), images[:1])
    scorer.components(*probe)
    scorer.texture = scorer.texture + 10.0  # e.g. references re-fitted on other images
    fresh = dataclasses.replace(scorer)  # the same references, nothing cached
    assert scorer.components(*probe)[0].tolist() == pytest.approx(fresh.components(*probe)[0].tolist())


def test_knn_score_and_uncertainty_rule_by_hand():
    reference = ood.normalise(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    # (2, 0) normalised is (1, 0): nearest is itself (distance 0), 2nd nearest (1,1)/sqrt2 at sqrt(2 - sqrt2)
    assert ood.knn_scores(np.array([[2.0, 0.0]]), reference, 1)[0] == pytest.approx(0.0, abs=1e-6)
    assert ood.knn_scores(np.array([[2.0, 0.0]]), reference, 2)[0] == pytest.approx(np.sqrt(2 - np.sqrt(2)), abs=1e-5)
    conf = np.array([0.30, 0.40, 0.55, 0.90, 0.95, 0.97, 0.99, 0.99, 0.99, 0.99])
    correct = np.array([False, True, False, True, True, True, True, True, True, True])
    # cost of flagging the i least confident = wrong answers left + cost x i:
    # review cost 0.5: i=0: 2, i=1: 1.5, i=2: 2, i=3: 1.5 -> the first minimum, threshold 0.40 (1 flagged)
    threshold, info = uncertainty_threshold(conf, correct, review_cost=0.5, max_share=0.5)
    assert threshold == pytest.approx(0.40) and info["valid_flagged"] == 1
    # review cost 0.3: i=1: 1.3, i=3: 0.9 -> threshold 0.90 (3 flagged, no error left)
    threshold, info = uncertainty_threshold(conf, correct, review_cost=0.3, max_share=0.5)
    assert threshold == pytest.approx(0.90) and info["valid_flagged"] == 3 and info["valid_error_answered"] == 0
    # at most 20 % may be flagged: i <= 2, best i=1
    assert uncertainty_threshold(conf, correct, review_cost=0.3, max_share=0.2)[0] == pytest.approx(0.40)
    assert uncertainty_threshold(conf, np.ones(10, bool), 0.5, 0.25)[0] == 0.0


def test_export_reloads_with_identical_answers_and_litert_parity(tiny, tmp_path):
    predictor = tiny["predictor"]
    files = [p for label in synthetic.CLASSES for p in _sample(tiny, label, 4)]
    assert main(["export", str(tmp_path / "bundle"), "--model", tiny["run_id"], "--config", str(tiny["folder"])]) == 0
    exported = Predictor.from_bundle(tmp_path / "bundle")
    before, after = predictor.answer_paths(files), exported.answer_paths(files)
    assert [(a.label, a.verdict, a.probabilities, a.ood_score) for a in before] == [(a.label, a.verdict, a.probabilities, a.ood_score) for a in after]
    lite = Predictor.from_bundle(tmp_path / "bundle", backend="litert")
    arrays = exported.load_images(files)[0]
    keras_probs, keras_feats = exported.forward(arrays)
    lite_probs, lite_feats = lite.forward(arrays)
    assert np.abs(keras_probs - lite_probs).max() < 1e-4 and (keras_probs.argmax(1) == lite_probs.argmax(1)).all()
    assert np.abs(keras_feats - lite_feats).max() < 1e-3
    assert [a.verdict for a in lite.answer_paths(files)] == [a.verdict for a in after]
    # every core this process may use: left unset, ai-edge-litert runs one thread (5.5 ms against 3.0 ms on 2 cores)
    assert lite._litert.threads == len(os.sched_getaffinity(0))


def test_export_into_model_bundle_as_in_git_keeps_its_readme_and_refuses_foreign_folders(tiny, tmp_path):
    # the documented `python main.py export model_bundle`: the folder holds its README (in git)
    folder = tmp_path / "model_bundle"
    folder.mkdir()
    shutil.copy2(REPO / "model_bundle" / "README.md", folder / "README.md")
    readme = (folder / "README.md").read_bytes()
    export = ["export", str(folder), "--model", tiny["run_id"], "--config", str(tiny["folder"])]
    assert main(export) == 0
    assert (folder / "README.md").read_bytes() == readme and (folder / bundles.SERVING_SPEC).is_file()
    assert "README.md" not in json.loads((folder / bundles.BUNDLE_MANIFEST).read_text())["files"]
    Predictor.from_bundle(folder)
    assert main(export) == 0, "exporting again replaces the bundle export wrote"
    assert (folder / "README.md").read_bytes() == readme and not list(tmp_path.glob(".old-*")) and not list(tmp_path.glob(".tmp-*"))
    # a folder with anything else in it, even beside a serving.json, is refused and left as it was
    for name, planted in (("notes", {"notes.txt": "mine"}), ("looks-like", {"serving.json": "{}", "photo.jpg": "mine"}),
                          ("bundle-plus", {"photo.jpg": "mine"})):
        other = tmp_path / name
        if name == "bundle-plus":
            shutil.copytree(folder, other)
        other.mkdir(exist_ok=True)
        for file, text in planted.items():
            (other / file).write_text(text)
        before = sorted(p.name for p in other.iterdir())
        assert main(["export", str(other), "--model", tiny["run_id"], "--config", str(tiny["folder"])]) == 4, name
        assert sorted(p.name for p in other.iterdir()) == before and (other / "photo.jpg" if "photo.jpg" in planted else other / "notes.txt").read_text() == "mine"
    link = tmp_path / "link"
    link.symlink_to(folder)
    assert main(["export", str(link), "--model", tiny["run_id"], "--config", str(tiny["folder"])]) == 4
    assert link.is_symlink()


def test_a_changed_bundle_file_or_newer_spec_is_refused(tiny, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(tiny["bundle"], copy)
    reference = np.load(copy / bundles.OOD_REFERENCE)
    np.save(copy / bundles.OOD_REFERENCE, reference * 0.5)
    with pytest.raises(ArtifactError, match=r"ood_reference\.npy does not match its sha256"):
        Predictor.from_bundle(copy)
    shutil.copy2(tiny["bundle"] / bundles.OOD_REFERENCE, copy / bundles.OOD_REFERENCE)
    spec = json.loads((copy / "serving.json").read_text())
    with pytest.raises(ArtifactError, match="newer than this program"):
        bundles.ServingSpec.from_json(spec | {"spec_version": bundles.SPEC_VERSION + 1})


def test_served_pointer_is_relative_and_survives_moving_the_artifacts(tiny, tmp_path):
    pointer = json.loads((tiny["folder"] / "artifacts" / "served.json").read_text())
    assert not Path(pointer["bundle"]).is_absolute()
    moved = tmp_path / "elsewhere"
    shutil.copytree(tiny["folder"] / "artifacts", moved)
    predictor = Predictor.from_bundle(served_model.resolve_bundle(ArtifactStore(moved), None))
    assert predictor.bundle.resolve().is_relative_to(moved.resolve())
    assert predictor.answer_file(_sample(tiny)[0]).label == "patches"


def test_cli_columns_exit_codes_and_predictions_log(tiny, tmp_path):
    folder = tiny["folder"]
    images = tmp_path / "in"
    shutil.copytree(tiny["data"] / "inclusion", images / "sub")
    (images / "notes.txt").write_text("a note")
    out_csv, out_json = tmp_path / "a.csv", tmp_path / "a.json"
    log = folder / "artifacts" / "predictions.jsonl"
    before = len(log.read_text().splitlines()) if log.is_file() else 0
    assert main(["predict", str(images), "--csv", str(out_csv), "--json", str(out_json), "--config", str(folder)]) == 0
    rows = list(csv.DictReader(out_csv.open()))
    assert list(rows[0]) == columns(synthetic.CLASSES) and len(rows) == 24  # notes.txt is skipped, not answered
    assert list(rows[0])[:5] == ["path", "label", "confidence", "verdict", "ood_score"] and list(rows[0])[-5:] == [
        "model_run", "model_sha256", "threshold", "ms", "error"]
    assert {r["label"] for r in rows} == {"inclusion"} and all(r["model_run"] == tiny["run_id"] for r in rows)
    assert json.loads(out_json.read_text())[0]["p_inclusion"] > 0.5
    entries = [json.loads(line) for line in log.read_text().splitlines()[before:]]
    assert len(entries) == 24 and {"time", "file", "sha256", "label", "confidence", "verdict", "model_run"} <= set(entries[0])
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    code = main(["predict", str(_sample(tiny)[0]), str(tmp_path / "broken.png"), "--csv", str(out_csv), "--config", str(folder)])
    rows = list(csv.DictReader(out_csv.open()))
    assert code == 3 and rows[0]["error"] == "" and rows[1]["error"] and rows[1]["label"] == ""
    assert main(["predict", str(_sample(tiny)[0]), "--threshold", "1.5", "--config", str(folder)]) == 2
    assert main(["predict", str(_sample(tiny)[0]), "--model", "no-such-run", "--config", str(folder)]) == 4  # ArtifactError
