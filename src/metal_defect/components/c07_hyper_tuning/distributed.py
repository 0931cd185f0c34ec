"""c07 distributed search: Keras Tuner's chief/worker mode, the chief's announcement and the worker's checks."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from metal_defect import artifacts as art
from metal_defect import runtime
from metal_defect.components.c07_hyper_tuning.finalist import BudgetPlan
from metal_defect.components.c07_hyper_tuning.space import SearchJob, space_text
from metal_defect.components.c07_hyper_tuning.trials import TRIAL_RECORD, build_tuner
from metal_defect.errors import ArtifactError, ConfigError, DataError

log = logging.getLogger(__name__)


ACTIVE_FILE = "active.json"  # in paths.tuning: the search a chief serves now (read by workers)


def join_search(tuner_id: str, address: str, option: str) -> None:
    """Set Keras Tuner's three environment variables for this process: `tuner_id` ('chief' or a worker id)
    and the oracle's HOST:PORT (`option` names where the address came from, for the error message)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"{option} {address}: expected HOST:PORT, e.g. 10.0.0.5:8000")
    os.environ.update({"KERASTUNER_TUNER_ID": tuner_id, "KERASTUNER_ORACLE_IP": host, "KERASTUNER_ORACLE_PORT": port})


def distributed_role() -> str:
    """local, chief or worker, from Keras Tuner's environment variables."""
    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return "local"
    missing = [v for v in ("KERASTUNER_ORACLE_PORT", "KERASTUNER_TUNER_ID") if v not in os.environ]
    if missing:
        raise ConfigError(f"KERASTUNER_ORACLE_IP is set but {', '.join(missing)} is not: a distributed search needs all three "
                          "(or start it with `python main.py run --tune-chief HOST:PORT` and `python main.py tune-worker --chief HOST:PORT`)")
    return "chief" if "chief" in os.environ["KERASTUNER_TUNER_ID"] else "worker"


def search(job: SearchJob, project: Path, plan: BudgetPlan) -> Any:
    """Run (or resume) the search in `project` until the budget `plan`'s search deadline (earlier when the best trial
    so far needs longer than the base model for the full schedule); returns the tuner (on a chief: after every
    worker finished)."""
    role = distributed_role()
    deadline = plan.search_deadline
    tuner = build_tuner(job, project, plan)
    finished = sum(t.status in ("COMPLETED", "FAILED", "INVALID") for t in tuner.oracle.trials.values())
    log.info("tuning %s (%s, %s): project %s; %d finished trial(s) kept; no trial starts after %s; %s", job.model_name, job.tuning.tuner,
             role, project, finished, time.strftime("%H:%M:%S", time.localtime(deadline)), space_text(job))
    if role == "chief":
        address = f"{os.environ['KERASTUNER_ORACLE_IP']}:{os.environ['KERASTUNER_ORACLE_PORT']}"
        active = project.parent / ACTIVE_FILE
        art.write_json_atomic(active, {"state": "running", "project": project.name, "chief": address, "model": job.model_name,
                                       "recipe_fingerprint": job.recipe_fingerprint, "data_fingerprint": job.data_fingerprint,
                                       "started": art.now_iso(), "deadline": deadline, "plan": dataclasses.asdict(plan)})
        log.info("chief: serving the oracle on %s; start workers with `python main.py tune-worker --chief HOST:%s`",
                 address, os.environ["KERASTUNER_ORACLE_PORT"])
    try:
        tuner.search(verbose=0)
    except RuntimeError as exc:  # Keras Tuner's "consecutive failures exceeded the limit"
        if "consecutive failures" not in str(exc):
            raise
        log.warning("search stopped: %s", str(exc).splitlines()[0])
    finally:
        if role == "chief":
            art.write_json_atomic(project.parent / ACTIVE_FILE, {**art.read_json(project.parent / ACTIVE_FILE), "state": "finished",
                                                                 "ended": art.now_iso()})
    return tuner


def wait_for_chief(root: Path, wait_s: float, poll_s: float = 1.0) -> dict[str, Any]:
    """The chief's active.json once it says running (a worker may start before the chief)."""
    path = root / ACTIVE_FILE
    give_up = time.monotonic() + wait_s
    said = False
    while True:
        if path.is_file():
            try:
                active = art.read_json(path)
            except ArtifactError:
                active = {}
            if active.get("state") == "running":
                return active
        if time.monotonic() >= give_up:
            raise ArtifactError(f"tune-worker: no running search announced in {path} after {wait_s:.0f} s; start the chief first "
                                "(`python main.py run --tune-chief HOST:PORT`), and point paths.tuning at the folder it uses")
        if not said:
            log.info("tune-worker: waiting for a chief to announce a search in %s", path)
            said = True
        time.sleep(poll_s)


def take_trials(job: SearchJob, active: Mapping[str, Any], project: Path, chief: str | None, worker_id: str | None) -> dict[str, Any]:
    """A worker's part of a distributed search: check the job against the chief's, then take trials until none are left."""
    if job.data_fingerprint != active["data_fingerprint"]:
        raise DataError(f"tune-worker refuses to take trials: its prepared data (fingerprint {job.data_fingerprint}, from "
                        f"{job.prepared}) differs from the chief's ({active['data_fingerprint']}); use the same data "
                        "source, schema and data_preprocessing params as the chief, or share its artifacts folder")
    if job.recipe_fingerprint != active["recipe_fingerprint"]:
        raise ConfigError(f"tune-worker refuses to take trials: its training recipe or search settings (fingerprint {job.recipe_fingerprint}) "
                          f"differ from the chief's ({active['recipe_fingerprint']}); use the same params.yaml as the chief")
    address = chief or active["chief"]
    worker_id = worker_id or f"worker-{socket.gethostname()}-{os.getpid()}"
    if "chief" in worker_id:
        raise ConfigError(f"tune-worker --id {worker_id}: a worker id must not contain 'chief' (Keras Tuner would take it for the chief)")
    join_search(worker_id, address, "tune-worker --chief")
    runtime.import_tensorflow()
    log.info("tune-worker %s: taking trials from the chief at %s (project %s)", worker_id, address, project)
    tuner = build_tuner(job, project, BudgetPlan.announced(active))
    tuner.search(verbose=0)
    ran = [p.parent.name for p in project.glob(f"trial_*/{TRIAL_RECORD}") if art.read_json(p).get("worker") == worker_id]
    log.info("tune-worker %s: the chief has no more trials; this worker ran %d: %s", worker_id, len(ran), ", ".join(sorted(ran)) or "none")
    return {"worker": worker_id, "trials": sorted(ran), "project": str(project)}
