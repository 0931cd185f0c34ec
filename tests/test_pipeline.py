"""The stage runner: reuse, --force, fingerprints, atomic outputs, kills, failures, manifests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_config
from toy_stages import TOY_STAGES

from metal_defect import pipeline
from metal_defect.artifacts import ArtifactStore
from metal_defect.config import load_config
from metal_defect.errors import ConfigError
from metal_defect.pipeline import Runner, Stage, parse_stage_selection

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def cfg_dir(tmp_path):
    return write_config(tmp_path / "cfg")


@pytest.fixture
def calls(tmp_path, monkeypatch):
    path = tmp_path / "calls.txt"
    monkeypatch.setenv("TOY_CALLS", str(path))
    return lambda: path.read_text().split() if path.exists() else []


def run(cfg_dir: Path, overrides=(), selection=None, force=()):
    return Runner(load_config(cfg_dir, list(overrides)), TOY_STAGES).run(selection, force)


def test_second_run_reuses_every_stage(cfg_dir, calls):
    first = run(cfg_dir)
    assert first["status"] == "succeeded" and calls() == ["first", "second"]
    again = run(cfg_dir)
    assert calls() == ["first", "second"]  # nothing recomputed
    assert all(s["reused"] for s in again["stages"].values())
    assert again["stages"]["second"]["fingerprint"] == first["stages"]["second"]["fingerprint"]
    log = (Path(again["config_dir"]) / "artifacts" / "runs" / again["run_id"] / "run.log").read_text()
    assert "stage first: reused" in log


def test_force_reruns_only_the_forced_stage_when_its_output_is_unchanged(cfg_dir, calls):
    run(cfg_dir)
    manifest = run(cfg_dir, force=["first"])
    assert calls() == ["first", "second", "first"]  # same output -> second still reused
    assert manifest["stages"]["first"]["reused"] is False and manifest["stages"]["second"]["reused"] is True
    run(cfg_dir, force=["all"])
    assert calls()[-2:] == ["first", "second"]


def test_fingerprint_changes_when_and_only_when_a_declared_input_changes(cfg_dir, calls):
    base = run(cfg_dir)["stages"]
    undeclared = run(cfg_dir, ["data_preprocessing.max_file_mb=7"])["stages"]  # neither stage declares it
    assert {k: v["fingerprint"] for k, v in undeclared.items()} == {k: v["fingerprint"] for k, v in base.items()}
    only_second = run(cfg_dir, ["data_loader.batch_size=5"])["stages"]
    assert only_second["first"]["fingerprint"] == base["first"]["fingerprint"]
    assert only_second["second"]["fingerprint"] != base["second"]["fingerprint"]
    upstream = run(cfg_dir, ["base.seed=3"])["stages"]  # changes first's output -> second too
    assert upstream["first"]["fingerprint"] != base["first"]["fingerprint"]
    assert upstream["second"]["fingerprint"] != base["second"]["fingerprint"]
    assert calls() == ["first", "second", "second", "first", "second"]


def test_fingerprint_covers_the_stage_code(cfg_dir, tmp_path, monkeypatch):
    module = tmp_path / "mod" / "codefp_stage.py"
    module.parent.mkdir()
    module.write_text("def go(io, *, base):\n    (io.out_dir / 'x').write_text('1')\n")
    monkeypatch.syspath_prepend(str(module.parent))
    stage = Stage("codefp", "codefp_stage:go", sections=("base",))
    before = pipeline.code_fingerprint(stage)
    module.write_text(module.read_text() + "# a change\n")
    assert pipeline.code_fingerprint(stage) != before


def test_selection_by_name_number_and_range():
    stages = list(pipeline.STAGES)
    names = [s.name for s in stages]
    assert parse_stage_selection(None, stages) == names
    assert parse_stage_selection("1-2", stages) == names[:2]
    assert parse_stage_selection("data_preprocessing", stages) == ["data_preprocessing"]
    assert parse_stage_selection("2,1", stages) == names[:2]
    with pytest.raises(ConfigError, match="did you mean 'data_ingestion'"):
        parse_stage_selection("data_ingest", stages)
    with pytest.raises(ConfigError, match="no stage number 99"):
        parse_stage_selection("99", stages)


def test_selected_stage_pulls_in_what_it_needs(cfg_dir, calls):
    manifest = run(cfg_dir, selection="second")
    assert list(manifest["stages"]) == ["first", "second"]


def test_no_stage_is_named_like_a_subcommand():
    pipeline.check_registry(pipeline.STAGES)
    with pytest.raises(ValueError, match="named like a subcommand"):
        pipeline.check_registry([Stage("evaluate", "x:y")])
    with pytest.raises(ValueError, match="must come before"):
        pipeline.check_registry([Stage("b", "x:y", upstream=("a",))])


def test_failed_run_is_marked_failed_and_leaves_no_output(cfg_dir, monkeypatch):
    monkeypatch.setenv("TOY_FAIL", "1")
    with pytest.raises(RuntimeError, match="toy failure"):
        run(cfg_dir)
    store = ArtifactStore(cfg_dir / "artifacts")
    (run_id,) = store.run_ids()
    manifest = store.manifest(run_id)
    assert manifest["status"] == "failed" and "toy failure" in manifest["error"] and manifest["ended"]
    assert not list((cfg_dir / "artifacts" / "stages" / "first").iterdir())  # no output, not even a temp one


def test_interrupted_stage_resumes_from_partial_state_which_is_removed_on_success(cfg_dir, monkeypatch):
    monkeypatch.setenv("TOY_INTERRUPT_AT", "2")
    with pytest.raises(KeyboardInterrupt):
        run(cfg_dir)
    store = ArtifactStore(cfg_dir / "artifacts")
    assert store.manifest(store.run_ids()[0])["status"] == "failed"
    work = list((cfg_dir / "artifacts" / "work" / "second").iterdir())
    assert len(work) == 1 and (work[0] / "progress.txt").read_text() == "2"
    monkeypatch.delenv("TOY_INTERRUPT_AT")
    manifest = run(cfg_dir)
    assert manifest["stages"]["first"]["reused"] and manifest["stages"]["second"]["summary"]["resumed_from"] == 2
    assert not work[0].exists()


def _spawn(cfg_dir: Path, env_extra: dict[str, str]) -> subprocess.Popen:
    code = ("import sys; from metal_defect.config import load_config; from metal_defect.pipeline import Runner; "
            "from toy_stages import TOY_STAGES; Runner(load_config(sys.argv[1]), TOY_STAGES).run()")
    env = dict(os.environ, PYTHONPATH=str(TESTS), **env_extra)
    return subprocess.Popen([sys.executable, "-c", code, str(cfg_dir)], env=env)


def test_sigkill_mid_stage_leaves_no_trusted_output_and_next_run_recovers(cfg_dir, tmp_path):
    marker = tmp_path / "started"
    proc = _spawn(cfg_dir, {"TOY_BLOCK": str(marker)})
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert time.monotonic() < deadline and proc.poll() is None, "toy stage never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stage_root = cfg_dir / "artifacts" / "stages" / "first"
    leftovers = list(stage_root.iterdir())
    assert leftovers and all(p.name.startswith(".tmp-") for p in leftovers)  # half-written, clearly not final
    store = ArtifactStore(cfg_dir / "artifacts")
    config = load_config(cfg_dir)
    runner = Runner(config, TOY_STAGES)
    fingerprint = runner.fingerprint(TOY_STAGES[0], {}, None)
    assert store.finished_record("first", fingerprint) is None
    (killed,) = store.run_ids()
    assert store.manifest(killed)["status"] == "running"

    manifest = runner.run()
    assert manifest["status"] == "succeeded" and not manifest["stages"]["first"]["reused"]
    assert store.manifest(killed)["status"] == "failed"  # the dead run is no longer "running"
    assert [p.name for p in stage_root.iterdir()] == [fingerprint]  # temp folder swept
    assert (stage_root / fingerprint / "seed.txt").read_text() == "42"


def test_manifest_records_what_a_run_needs_to_be_reproduced(cfg_dir):
    manifest = run(cfg_dir)
    for key in ("run_id", "started", "ended", "git", "config_hash", "seeds", "libraries", "stages", "duration_s"):
        assert manifest[key] is not None, key
    assert manifest["seeds"] == {"python": 42, "numpy": 42, "tensorflow": 42}
    assert manifest["libraries"]["numpy"]
    assert manifest["metrics"] == {"seed_seen": 42}
    run_dir = cfg_dir / "artifacts" / "runs" / manifest["run_id"]
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "succeeded"
    assert "seed: 42" in (run_dir / "config.yaml").read_text()
    assert (run_dir / "stages" / "second" / "result.txt").read_text() == "42-32-resumed_from_0"
