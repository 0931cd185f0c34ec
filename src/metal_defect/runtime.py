"""Process-wide set-up that must happen once: a quiet TensorFlow import.

TensorFlow's C++ runtime writes start-up lines (absl's "All log messages before
absl::InitializeLog()", oneDNN and CPU-feature notes, cuInit errors on a machine without a
GPU) straight to file descriptor 2, before `TF_CPP_MIN_LOG_LEVEL` is read, so no Python
setting hides them. They are not the user's business: the import and the first device
query run with descriptor 2 pointed at a temporary file, and what was written there goes
to the log file at DEBUG level. After start-up, C++ lines below FATAL are hidden unless the
user sets `TF_CPP_MIN_LOG_LEVEL` (e.g. 0 to see everything): those that matter surface as
Python exceptions, the rest (such as "oneDNN supports DT_UINT8 only on ...", printed at the
first training step) would only interrupt the progress lines.

TensorFlow turns its oneDNN kernels on by itself only on x86 CPUs with AVX-512 VNNI/BF16 or
AMX; on an AVX2-only part (the AMD EPYC machines here) it falls back to its Eigen kernels,
which trained the default network at half the speed (one step of 32 images at 160 px: 1,332 ms
against 693 ms with oneDNN). `prefer_onednn` asks for oneDNN on every x86-64 CPU unless the
user chose (`TF_ENABLE_ONEDNN_OPTS=0` turns it off); the package's import runs it, before
anything can import TensorFlow.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import sys
import tempfile
from collections.abc import Iterator

log = logging.getLogger(__name__)
QUIET_LEVEL = "3"  # TF_CPP_MIN_LOG_LEVEL unless the user set one: FATAL only
ONEDNN = "TF_ENABLE_ONEDNN_OPTS"
X86_64 = ("x86_64", "amd64")


def prefer_onednn(machine: str | None = None) -> None:
    """Ask TensorFlow for its oneDNN CPU kernels on any x86-64 machine, unless the user set TF_ENABLE_ONEDNN_OPTS.

    Read once, at TensorFlow's import: calling this later changes nothing in a running process.
    """
    if (machine or platform.machine()).lower() in X86_64:
        os.environ.setdefault(ONEDNN, "1")


@contextlib.contextmanager
def native_stderr_to_log(what: str) -> Iterator[None]:
    """Send everything written to descriptor 2 inside the block to the log (DEBUG), not the terminal."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode("utf-8", errors="replace").splitlines():
                if line.strip():
                    log.debug("%s: %s", what, line)


def import_tensorflow() -> None:
    """Import TensorFlow and Keras and initialise the devices, once, without terminal noise."""
    if "tensorflow" in sys.modules and "keras" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", QUIET_LEVEL)
    with native_stderr_to_log("tensorflow start-up"):
        import keras  # noqa: F401
        import tensorflow as tf

        tf.config.list_physical_devices("GPU")  # cuInit runs here
