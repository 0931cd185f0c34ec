"""The predictor: one implementation for the CLI, the app, evaluation and benchmarks.

It loads a model bundle (see bundle.py), converts images with `serving.images` (the same
functions that prepared the training data) and answers each image with the most probable
class, its calibrated confidence, every class probability, an out-of-distribution score and
a verdict: the class name, `uncertain` (confidence below the bundle's threshold) or
`out_of_distribution` (unlike the training images, colour in a grayscale model's input, or
no content at all). Unusable files get an answer with `error` set; nothing here raises for a
bad image.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from metal_defect.artifacts import sha256_file
from metal_defect.metrics import apply_temperature
from metal_defect.serving import bundle as bundles
from metal_defect.serving import ood
from metal_defect.serving.images import RESAMPLE, ImageProblem, content_problem, convert_decoded, decode_image, is_colourful, read_bytes

log = logging.getLogger(__name__)

UNCERTAIN = "uncertain"
OUT_OF_DISTRIBUTION = "out_of_distribution"
LEADING_COLUMNS = ("path", "label", "confidence", "verdict", "ood_score")
TRAILING_COLUMNS = ("model_run", "model_sha256", "threshold", "ms", "error")
HEATMAP_COLUMNS = ("heat_peak_x", "heat_peak_y")
PREDICTIONS_LOG = "predictions.jsonl"
OOD_PART_WORDS = {"semantic": " (in what the network sees)", "statistics": " (grey levels and edges)",
                  "texture": " (texture)", "polarity": " (closer to their negatives: inverted?)"}


@dataclass
class Answer:
    """The predictor's answer for one image (or why it could not answer)."""

    path: str
    label: str | None = None
    confidence: float | None = None
    verdict: str | None = None
    ood_score: float | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    model_run: str | None = None
    model_sha256: str = ""
    threshold: float | None = None
    ms: float | None = None
    error: str | None = None
    reason: str = ""  # why the verdict is not the class name (shown on screen and in the log)
    sha256: str = ""  # of the file's bytes (the predictions log)
    content_reason: str = ""  # set from the file itself (no content, colour): out of distribution whatever the scores
    ood_part: str = ""  # the part of the OOD check that decided the score (semantic, statistics, texture, polarity)
    heat_peak_x: int | None = None  # Grad-CAM maximum in the original image's pixels (when heatmaps were asked for)
    heat_peak_y: int | None = None

    @property
    def flagged(self) -> bool:
        return self.verdict in (UNCERTAIN, OUT_OF_DISTRIBUTION)

    def row(self, class_names: Sequence[str], heatmaps: bool = False) -> dict[str, Any]:
        """CSV/JSON columns in their documented order (two heatmap columns at the end when asked for)."""
        out: dict[str, Any] = {k: getattr(self, k) for k in LEADING_COLUMNS}
        out |= {f"p_{c}": self.probabilities.get(c) for c in class_names}
        out |= {k: getattr(self, k) for k in TRAILING_COLUMNS}
        return out | ({k: getattr(self, k) for k in HEATMAP_COLUMNS} if heatmaps else {})


def columns(class_names: Sequence[str], heatmaps: bool = False) -> list[str]:
    return [*LEADING_COLUMNS, *(f"p_{c}" for c in class_names), *TRAILING_COLUMNS, *(HEATMAP_COLUMNS if heatmaps else ())]


class Predictor:
    """A loaded model bundle. `answer_paths` for files, `answer_arrays` for converted images."""

    def __init__(self, model: Any, spec: bundles.ServingSpec, bundle: Path | None = None, scorer: ood.OodScorer | None = None,
                 model_sha256: str = "", backend: str = "compiled"):
        self.model, self.spec, self.bundle, self.scorer, self.model_sha256 = model, spec, bundle, scorer, model_sha256
        self.backend = backend
        self._graph: Any = None
        self._litert: Any = None
        self._gradcam: Any = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_bundle(cls, bundle: Path | str, backend: str = "compiled", verify: bool = True) -> Predictor:
        """Load a bundle folder, checking every file against its sha256 manifest first."""
        bundle = Path(bundle)
        spec = bundles.read_spec(bundle)
        files = bundles.verify_bundle(bundle) if verify or (bundle / bundles.BUNDLE_MANIFEST).is_file() else {}
        scorer = bundles.read_ood_scorer(bundle, spec.ood) if spec.ood is not None else None
        model = bundles.load_model(bundle / bundles.MODEL_FILE)
        bundles.check_model_fits(model, spec, bundle / bundles.MODEL_FILE)
        sha = files.get(bundles.MODEL_FILE) or sha256_file(bundle / bundles.MODEL_FILE)
        predictor = cls(model, spec, bundle, scorer, sha, backend)
        if backend == "litert":
            predictor.use_litert()
        return predictor

    @property
    def class_names(self) -> list[str]:
        return list(self.spec.class_names)

    @property
    def temperature(self) -> float:
        return float(self.spec.temperature)

    @property
    def threshold(self) -> float:
        return float(self.spec.uncertain_threshold)

    def use_litert(self) -> None:
        """Answer through the bundle's LiteRT model (model.tflite, written by `main.py export`)."""
        from metal_defect.serving.export import LiteRtRunner

        path = (self.bundle or Path(".")) / bundles.TFLITE_FILE
        if not path.is_file():
            raise bundles.ArtifactError(f"{self.bundle}: no {bundles.TFLITE_FILE}; write one with `python main.py export DIR`")
        self._litert, self.backend = LiteRtRunner(path, len(self.class_names)), "litert"

    # ------------------------------------------------------------------ the network
    def serving_model(self) -> Any:
        """The Keras model returning (probabilities, OOD features), or probabilities only."""
        return ood.with_features(self.model, self.spec.ood.feature_layer, self.spec.ood.texture_layer) if self.spec.ood else self.model

    def _compiled(self) -> Any:
        if self._graph is None:
            import tensorflow as tf

            network = self.serving_model()
            signature = [tf.TensorSpec([None, self.spec.image_size, self.spec.image_size, self.spec.channels], tf.uint8, name="pixels")]

            @tf.function(input_signature=signature, reduce_retracing=True)
            def graph(pixels: Any) -> Any:
                return network(pixels, training=False)

            self._graph = graph
        return self._graph

    def forward(self, images: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw softmax [N, K] (float64, no temperature) and OOD features (penultimate, then texture statistics; or None) for uint8 images."""
        k = len(self.class_names)
        if len(images) == 0:
            return np.zeros((0, k)), (np.zeros((0, 0), np.float32) if self.spec.ood else None)
        probs, feats = [], []
        for start in range(0, len(images), batch_size):
            chunk = np.ascontiguousarray(images[start:start + batch_size], dtype=np.uint8)
            if self.backend == "litert":
                out = self._litert(chunk)
            elif self.backend == "eager":
                out = self.serving_model()(chunk, training=False)
            else:
                out = self._compiled()(chunk)
            p, f = (out if self.spec.ood else (out, None))
            probs.append(np.asarray(p, dtype=np.float64))
            if f is not None:
                feats.append(np.asarray(f, dtype=np.float32))
        return np.concatenate(probs), (np.concatenate(feats) if feats else None)

    def raw_probabilities(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Model softmax output for uint8 images [N, H, W, C] (no temperature)."""
        return self.forward(images, batch_size)[0]

    def probabilities(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Calibrated probabilities (the stored temperature applied)."""
        return self.calibrate(self.raw_probabilities(images, batch_size))

    def calibrate(self, raw: np.ndarray) -> np.ndarray:
        return apply_temperature(raw, self.temperature) if self.temperature != 1.0 and len(raw) else raw

    def ood_scores(self, features: np.ndarray | None, images: np.ndarray) -> tuple[np.ndarray, list[str]] | None:
        """The OOD score per image (above spec.ood.threshold = out of distribution) and the part that
        decided it, or None without a scorer."""
        if features is None or self.scorer is None:
            return None
        components = self.scorer.components(features, images)
        return self.scorer.combine(components), self.scorer.deciding(components)

    # ------------------------------------------------------------------ answers
    def answer_arrays(self, images: np.ndarray, threshold: float | None = None, names: Sequence[str] | None = None,
                      reasons: Sequence[str] | None = None, batch_size: int = 64) -> list[Answer]:
        """Answers for converted uint8 images; `reasons[i]` (non-empty) forces out_of_distribution."""
        raw, features = self.forward(images, batch_size)
        return self._answers(self.calibrate(raw), self.ood_scores(features, images), threshold, names, reasons)

    def answers_from(self, probs: np.ndarray, features: np.ndarray | None, images: np.ndarray, names: Sequence[str] | None = None,
                     reasons: Sequence[str] | None = None, threshold: float | None = None) -> list[Answer]:
        """Answers from calibrated probabilities and OOD features already computed for `images` (evaluation)."""
        return self._answers(probs, self.ood_scores(features, images), threshold, names, reasons)

    def _answers(self, probs: np.ndarray, scores: tuple[np.ndarray, list[str]] | None, threshold: float | None,
                 names: Sequence[str] | None, reasons: Sequence[str] | None) -> list[Answer]:
        threshold = self.threshold if threshold is None else float(threshold)
        answers = []
        for i, row in enumerate(probs):
            best = int(row.argmax())
            score, part = (None, "") if scores is None else (float(scores[0][i]), scores[1][i])
            answer = Answer(path=names[i] if names else str(i), label=self.class_names[best], confidence=float(row[best]),
                            ood_score=score, ood_part=part, probabilities=dict(zip(self.class_names, map(float, row))),
                            model_run=self.spec.run_id, model_sha256=self.model_sha256, threshold=threshold,
                            content_reason=reasons[i] if reasons else "")
            self.judge(answer, threshold)
            answers.append(answer)
        return answers

    def judge(self, answer: Answer, threshold: float | None = None) -> Answer:
        """Set the verdict of an answer from its content reason, OOD score and confidence (again, for another threshold)."""
        threshold = self.threshold if threshold is None else float(threshold)
        ood_threshold = self.spec.ood.threshold if self.spec.ood else None
        answer.threshold, answer.reason = threshold, ""
        if answer.error is not None:
            answer.verdict = None
        elif answer.content_reason:
            answer.verdict, answer.reason = OUT_OF_DISTRIBUTION, answer.content_reason
        elif answer.ood_score is not None and ood_threshold is not None and answer.ood_score > ood_threshold:
            answer.verdict = OUT_OF_DISTRIBUTION
            answer.reason = (f"unlike the training images{OOD_PART_WORDS.get(answer.ood_part, '')}: OOD score {answer.ood_score:.2f} "
                             f"(above {ood_threshold:g} is out of distribution)")
        elif answer.confidence is not None and answer.confidence < threshold:
            answer.verdict, answer.reason = UNCERTAIN, f"confidence {answer.confidence:.3f} below {threshold:.3f}"
        else:
            answer.verdict = answer.label
        return answer

    def _decode(self, source: str | os.PathLike | bytes) -> tuple[Any, bytes]:
        """File (path or bytes) -> (decoded PIL image, its bytes) within the bundle's size limits. Raises ImageProblem."""
        data = read_bytes(source, int(self.spec.max_file_mb * 1e6), limit="the model's limit")
        return decode_image(data, max_pixels=self.spec.max_image_pixels), data

    def convert(self, source: str | os.PathLike | bytes) -> tuple[np.ndarray, str, str]:
        """File (path or bytes) -> (model input, forced-OOD reason or "", sha256 of the bytes). Raises ImageProblem."""
        image, data = self._decode(source)
        reason = ""
        if self.spec.ood is not None:
            problem = content_problem(image, self.spec.ood.min_image_side, self.spec.ood.min_pixel_std)
            if problem:
                reason = f"no usable content: {problem}"
            elif self.spec.ood.colour_is_ood and is_colourful(image):
                reason = "a colour image: this model was trained on grayscale images"
        array = convert_decoded(image, self.spec.image_size, self.spec.color_mode, self.spec.resize)
        return array, reason, hashlib.sha256(data).hexdigest()

    def load_images(self, paths: Sequence[str | os.PathLike]) -> tuple[np.ndarray, list[int], list[dict[str, str]], list[str]]:
        """Convert files to model input: (images, indices of the usable ones, problems, forced-OOD reasons)."""
        arrays, ok, problems, reasons = [], [], [], []
        for i, path in enumerate(paths):
            try:
                array, reason, _ = self.convert(path)
            except (ImageProblem, OSError) as exc:
                problems.append({"path": str(path), "reason": _problem(exc)})
                continue
            arrays.append(array)
            ok.append(i)
            reasons.append(reason)
        empty = np.zeros((0, self.spec.image_size, self.spec.image_size, self.spec.channels), dtype=np.uint8)
        return (np.stack(arrays) if arrays else empty), ok, problems, reasons

    def answer_file(self, source: str | os.PathLike | bytes, name: str | None = None, threshold: float | None = None) -> Answer:
        """The fast path: one file (path or bytes) to an answer, through the compiled graph or LiteRT."""
        started = time.perf_counter()
        name = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
        try:
            array, reason, sha = self.convert(source)
        except (ImageProblem, OSError) as exc:
            return self._failed(name, exc, threshold, started)
        answer = self.answer_arrays(array[None], threshold, [name], [reason])[0]
        answer.sha256, answer.ms = sha, round((time.perf_counter() - started) * 1000, 3)
        return answer

    def answer_paths(self, paths: Iterable[str | os.PathLike], threshold: float | None = None, batch_size: int = 32) -> list[Answer]:
        """Answers for many files, converted one by one and run through the network in batches."""
        out: list[Answer] = []
        batch: list[tuple[np.ndarray, str, str, str, float]] = []  # (input, name, forced reason, sha256, ms so far)

        def flush() -> None:
            if not batch:
                return
            started = time.perf_counter()
            answers = self.answer_arrays(np.stack([b[0] for b in batch]), threshold, [b[1] for b in batch], [b[2] for b in batch])
            share = (time.perf_counter() - started) * 1000 / len(batch)
            for answer, item in zip(answers, batch):
                answer.sha256, answer.ms = item[3], round(item[4] + share, 3)
                out.append(answer)
            batch.clear()

        for path in paths:
            started = time.perf_counter()
            try:
                array, reason, sha = self.convert(path)
            except (ImageProblem, OSError) as exc:
                flush()
                out.append(self._failed(str(path), exc, threshold, started))
                continue
            batch.append((array, str(path), reason, sha, (time.perf_counter() - started) * 1000))
            if len(batch) >= batch_size:
                flush()
        flush()
        return out

    # ------------------------------------------------------------------ heatmaps
    def gradcam(self) -> Any:
        """The heatmap maker of this model (built on first use: the fast path never pays for it)."""
        if self._gradcam is None:
            from metal_defect.serving.explain import GradCam

            self._gradcam = GradCam(self.model, self.spec.heatmap_layer, self.spec.heatmap_method)
        return self._gradcam

    def heatmaps(self, images: np.ndarray, classes: Sequence[int], original_sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Heatmaps of `classes` for converted images, each in its original (width, height) pixel frame, 0..1."""
        from metal_defect.serving.explain import to_original_frame

        maps = []
        for start in range(0, len(images), 32):
            maps.extend(self.gradcam()(images[start:start + 32], np.asarray(classes[start:start + 32])))
        return [to_original_frame(m, size, self.spec.image_size, self.spec.resize) for m, size in zip(maps, original_sizes)]

    def explain(self, source: str | os.PathLike | bytes, answer: Answer, max_side: int | None = None) -> tuple[np.ndarray, Any]:
        """Heatmap and overlay image for an answered file; sets the answer's peak (in the original image's pixels).

        The overlay is drawn on the decoded image (a very large one is decoded at WORK_MAX_PIXELS),
        or on a copy whose long side is `max_side` (the app: what the page shows).
        """
        from metal_defect.serving.explain import overlay, peak

        image, _ = self._decode(source)
        array = convert_decoded(image, self.spec.image_size, self.spec.color_mode, self.spec.resize)
        shown = display_copy(image, max_side)
        heat = self.heatmaps(array[None], [self.class_names.index(answer.label)], [shown.size])[0]
        scale = image.info.get("reduced_by", 1) * image.size[0] / shown.size[0]
        x, y = peak(heat)
        answer.heat_peak_x, answer.heat_peak_y = round(x * scale), round(y * scale)
        return heat, overlay(shown, heat)

    def display_image(self, source: str | os.PathLike | bytes, max_side: int) -> Any:
        """The image as the model reads it (8-bit grey or RGB, EXIF rotation applied), long side at most `max_side`:
        what a page shows, whatever the file's bit depth or size. Raises ImageProblem."""
        return display_copy(self._decode(source)[0], max_side)

    def write_heatmaps(self, answers: Sequence[Answer], folder: Path) -> int:
        """An overlay PNG per answered image in `folder` (<name>.heatmap.png; numbered when names repeat)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        used: set[str] = set()
        written = 0
        for answer in answers:
            if answer.error is not None:
                continue
            stem = Path(answer.path).name
            name, n = f"{stem}.heatmap.png", 1
            while name in used:
                n += 1
                name = f"{stem}.{n}.heatmap.png"
            used.add(name)
            try:
                _, picture = self.explain(answer.path, answer)
            except (ImageProblem, OSError) as exc:  # the file changed since it was answered
                log.warning("%s: no heatmap (%s)", answer.path, exc)
                continue
            picture.save(folder / name)
            written += 1
        return written

    def _failed(self, name: str, exc: Exception, threshold: float | None, started: float) -> Answer:
        return Answer(path=name, model_run=self.spec.run_id, model_sha256=self.model_sha256,
                      threshold=self.threshold if threshold is None else threshold, error=_problem(exc),
                      ms=round((time.perf_counter() - started) * 1000, 3))


def display_copy(image: Any, max_side: int | None) -> Any:
    """`image` itself, or a copy whose long side is `max_side` (never enlarged)."""
    if max_side is None or max(image.size) <= max_side:
        return image
    shown = image.copy()
    shown.thumbnail((max_side, max_side), RESAMPLE)
    return shown


def _problem(exc: Exception) -> str:
    """Why a file could not be answered, for its row."""
    return str(exc) if isinstance(exc, ImageProblem) else f"unreadable: {getattr(exc, 'strerror', None) or exc}"


LOG_ROTATE_MB = 64.0  # the predictions log is rotated past this size (predictions.jsonl.1, .2, ...)
LOG_ROTATIONS_KEPT = 20


def rotate_log(path: Path, rotate_mb: float = LOG_ROTATE_MB, kept: int = LOG_ROTATIONS_KEPT) -> bool:
    """Past `rotate_mb`, move the log to `<name>.1` (`.1` to `.2`, ..., the oldest beyond `kept` dropped); whether it rotated."""
    try:
        if path.stat().st_size < rotate_mb * 1e6:
            return False
    except FileNotFoundError:
        return False
    path.with_name(f"{path.name}.{kept}").unlink(missing_ok=True)
    for index in range(kept - 1, 0, -1):
        older = path.with_name(f"{path.name}.{index}")
        if older.exists():
            os.replace(older, path.with_name(f"{path.name}.{index + 1}"))
    os.replace(path, path.with_name(f"{path.name}.1"))
    return True


def append_log(path: Path, answers: Iterable[Answer], source: str, rotate_mb: float = LOG_ROTATE_MB) -> int:
    """Append answers to the predictions log (JSON lines): the audit trail and the history; rotated past `rotate_mb`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rotate_log(path, rotate_mb)
    now = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    lines = [json.dumps({"time": now, "source": source, "file": Path(a.path).name, "path": a.path, "sha256": a.sha256,
                         "label": a.label, "confidence": a.confidence, "verdict": a.verdict, "reason": a.reason or None,
                         "ood_score": a.ood_score, "model_run": a.model_run, "model_sha256": a.model_sha256, "error": a.error})
             for a in answers]
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("".join(line + "\n" for line in lines))
    return len(lines)
