"""The model bundle: the folder a served model lives in (which bundle is served: `metal_defect.served`).

Layout (every file listed with its sha256 in `bundle_manifest.json`, checked on load):

    serving.json        the contract (ServingSpec): input size/mode/resize, classes, temperature,
                        verdict thresholds, OOD settings; versioned by `spec_version`
    model.keras         the Keras model (loaded with safe_mode: no code from the file runs)
    ood_reference.npy   normalised penultimate features of the training images (no pickle)
    ood_statistics.npy  their standardised image statistics (no pickle)
    ood_texture.npy, ood_texture_inverted.npy
                        their standardised texture statistics, and their negatives' (no pickle)
    model_card.md       what the model is, how good, where it fails
    metrics.json        headline metrics (validation, test, quality gate)
    model.tflite        optional: the LiteRT export (written by `main.py export`)

Nothing in a bundle is unpickled: a bundle may come from elsewhere.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metal_defect.artifacts import read_json, sha256_file, write_json_atomic
from metal_defect.errors import ArtifactError

SPEC_VERSION = 3
BUNDLE_DIR = "served"
SERVING_SPEC = "serving.json"
MODEL_FILE = "model.keras"
TFLITE_FILE = "model.tflite"
MODEL_CARD = "model_card.md"
METRICS_FILE = "metrics.json"
OOD_REFERENCE = "ood_reference.npy"  # normalised penultimate features of the training images
OOD_STATISTICS = "ood_statistics.npy"  # their standardised image statistics
OOD_TEXTURE = "ood_texture.npy"  # their standardised texture statistics (spec_version 3)
OOD_TEXTURE_INVERTED = "ood_texture_inverted.npy"  # the same of their negatives (255 - pixels)
BUNDLE_MANIFEST = "bundle_manifest.json"
BUNDLE_ENV = "METAL_DEFECT_BUNDLE"  # a bundle folder to serve instead of the served pointer (containers)


@dataclass(frozen=True)
class OodSpec:
    """Out-of-distribution settings (see serving/ood.py): k-NN distances to the training images in
    L2-normalised penultimate features (Sun et al., ICML 2022), in standardised image statistics,
    in the texture statistics of `texture_layer` and its polarity ratio, each divided by its
    validation threshold; the OOD score is the largest, flagged above 1."""

    feature_layer: str
    neighbours: int
    feature_threshold: float
    statistics_threshold: float
    statistics_mean: tuple[float, ...]
    statistics_scale: tuple[float, ...]
    rule: str
    reference_count: int
    colour_is_ood: bool  # a grayscale model treats a colourful image as out of distribution
    min_image_side: int = 16
    min_pixel_std: float = 0.004
    threshold: float = 1.0  # on the combined score
    texture_layer: str | None = None
    texture_threshold: float = 1.0
    polarity_threshold: float = 1.0
    texture_mean: tuple[float, ...] = ()
    texture_scale: tuple[float, ...] = ()


@dataclass(frozen=True)
class ServingSpec:
    """What a bundle promises: how to turn an image into input, and how to read the output."""

    model_name: str
    class_names: tuple[str, ...]
    image_size: int
    color_mode: str
    resize: str = "pad"  # base.resize: "pad" keeps the aspect ratio, "stretch" squares the image
    temperature: float = 1.0
    pretrained: bool = False
    created: str = ""
    run_id: str | None = None
    uncertain_threshold: float = 0.0
    uncertain_rule: str = "none (threshold 0: nothing is flagged uncertain)"
    ood: OodSpec | None = None
    heatmap_layer: str | None = None  # the heatmap's layer (serving/explain.py); None: its default rule
    heatmap_method: str = "layercam"
    max_image_pixels: int = 40_000_000
    max_file_mb: float = 50.0
    extensions: tuple[str, ...] = (".bmp", ".jpg", ".jpeg", ".png", ".tif", ".tiff")  # what a folder walk answers
    weak_model: bool = False
    weak_reasons: tuple[str, ...] = ()
    input_dtype: str = "uint8"
    spec_version: int = SPEC_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return 1 if self.color_mode == "grayscale" else 3

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["class_names"] = list(self.class_names)
        data["weak_reasons"] = list(self.weak_reasons)
        data["extensions"] = list(self.extensions)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], where: Path | str = SERVING_SPEC) -> ServingSpec:
        version = int(data.get("spec_version", 1))
        if version > SPEC_VERSION:
            raise ArtifactError(f"{where}: spec_version {version} is newer than this program understands ({SPEC_VERSION}); "
                                "update metal-defect to serve this bundle")
        if version < SPEC_VERSION:  # 0.1 has no released bundles: an older one comes from a development build
            raise ArtifactError(f"{where}: spec_version {version} is older than this program serves ({SPEC_VERSION}: the texture part "
                                "of the out-of-distribution check); run `python main.py` again to evaluate the model into a current bundle")
        missing = [k for k in ("model_name", "class_names", "image_size", "color_mode") if k not in data]
        if missing:
            raise ArtifactError(f"{where}: not a serving spec (missing {', '.join(missing)})")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["extra"] = {k: v for k, v in data.items() if k not in known}
        values["class_names"] = tuple(data["class_names"])
        values["weak_reasons"] = tuple(data.get("weak_reasons", ()))
        if "extensions" in data:
            values["extensions"] = tuple(data["extensions"])
        values["spec_version"] = version
        if data.get("ood"):
            ood = dict(data["ood"])
            for key in ("statistics_mean", "statistics_scale", "texture_mean", "texture_scale"):
                ood[key] = tuple(ood.get(key, ()))
            values["ood"] = OodSpec(**ood)
        return cls(**values)


def write_manifest(bundle: Path) -> dict[str, str]:
    """Record the sha256 of every file in the bundle (call after the last file is written)."""
    files = {p.relative_to(bundle).as_posix(): sha256_file(p) for p in sorted(bundle.rglob("*")) if p.is_file() and p.name != BUNDLE_MANIFEST}
    write_json_atomic(bundle / BUNDLE_MANIFEST, {"files": files})
    return files


# Every file of the bundle format: one that is in the folder must be in the manifest, so that a
# manifest emptied or cut down (with serving.json then edited at will) is caught like a flipped byte.
BUNDLE_FILES = (SERVING_SPEC, MODEL_FILE, TFLITE_FILE, MODEL_CARD, METRICS_FILE, OOD_REFERENCE, OOD_STATISTICS, OOD_TEXTURE,
                OOD_TEXTURE_INVERTED)
REQUIRED_FILES = (SERVING_SPEC, MODEL_FILE)


def verify_bundle(bundle: Path) -> dict[str, str]:
    """Check the manifest covers every bundle file there is (and the required ones), and every file
    against it; ArtifactError naming the first problem. (The manifest's own sha256, recorded by the
    served pointer, is checked by `served_bundle`.)"""
    manifest = bundle / BUNDLE_MANIFEST
    if not manifest.is_file():
        raise ArtifactError(f"{bundle}: no {BUNDLE_MANIFEST}; re-export the bundle with `python main.py export DIR`")
    listing = read_json(manifest)
    files = listing.get("files") if isinstance(listing, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise ArtifactError(f"{bundle}: {BUNDLE_MANIFEST} is not a manifest (no 'files' mapping of names to sha256); re-export the bundle")
    uncovered = [name for name in BUNDLE_FILES if name not in files and ((bundle / name).exists() or name in REQUIRED_FILES)]
    if uncovered:
        raise ArtifactError(f"{bundle}: {', '.join(uncovered)} not covered by {BUNDLE_MANIFEST} (the manifest was emptied or edited); "
                            "re-export the bundle")
    for name, expected in files.items():
        path = bundle / name
        if not path.is_file():
            raise ArtifactError(f"{bundle}: {name} is listed in {BUNDLE_MANIFEST} but missing; the bundle is incomplete")
        if sha256_file(path) != expected:
            raise ArtifactError(f"{bundle}: {name} does not match its sha256 in {BUNDLE_MANIFEST} (changed or damaged); re-export the bundle")
    return files


def read_spec(bundle: Path) -> ServingSpec:
    path = bundle / SERVING_SPEC
    if not path.is_file():
        raise ArtifactError(f"{bundle}: not a model bundle (no {SERVING_SPEC})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: unreadable serving spec ({exc})") from exc
    return ServingSpec.from_json(data, path)


def write_spec(bundle: Path, spec: ServingSpec) -> None:
    write_json_atomic(bundle / SERVING_SPEC, spec.to_json())


def write_ood_references(bundle: Path, scorer: Any) -> None:
    """The scorer's reference arrays (an ood.OodScorer), as plain .npy files."""
    import numpy as np

    arrays = {OOD_REFERENCE: scorer.features, OOD_STATISTICS: scorer.statistics, OOD_TEXTURE: scorer.texture,
              OOD_TEXTURE_INVERTED: scorer.texture_inverted}
    for name, array in arrays.items():
        if array is not None:
            np.save(bundle / name, np.asarray(array, dtype=np.float32), allow_pickle=False)


def read_ood_scorer(bundle: Path, spec: OodSpec) -> Any:
    """The ood.OodScorer the bundle's references and `spec` describe (no pickle is read)."""
    import numpy as np

    from metal_defect.serving.ood import OodScorer

    def load(name: str) -> Any:
        return np.load(bundle / name, allow_pickle=False).astype(np.float32)

    scorer = OodScorer(load(OOD_REFERENCE), load(OOD_STATISTICS), np.asarray(spec.statistics_mean, np.float32),
                       np.asarray(spec.statistics_scale, np.float32), spec.neighbours, spec.feature_threshold, spec.statistics_threshold)
    scorer.texture, scorer.texture_inverted = load(OOD_TEXTURE), load(OOD_TEXTURE_INVERTED)
    scorer.texture_mean, scorer.texture_scale = np.asarray(spec.texture_mean, np.float32), np.asarray(spec.texture_scale, np.float32)
    scorer.texture_threshold, scorer.polarity_threshold = spec.texture_threshold, spec.polarity_threshold
    return scorer


def load_model(path: Path) -> Any:
    """Load a saved .keras model in Keras' safe mode with this package's custom objects registered."""
    import keras

    from metal_defect.serving import keras_objects  # noqa: F401  (registers the custom layers and loss)

    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # a foreign or damaged file fails in many ways inside Keras; all mean "not this bundle's model"
        raise ArtifactError(f"{path}: cannot load the model ({type(exc).__name__}: {exc})".replace("\n", " ")[:500]) from exc


def check_model_fits(model: Any, spec: ServingSpec, path: Path) -> None:
    """ArtifactError unless the model takes the spec's input and gives one probability per class (a foreign model.keras)."""
    try:
        inputs, outputs = tuple(model.inputs[0].shape[1:]), tuple(model.outputs[0].shape[1:])
    except (AttributeError, IndexError, TypeError) as exc:
        raise ArtifactError(f"{path}: not a model with one input and one output") from exc
    expected_in = (spec.image_size, spec.image_size, spec.channels)
    if inputs != expected_in or outputs != (len(spec.class_names),):
        raise ArtifactError(f"{path}: the model takes {inputs} and gives {outputs}, but {SERVING_SPEC} says {expected_in} "
                            f"and {len(spec.class_names)} classes; this is not the bundle's model")


def read_metrics(bundle: Path) -> dict[str, Any]:
    """The bundle's metrics.json ({} when absent: a bundle put together by hand still answers; the app then shows no numbers)."""
    path = bundle / METRICS_FILE
    return read_json(path) if path.is_file() else {}
