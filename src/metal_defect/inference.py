"""The predictor: one implementation for the CLI, the app, evaluation and benchmarks.

It loads a model bundle (the `served/` folder an evaluation writes: model.keras,
serving.json with the input contract and temperature, model card), converts images with
c02's `to_model_input` (the same function that prepared the training data) and returns
calibrated probabilities.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from metal_defect.artifacts import ArtifactStore, read_json
from metal_defect.components.c02_data_preprocessing import ImagePreprocessor, ImageProblem
from metal_defect.errors import ArtifactError
from metal_defect.metrics import apply_temperature

log = logging.getLogger(__name__)

BUNDLE_DIR = "served"
SERVING_SPEC = "serving.json"
MODEL_FILE = "model.keras"
MODEL_CARD = "model_card.md"


def bundle_of_run(store: ArtifactStore, run_id: str) -> Path:
    """The model bundle an evaluation in run `run_id` wrote."""
    manifest = store.manifest(run_id)
    stage = manifest.get("stages", {}).get("evaluation")
    if not stage or stage.get("status") not in ("succeeded", "reused"):
        raise ArtifactError(f"run {run_id} has no finished evaluation (status {manifest.get('status')}); "
                            "only runs that reached the evaluation stage can be served")
    bundle = Path(stage["output"]) / BUNDLE_DIR
    if not (bundle / SERVING_SPEC).is_file():
        raise ArtifactError(f"run {run_id}: model bundle {bundle} is missing; re-run `python main.py`")
    return bundle


def served_bundle(store: ArtifactStore) -> tuple[Path, dict[str, Any]]:
    """The bundle the served pointer names (ArtifactError when nothing is served yet)."""
    pointer = store.served()
    if pointer is None:
        raise ArtifactError(f"no model is served yet ({store.served_pointer} missing): train one with `python main.py`, "
                            "or serve an earlier run with `python main.py promote RUN_ID`")
    return Path(pointer["bundle"]), pointer


def load_model(path: Path) -> Any:
    """Load a saved .keras model with this package's custom layers and losses registered."""
    import keras

    from metal_defect.components import c04_model_builder, c06_training  # noqa: F401  (registers custom objects)

    return keras.models.load_model(path, compile=False)


def predict_probabilities(model: Any, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Model softmax output for uint8 images [N, H, W, C] as float64 (empty input -> empty output)."""
    if len(images) == 0:
        return np.zeros((0, int(model.output_shape[-1])), dtype=np.float64)
    return np.asarray(model.predict(images, batch_size=batch_size, verbose=0), dtype=np.float64)


@dataclass
class Predictor:
    """A loaded model bundle: call `probabilities` on uint8 arrays or `predict_files` on paths."""

    model: Any
    spec: dict[str, Any]
    bundle: Path

    @classmethod
    def from_bundle(cls, bundle: Path) -> Predictor:
        bundle = Path(bundle)
        if not (bundle / SERVING_SPEC).is_file():
            raise ArtifactError(f"{bundle}: not a model bundle (no {SERVING_SPEC})")
        return cls(load_model(bundle / MODEL_FILE), read_json(bundle / SERVING_SPEC), bundle)

    @classmethod
    def load(cls, store: ArtifactStore, run_id: str | None = None) -> Predictor:
        """The served model, or the model of run `run_id`."""
        bundle = bundle_of_run(store, run_id) if run_id else served_bundle(store)[0]
        return cls.from_bundle(bundle)

    @property
    def class_names(self) -> list[str]:
        return list(self.spec["class_names"])

    @property
    def temperature(self) -> float:
        return float(self.spec.get("temperature", 1.0))

    @property
    def preprocessor(self) -> ImagePreprocessor:
        # bundles written before the aspect-preserving resize existed stretched their images
        return ImagePreprocessor(self.spec["image_size"], self.spec["color_mode"], tuple(self.class_names), resize=self.spec.get("resize", "stretch"))

    def raw_probabilities(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Model softmax output for uint8 images [N, H, W, C] (no temperature)."""
        return predict_probabilities(self.model, images, batch_size)

    def probabilities(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Calibrated probabilities (the stored temperature applied)."""
        raw = self.raw_probabilities(images, batch_size)
        return apply_temperature(raw, self.temperature) if self.temperature != 1.0 else raw

    def load_images(self, paths: list[str | os.PathLike]) -> tuple[np.ndarray, list[int], list[dict[str, str]]]:
        """Convert files to model input; unusable files are reported, not fatal."""
        convert = self.preprocessor
        arrays, ok, problems = [], [], []
        for i, path in enumerate(paths):
            try:
                arrays.append(convert(path))
                ok.append(i)
            except (ImageProblem, OSError) as exc:
                problems.append({"path": str(path), "reason": str(exc)})
        shape = (0, self.spec["image_size"], self.spec["image_size"], 1 if self.spec["color_mode"] == "grayscale" else 3)
        return (np.stack(arrays) if arrays else np.zeros(shape, dtype=np.uint8)), ok, problems

    def predict_files(self, paths: list[str | os.PathLike]) -> list[dict[str, Any]]:
        """One answer per file: class, confidence and all probabilities, or the reason it failed."""
        images, ok, problems = self.load_images(paths)
        probs = self.probabilities(images)
        answers: list[dict[str, Any]] = [{"path": str(p), "error": None} for p in paths]
        for row, index in enumerate(ok):
            best = int(probs[row].argmax())
            answers[index].update(label=self.class_names[best], confidence=float(probs[row, best]),
                                  probabilities=dict(zip(self.class_names, map(float, probs[row]))))
        for problem in problems:
            answers[[str(p) for p in paths].index(problem["path"])]["error"] = problem["reason"]
        return answers
