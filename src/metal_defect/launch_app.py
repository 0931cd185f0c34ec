"""Start the Streamlit app on 0.0.0.0:$PORT (default 8501): `python -m metal_defect.launch_app`.

Hosts such as Render and most container platforms give the port in $PORT; Streamlit itself
reads only STREAMLIT_SERVER_PORT, so this launcher passes it on. The Docker image runs it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path

APP_FILE = "st_app_predict.py"


def app_file() -> Path:
    """st_app_predict.py: $METAL_DEFECT_APP, else beside the checkout's src/, else in the current folder."""
    candidates = [os.environ.get("METAL_DEFECT_APP"), Path(__file__).resolve().parents[2] / APP_FILE, Path.cwd() / APP_FILE]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise SystemExit(f"cannot find {APP_FILE} (looked in {', '.join(str(c) for c in candidates if c)}); set METAL_DEFECT_APP")


def command(port: int, address: str) -> list[str]:
    return [sys.executable, "-m", "streamlit", "run", str(app_file()), "--server.port", str(port), "--server.address", address,
            "--server.headless", "true", "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m metal_defect.launch_app", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8501")), help="default $PORT, else 8501")
    parser.add_argument("--address", default="0.0.0.0", help="default 0.0.0.0 (all interfaces)")
    args = parser.parse_args(argv)
    cmd = command(args.port, args.address)
    os.execve(cmd[0], cmd, server_environment(os.environ))  # the server replaces this process: signals reach Streamlit directly


def server_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The server's environment: the caller's, with defaults the app server needs (the caller's own is left as it is)."""
    env = dict(environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ start-up lines are no news to an operator
    # glibc keeps freed image buffers in per-thread arenas (Streamlit runs each session in a thread)
    # and raises its mmap threshold after each large free: measured, two sessions of three 36 MP
    # uploads grew the server by 390 MB with glibc's defaults and by 173 MB with these. Only the
    # server gets them: set in a process that goes on (a test calling main), they slowed every
    # TensorFlow child process started after it.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    env.setdefault("MALLOC_ARENA_MAX", "2")
    return env

if __name__ == "__main__":  # pragma: no cover
    main()
