"""Grad-CAM heatmaps: frame, where the peak lands, the CLI's overlays, pointing accuracy by hand."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metal_defect.serving import explain
from metal_defect.serving.bundle import ServingSpec
from metal_defect.serving.predictor import Answer, Predictor


def _bright_spot_model(size: int) -> object:
    """A fixed-weight network whose class 0 evidence is bright pixels: conv (mean of 3x3) - 0.5, ReLU,
    global average pooling, dense: class 0 grows with the bright area, class 1 shrinks."""
    import keras

    from metal_defect.serving.keras_objects import PixelPreprocess

    inputs = keras.Input((size, size, 1), dtype="uint8")
    x = PixelPreprocess("scale", name="preprocess")(inputs)
    conv = keras.layers.Conv2D(1, 3, padding="same", name="conv")
    x = keras.layers.ReLU(name="evidence")(conv(x))
    x = keras.layers.GlobalAveragePooling2D()(x)
    dense = keras.layers.Dense(2, activation="softmax", name="probabilities")
    model = keras.Model(inputs, dense(x))
    conv.set_weights([np.full((3, 3, 1, 1), 1 / 9, np.float32), np.array([-0.5], np.float32)])
    dense.set_weights([np.array([[20.0, -20.0]], np.float32), np.zeros(2, np.float32)])
    return model


def _spot_image(width: int, height: int, x: int, y: int, side: int = 6) -> Image.Image:
    rng = np.random.default_rng(0)
    pixels = rng.integers(20, 60, (height, width), dtype=np.uint8)
    pixels[y:y + side, x:x + side] = 250
    return Image.fromarray(pixels)


def _predictor(size: int = 32) -> Predictor:
    spec = ServingSpec(model_name="spot", class_names=("spot", "plain"), image_size=size, color_mode="grayscale", resize="pad")
    return Predictor(_bright_spot_model(size), spec)


def test_the_heatmap_layer_is_the_last_spatial_one():
    assert explain.heatmap_layer(_bright_spot_model(32)) == "evidence"


@pytest.mark.parametrize(("width", "height", "corner"), [(32, 32, (2, 2)), (64, 32, (52, 22)), (30, 90, (3, 80))])
def test_peak_lands_where_the_evidence_is_in_the_original_frame(tmp_path, width, height, corner):
    predictor = _predictor()
    path = tmp_path / "spot.png"
    _spot_image(width, height, *corner).save(path)
    answer = predictor.answer_file(path)
    assert answer.label == "spot"
    heat, picture = predictor.explain(path, answer)
    assert heat.shape == (height, width) and picture.size == (width, height)
    assert heat.min() >= 0.0 and heat.max() == pytest.approx(1.0)
    x, y = answer.heat_peak_x, answer.heat_peak_y
    # the 6-pixel spot, with a few pixels of slack for the coarse map's interpolation
    assert corner[0] - 4 <= x <= corner[0] + 10 and corner[1] - 4 <= y <= corner[1] + 10, (x, y, corner)


def test_content_box_inverts_the_padding():
    from metal_defect.serving.images import content_box, convert_decoded

    image = Image.new("L", (60, 20), 200)
    array = convert_decoded(image, 30, "grayscale")[..., 0]
    x0, y0, x1, y1 = content_box(60, 20, 30)
    assert (x0, y0, x1, y1) == (0, 10, 30, 20)
    assert (array[y0:y1, x0:x1] == 200).all() and array[:y0].max() == 200  # fill is the mean colour
    assert content_box(60, 20, 30, "stretch") == (0, 0, 30, 30)


def test_pointing_accuracy_by_hand():
    boxes = [explain.Boxes(100, 100, ((10, 10, 29, 29),)),  # share 0.04
             explain.Boxes(100, 100, ((0, 0, 49, 99),)),  # left half: share 0.5
             explain.Boxes(100, 100, ((60, 60, 69, 69), (0, 0, 9, 9))),  # two boxes: share 0.02
             explain.Boxes(100, 100, ((50, 50, 59, 59),))]  # share 0.01
    peaks = [(20, 20), (80, 50), (5, 5), (70, 50)]
    # strict: inside, outside (31 px right of the box), inside the 2nd box, outside (11 px right)
    result = explain.pointing_accuracy(peaks, boxes, ["a", "a", "b", "b"], tolerance=15)
    assert result["overall"]["strict"] == pytest.approx(0.5) and result["overall"]["tolerant"] == pytest.approx(0.75)
    assert result["overall"]["chance"] == pytest.approx((0.04 + 0.5 + 0.02 + 0.01) / 4)
    assert result["per_class"]["a"] == {"n": 2, "strict": 0.5, "tolerant": 0.5, "chance": pytest.approx(0.27)}
    assert result["per_class"]["b"]["tolerant"] == 1.0
    assert boxes[0].scaled_to(200, 50).boxes == ((20.0, 5.0, 58.0, 14.5),)


def test_read_voc_and_its_errors(tmp_path):
    xml = tmp_path / "a.xml"
    xml.write_text("<annotation><size><width>200</width><height>100</height></size>"
                   "<object><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>30</xmax><ymax>40</ymax></bndbox></object></annotation>")
    assert explain.read_voc(xml) == explain.Boxes(200, 100, ((1.0, 2.0, 30.0, 40.0),))
    (tmp_path / "b.xml").write_text("<annotation><size><width>200</width>")
    with pytest.raises(ValueError, match=r"b\.xml"):
        explain.read_voc(tmp_path / "b.xml")


def test_cli_heatmaps_write_one_overlay_per_answered_image_and_fill_the_columns(tmp_path, tiny):
    from metal_defect.cli import main

    data, folder = tiny["data"], tiny["folder"]
    images = tmp_path / "in"
    images.mkdir()
    for source in sorted((data / "patches").glob("*.png"))[:3]:
        shutil.copy2(source, images / source.name)
    (images / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "answers.csv"
    code = main(["predict", str(images), "--heatmaps", str(tmp_path / "heat"), "--csv", str(out), "--config", str(folder)])
    rows = list(csv.DictReader(out.open()))
    assert code == 3 and list(rows[0])[-2:] == ["heat_peak_x", "heat_peak_y"]
    answered = [r for r in rows if not r["error"]]
    assert len(answered) == 3 and all(0 <= int(r["heat_peak_x"]) < 32 and 0 <= int(r["heat_peak_y"]) < 32 for r in answered)
    assert [r["heat_peak_x"] for r in rows if r["error"]] == [""]
    overlays = sorted(p.name for p in (tmp_path / "heat").iterdir())
    assert overlays == sorted(f"{Path(r['path']).name}.heatmap.png" for r in answered)
    assert Image.open(tmp_path / "heat" / overlays[0]).size == (32, 32)


def test_answers_without_heatmaps_keep_the_documented_columns():
    answer = Answer(path="x.png", label="a", confidence=0.9, verdict="a", probabilities={"a": 0.9, "b": 0.1})
    assert list(answer.row(["a", "b"]))[-1] == "error" and list(answer.row(["a", "b"], heatmaps=True))[-2:] == ["heat_peak_x", "heat_peak_y"]


def test_heatmaps_reach_into_a_nested_keras_applications_backbone():
    from conftest import REPO

    from metal_defect.components.c04_model_builder import build_model
    from metal_defect.config import load_config

    params = load_config(REPO, ["model.transfer.weights=none"]).model
    model = build_model("MobileNetV2", (64, 64, 1), 3, params).model
    layers = explain.spatial_layers(model)
    assert layers and all("/" in name for name, _ in layers)  # every spatial layer lives inside the backbone
    layer = explain.heatmap_layer(model)
    assert layer.startswith(model.layers[2].name + "/") and dict(layers)[layer] * 4 >= 64
    heat = explain.GradCam(model, layer)(np.full((2, 64, 64, 1), 128, np.uint8), np.array([0, 1]))
    assert heat.shape == (2, dict(layers)[layer], dict(layers)[layer]) and np.isfinite(heat).all()
    assert explain.GradCam(model, explain.last_spatial_layer(model), "gradcam")(np.zeros((1, 64, 64, 1), np.uint8), np.array([2])).ndim == 3


def test_ood_features_reach_into_a_nested_backbone_and_match_the_model():
    from conftest import REPO

    from metal_defect.components.c04_model_builder import build_model
    from metal_defect.config import load_config
    from metal_defect.serving import ood

    params = load_config(REPO, ["model.transfer.weights=none"]).model
    model = build_model("MobileNetV2", (64, 64, 1), 3, params).model
    feature_layer, texture_layer = ood.feature_layer(model), ood.texture_layer(model)
    assert "/" in texture_layer and "/" not in feature_layer
    serving = ood.with_features(model, feature_layer, texture_layer)
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 1), dtype=np.uint8)
    probs, features = (np.asarray(t) for t in serving(images, training=False))
    channels = model.get_layer(texture_layer.split("/")[0]).get_layer(texture_layer.split("/")[1]).output.shape[-1]
    penultimate = int(np.prod(model.get_layer(feature_layer).output.shape[1:]))
    assert features.shape == (2, penultimate + 2 * channels) and np.isfinite(features).all()
    np.testing.assert_allclose(probs, np.asarray(model(images, training=False)), atol=1e-5)


def test_a_defect_mask_is_ground_truth_like_a_box(tmp_path):
    pixels = np.zeros((40, 60), np.uint8)
    pixels[10:14, 20:24] = 255  # a 4 x 4 defect
    Image.fromarray(pixels).save(tmp_path / "a.png")
    mask = explain.read_mask(tmp_path / "a.png")
    assert mask.distance(21, 11) == 0 and mask.distance(30, 11) == pytest.approx(7) and mask.share() == pytest.approx(16 / 2400)
    doubled = mask.scaled_to(120, 80)
    assert doubled.distance(42, 22) == 0 and doubled.distance(21, 11) > 0 and doubled.share() == pytest.approx(mask.share())
    result = explain.pointing_accuracy([(21, 12), (50, 30)], [mask, mask], ["Blowhole", "Blowhole"])
    assert result["hits"] == [True, False] and result["overall"]["strict"] == 0.5
    assert mask.outline().sum() == 12  # the 4 x 4 square's border pixels
    drawn = np.asarray(explain.draw_regions(Image.new("RGB", (60, 40)), mask))
    assert (drawn[10, 20] == 255).all() and (drawn[11, 21] == 0).all() and (drawn[0, 0] == 0).all()
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"bad\.png"):
        explain.read_mask(tmp_path / "bad.png")


def test_masks_are_matched_by_image_name_in_class_folders_and_empty_ones_skipped(tmp_path, caplog):
    from metal_defect.components.c06_evaluation.heatmaps import regions_for

    masks = tmp_path / "masks"
    for label, name, filled in [("Crack", "exp1_7", True), ("Blowhole", "exp1_7", True), ("Free", "exp2_1", False), ("Crack", "broken", True)]:
        (masks / label).mkdir(parents=True, exist_ok=True)
        pixels = np.zeros((20, 30), np.uint8)
        if filled:
            pixels[:, :15 if label == "Crack" else 5] = 255
        Image.fromarray(pixels).save(masks / label / f"{name}.png")
    (masks / "Crack" / "broken.png").write_bytes(b"\x89PNG truncated")
    records = [{"source": "/data/Blowhole/exp1_7.jpg", "label": "Blowhole", "original_size": [60, 40]},
               {"source": "/data/Free/exp2_1.jpg", "label": "Free", "original_size": [30, 20]},
               {"source": "/data/Crack/broken.jpg", "label": "Crack", "original_size": [30, 20]},
               {"source": "/data/Crack/no_mask.jpg", "label": "Crack"}]
    chosen, regions = regions_for(records, None, str(masks))
    assert chosen == [0]  # empty mask: no defect; unreadable: reported; none: not counted
    assert (regions[0].width, regions[0].height) == (60, 40) and regions[0].share() == pytest.approx(5 / 30)  # its own class's mask, scaled
    assert "broken.png" in caplog.text
    assert regions_for(records, None, None) == ([], [])
