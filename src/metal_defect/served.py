"""The served model: the one owner of the pointer `artifacts/served.json`.

A finished run's select stage writes its bundle and, beside it, `served_model.json` (the
record of what it chose and why); publishing copies the headline of that record into the
pointer, with the bundle's path (relative to the artifacts folder, so a moved or mounted
folder still works) and the sha256 of the bundle's manifest as it was when served (an
emptied or replaced manifest is caught on load). `promote RUN_ID` publishes an earlier
run's choice again. The pointer is read here, by the CLI and the app alike; the serving
package knows bundles only, never runs or stages.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from metal_defect.artifacts import ArtifactStore, read_json, sha256_file, write_json_atomic
from metal_defect.errors import ArtifactError
from metal_defect.serving.bundle import BUNDLE_DIR, BUNDLE_ENV, BUNDLE_MANIFEST, SERVING_SPEC

log = logging.getLogger(__name__)

POINTER_FILE = "served.json"  # in the artifacts folder
SERVED_RECORD = "served_model.json"  # beside the bundle a run chose: its name, metrics, temperature, why it was chosen
CHOOSING_STAGE = "select"  # the stage whose output holds a run's chosen bundle


def pointer_path(store: ArtifactStore) -> Path:
    return store.root / POINTER_FILE


def read_pointer(store: ArtifactStore) -> dict[str, Any] | None:
    """The served pointer, or None when no model is served yet."""
    path = pointer_path(store)
    return read_json(path) if path.is_file() else None


def write_pointer(store: ArtifactStore, pointer: Mapping[str, Any]) -> None:
    """Replace the pointer atomically (a reader sees the old one or the new one, never half)."""
    write_json_atomic(pointer_path(store), dict(pointer))


def publish(store: ArtifactStore, run_id: str, chosen: Path) -> dict[str, Any]:
    """Serve the bundle in `chosen` (a folder holding `served/` and `served_model.json`) as run `run_id`'s model."""
    record = read_json(chosen / SERVED_RECORD)
    pointer = {"run_id": run_id, "bundle": pointer_value(store, chosen / BUNDLE_DIR), "model_name": record["name"],
               "served": record.get("served", "base"), "reason": record.get("reason", ""), "temperature": record["temperature"],
               "valid": record["valid"], "test": record["test"], "weak_model": record.get("weak_model", False),
               "weak_reasons": record.get("weak_reasons", []), "promoted": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
               "manifest_sha256": sha256_file(chosen / BUNDLE_DIR / BUNDLE_MANIFEST)}
    write_pointer(store, pointer)
    log.info("served model is now %s from run %s", record["name"], run_id)
    if pointer["weak_model"]:
        log.warning("the served model is flagged weak_model: %s", "; ".join(pointer["weak_reasons"]))
    return pointer


def promote(store: ArtifactStore, run_id: str) -> str:
    """Serve run `run_id`'s chosen model again (roll back or forward); a line saying what changed."""
    bundle = bundle_of_run(store, run_id)
    previous = (read_pointer(store) or {}).get("run_id")
    pointer = publish(store, run_id, bundle.parent)
    return f"served model: {pointer['model_name']} from run {run_id} (was: {previous or 'none'})"


def bundle_of_run(store: ArtifactStore, run_id: str) -> Path:
    """The model bundle run `run_id` chose to serve (its select stage's output)."""
    manifest = store.manifest(run_id)
    stage = manifest.get("stages", {}).get(CHOOSING_STAGE)
    if not stage or stage.get("status") not in ("succeeded", "reused"):
        raise ArtifactError(f"run {run_id} has no finished {CHOOSING_STAGE} stage (status {manifest.get('status')}); "
                            "only runs that chose a model can be served")
    bundle = _rebase(store, Path(stage["output"])) / BUNDLE_DIR
    if not (bundle / SERVING_SPEC).is_file():
        raise ArtifactError(f"run {run_id}: model bundle {bundle} is missing; re-run `python main.py`")
    return bundle


def _rebase(store: ArtifactStore, recorded: Path) -> Path:
    """A path recorded under an artifacts folder that has since been moved or mounted elsewhere."""
    if recorded.exists() or "stages" not in recorded.parts:
        return recorded
    parts = recorded.parts
    return store.root.joinpath(*parts[len(parts) - 1 - parts[::-1].index("stages"):])


def pointer_value(store: ArtifactStore, bundle: Path) -> str:
    """How the served pointer records a bundle: relative to the artifacts folder when inside it."""
    try:
        return Path(os.path.relpath(Path(bundle).resolve(), store.root.resolve())).as_posix() if _inside(bundle, store.root) else str(bundle)
    except ValueError:  # another drive (Windows)
        return str(bundle)


def _inside(path: Path, root: Path) -> bool:
    return Path(path).resolve().is_relative_to(Path(root).resolve())


def served_bundle(store: ArtifactStore) -> tuple[Path, dict[str, Any]]:
    """The bundle the served pointer names, and the pointer; ArtifactError when none is served or its manifest changed."""
    pointer = read_pointer(store)
    if pointer is None:
        raise ArtifactError(f"no model is served yet ({pointer_path(store)} missing): train one with `python main.py`, "
                            "or serve an earlier run with `python main.py promote RUN_ID`")
    recorded = Path(pointer["bundle"])
    bundle = recorded if recorded.is_absolute() else store.root / recorded
    if not (bundle / SERVING_SPEC).is_file():
        bundle = _rebase(store, recorded)
    recorded_manifest = pointer.get("manifest_sha256")
    if recorded_manifest and (bundle / BUNDLE_MANIFEST).is_file() and sha256_file(bundle / BUNDLE_MANIFEST) != recorded_manifest:
        raise ArtifactError(f"{bundle}: {BUNDLE_MANIFEST} is not the one recorded in {pointer_path(store)} when run {pointer.get('run_id')} "
                            "was served (changed or replaced); `python main.py promote RUN_ID` serves a run again")
    return bundle, pointer


def resolve_bundle(store: ArtifactStore | None, model: str | None) -> Path:
    """`--model` (a run id or a bundle folder), else $METAL_DEFECT_BUNDLE, else the served pointer."""
    choice = model or os.environ.get(BUNDLE_ENV) or None
    if choice and (Path(choice) / SERVING_SPEC).is_file():
        return Path(choice)
    if choice and store is not None and (store.runs_dir / choice).is_dir():
        return bundle_of_run(store, choice)
    if choice:
        source = "--model" if model else f"${BUNDLE_ENV}"
        raise ArtifactError(f"{source}={choice}: neither a bundle folder (with {SERVING_SPEC}) nor a run id under "
                            f"{store.runs_dir if store else 'the artifacts folder'}; see `python main.py runs`")
    if store is None:
        raise ArtifactError(f"no model: give a bundle folder (--model DIR or ${BUNDLE_ENV})")
    return served_bundle(store)[0]


def chosen_runs(store: ArtifactStore) -> list[tuple[str, Path]]:
    """(run id, bundle) of every run that chose a model, newest first (a bundle reused by later runs once)."""
    found: dict[Path, str] = {}
    for run_id in reversed(store.run_ids()):
        try:
            bundle = bundle_of_run(store, run_id)
        except ArtifactError:
            continue
        found.setdefault(bundle.resolve(), run_id)
    return [(run_id, bundle) for bundle, run_id in found.items()]
