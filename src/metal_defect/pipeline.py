"""The stage registry and the one runner.

A stage is data: a plain function (named as "module:function" so that the CLI does not
import TensorFlow to print --help), the config sections it reads and the stages upstream
of it. Its fingerprint covers exactly: the declared sections, the upstream outputs (by the
hash of their content), its code, and for a stage that reads outside data, that data's
fingerprint. A stage's code is its module and every module of this package that it
imports, directly or through others, read statically with `ast` (nothing is imported), so a
code change anywhere in that chain is never silently reused (`code_chain` lists it).

A finished output is reused only after it is checked against the record written when it
finished (file list, sizes, content hash); one that does not match is reported and
recomputed. Files a stage declares as `reports` (pictures and other things for people)
are listed and checked but left out of the content hash, so downstream stages depend on
the content they read, not on figures.

The runner owns paths, logging, timing and caching; a stage function only receives
`StageIO` (where to write) and its sections as keyword arguments, and returns a small
summary dict that is stored with its output and in the run manifest.
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib
import importlib.util
import logging
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metal_defect import artifacts as art
from metal_defect import runtime
from metal_defect.config import RECIPE_SECTIONS, Config, dump_yaml, fingerprint_of
from metal_defect.errors import ArtifactError, ConfigError
from metal_defect.served import read_pointer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageIO:
    """What the runner hands a stage besides its config sections."""

    out_dir: Path  # write finished outputs here; moved into place only if the stage returns
    work_dir: Path  # partial state that survives an interrupted run; removed on success
    inputs: Mapping[str, Path]  # upstream stage name -> its finished output folder
    run_id: str
    run_dir: Path
    cache_dir: Path  # shared download cache (paths.download_cache), outside any fingerprint
    tuning_dir: Path | None = None  # Keras Tuner projects (paths.tuning), outside any fingerprint


@dataclass(frozen=True)
class Stage:
    """A pipeline step: what it runs, what it reads, what it depends on."""

    name: str
    target: str  # "package.module:function"
    sections: tuple[str, ...] = ()
    upstream: tuple[str, ...] = ()
    external: str | None = None  # "module:function(**sections) -> str": fingerprint of outside inputs
    publish: str | None = None  # "module:function(store, run_id, output)": run after a new output (e.g. serve the model)
    reports: tuple[str, ...] = ()  # output files for people ("eda/", "x.png"): verified, but not part of the content hash
    description: str = ""

    def resolve(self, target: str | None = None) -> Callable[..., Any]:
        module, _, func = (target or self.target).partition(":")
        return getattr(importlib.import_module(module), func)

    def entry_modules(self) -> tuple[str, ...]:
        """The modules holding the stage's target, external and publish functions."""
        targets = [t for t in (self.target, self.external, self.publish) if t]
        return tuple(dict.fromkeys(t.partition(":")[0] for t in targets))


@dataclass
class StageOutcome:
    name: str
    fingerprint: str
    output: Path
    output_hash: str
    reused: bool
    duration_s: float
    summary: dict[str, Any] = field(default_factory=dict)


# The stages, in order: stage N runs metal_defect.stages.sN_<name> (which drives the numbered components).
STAGES: tuple[Stage, ...] = (
    Stage(
        "data_ingestion",
        "metal_defect.stages.s1_data_ingestion:run_stage",
        sections=("data_ingestion", "schema"),
        external="metal_defect.components.c01_data_ingestion:source_fingerprint",
        description="find labelled images in a folder, archive or URL; report what was skipped",
    ),
    Stage(
        "data_preprocessing",
        "metal_defect.stages.s2_data_preprocessing:run_stage",
        sections=("base", "data_preprocessing", "schema"),
        upstream=("data_ingestion",),
        reports=("eda/",),
        description="decode, check, de-duplicate, resize and split the images; EDA plots",
    ),
    Stage(
        "train",
        "metal_defect.stages.s3_train:run_stage",
        sections=RECIPE_SECTIONS,
        upstream=("data_preprocessing",),
        description="train the base models in train.models (c03 loader, c04 builder, c05 callbacks)",
    ),
    Stage(
        "evaluation",
        "metal_defect.stages.s4_evaluation:run_stage",
        sections=("evaluation", "data_preprocessing", "schema"),  # file limits and image extensions travel into the serving spec
        upstream=("data_ingestion", "data_preprocessing", "train"),
        description="metrics, plots, calibration, verdict rules and model card of the base models; the best on validation gets a bundle",
    ),
    Stage(
        "tune",
        "metal_defect.stages.s5_tune:run_stage",
        sections=(*RECIPE_SECTIONS, "tuning", "evaluation", "data_preprocessing", "schema"),
        upstream=("data_ingestion", "data_preprocessing", "train", "evaluation"),
        reports=("trials.png",),
        description="Keras Tuner search around the best base model (resumable, distributed) ranks configurations; the best one trained with the full schedule and evaluated like the base models",
    ),
    Stage(
        "select",
        "metal_defect.stages.s6_select:select_stage",
        sections=("evaluation",),
        upstream=("evaluation", "tune"),
        publish="metal_defect.stages.s6_select:publish_served",
        description="serve the tuned model only when clearly better on validation than the base model; say which and why",
    ),
)

# Subcommands of the CLI; no stage may be named like one.
SUBCOMMANDS = ("run", "runs", "promote", "evaluate", "predict", "review", "export", "compare", "bench", "proxy-data", "app", "screenshot", "tune-worker")


def check_registry(stages: Sequence[Stage]) -> None:
    """Names unique and not subcommands; upstream stages come earlier."""
    seen: set[str] = set()
    for stage in stages:
        if stage.name in SUBCOMMANDS:
            raise ValueError(f"stage '{stage.name}' is named like a subcommand")
        if stage.name in seen:
            raise ValueError(f"stage '{stage.name}' is registered twice")
        missing = [u for u in stage.upstream if u not in seen]
        if missing:
            raise ValueError(f"stage '{stage.name}' needs {missing}, which must come before it")
        seen.add(stage.name)


check_registry(STAGES)


def parse_stage_selection(text: str | None, stages: Sequence[Stage], option: str = "--stages") -> list[str]:
    """'1-2', '2,4', 'data_ingestion,train', 'data_ingestion-train' -> stage names in order.

    `option` names the command-line option in error messages (--stages or --force).
    """
    names = [s.name for s in stages]
    if not text or text == "all":
        return names

    def index_of(token: str) -> int:
        token = token.strip()
        if token.isdigit():
            number = int(token)
            if not 1 <= number <= len(names):
                raise ConfigError(f"{option}: no stage number {number}; stages are 1..{len(names)}: {_numbered(names)}")
            return number - 1
        if token in names:
            return names.index(token)
        close = difflib.get_close_matches(token, names, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{option}: unknown stage '{token}'{hint} (stages: {_numbered(names)})")

    chosen: set[int] = set()
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if item in names or item.isdigit():
            chosen.add(index_of(item))
            continue
        left, sep, right = item.partition("-")
        if not sep:
            chosen.add(index_of(item))
            continue
        lo, hi = index_of(left), index_of(right)
        if lo > hi:
            raise ConfigError(f"{option}: range '{item}' runs backwards")
        chosen.update(range(lo, hi + 1))
    return [names[i] for i in sorted(chosen)]


def _numbered(names: Sequence[str]) -> str:
    return ", ".join(f"{i}={n}" for i, n in enumerate(names, 1))


def plan(selected: Sequence[str], stages: Sequence[Stage]) -> list[Stage]:
    """The selected stages plus every stage they need, in registry order."""
    by_name = {s.name: s for s in stages}
    needed: set[str] = set()

    def add(name: str) -> None:
        if name not in needed:
            needed.add(name)
            for up in by_name[name].upstream:
                add(up)

    for name in selected:
        add(name)
    return [s for s in stages if s.name in needed]


PACKAGE = __name__.partition(".")[0]


@functools.cache
def _module_imports(module: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(modules of this package, top-level outside packages) that `module`'s source imports anywhere."""
    path = _module_file(module)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    inside: set[str] = set()
    outside: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]  # `from pkg import module` names a module
        else:
            continue
        for name in names:
            if name.partition(".")[0] == PACKAGE:
                if _is_module(name):
                    inside.add(name)
            elif name:
                outside.add(name.partition(".")[0])
    return tuple(sorted(inside)), tuple(sorted(outside))


def _is_module(name: str) -> bool:
    return _source_of(name) is not None


def _source_of(module: str) -> Path | None:
    """The source file of `module`, found without importing it (importing would run TensorFlow's
    start-up for half the package): inside this package by path, elsewhere by a top-level lookup."""
    top, _, rest = module.partition(".")
    if top == PACKAGE:
        spec = importlib.util.find_spec(PACKAGE)
        roots = list(spec.submodule_search_locations or []) if spec else []
        for root in roots:
            base = Path(root).joinpath(*rest.split(".")) if rest else Path(root)
            for candidate in (base.with_suffix(".py") if rest else None, base / "__init__.py"):
                if candidate is not None and candidate.is_file():
                    return candidate
        return None
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec and spec.origin and spec.origin.endswith(".py") else None


def _module_file(module: str) -> Path:
    path = _source_of(module)
    if path is None:
        raise ArtifactError(f"module {module} not found (or has no Python source)")
    return path


def code_chain(stage: Stage) -> list[str]:
    """The stage's modules and every module of this package they import, directly or not.

    Read statically (ast), so nothing is imported; parent packages' `__init__` modules count
    too, since importing a module runs them.
    """
    seen: set[str] = set()
    todo = list(stage.entry_modules())
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        parents = [".".join(parts[:i]) for i in range(1, len(parts)) if parts[0] == PACKAGE]
        todo.extend(p for p in (*parents, *_module_imports(module)[0]) if p not in seen)
    return sorted(seen)


def needs_tensorflow(stage: Stage) -> bool:
    """Whether any module in the stage's chain imports TensorFlow or Keras."""
    return any({"tensorflow", "keras"} & set(_module_imports(m)[1]) for m in code_chain(stage))


def code_fingerprint(stage: Stage) -> str:
    """sha256 over the source files of every module in the stage's code chain (names and bytes)."""
    _module_imports.cache_clear()  # sources may have changed since the last call in this process
    return art.hash_strings(*(f"{m}:{art.sha256_file(_module_file(m))}" for m in code_chain(stage)))


class Runner:
    """Runs stages for one run: fingerprints, reuse, atomic outputs, manifest, logs."""

    def __init__(self, config: Config, stages: Sequence[Stage] = STAGES, command: str = "run"):
        check_registry(stages)
        self.config = config
        self.stages = list(stages)
        self.store = art.ArtifactStore(config.paths.artifacts)
        self.command = command

    def run(self, selection: str | None = None, force: Sequence[str] = ()) -> dict[str, Any]:
        """Run the selected stages (and what they need). Returns the final manifest."""
        names = parse_stage_selection(selection, self.stages)
        forced = self._parse_force(force)
        todo = plan(names, self.stages)
        art.ensure_dir(self.store.root, "paths.artifacts")
        for run_id in self.store.mark_dead_runs_failed():
            log.warning("run %s had died without finishing; marked failed", run_id)
        art.sweep_stale_tmp(self.store.root / "stages")

        run_id = art.new_run_id()
        run_dir = self.store.run_dir(run_id)
        run_dir.mkdir(parents=True)
        (run_dir / "config.yaml").write_text(dump_yaml(self.config), encoding="utf-8")
        handler = _attach_run_log(run_dir / "run.log")
        manifest = self._new_manifest(run_id, names)
        self._save(run_dir, manifest)
        log.info("run %s: stages %s (folder %s)", run_id, ", ".join(s.name for s in todo), run_dir)
        started = time.monotonic()
        try:
            externals = {s.name: self._external(s) for s in todo if s.external}
            if externals:
                manifest["data_fingerprint"] = next(iter(externals.values()))
            outputs: dict[str, StageOutcome] = {}
            for stage in todo:
                outcome = self._run_stage(stage, outputs, externals.get(stage.name), stage.name in forced, run_id, run_dir)
                outputs[stage.name] = outcome
                manifest["stages"][stage.name] = {
                    "number": self.stages.index(stage) + 1,
                    "status": "reused" if outcome.reused else "succeeded",
                    "reused": outcome.reused,
                    "fingerprint": outcome.fingerprint,
                    "duration_s": round(outcome.duration_s, 3),
                    "output": str(outcome.output),
                    "summary": outcome.summary,
                }
                manifest["metrics"].update(outcome.summary.get("metrics", {}))
                self._save(run_dir, manifest)
                _link(run_dir / "stages" / stage.name, outcome.output)
                if stage.publish:
                    self._publish(stage, outcome, run_id, manifest)
                    self._save(run_dir, manifest)
        except BaseException as exc:
            manifest["status"] = "failed"
            manifest["error"] = "interrupted (Ctrl-C or SIGTERM)" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"
            raise
        else:
            manifest["status"] = "succeeded"
        finally:
            manifest["ended"] = art.now_iso()
            manifest["duration_s"] = round(time.monotonic() - started, 3)
            self._save(run_dir, manifest)
            log.info("run %s %s in %.1f s; manifest %s", run_id, manifest["status"], manifest["duration_s"], run_dir / art.RUN_MANIFEST)
            _detach_run_log(handler)
        return manifest

    # ------------------------------------------------------------------------
    def _new_manifest(self, run_id: str, names: list[str]) -> dict[str, Any]:
        """The run manifest as it starts: what runs, with which config, code, seeds, libraries and host."""
        seed = self.config.base.seed
        return {
            "run_id": run_id,
            "command": self.command,
            "status": "running",
            "started": art.now_iso(),
            "ended": None,
            "duration_s": None,
            "git": art.git_state(self.config.config_dir),
            "config_dir": str(self.config.config_dir),
            "config_hash": fingerprint_of(self.config.to_dict()),
            "data_fingerprint": None,
            "seeds": {"python": seed, "numpy": seed, "tensorflow": seed},
            "stages_selected": names,
            "stages": {},
            "metrics": {},
            "libraries": art.library_versions(),
            "host": art.host_info(),
        }

    def _parse_force(self, force: Sequence[str]) -> set[str]:
        names = {s.name for s in self.stages}
        forced: set[str] = set()
        for item in force:
            for token in item.split(","):
                token = token.strip()
                if token == "all":
                    forced |= names
                elif token:
                    forced.update(parse_stage_selection(token, self.stages, option="--force"))
        return forced

    def _external(self, stage: Stage) -> str:
        func = stage.resolve(stage.external)
        return func(**{name: self.config.section(name) for name in stage.sections})

    def fingerprint(self, stage: Stage, upstream: Mapping[str, StageOutcome], external: str | None) -> str:
        """Covers exactly: the stage's sections, upstream output hashes, its code, outside data."""
        sections = {name: fingerprint_of(self.config.section(name)) for name in stage.sections}
        ups = {name: upstream[name].output_hash for name in stage.upstream}
        return art.hash_strings(stage.name, fingerprint_of(sections), fingerprint_of(ups), code_fingerprint(stage), external or "")[:16]

    def _run_stage(self, stage: Stage, upstream: Mapping[str, StageOutcome], external: str | None, forced: bool, run_id: str, run_dir: Path) -> StageOutcome:
        fingerprint = self.fingerprint(stage, upstream, external)
        final = self.store.stage_dir(stage.name, fingerprint)
        work = self.store.work_dir(stage.name, fingerprint)
        record = self.store.finished_record(stage.name, fingerprint)
        why = "no finished output with this fingerprint"
        if record and not forced:
            problems = art.verify_tree(final, record, stage.reports)
            if not problems:
                log.info("stage %s: reused (fingerprint %s, finished by run %s)", stage.name, fingerprint, record.get("run_id"))
                return StageOutcome(stage.name, fingerprint, final, record["output_hash"], True, 0.0, record.get("summary", {}))
            log.warning("stage %s: the finished output %s does not match its record (%s); recomputing it", stage.name, final, "; ".join(problems))
            why = "finished output damaged"
        if forced and work.exists():
            log.info("stage %s: --force discards its partial state in %s", stage.name, work)
            shutil.rmtree(work)
        resumed = work.exists() and any(work.iterdir())
        work.mkdir(parents=True, exist_ok=True)
        why = "forced" if forced else "resuming partial state" if resumed else why
        log.info("stage %s: running (fingerprint %s; %s)", stage.name, fingerprint, why)
        if needs_tensorflow(stage):
            runtime.import_tensorflow()
        func = stage.resolve()
        start = time.monotonic()
        try:
            with art.staging_dir(final) as tmp:
                io = StageIO(out_dir=tmp, work_dir=work, inputs={u: upstream[u].output for u in stage.upstream}, run_id=run_id, run_dir=run_dir,
                             cache_dir=self.config.paths.download_cache, tuning_dir=self.config.paths.tuning_root)
                summary = func(io, **{name: self.config.section(name) for name in stage.sections}) or {}
                duration = time.monotonic() - start
                files = art.tree_files(tmp)
                output_hash = art.hash_tree(tmp, stage.reports, files)
                art.write_json_atomic(
                    tmp / art.STAGE_RECORD,
                    {"stage": stage.name, "fingerprint": fingerprint, "output_hash": output_hash, "reports": list(stage.reports),
                     "files": files, "run_id": run_id, "finished": art.now_iso(), "duration_s": round(duration, 3),
                     "summary": summary},
                )
        except BaseException as exc:
            # The console shows the error once (the CLI prints it); the run log keeps the details.
            state = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            log.debug("stage %s %s after %.1f s: %s", stage.name, state, time.monotonic() - start, exc, exc_info=not isinstance(exc, KeyboardInterrupt))
            if work.is_dir() and not any(work.iterdir()):
                _remove_empty_folders(work, self.store.root)  # nothing to resume: leave no empty folder behind
            elif work.is_dir():
                log.info("stage %s %s; its partial state is kept in %s and resumed by the same command", stage.name, state, work)
            raise
        shutil.rmtree(work, ignore_errors=True)
        log.info("stage %s: done in %.1f s -> %s", stage.name, duration, final)
        return StageOutcome(stage.name, fingerprint, final, output_hash, False, duration, summary)

    def _publish(self, stage: Stage, outcome: StageOutcome, run_id: str, manifest: dict[str, Any]) -> None:
        """Publish a new output (e.g. serve the model). A reused one is published only when nothing is
        served yet: otherwise a plain rerun would undo a `promote` (a rollback)."""
        served = read_pointer(self.store)
        if outcome.reused and served is not None:
            log.info("stage %s was reused: the served model stays run %s's (publishing belongs to the run that produced it, or `promote`)",
                     stage.name, served.get("run_id"))
            return
        manifest["served"] = stage.resolve(stage.publish)(self.store, run_id, outcome.output)

    def _save(self, run_dir: Path, manifest: dict[str, Any]) -> None:
        art.write_json_atomic(run_dir / art.RUN_MANIFEST, manifest)


def _remove_empty_folders(folder: Path, stop: Path) -> None:
    """Remove `folder` and then its parents while they are empty, up to (not including) `stop`."""
    while folder != stop and stop in folder.parents:
        try:
            folder.rmdir()
        except OSError:  # not empty (or already gone): stop here
            return
        folder = folder.parent


def _link(link: Path, target: Path) -> None:
    """A convenience symlink from the run folder to a stage output (skipped where unsupported)."""
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        if link.is_symlink():
            link.unlink()
        link.symlink_to(target, target_is_directory=True)
    except OSError:
        pass


def _attach_run_log(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    package_logger = logging.getLogger("metal_defect")
    if package_logger.level == logging.NOTSET:  # used as a library: let the run log see everything
        package_logger.setLevel(logging.DEBUG)
    package_logger.addHandler(handler)
    return handler


def _detach_run_log(handler: logging.Handler) -> None:
    logging.getLogger("metal_defect").removeHandler(handler)
    handler.close()
