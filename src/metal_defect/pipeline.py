"""The stage registry and the one runner.

A stage is data: a plain function (named as "module:function" so that the CLI does not
import TensorFlow to print --help), the config sections it reads, the stages upstream of
it, and any extra modules whose code it runs. Its fingerprint covers exactly those: the
declared sections, the upstream outputs (by content hash), its code, and for a stage that
reads outside data, that data's fingerprint. A finished output with the same fingerprint
is reused; `--force` recomputes it.

The runner owns paths, logging, timing and caching; a stage function only receives
`StageIO` (where to write) and its sections as keyword arguments, and returns a small
summary dict that is stored with its output and in the run manifest.
"""

from __future__ import annotations

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
from metal_defect.config import Config, dump_yaml, fingerprint_of
from metal_defect.errors import ArtifactError, ConfigError, MetalDefectError

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


@dataclass(frozen=True)
class Stage:
    """A pipeline step: what it runs, what it reads, what it depends on."""

    name: str
    target: str  # "package.module:function"
    sections: tuple[str, ...] = ()
    upstream: tuple[str, ...] = ()
    code: tuple[str, ...] = ()  # further modules whose source is part of the fingerprint
    external: str | None = None  # "module:function(**sections) -> str": fingerprint of outside inputs
    publish: str | None = None  # "module:function(store, run_id, output)": run after success (e.g. serve the model)
    description: str = ""

    def resolve(self, target: str | None = None) -> Callable[..., Any]:
        module, _, func = (target or self.target).partition(":")
        return getattr(importlib.import_module(module), func)

    def modules(self) -> tuple[str, ...]:
        return (self.target.partition(":")[0], *self.code)


@dataclass
class StageOutcome:
    name: str
    fingerprint: str
    output: Path
    output_hash: str
    reused: bool
    duration_s: float
    summary: dict[str, Any] = field(default_factory=dict)


# The stages, in order. Component stages are added here as they are built.
STAGES: tuple[Stage, ...] = (
    Stage(
        "data_ingestion",
        "metal_defect.components.c01_data_ingestion:run_stage",
        sections=("data_ingestion", "schema"),
        external="metal_defect.components.c01_data_ingestion:source_fingerprint",
        description="find labelled images in a folder, archive or URL; report what was skipped",
    ),
    Stage(
        "data_preprocessing",
        "metal_defect.components.c02_data_preprocessing:run_stage",
        sections=("base", "data_preprocessing", "schema"),
        upstream=("data_ingestion",),
        description="decode, check, de-duplicate, resize and split the images; EDA plots",
    ),
    Stage(
        "train",
        "metal_defect.components.c06_training:run_stage",
        sections=("base", "data_loader", "model", "callbacks", "train"),
        upstream=("data_preprocessing",),
        code=("metal_defect.components.c03_dataset_loader", "metal_defect.components.c04_model_builder",
              "metal_defect.components.c05_callbacks"),
        description="train the base models in train.models (c03 loader, c04 builder, c05 callbacks)",
    ),
    Stage(
        "evaluation",
        "metal_defect.components.c06_evaluation:run_stage",
        sections=("evaluation",),
        upstream=("data_ingestion", "data_preprocessing", "train"),
        code=("metal_defect.metrics", "metal_defect.plots", "metal_defect.inference"),
        publish="metal_defect.components.c06_evaluation:publish",
        description="metrics, plots, calibration and model card; the best model on validation becomes the served model",
    ),
)

# Subcommands of the CLI; no stage may be named like one.
SUBCOMMANDS = ("run", "runs", "promote", "evaluate", "predict", "export", "bench")


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


def parse_stage_selection(text: str | None, stages: Sequence[Stage]) -> list[str]:
    """'1-2', '2,4', 'data_ingestion,train', 'data_ingestion-train' -> stage names in order."""
    names = [s.name for s in stages]
    if not text or text == "all":
        return names

    def index_of(token: str) -> int:
        token = token.strip()
        if token.isdigit():
            number = int(token)
            if not 1 <= number <= len(names):
                raise ConfigError(f"--stages: no stage number {number}; stages are 1..{len(names)}: {_numbered(names)}")
            return number - 1
        if token in names:
            return names.index(token)
        import difflib

        close = difflib.get_close_matches(token, names, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"--stages: unknown stage '{token}'{hint} (stages: {_numbered(names)})")

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
            raise ConfigError(f"--stages: range '{item}' runs backwards")
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


def code_fingerprint(stage: Stage) -> str:
    """sha256 of the source files of the stage's module and its declared extra modules."""
    parts = []
    for module in stage.modules():
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.origin:
            raise ArtifactError(f"stage '{stage.name}': module {module} not found")
        parts.append(art.sha256_file(Path(spec.origin)))
    return art.hash_strings(*parts)


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
        self.store.root.mkdir(parents=True, exist_ok=True)
        for run_id in self.store.mark_dead_runs_failed():
            log.warning("run %s had died without finishing; marked failed", run_id)
        art.sweep_stale_tmp(self.store.root / "stages")

        run_id = art.new_run_id()
        run_dir = self.store.run_dir(run_id)
        run_dir.mkdir(parents=True)
        (run_dir / "config.yaml").write_text(dump_yaml(self.config), encoding="utf-8")
        handler = _attach_run_log(run_dir / "run.log")
        seed = self.config.base.seed
        manifest: dict[str, Any] = {
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
                    manifest["served"] = stage.resolve(stage.publish)(self.store, run_id, outcome.output)
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
            log.info("run %s %s in %.1f s; manifest %s", run_id, manifest["status"], manifest["duration_s"], run_dir / art.MANIFEST)
            _detach_run_log(handler)
        return manifest

    # ------------------------------------------------------------------------
    def _parse_force(self, force: Sequence[str]) -> set[str]:
        names = {s.name for s in self.stages}
        forced: set[str] = set()
        for item in force:
            for token in item.split(","):
                token = token.strip()
                if token == "all":
                    forced |= names
                elif token:
                    forced.update(parse_stage_selection(token, self.stages))
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
        record = self.store.finished_record(stage.name, fingerprint)
        if record and not forced:
            log.info("stage %s: reused (fingerprint %s, finished by run %s)", stage.name, fingerprint, record.get("run_id"))
            return StageOutcome(stage.name, fingerprint, final, record["output_hash"], True, 0.0, record.get("summary", {}))
        work = self.store.work_dir(stage.name, fingerprint)
        resumed = work.exists() and any(work.iterdir())
        work.mkdir(parents=True, exist_ok=True)
        why = "forced" if forced and record else "resuming partial state" if resumed else "no finished output with this fingerprint"
        log.info("stage %s: running (fingerprint %s; %s)", stage.name, fingerprint, why)
        func = stage.resolve()
        start = time.monotonic()
        try:
            with art.staging_dir(final) as tmp:
                io = StageIO(out_dir=tmp, work_dir=work, inputs={u: upstream[u].output for u in stage.upstream}, run_id=run_id, run_dir=run_dir,
                             cache_dir=self.config.paths.download_cache)
                summary = func(io, **{name: self.config.section(name) for name in stage.sections}) or {}
                duration = time.monotonic() - start
                output_hash = art.hash_tree(tmp)
                art.write_json_atomic(
                    tmp / art.STAGE_RECORD,
                    {"stage": stage.name, "fingerprint": fingerprint, "output_hash": output_hash, "run_id": run_id,
                     "finished": art.now_iso(), "duration_s": round(duration, 3), "summary": summary},
                )
        except MetalDefectError as exc:
            log.error("stage %s failed after %.1f s: %s", stage.name, time.monotonic() - start, exc)
            raise
        except KeyboardInterrupt:
            log.error("stage %s interrupted after %.1f s; partial state kept in %s", stage.name, time.monotonic() - start, work)
            raise
        except Exception:
            log.error("stage %s failed after %.1f s", stage.name, time.monotonic() - start)
            raise
        shutil.rmtree(work, ignore_errors=True)
        log.info("stage %s: done in %.1f s -> %s", stage.name, duration, final)
        return StageOutcome(stage.name, fingerprint, final, output_hash, False, duration, summary)

    def _save(self, run_dir: Path, manifest: dict[str, Any]) -> None:
        art.write_json_atomic(run_dir / art.MANIFEST, manifest)


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
