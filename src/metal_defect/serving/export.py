"""Self-contained bundles and the LiteRT model: `python main.py export DIR`.

The LiteRT model computes what the Keras serving model computes (probabilities and, when
the bundle has an OOD reference, the OOD features: penultimate and texture statistics), so the predictor can run either.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from metal_defect.artifacts import read_json, staging_dir
from metal_defect.errors import ArtifactError
from metal_defect.serving import bundle as bundles

log = logging.getLogger(__name__)


def export_litert(serving_model: Any, path: Path) -> Path:
    """Write `serving_model` as a LiteRT flatbuffer (Keras' own exporter; the path ends in .tflite)."""
    import io
    from contextlib import redirect_stdout

    with redirect_stdout(io.StringIO()):  # the converter prints its saved-artifact summary
        serving_model.export(str(path), format="litert", verbose=False)
    return path


# Files a folder may hold beside a bundle that export keeps as they are: a folder's own README
# (model_bundle/README.md is in git, and the documented command exports into that folder) and
# git's placeholders.
KEPT_BESIDE_BUNDLE = ("README.md", ".gitignore", ".gitkeep")


def export_bundle(predictor: Any, destination: Path) -> dict[str, Any]:
    """Copy the predictor's bundle to `destination`, add model.tflite, and write a fresh sha256 manifest.

    `destination` is new, empty, or holds only files export keeps (KEPT_BESIDE_BUNDLE) and an earlier
    exported bundle (every other file listed in its manifest): that bundle is replaced whole, the kept
    files stay. Anything else is refused, so no file export did not write is ever deleted.
    """
    destination = Path(destination)
    kept = files_kept_beside_bundle(destination)
    with staging_dir(destination) as staged:
        for item in sorted(predictor.bundle.iterdir()):
            if item.name in (bundles.BUNDLE_MANIFEST, bundles.TFLITE_FILE, *KEPT_BESIDE_BUNDLE) or not item.is_file():
                continue
            shutil.copy2(item, staged / item.name)
        export_litert(predictor.serving_model(), staged / bundles.TFLITE_FILE)
        files = bundles.write_manifest(staged)
        for name in kept:  # copied in, outside the manifest; the original goes only with the atomic swap
            shutil.copy2(destination / name, staged / name)
    log.info("exported %s (%d files) to %s", predictor.spec.model_name, len(files) + 1, destination)
    return {"folder": str(destination), "files": sorted(files)}


def files_kept_beside_bundle(destination: Path) -> list[str]:
    """The names in `destination` that export keeps; ArtifactError when it may not export there."""
    if destination.is_symlink():
        raise ArtifactError(f"export: {destination} is a symbolic link; give the folder it points to, or a new folder")
    if not destination.exists():
        return []
    if not destination.is_dir():
        raise ArtifactError(f"export: {destination} is a file, not a folder; give an empty or new folder")
    names = sorted(p.name for p in destination.iterdir())
    kept = [name for name in names if name in KEPT_BESIDE_BUNDLE and (destination / name).is_file()
            and not (destination / name).is_symlink()]
    others = [name for name in names if name not in kept]
    if not others:
        return kept
    listed: set[str] = set()
    if (destination / bundles.SERVING_SPEC).is_file() and (destination / bundles.BUNDLE_MANIFEST).is_file():
        try:
            listed = {name.split("/")[0] for name in read_json(destination / bundles.BUNDLE_MANIFEST).get("files", {})}
        except (ArtifactError, AttributeError, UnicodeDecodeError):
            listed = set()
    foreign = [name for name in others if name not in listed | {bundles.BUNDLE_MANIFEST}]
    if not listed or foreign:
        raise ArtifactError(f"export: {destination} holds files that are not an exported bundle ({', '.join(foreign[:5])}"
                            f"{', ...' if len(foreign) > 5 else ''}); give an empty or new folder")
    return kept


def available_cores() -> int:
    """The cores this process may run on (its affinity, e.g. a container's cpuset), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS and Windows have no affinity call
        return os.cpu_count() or 1


class LiteRtRunner:
    """Runs a .tflite serving model: uint8 images [N, H, W, C] -> (probabilities, features) or probabilities."""

    def __init__(self, path: Path, n_classes: int, threads: int | None = None):
        """`threads`: the interpreter's threads, by default every core this process may use. Left unset,
        ai-edge-litert 2.3 runs one thread: 5.5 ms for the default network on 2 cores against 3.0 ms with both."""
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:  # pragma: no cover - the runtime requirement; TensorFlow's copy is deprecated
            from tensorflow.lite import Interpreter  # type: ignore[no-redef]
        self.threads = threads or available_cores()
        self.interpreter = Interpreter(model_path=str(path), num_threads=self.threads)
        self.n_classes = n_classes
        self._batch = 0

    def _resize(self, batch: int) -> None:
        if batch != self._batch:
            index = self.interpreter.get_input_details()[0]["index"]
            self.interpreter.resize_tensor_input(index, [batch, *self.interpreter.get_input_details()[0]["shape"][1:]])
            self.interpreter.allocate_tensors()
            self._batch = batch
            outputs = self.interpreter.get_output_details()
            # outputs are matched by shape: the probabilities have one column per class
            self._order = sorted(range(len(outputs)), key=lambda i: outputs[i]["shape"][-1] != self.n_classes)
            self._outputs = outputs

    def __call__(self, images: np.ndarray) -> Any:
        self._resize(len(images))
        self.interpreter.set_tensor(self.interpreter.get_input_details()[0]["index"], np.ascontiguousarray(images, dtype=np.uint8))
        self.interpreter.invoke()
        values = [self.interpreter.get_tensor(self._outputs[i]["index"]) for i in self._order]
        return tuple(values) if len(values) > 1 else values[0]
