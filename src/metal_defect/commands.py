"""What `runs`, `promote` and `evaluate DIR` do (the CLI only parses and prints)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import logging
from pathlib import Path
from typing import Any

from metal_defect import artifacts as art
from metal_defect import served as served_model
from metal_defect.config import Config
from metal_defect.errors import ArtifactError, ConfigError, DataError
from metal_defect.review import NOT_VALID, ReviewStore, review_disabled
from metal_defect.serving.images import walked_file_problem

log = logging.getLogger(__name__)


def list_runs(config: Config, limit: int = 20) -> str:
    """A table of the last `limit` runs: status, duration, stages run/reused, model and metrics."""
    store = art.ArtifactStore(config.paths.artifacts)
    store.mark_dead_runs_failed()
    served = (served_model.read_pointer(store) or {}).get("run_id")
    rows = [("", "run", "status", "started", "duration", "ran/reused", "model", "val F1", "test acc", "test F1", "reviewed acc",
             "served before: test / reviewed acc")]
    for run_id in store.run_ids()[-limit:]:
        try:
            m = store.manifest(run_id)
        except ArtifactError:
            continue
        stages = m.get("stages", {}).values()
        metrics = m.get("metrics", {})
        rows.append((
            "*" if run_id == served else "", run_id, m.get("status", "?"), (m.get("started") or "")[:19].replace("T", " "),
            f"{m['duration_s']:.0f} s" if m.get("duration_s") is not None else "-",
            f"{sum(not s['reused'] for s in stages)}/{sum(s['reused'] for s in stages)}",
            metrics.get("best_model", "-") + (" (WEAK)" if metrics.get("weak_model") else ""),
            _fmt(metrics.get("valid_macro_f1")), _fmt(metrics.get("test_accuracy")), _fmt(metrics.get("test_macro_f1")),
            _fmt(metrics.get("reviewed_accuracy")), _served_before(m.get("served") or {}),
        ))
    if len(rows) == 1:
        return f"no runs yet under {store.runs_dir}; start one with `python main.py`"
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
    note = "\n(WEAK) = flagged weak_model by the quality gate; its model card says why" if any("(WEAK)" in str(r[6]) for r in rows) else ""
    return "\n".join(lines) + ("\n* = served model" if served else "\nno model is served yet") + note


def _served_before(served: dict[str, Any]) -> str:
    """The model this run replaced, on this run's test split and reviewed slice ("-" when it replaced none)."""
    previous = served.get("previous") or {}
    if not previous:
        return "-"
    figures = [_fmt(previous[split]["before"]["accuracy"]) if split in previous else "-" for split in ("test", "reviewed")]
    return f"{figures[0]} / {figures[1]} (run {previous['run_id']})"


def _fmt(value: float | None) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def promote(config: Config, run_id: str) -> str:
    """Serve the evaluated model of `run_id` (roll back or forward)."""
    return served_model.promote(art.ArtifactStore(config.paths.artifacts), run_id)


def evaluate(config: Config, folder: Path, run_id: str | None, out: Path | None) -> str:
    """Evaluate the served model, or run `run_id`'s, on a labelled folder; returns a summary line."""
    # deliberately lazy: these start TensorFlow, which `runs`, `promote` and --help never need
    from metal_defect.folder_evaluation import evaluate_folder
    from metal_defect.metrics import caption
    from metal_defect.serving.predictor import Predictor

    folder = Path(folder).resolve()
    if not folder.exists():
        raise DataError(f"evaluate: {folder} does not exist")
    store = art.ArtifactStore(config.paths.artifacts)
    predictor = Predictor.from_bundle(served_model.resolve_bundle(store, run_id))
    out = out or store.root / "evaluations" / f"{dt.datetime.now():%Y%m%d-%H%M%S}-{folder.name.replace(' ', '_')}"
    report = evaluate_folder(folder, predictor, config, Path(out))
    lines = [f"{predictor.spec.model_name} on {folder}: {caption(report['n'], report['errors'])}, macro F1 {report['macro_f1']:.4f}, "
             f"ECE {report['calibration']['ece']:.4f}; results in {out}"]
    lines += skipped_lines(report["skipped_at_ingestion"], report["unreadable"], predictor.class_names)
    skipped = len(report["skipped_at_ingestion"]) + len(report["unreadable"])
    if skipped > report["n"]:
        log.warning("MOST OF %s WAS NOT EVALUATED: %d of %d files skipped; the numbers describe only %d images (see the list above)",
                    folder, skipped, skipped + report["n"], report["n"])
    return "\n".join(lines)


def skipped_lines(skipped: list[dict], unreadable: list[dict], class_names: list[str]) -> list[str]:
    """What `evaluate` left out, grouped: unknown class folders with their image counts, then other reasons."""
    from collections import Counter

    from metal_defect.components.c01_data_ingestion import reason_kind

    unknown = Counter(s["unknown_class"] for s in skipped if s.get("unknown_class"))
    reasons = Counter(reason_kind(s["reason"]) for s in skipped if not s.get("unknown_class"))
    reasons.update(reason_kind(u["reason"]) for u in unreadable)
    if not unknown and not reasons:
        return ["no files skipped"]
    lines = [f"{sum(unknown.values()) + sum(reasons.values())} files skipped:"]
    for name, n in unknown.most_common():
        lines.append(f"  {n:5d}  in '{name}': not a class of this model ({', '.join(class_names)}); add an alias in schema.yaml if it is one")
    for reason, n in reasons.most_common():
        lines.append(f"  {n:5d}  {reason}")
    return lines


def proxy_data(config: Config, neu: Path | None, out: Path | None, seed: int) -> str:
    """`main.py proxy-data`: write the proxy data set (see proxy.py); returns a summary line."""
    from metal_defect import proxy

    neu = Path(neu) if neu else Path(config.data_ingestion.source).parent
    images, annotations = neu / "images", neu / "annotations"
    if not images.is_dir() or not annotations.is_dir():
        raise DataError(f"proxy-data: {neu} must hold images/<class>/ and annotations/*.xml (the NEU-DET layout); pass --neu DIR")
    out = Path(out) if out else config.paths.artifacts / "datasets" / "neu-proxy"
    summary = proxy.make_proxy(images, annotations, out, seed)
    counts = ", ".join(f"{c}={n}" for c, n in summary["counts"].items())
    return f"proxy data set: {summary['images']} images in {out} ({counts}); summary in {proxy.manifest_path(out)}"


def expand_paths(arguments: list[str], extensions: tuple[str, ...]) -> tuple[list[str], list[dict[str, str]]]:
    """Files named, folders walked recursively for `extensions`, globs expanded.

    Returns the files to answer (in order, without repeats) and the files skipped in folders
    (other extensions). A named file is always answered, whatever its extension: if it is
    not an image its answer says so.
    """
    import glob

    wanted = {e.lower() for e in extensions}
    files: list[str] = []
    skipped: list[dict[str, str]] = []
    for argument in arguments:
        matches = sorted(glob.glob(argument, recursive=True)) if glob.has_magic(argument) else [argument]
        if not matches:
            files.append(argument)  # answered with "no such file"
        for match in matches:
            path = Path(match)
            if path.is_dir():
                for child in sorted(path.rglob("*")):
                    if child.is_dir() and not child.is_symlink():
                        continue
                    problem = walked_file_problem(child)
                    if problem:
                        skipped.append({"path": str(child), "reason": problem})
                    elif child.suffix.lower() in wanted:
                        files.append(str(child))
                    else:
                        skipped.append({"path": str(child), "reason": f"not an image extension of this model ({', '.join(sorted(wanted))})"})
            else:
                files.append(str(path))
    seen: set[str] = set()
    return [f for f in files if not (f in seen or seen.add(f))], skipped


def check_outputs(outputs: dict[str, Path | None], inputs: list[str], log_file: Path) -> None:
    """Refuse, before any work, outputs that would overwrite an input or the predictions log, or
    that cannot be what they are asked to be (a folder as a file, a device, a file as a folder)."""
    protected = {Path(p).resolve(): f"the input {p}" for p in inputs} | {log_file.resolve(): f"the predictions log {log_file}"}
    for option, target in outputs.items():
        if target is None:
            continue
        target = Path(target)
        folder = option == "--heatmaps"
        resolved = target.resolve()
        if resolved in protected:
            raise ConfigError(f"predict {option} {target}: that is {protected[resolved]}; write the answers somewhere else")
        if folder and target.exists() and not target.is_dir():
            raise ConfigError(f"predict {option} {target}: a file, not a folder; give a folder for the heatmap images")
        if not folder and target.exists() and not target.is_file():
            raise ConfigError(f"predict {option} {target}: {'a folder' if target.is_dir() else 'not a regular file'}; give a file name")


def predict(config: Config, arguments: list[str], model: str | None, csv_path: Path | None, json_path: Path | None,
            threshold: float | None, backend: str = "compiled", heatmaps: Path | None = None, review: bool = True) -> tuple[str, int]:
    """`main.py predict`: answer every image; returns the screen table and the exit code (3 if a named file failed).
    Flagged answers keep their images in the review queue unless `review` is false or METAL_DEFECT_NO_REVIEW=1."""
    import csv
    import json

    from metal_defect.serving.predictor import PREDICTIONS_LOG, Predictor, append_log, columns

    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"predict --threshold {threshold}: a confidence threshold lies between 0 and 1")
    store = art.ArtifactStore(config.paths.artifacts)
    predictor = Predictor.from_bundle(served_model.resolve_bundle(store, model), backend)
    files, skipped = expand_paths(arguments, predictor.spec.extensions)
    check_outputs({"--csv": csv_path, "--json": json_path, "--heatmaps": heatmaps}, files, store.root / PREDICTIONS_LOG)
    if not files:
        raise DataError(f"predict: no image files in {' '.join(arguments)} (extensions {', '.join(predictor.spec.extensions)})")
    answers = predictor.answer_paths(files, threshold)
    if heatmaps is not None:
        written = predictor.write_heatmaps(answers, heatmaps)
        log.info("%d heatmap overlays in %s", written, heatmaps)
    names = predictor.class_names
    rows = [a.row(names, heatmaps is not None) for a in answers]
    for target, write in ((csv_path, "csv"), (json_path, "json")):
        if target is None:
            continue
        if write == "csv":
            buffer = io.StringIO(newline="")
            writer = csv.DictWriter(buffer, fieldnames=columns(names, heatmaps is not None))
            writer.writeheader()
            writer.writerows(rows)
            text = buffer.getvalue()
        else:
            text = json.dumps(rows, indent=2) + "\n"
        try:  # temp file + rename: a kill leaves the earlier file whole, never a cut one
            art.write_text_atomic(Path(target), text)
        except OSError as exc:
            raise ArtifactError(f"predict --{write} {target}: cannot write it ({exc.strerror or exc}); the answers are in "
                                f"{store.root / PREDICTIONS_LOG}") from exc
    append_log(store.root / PREDICTIONS_LOG, answers, source="cli", rotate_mb=config.review.log_rotate_mb)
    queued = queue_flagged(config, answers, source="cli") if review and not review_disabled() else []
    table = _answer_table(answers)
    flagged = sum(a.flagged for a in answers)
    failed = sum(a.error is not None for a in answers)
    spec = predictor.spec
    lines = [f"model {spec.model_name} (run {spec.run_id or '-'}, {predictor.bundle}); uncertain below "
             f"{predictor.threshold if threshold is None else threshold:.3f}" + (" -- WEAK MODEL: " + "; ".join(spec.weak_reasons) if spec.weak_model else ""),
             table, f"{len(answers)} files: {len(answers) - flagged - failed} answered with a class, {flagged} flagged, {failed} unreadable"]
    if queued:
        lines.append(f"{sum(ok for ok, _ in queued)} of {flagged} flagged images queued for review in {config.paths.review_root} "
                     "(`python main.py review list`)")
        lines += [message for ok, message in queued if not ok]
    if skipped:
        other = [entry for entry in skipped if not entry["reason"].startswith("not an image extension")]
        if len(other) < len(skipped):
            example = next(entry["path"] for entry in skipped if entry not in other)
            lines.append(f"{len(skipped) - len(other)} other files in the folders skipped (not image extensions), e.g. {example}")
        lines += [f"left out: {entry['path']}: {entry['reason']}" for entry in other[:20]]
        if len(other) > 20:
            lines.append(f"... and {len(other) - 20} more files left out (the log lists them all)")
            log.info("left out: %s", "; ".join(f"{e['path']}: {e['reason']}" for e in other[20:]))
    return "\n".join(lines), (3 if failed else 0)


def review_store(config: Config) -> ReviewStore:
    """The review store paths.review names, with the configured cap."""
    return ReviewStore(config.paths.review_root, config.review.max_items, config.review.max_mb)


def queue_flagged(config: Config, answers: list, source: str) -> list[tuple[bool, str]]:
    """Put every flagged answer's image in the review queue: its bytes as read again, kept only when they are still
    the bytes that were answered (same sha256); (queued, message) per flagged answer."""
    import hashlib

    store = review_store(config)
    results = []
    for answer in answers:
        if not answer.flagged or answer.error:
            continue
        try:
            data = Path(answer.path).read_bytes()
        except OSError as exc:
            results.append((False, f"{answer.path}: not queued for review: cannot read it again ({exc.strerror or exc})"))
            continue
        if answer.sha256 and hashlib.sha256(data).hexdigest() != answer.sha256:
            results.append((False, f"{answer.path}: not queued for review: the file changed after it was answered"))
            continue
        results.append(store.add(data, answer.path, dataclasses.asdict(answer), why=answer.verdict, source=source))
    return results


def review(config: Config, args: Any) -> str:
    """`main.py review list | label | export | stats`."""
    import json

    store = review_store(config)
    if args.action == "list":
        items = sorted(store.items(), key=lambda item: item.time, reverse=True)
        if args.status != "all":
            items = [i for i in items if (i.decision is None) == (args.status == "unreviewed")]
        if not items:
            return f"the review queue in {store.root} is empty" + ("" if args.status == "all" else f" ({args.status})")
        rows = [("sha256", "file", "verdict", "confidence", "model label", "status", "by")]
        rows += [(i.sha256[:12], i.name, i.why if i.why == "disputed" else (i.verdict or "-"),
                  f"{i.confidence:.3f}" if i.confidence is not None else "-", i.label or "-", i.status,
                  (i.decision or {}).get("reviewer", "")) for i in items]
        widths = [max(len(str(r[c])) for r in rows) for c in range(len(rows[0]))]
        return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)
    if args.action == "label":
        item = store.find(args.sha256)
        classes = list(item.probabilities) + (list(config.schema.classes) if isinstance(config.schema.classes, list) else [])
        decision = store.label(args.sha256, args.label, list(dict.fromkeys(classes)), args.by)
        return f"{decision['name']} ({decision['sha256'][:12]}): {decision['class']}, by {decision['reviewer']} (the model said {decision['model_label']})"
    if args.action == "add":
        return "\n".join(review_add(config, store, args.paths, args.label, args.by))
    if args.action == "export":
        counts = store.export(args.destination)
        total = sum(counts.values())
        return (f"{total} labelled images exported to {args.destination}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
                if total else f"no labelled images to export (not-valid ones are left out: {NOT_VALID})")
    return json.dumps(store.stats(), indent=2)


def review_add(config: Config, store: Any, paths: list[Path], label: str, reviewer: str | None) -> list[str]:
    """`review add FILE... --label CLASS`: the command line's "this answer is wrong": each image is answered by the served
    model, queued as disputed with the user's class, and labelled with it in the same step."""
    import hashlib

    from metal_defect.serving.predictor import Predictor

    predictor = Predictor.from_bundle(served_model.resolve_bundle(art.ArtifactStore(config.paths.artifacts), None))
    if label not in predictor.class_names:
        raise ConfigError(f"review add: unknown class '{label}'; the served model's classes are {', '.join(predictor.class_names)}")
    lines = []
    for path in paths:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            lines.append(f"{path}: not added: cannot read it ({exc.strerror or exc})")
            continue
        answer = predictor.answer_paths([str(path)])[0]
        if answer.error:
            lines.append(f"{path}: not added: {answer.error}")
            continue
        queued, message = store.add(data, str(path), dataclasses.asdict(answer), why="disputed", source="cli", user_class=label)
        if queued:
            store.label(hashlib.sha256(data).hexdigest(), label, predictor.class_names, reviewer)
            lines.append(f"{Path(path).name}: labelled {label} (the model said {answer.verdict})")
        else:
            lines.append(message)
    return lines


def _answer_table(answers: list) -> str:
    rows = [("file", "verdict", "label", "confidence", "ood", "note")]
    for a in answers:
        rows.append((Path(a.path).name, a.verdict or "ERROR", a.label or "-", f"{a.confidence:.3f}" if a.confidence is not None else "-",
                     f"{a.ood_score:.3f}" if a.ood_score is not None else "-", a.error or a.reason))
    widths = [min(max(len(str(r[i])) for r in rows), 40) for i in range(5)]
    return "\n".join("  ".join(str(v)[:40].ljust(w) for v, w in zip(r[:5], widths)) + ("  " + r[5] if r[5] else "") for r in rows).rstrip()


def export(config: Config, destination: Path, model: str | None) -> str:
    """`main.py export DIR`: a self-contained bundle with model.keras, model.tflite and a sha256 manifest."""
    from metal_defect.serving.export import export_bundle
    from metal_defect.serving.predictor import Predictor

    store = art.ArtifactStore(config.paths.artifacts)
    target = Path(destination).resolve()
    if target == store.root.resolve() or store.root.resolve() in target.parents:
        raise ArtifactError(f"export {destination}: inside the artifacts folder {store.root}, whose stage outputs and runs "
                            "are never changed in place; export to a folder of its own (e.g. model_bundle)")
    predictor = Predictor.from_bundle(served_model.resolve_bundle(store, model))
    result = export_bundle(predictor, Path(destination))
    return f"exported {predictor.spec.model_name} (run {predictor.spec.run_id or '-'}) to {result['folder']}: {', '.join(result['files'])} + bundle_manifest.json"


def screenshot(config: Config, image: Path | None, out: Path) -> str:
    """`main.py screenshot`: the app answering one image with the served model, as a PNG (the README picture)."""
    import os

    from metal_defect import screenshot as shot
    from metal_defect.components.c03_dataset_loader import read_records

    store = art.ArtifactStore(config.paths.artifacts)
    _, pointer = served_model.served_bundle(store)
    if image is None:
        prepared = Path(store.manifest(pointer["run_id"])["stages"]["data_preprocessing"]["output"])
        tests = [r["source"] for r in read_records(prepared)["records"] if r["split"] == "test"]
        if not tests:
            raise DataError("screenshot: the served run has no test images; give one with --image")
        image = Path(tests[-1])
    env = dict(os.environ, METAL_DEFECT_HOME=str(config.config_dir))
    env.pop("METAL_DEFECT_BUNDLE", None)
    result = shot.capture([Path(image)], Path(out), env)
    return f"{out}: the app answering {Path(image).name} with run {pointer['run_id']} ({result['seconds']} s from upload to answer)"


def tune_worker(config: Config, chief: str | None, worker_id: str | None, wait_s: float) -> str:
    """`main.py tune-worker`: wait for a chief's search, prepare the data from this config, take trials."""
    from metal_defect.components.c07_hyper_tuning.distributed import take_trials, wait_for_chief
    from metal_defect.components.c07_hyper_tuning.space import SearchJob, data_fingerprint
    from metal_defect.config import Recipe
    from metal_defect.pipeline import Runner

    active = wait_for_chief(config.paths.tuning_root, wait_s)
    manifest = Runner(config, command="tune-worker").run("data_ingestion-data_preprocessing")
    prepared = Path(manifest["stages"]["data_preprocessing"]["output"])
    job = SearchJob(active["model"], Recipe.of(config), config.tuning, prepared, data_fingerprint(prepared))
    result = take_trials(job, active, config.paths.tuning_root / active["project"], chief, worker_id)
    return f"worker {result['worker']} ran {len(result['trials'])} trial(s): {', '.join(result['trials']) or 'none'}"
