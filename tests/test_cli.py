"""The command line: help at every level, one-line errors with exit codes, tracebacks in the log."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, write_config

from metal_defect.cli import main


def _cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, str(REPO / "main.py"), *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"]])
def test_help_explains_itself(args):
    result = _cli(*args)
    assert result.returncode == 0
    assert "usage: main.py" in result.stdout
    if args[0] == "run":
        assert "data_ingestion" in result.stdout and "KEY=VALUE" in result.stdout and "--force" in result.stdout


def test_console_command_is_installed_and_equals_main_py():
    result = subprocess.run([str(Path(sys.executable).parent / "metal-defect"), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == _cli("--help").stdout


def test_config_typo_is_one_line_exit_2_and_traceback_only_in_log(tmp_path):
    folder = write_config(tmp_path / "cfg")
    result = _cli("run", "--config", str(folder), "trian.epochs=3", "data_loader.batch_sise=1")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown key 'trian.epochs'" in lines[0]
    assert "Traceback" not in result.stderr
    log = (folder / "logs" / "metal_defect.log").read_text()
    assert "Traceback" in log and "ConfigError" in log


def test_bare_overrides_mean_run(tmp_path):
    folder = write_config(tmp_path / "cfg")
    result = _cli("--config", str(folder), "base.seed=banana")
    assert result.returncode == 2 and "base.seed = 'banana'" in result.stderr


def test_unknown_stage_and_missing_data_exit_codes(tmp_path):
    folder = write_config(tmp_path / "cfg", params={"data_ingestion": {"source": str(tmp_path / "nope")}})
    result = _cli("run", "--config", str(folder), "--stages", "data_ingest")
    assert result.returncode == 2 and "did you mean 'data_ingestion'" in result.stderr
    result = _cli("run", "--config", str(folder), "--stages", "1")
    assert result.returncode == 3 and "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_not_key_value_argument_is_rejected(tmp_path):
    assert main(["run", "--config", str(write_config(tmp_path / "cfg")), "bogus"]) == 2
