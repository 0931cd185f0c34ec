"""Run ids, manifests, content fingerprints, atomic writes and the served-model pointer.

Layout under `paths.artifacts`:

    stages/<stage>/<fingerprint>/     finished stage outputs (moved in whole, never edited)
    stages/<stage>/.tmp-*             outputs being written; ignored and swept later
    work/<stage>/<fingerprint>/       partial state of an interrupted long stage
    runs/<run_id>/                    config.yaml, run.log, manifest.json, stage links
    served.json                       which run's model the app and `predict` use
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from metal_defect.errors import ArtifactError, ConfigError
from metal_defect.runtime import ONEDNN

STAGE_RECORD = "_stage.json"
RUN_MANIFEST = "manifest.json"
TRACKED_LIBRARIES = ("tensorflow", "keras", "keras-tuner", "numpy", "pillow", "scikit-learn", "pyyaml", "metal-defect")


# ----------------------------------------------------------------------------- hashing
def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of one file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def tree_files(root: Path) -> dict[str, int]:
    """Every file below `root` (relative POSIX path -> size in bytes), the stage record excluded."""
    files = {}
    for path in root.rglob("*"):
        if path.is_file() and path.relative_to(root).as_posix() != STAGE_RECORD:
            files[path.relative_to(root).as_posix()] = path.stat().st_size
    return dict(sorted(files.items()))


def is_report(relative: str, reports: Iterable[str]) -> bool:
    """Whether a file (relative POSIX path) lies under one of the `reports` prefixes ('eda/', 'notes.txt')."""
    return any(relative == r or (r.endswith("/") and relative.startswith(r)) for r in reports)


def hash_tree(root: Path, exclude: Iterable[str] = (), files: Iterable[str] | None = None) -> str:
    """sha256 over the files below `root` (relative path and content, sorted), the stage record
    and anything under an `exclude` prefix left out. `files`: the listing from `tree_files`,
    when the caller already has it (saves walking the tree again)."""
    exclude = tuple(exclude)
    digest = hashlib.sha256()
    for relative in sorted(tree_files(root) if files is None else files):
        if is_report(relative, exclude):
            continue
        digest.update(relative.encode())
        digest.update(b"\0")
        digest.update(sha256_file(root / relative).encode())
    return digest.hexdigest()


def verify_tree(root: Path, record: dict[str, Any], exclude: Iterable[str] = ()) -> list[str]:
    """Differences between a finished output folder and what its record says was written.

    Cheap checks first (file list and sizes); the content hash only when they agree. An
    empty list means the folder is exactly what the stage produced.
    """
    expected = record.get("files")
    if not isinstance(expected, dict) or "output_hash" not in record:
        return ["its record lists no files or no content hash (damaged)"]
    actual = tree_files(root)
    problems = []
    missing = [f for f in expected if f not in actual]
    added = [f for f in actual if f not in expected]
    resized = [f for f in expected if f in actual and actual[f] != expected[f]]
    for label, names in (("missing", missing), ("not written by the stage", added), ("changed size", resized)):
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            problems.append(f"{len(names)} file(s) {label}: {shown}")
    if not problems and hash_tree(root, exclude, actual) != record["output_hash"]:
        problems.append("file contents differ from the recorded hash")
    return problems


def hash_strings(*parts: str) -> str:
    """sha256 of several strings, unambiguously joined."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


# ----------------------------------------------------------------------------- atomic I/O
def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that readers see the old file or the new one, never half of one."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; readers such as the app's user need the umask's mode
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ArtifactError(f"{path}: not found") from exc
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc}); delete it or re-run the stage that writes it") from exc


@contextlib.contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final`; on success move it into place.

    A crash, kill or Ctrl-C inside the block leaves only a `.tmp-*` folder that nothing
    trusts (swept by `sweep_stale_tmp`). An existing `final` is replaced only after the
    new output is complete.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name[:16]}-{os.getpid()}-", dir=final.parent))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700: another user (the app in a container) could not read it
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)


def current_umask() -> int:
    """The process umask (read without changing it for longer than two system calls)."""
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    return _UMASK


_UMASK: int | None = None


def ensure_dir(path: Path, key: str) -> Path:
    """Create folder `path` (named by config key `key`) or raise a ConfigError saying why it cannot be."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file, not a folder" if blocker else (exc.strerror or str(exc))
        raise ConfigError(f"config.yaml: {key} = {path}: cannot create or write this folder ({why}); choose a writable folder") from exc
    return path


def replace_dir(new: Path, final: Path) -> None:
    """Atomically move folder `new` to `final`, replacing whatever was there."""
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name[:16]}-{secrets.token_hex(4)}")
        os.rename(final, old)
    os.rename(new, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sweep_stale_tmp(root: Path) -> int:
    """Remove `.tmp-*`/`.old-*` folders left by killed processes (pid no longer alive)."""
    removed = 0
    if not root.exists():
        return 0
    for path in root.glob("*/.tmp-*-*-*"):
        pid = path.name.split("-")[-2] if path.name.count("-") >= 3 else ""
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    for path in root.glob("*/.old-*"):
        shutil.rmtree(path, ignore_errors=True)
        removed += 1
    return removed


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------- runs
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a name under runs/, never a path


def new_run_id(now: dt.datetime | None = None) -> str:
    """Sortable, unique: 20261125-183000-a1b2."""
    now = now or dt.datetime.now()
    return f"{now:%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def new_folder(parent: Path, prefix: str, suffix: str = "") -> Path:
    """Create and return parent/<prefix><timestamp-token><suffix>, a folder no other process holds.

    Two commands started in the same second once shared (and deleted) one timestamp-named folder;
    the exclusive mkdir makes the claim atomic.
    """
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        folder = parent / f"{prefix}{new_run_id()}{suffix}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def git_state(cwd: Path) -> dict[str, Any]:
    """Commit and dirty flag of the checkout holding `cwd` (None outside git)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return {"commit": None, "dirty": None}
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True, timeout=10)
        return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in TRACKED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def host_info() -> dict[str, Any]:
    return {"hostname": socket.gethostname(), "platform": platform.platform(), "cpu_count": os.cpu_count(), **cpu_info(), "pid": os.getpid()}


# The extensions TensorFlow's CPU kernels run fastest with: machines of one kind here differ by them (an Intel
# part with AVX-512 BF16/VNNI, an AMD EPYC part with AVX2 only), and training ran several times slower on the second
VECTOR_EXTENSIONS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_description(cpuinfo: str) -> dict[str, Any]:
    """The CPU model and its vector extensions from the text of /proc/cpuinfo, for reading a run's timings."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    return {"cpu_model": fields.get("model name") or None, "cpu_vector_extensions": [f for f in VECTOR_EXTENSIONS if f in flags]}


def cpu_info() -> dict[str, Any]:
    """This machine's CPU model and vector extensions (none known off Linux), and whether TensorFlow's oneDNN kernels were asked for."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")[:1_000_000]
    except OSError:
        text = ""
    return {**cpu_description(text), "tensorflow_onednn": os.environ.get(ONEDNN, "tensorflow's default")}


class ArtifactStore:
    """Paths and records under the artifacts root; the one place that builds them."""

    def __init__(self, root: Path):
        self.root = Path(root)

    # stage outputs ------------------------------------------------------------
    def stage_dir(self, stage: str, fingerprint: str) -> Path:
        return self.root / "stages" / stage / fingerprint

    def work_dir(self, stage: str, fingerprint: str) -> Path:
        return self.root / "work" / stage / fingerprint

    def finished_record(self, stage: str, fingerprint: str) -> dict[str, Any] | None:
        """The record of a finished stage output, or None if there is none to trust."""
        record = self.stage_dir(stage, fingerprint) / STAGE_RECORD
        if not record.is_file():
            return None
        try:
            return read_json(record)
        except ArtifactError:
            return None

    # runs ---------------------------------------------------------------------
    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    def run_dir(self, run_id: str) -> Path:
        return self.runs_dir / run_id

    def manifest(self, run_id: str) -> dict[str, Any]:
        if not RUN_ID.fullmatch(str(run_id)) or ".." in str(run_id):
            raise ArtifactError(f"'{run_id}' is not a run id (like 20261125-183000-a1b2); `python main.py runs` lists them")
        path = self.run_dir(run_id) / RUN_MANIFEST
        if not path.is_file():
            known = ", ".join(self.run_ids()[-5:]) or "none yet"
            raise ArtifactError(f"run '{run_id}' not found under {self.runs_dir} (recent runs: {known}); `python main.py runs` lists them")
        return read_json(path)

    def run_ids(self) -> list[str]:
        if not self.runs_dir.is_dir():
            return []
        return sorted(p.name for p in self.runs_dir.iterdir() if (p / RUN_MANIFEST).is_file())

    def mark_dead_runs_failed(self) -> list[str]:
        """Runs still marked 'running' whose process is gone (SIGKILL, power loss) become failed."""
        fixed = []
        for run_id in self.run_ids():
            path = self.run_dir(run_id) / RUN_MANIFEST
            try:
                data = read_json(path)
            except ArtifactError:
                continue
            host = data.get("host", {})
            if data.get("status") != "running" or host.get("hostname") != socket.gethostname():
                continue
            if not pid_alive(int(host.get("pid", -1))):
                data["status"] = "failed"
                data["error"] = "the process died without finishing (killed or crashed); marked failed by a later run"
                data.setdefault("ended", None)
                write_json_atomic(path, data)
                fixed.append(run_id)
        return fixed
