"""Small stages for runner tests: they read real config sections and write tiny outputs.

Behaviour is steered by environment variables so that a subprocess can be told to
block (for SIGKILL tests), fail, or be interrupted after saving partial state.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from metal_defect.pipeline import Stage

CALLS_FILE = "TOY_CALLS"  # env: file to which every stage call appends its name


def _record(name: str) -> None:
    calls = os.environ.get(CALLS_FILE)
    if calls:
        with open(calls, "a") as handle:
            handle.write(name + "\n")


def first(io, *, base):
    _record("first")
    (io.out_dir / "seed.txt").write_text(str(base.seed))
    (io.out_dir / "half.txt").write_text("written before any pause")
    if os.environ.get("TOY_BLOCK"):
        Path(os.environ["TOY_BLOCK"]).write_text("started")
        time.sleep(120)
    if os.environ.get("TOY_FAIL"):
        raise RuntimeError("toy failure")
    return {"metrics": {"seed_seen": base.seed}}


def second(io, *, data_loader):
    _record("second")
    seed = (io.inputs["first"] / "seed.txt").read_text()
    progress = io.work_dir / "progress.txt"
    done = int(progress.read_text()) if progress.exists() else 0
    for step in range(done, 3):
        progress.write_text(str(step + 1))
        if os.environ.get("TOY_INTERRUPT_AT") == str(step + 1):
            raise KeyboardInterrupt("toy interrupt")
    (io.out_dir / "result.txt").write_text(f"{seed}-{data_loader.batch_size}-resumed_from_{done}")
    return {"resumed_from": done}


def reader(io):
    """A stage downstream of data_preprocessing: it only records that it ran."""
    _record("reader")
    (io.out_dir / "n.txt").write_text(str(len(list(io.inputs["data_preprocessing"].rglob("*.png")))))


TOY_STAGES = (
    Stage("first", "toy_stages:first", sections=("base",)),
    Stage("second", "toy_stages:second", sections=("data_loader",), upstream=("first",)),
)
