"""Start the Streamlit app on 0.0.0.0:$PORT (default 8501): `python -m metal_defect.launch_app`.

Hosts such as Render and most container platforms give the port in $PORT; Streamlit itself
reads only STREAMLIT_SERVER_PORT, so this launcher passes it on. The Docker image runs it.
"""

from __future__ import annotations

import argparse
import os
import sys
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
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ start-up lines are no news to an operator
    # glibc keeps freed image buffers in per-thread arenas (Streamlit runs each session in a thread)
    # and raises its mmap threshold after each large free: measured, two sessions of three 36 MP
    # uploads grew the server by 390 MB with glibc's defaults and by 175 MB with these.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    os.environ.setdefault("MALLOC_ARENA_MAX", "2")
    os.execv(cmd[0], cmd)  # the server replaces this process: signals reach Streamlit directly


if __name__ == "__main__":  # pragma: no cover
    main()
