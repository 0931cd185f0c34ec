"""Delivery without a Docker engine: build context, launcher, Dockerfile and workflow checks, pins."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

TOOLS = Path(sys.executable).parent


def _docker_pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex (Go filepath.Match plus `**`, as Docker reads it)."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            if pattern.startswith("/", i):
                out, i = out + "(?:/|)", i + 1  # `**/x` also matches `x` at the top
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + "$")


def build_context(root: Path) -> list[Path]:
    """The files `docker build root` sends, per root/.dockerignore (the last matching rule wins;
    a rule matching a parent folder applies to everything in it)."""
    rules = []
    for line in (root / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negate = line.startswith("!")
            rules.append((negate, _docker_pattern(line.lstrip("!").strip("/"))))
    sent = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and ".git" not in p.relative_to(root).parts[:1]):
        relative = path.relative_to(root).as_posix()
        parents = [relative.rsplit("/", n)[0] for n in range(relative.count("/"), 0, -1)] + [relative]
        excluded = False
        for negate, rule in rules:  # moby's patternmatcher: a rule applies when it matches the path or a parent
            if any(rule.match(candidate) for candidate in parents):
                excluded = not negate
        if not excluded:
            sent.append(path)
    return sent


def test_build_context_holds_what_the_image_needs_and_stays_small(tmp_path):
    context = build_context(REPO)
    names = {p.relative_to(REPO).as_posix() for p in context}
    assert {"Dockerfile", "requirements.txt", "setup.py", "st_app_predict.py", "params.yaml", "schema.yaml",
            "config/config.yaml", ".streamlit/config.toml", "src/metal_defect/serving/predictor.py"} <= names
    for unwanted in ("tests/", "docs/", "research/", "artifacts/", "logs/", ".venv/", ".git/", ".ci/", "__pycache__"):
        assert not any(unwanted in name for name in names), unwanted
    size = sum(p.stat().st_size for p in context)
    assert size < 5_000_000, f"build context {size / 1e6:.1f} MB"
    # the rules themselves: a planted artifact, notebook and cache stay out, a bundle goes in
    fake = tmp_path / "repo"
    for name in ("src/pkg/a.py", "src/pkg/__pycache__/a.cpython-311.pyc", "src/pkg.egg-info/PKG-INFO", "artifacts/runs/x.json", "research/eda.ipynb",
                 "model_bundle/serving.json", "tests/test_x.py", "README.md"):
        (fake / name).parent.mkdir(parents=True, exist_ok=True)
        (fake / name).write_text("x")
    shutil.copy2(REPO / ".dockerignore", fake / ".dockerignore")
    assert {p.relative_to(fake).as_posix() for p in build_context(fake)} == {"src/pkg/a.py", "model_bundle/serving.json", "README.md"}


def test_the_launcher_binds_all_interfaces_on_port(monkeypatch):
    from metal_defect import launch_app

    started = {}
    monkeypatch.setattr(launch_app.os, "execve", lambda path, argv, env: started.update(argv=argv, env=env))
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_ARENA_MAX"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PORT", "9123")
    launch_app.main([])
    argv = started["argv"]
    assert argv[1:4] == ["-m", "streamlit", "run"] and argv[4].endswith("st_app_predict.py")
    assert argv[argv.index("--server.port") + 1] == "9123" and argv[argv.index("--server.address") + 1] == "0.0.0.0"
    monkeypatch.delenv("PORT")
    launch_app.main([])
    assert started["argv"][started["argv"].index("--server.port") + 1] == "8501"
    # the server gets the allocator settings; this process, and what it starts later, does not
    assert started["env"]["MALLOC_ARENA_MAX"] == "2" and started["env"]["MALLOC_MMAP_THRESHOLD_"] == str(1 << 20)
    assert "MALLOC_ARENA_MAX" not in os.environ and "MALLOC_MMAP_THRESHOLD_" not in os.environ


@pytest.mark.parametrize("check", [
    ["hadolint", "Dockerfile"],
    ["check-jsonschema", "--builtin-schema", "vendor.github-workflows", ".github/workflows/ci.yml"],
    ["zizmor", "--offline", "--persona", "auditor", ".github/workflows/"],
])
def test_dockerfile_and_workflow_checks_are_clean(check):
    tool = TOOLS / check[0]
    assert tool.exists(), f"{check[0]} is pinned in requirements-dev.txt"
    result = subprocess.run([str(tool), *check[1:]], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_requirements_pin_exact_versions():
    for name in ("requirements.txt", "requirements-serve.txt", "requirements-dev.txt"):
        for line in (REPO / name).read_text().splitlines():
            requirement = line.split("#")[0].strip()
            if requirement.startswith("-r "):
                assert (REPO / requirement[3:].strip()).is_file(), f"{name}: {requirement}"
            elif requirement:
                assert re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[0-9][0-9A-Za-z.]*", requirement), f"{name}: {requirement} is not pinned"


def test_the_dockerfile_copies_what_the_package_install_reads_before_it():
    # the image never built: setup.py's data_files and requirements were copied after `pip install .`
    copied: set[str] = set()
    install = None
    for line in (REPO / "Dockerfile").read_text().replace("\\\n", " ").splitlines():
        words = line.split()
        if words[:1] == ["COPY"]:
            copied |= {w.rstrip("/") for w in words[1:-1] if not w.startswith("--")}
        elif words[:1] == ["RUN"] and "pip install" in line and re.search(r"\s\.(\s|$)", line):
            install = copied.copy()
            break
    assert install is not None, "the Dockerfile installs the package with `pip install ... .`"
    setup = (REPO / "setup.py").read_text()
    needed = {"setup.py", "pyproject.toml", "README.md", "src"} | set(re.findall(r'"([\w\-/]+\.(?:yaml|txt))"', setup))
    needed |= {req.split()[1] for req in (REPO / "requirements.txt").read_text().splitlines() if req.startswith("-r ")}
    covered = {name for name in needed if name in install or name.split("/")[0] in install}
    assert covered == needed, f"copied only after `pip install .`: {sorted(needed - covered)}"
