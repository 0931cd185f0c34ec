"""Benchmarks (run by a command and recorded, not timed tests). Results go to artifacts/bench/.

* `bench data`: ingestion + preprocessing of the configured source (NEU by default), and
  throughput (images/s) on synthetic sets of the same size and 10x larger.
* `bench train`: the full pipeline (every stage forced) once per seed: wall time, test and
  validation accuracy / macro F1; then the training loop's cost against a bare `model.fit`
  of the same model on the same tf.data input (median epoch time of epochs 2..N, the two
  run one after the other, alternating order over the repeats).
* `bench model`: the default custom CNN at `--size` px: parameters, multiply-adds, and the
  latency of one image (uint8 array to probabilities) through a compiled graph with a fixed
  signature, p50/p95 over 200 calls after 10 warm-up calls (file decoding not included).
* `bench datasets`: the same default params on NEU, X-SDD (rgb) and the proxy data set
  (`proxy-data`), each with a fresh config where only the schema changes (`classes: auto`,
  colour mode): test accuracy and macro F1 beside the majority and classical baselines of
  the quality gate, the weak_model flag and the wall time, as JSON and a Markdown table;
  with `--seeds`, one run per seed (split and initialisation) and the mean ± sd per data set.
* `bench predict`: the served model, file bytes to verdict one image at a time (no heatmap)
  over 200 files of the data source after 10 warm-up calls: p50/p95 per path (eager Keras,
  compiled graph, LiteRT), batch throughput, peak RSS, LiteRT-vs-graph probability gap.
* `bench ablate`: the configured recipe with each regulariser switched off in turn (and a few
  alternatives), each trained for `--epochs` epochs: fit of the training images and validation
  scores, a table and the learning curves (see `ablation`).
* `bench history`: the Review page's History section in Chromium over a predictions log of
  `--lines` answers (default 1,000,000, 120 days): seconds from opening the page to both charts drawn.
* `bench reviews`: the review loop on the configured data (see `review_loop`).
* `bench ood`: the served model's verdicts on sets built offline (outlier_sets): NEU test
  and re-encoded copies (must not be flagged), far outliers (blank, noise, photos, inverted
  NEU), near outliers (X-SDD in grayscale at NEU's size); AUROC against max-softmax.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from metal_defect import artifacts as art
from metal_defect import served as served_model
from metal_defect.config import Config, load_config

log = logging.getLogger(__name__)


def run(config: Config, args: Any) -> str:
    out = Path(config.paths.artifacts) / "bench"
    out.mkdir(parents=True, exist_ok=True)
    stamp = f"{dt.datetime.now():%Y%m%d-%H%M%S}"
    from metal_defect.ablation import bench_ablate
    from metal_defect.review_loop import bench_reviews

    result = {"data": bench_data, "train": bench_train, "datasets": bench_datasets, "model": bench_model, "predict": bench_predict,
              "ood": bench_ood, "ablate": bench_ablate, "history": bench_history, "reviews": bench_reviews}[args.what](config, args)
    result["machine"] = machine()
    result["date"] = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    path = out / f"{args.what}-{stamp}.json"
    art.write_json_atomic(path, result)
    art.write_json_atomic(out / f"{args.what}-latest.json", result)
    return json.dumps(result.get("headline", {}), indent=2) + f"\nfull results: {path}"


def machine() -> dict[str, Any]:
    import tensorflow as tf

    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(), **art.cpu_info(),
            "gpus": [d.name for d in tf.config.list_logical_devices("GPU")], "tensorflow": tf.__version__, "python": platform.python_version()}


# ----------------------------------------------------------------------------- data
def _time_data_stages(config: Config, args: Any, source: str, workdir: Path) -> dict[str, Any]:
    from metal_defect.pipeline import Runner

    cfg = derived_config(config, args, [f"data_ingestion.source={source}", f"paths.artifacts={workdir}"])
    started = time.perf_counter()
    manifest = Runner(cfg, command="bench").run("1-2", force=["all"])
    seconds = time.perf_counter() - started
    images = manifest["stages"]["data_ingestion"]["summary"]["images_found"]
    return {"images": images, "seconds": round(seconds, 2), "images_per_second": round(images / seconds, 1),
            "stage_seconds": {k: v["duration_s"] for k, v in manifest["stages"].items()},
            "decode_images_per_second": manifest["stages"]["data_preprocessing"]["summary"]["images_per_second"]}


def bench_data(config: Config, args: Any = None) -> dict[str, Any]:
    from metal_defect import synthetic

    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        tmp_path = Path(tmp)
        real = _time_data_stages(config, args, config.data_ingestion.source, tmp_path / "real")
        classes = tuple(synthetic.PREFIXES)
        results = {"source": real}
        for scale in (1, 10):
            root = synthetic.make_dataset(tmp_path / f"synthetic{scale}", classes=classes, per_class=280 * scale, size=200, ext=".jpg")
            results[f"synthetic_{scale}x"] = _time_data_stages(config, args, str(root), tmp_path / f"s{scale}")
            shutil.rmtree(root)
    flat = results["synthetic_10x"]["images_per_second"] / results["synthetic_1x"]["images_per_second"]
    results["headline"] = {
        "source_images": real["images"], "source_seconds": real["seconds"],
        "synthetic_1x_images_per_second": results["synthetic_1x"]["images_per_second"],
        "synthetic_10x_images_per_second": results["synthetic_10x"]["images_per_second"],
        "throughput_ratio_10x_over_1x": round(flat, 3),
    }
    return results


# ----------------------------------------------------------------------------- train
def bench_train(config: Config, args: Any) -> dict[str, Any]:
    from metal_defect.pipeline import Runner

    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    root = art.new_folder(Path(config.paths.artifacts) / "bench", "train-runs-")
    results: dict[str, Any] = {"params": {"epochs": config.train.epochs, "models": config.train.models, "image_size": config.base.image_size}}
    prepared_dir = None
    if "seeds" not in skip:
        per_seed = {}
        for seed in parse_seeds(args.seeds or "42,43,44"):
            # the training recipe over seeds, without the c07 search (bench datasets measures what tuning adds)
            cfg = derived_config(config, args, [f"base.seed={seed}", f"paths.artifacts={root}", "tuning.enabled=false"])
            started = time.perf_counter()
            manifest = Runner(cfg, command="bench").run(None, force=["all"])
            metrics = manifest["metrics"]
            per_seed[seed] = {"run_id": manifest["run_id"], "pipeline_seconds": round(time.perf_counter() - started, 1),
                              "stage_seconds": {k: v["duration_s"] for k, v in manifest["stages"].items()},
                              **{k: metrics.get(k) for k in ("best_model", "valid_accuracy", "valid_macro_f1", "test_accuracy",
                                                             "test_macro_f1", "test_errors", "test_n", "test_ece")}}
            log.info("bench seed %d: test accuracy %.4f, macro F1 %.4f, %.0f s", seed, metrics["test_accuracy"], metrics["test_macro_f1"],
                     per_seed[seed]["pipeline_seconds"])
            prepared_dir = prepared_dir or Path(manifest["stages"]["data_preprocessing"]["output"])
        results["seeds"] = per_seed
        results["mean_test_accuracy"] = statistics.mean(v["test_accuracy"] for v in per_seed.values())
        results["mean_test_macro_f1"] = statistics.mean(v["test_macro_f1"] for v in per_seed.values())
        results["max_pipeline_seconds"] = max(v["pipeline_seconds"] for v in per_seed.values())
    if "overhead" not in skip:
        if prepared_dir is None:
            cfg = derived_config(config, args, [f"paths.artifacts={root}"])
            prepared_dir = Path(Runner(cfg, command="bench").run("1-2")["stages"]["data_preprocessing"]["output"])
        results["loop_overhead"] = loop_overhead(config, prepared_dir, args.epochs or 5, args.repeats)
    results["headline"] = {k: results[k] for k in ("mean_test_accuracy", "mean_test_macro_f1", "max_pipeline_seconds") if k in results}
    if "seeds" in results:
        results["headline"]["per_seed_test_accuracy"] = {s: v["test_accuracy"] for s, v in results["seeds"].items()}
        results["headline"]["per_seed_test_macro_f1"] = {s: v["test_macro_f1"] for s, v in results["seeds"].items()}
    if "loop_overhead" in results:
        results["headline"]["loop_over_bare_fit"] = results["loop_overhead"]["median_ratio"]
    return results


def loop_overhead(config: Config, prepared_dir: Path, epochs: int, repeats: int) -> dict[str, Any]:
    """Our training loop (all callbacks) vs a bare model.fit: median epoch seconds of epochs 2..N."""
    import keras

    from metal_defect.components import c04_model_builder as builder
    from metal_defect.components.c03_dataset_loader import build_datasets
    from metal_defect.components.c05_callbacks import EpochTimer, learning_rate
    from metal_defect.components.c06_training import HISTORY_FILE, compile_model, pixel_statistics, train_one

    data = build_datasets(prepared_dir, config.data_loader, config.base.seed)
    train = dataclasses.replace(config.train, epochs=epochs, models=config.train.models[:1], verbose=0)
    name = train.models[0]
    callbacks_params = dataclasses.replace(config.callbacks, early_stopping=dataclasses.replace(config.callbacks.early_stopping, enabled=False))

    def ours() -> list[float]:
        with tempfile.TemporaryDirectory(prefix="bench-loop-") as work:
            train_one(name, data, config.base, config.model, callbacks_params, train, Path(work) / name)
            history = json.loads((Path(work) / name / HISTORY_FILE).read_text())
        return [row["epoch_seconds"] for row in history]

    def bare() -> list[float]:
        keras.utils.set_random_seed(config.base.seed)
        built = builder.build_model(name, data.image_shape, len(data.class_names), config.model, pixel_statistics(data["train"].files))
        compile_model(built.model, train, learning_rate(config.callbacks, train.learning_rate, data.steps("train"), epochs))
        fit = built.model.fit(data["train"].dataset, validation_data=data["valid"].dataset, epochs=epochs, callbacks=[EpochTimer()],
                              verbose=0, shuffle=False)
        return list(fit.history["epoch_seconds"])

    pairs = []
    for repeat in range(repeats):
        order = (("ours", ours), ("bare", bare)) if repeat % 2 == 0 else (("bare", bare), ("ours", ours))
        measured = {label: statistics.median(fn()[1:]) for label, fn in order}
        pairs.append({**{k: round(v, 3) for k, v in measured.items()}, "ratio": round(measured["ours"] / measured["bare"], 4),
                      "order": [label for label, _ in order]})
        log.info("loop overhead repeat %d: ours %.2f s/epoch, bare %.2f s/epoch, ratio %.3f", repeat + 1, measured["ours"], measured["bare"],
                 measured["ours"] / measured["bare"])
    return {"model": name, "epochs": epochs, "repeats": pairs, "median_ratio": round(statistics.median(p["ratio"] for p in pairs), 4)}


# ----------------------------------------------------------------------------- datasets
def derived_config(config: Config, args: Any, overrides: list[str]) -> Config:
    """The configuration of one benchmark run: the command line's overrides, then this run's.

    Without the first, `bench datasets base.resize=stretch` would silently measure the default."""
    return load_config(config.config_dir, [*(getattr(args, "resolved_overrides", None) or []), *overrides])


def dataset_overrides(config: Config, which: str) -> list[str]:
    """Overrides that point the default params at one benchmark data set (only the schema changes)."""
    neu = Path(config.data_ingestion.source)
    if which == "neu":
        return []
    if which == "xsdd":
        return [f"data_ingestion.source={neu.parents[1] / 'xsdd' / 'images'}", "schema.classes=auto", "schema.color_mode=rgb",
                "base.color_mode=rgb", "schema.aliases={}"]
    if which == "magnetic-tile":  # heatmap pointing against its defect masks; it has no boxes
        tiles = neu.parents[1] / "magnetic-tile"
        return [f"data_ingestion.source={tiles / 'images'}", "schema.classes=auto", "schema.aliases={}", f"evaluation.masks={tiles / 'masks'}",
                "evaluation.annotations=null"]
    if which == "proxy":
        from metal_defect import proxy

        folder = Path(config.paths.artifacts) / "datasets" / "neu-proxy"
        proxy.make_proxy(neu.parent / "images", neu.parent / "annotations", folder, seed=0)
        return [f"data_ingestion.source={folder}", "schema.classes=auto", "schema.aliases={}"]
    raise ValueError(f"unknown benchmark data set {which}: use neu, xsdd, magnetic-tile or proxy")


def parse_seeds(text: str) -> list[int]:
    """'42,43,44' -> [42, 43, 44]; a clear error for anything else."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--seeds {text!r}: expected whole numbers separated by commas, e.g. 42,43,44") from None
    if not seeds:
        raise ValueError("--seeds is empty: give at least one seed, e.g. 42")
    return seeds


def bench_datasets(config: Config, args: Any) -> dict[str, Any]:
    """The default params on each data set (and seed): the served model beside the quality gate's baselines."""
    from metal_defect.pipeline import Runner

    root = art.new_folder(Path(config.paths.artifacts) / "bench", "datasets-")
    seeds = parse_seeds(args.seeds) if args.seeds else [config.base.seed]
    tuning = {"on": ["tuning.enabled=true"], "off": ["tuning.enabled=false"]}.get(args.tuning, [])
    results: dict[str, Any] = {}
    for which in [w.strip() for w in args.datasets.split(",") if w.strip()]:
        runs = {}
        for seed in seeds:
            out = root / which if len(seeds) == 1 else root / which / f"seed-{seed}"
            cfg = derived_config(config, args, [*dataset_overrides(config, which), f"base.seed={seed}", f"paths.artifacts={out}", *tuning])
            started = time.perf_counter()
            manifest = Runner(cfg, command="bench").run(None, force=["all"])
            runs[seed] = _dataset_row(manifest, time.perf_counter() - started)
            r = runs[seed]
            log.info("bench %s, seed %d: test accuracy %.4f, macro F1 %.4f (classical %.4f, majority %.4f)%s, %.0f s", which, seed,
                     r["test_accuracy"], r["test_macro_f1"], r["classical_macro_f1"], r["majority_macro_f1"], " WEAK" if r["weak_model"] else "",
                     r["pipeline_seconds"])
        results[which] = {"seeds": runs, "summary": summarise_seeds(runs)}
    table = datasets_table(results)
    (root / "table.md").write_text(table, encoding="utf-8")
    return {"datasets": results, "table": table, "headline": {k: v["summary"] for k, v in results.items()}}


def _dataset_row(manifest: dict[str, Any], seconds: float) -> dict[str, Any]:
    from metal_defect.components.c06_evaluation.evaluate import GATE_FILE
    from metal_defect.components.c06_evaluation.heatmaps import POINTING_FILE

    m = manifest["metrics"]
    tune_summary = manifest["stages"]["tune"]["summary"]
    base, tuned = manifest["stages"]["evaluation"]["summary"]["metrics"], tune_summary.get("metrics", {})
    evaluation = Path(manifest["stages"]["evaluation"]["output"])
    gate = json.loads((evaluation / GATE_FILE).read_text())
    pointing_file = evaluation / "test" / POINTING_FILE
    pointing = json.loads(pointing_file.read_text())["overall"] if pointing_file.is_file() else None
    return {"classical_macro_f1_ci95": gate["classical"]["macro_f1_ci95"], "pointing_strict": pointing and pointing["strict"],
            "pointing_chance": pointing and pointing["chance"], "pointing_n": pointing and pointing["n"],
            "run_id": manifest["run_id"], "images": manifest["stages"]["data_preprocessing"]["summary"]["images_prepared"],
            "test_n": m.get("test_n"), "test_accuracy": m.get("test_accuracy"), "test_macro_f1": m.get("test_macro_f1"),
            "classical_accuracy": gate["classical"]["accuracy"], "classical_macro_f1": gate["classical"]["macro_f1"],
            "plain_lbp_macro_f1": gate.get("plain_lbp", {}).get("macro_f1"),  # gates before 2026-12-06 have no plain LBP baseline
            "majority_accuracy": gate["majority"]["accuracy"], "majority_macro_f1": gate["majority"]["macro_f1"],
            "weak_model": gate["weak_model"], "weak_reasons": gate["reasons"],
            "train_accuracy": gate.get("train_accuracy"), "train_accuracy_last_epoch": gate["train_accuracy_last_epoch"],
            "served": m.get("served", "base"), "base_valid_macro_f1": base.get("valid_macro_f1"), "base_test_macro_f1": base.get("test_macro_f1"),
            "tuned_valid_macro_f1": tuned.get("tuned_valid_macro_f1"), "tuned_test_macro_f1": tuned.get("tuned_test_macro_f1"),
            "trials_completed": tune_summary.get("trials_completed", 0),
            "pipeline_seconds": round(seconds, 1), "stage_seconds": {k: v["duration_s"] for k, v in manifest["stages"].items()}}


def summarise_seeds(runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample standard deviation over seeds (sd is null for one seed), the weak_model count and the slowest run."""
    summary: dict[str, Any] = {"seeds": list(runs), "weak_model_runs": sum(bool(r["weak_model"]) for r in runs.values()),
                               "max_pipeline_seconds": max(r["pipeline_seconds"] for r in runs.values())}
    for key in ("test_accuracy", "test_macro_f1", "classical_macro_f1"):
        values = [r[key] for r in runs.values()]
        summary[f"mean_{key}"] = statistics.mean(values)
        summary[f"sd_{key}"] = statistics.stdev(values) if len(values) > 1 else None
    return summary


# scores a row may lack (no search ran, an older gate): shown as "-"
_OPTIONAL_SCORES = ("base_valid_macro_f1", "tuned_valid_macro_f1", "base_test_macro_f1", "tuned_test_macro_f1", "train_accuracy", "plain_lbp_macro_f1")


def datasets_table(results: dict[str, Any]) -> str:
    """Markdown: one row per data set and seed, and a mean row for a data set run with several seeds."""
    rows = ["| data set | seed | images | test n | served model: accuracy, macro F1 | served (macro F1 base / tuned: validation; test; trials) | "
            "classical baseline (95 % CI) | plain LBP baseline | majority class | own training images | heatmap pointing (chance) | weak_model | pipeline |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for which, result in results.items():
        for seed, r in result["seeds"].items():
            shown = {key: "-" if r.get(key) is None else f"{r[key]:.3f}" for key in _OPTIONAL_SCORES}
            low, high = r.get("classical_macro_f1_ci95") or (float("nan"), float("nan"))
            fit, plain = shown["train_accuracy"], shown["plain_lbp_macro_f1"]
            pointing = f"{r['pointing_strict']:.3f} ({r['pointing_chance']:.3f}, n={r['pointing_n']})" if r.get("pointing_strict") is not None else "-"
            rows.append(f"| {which} | {seed} | {r['images']} | {r['test_n']} | {r['test_accuracy']:.1%}, {r['test_macro_f1']:.3f} | "
                        f"{r['served']} ({shown['base_valid_macro_f1']} / {shown['tuned_valid_macro_f1']}; {shown['base_test_macro_f1']} / "
                        f"{shown['tuned_test_macro_f1']}; {r['trials_completed']}) | "
                        f"{r['classical_accuracy']:.1%}, {r['classical_macro_f1']:.3f} ({low:.3f}–{high:.3f}) | {plain} | "
                        f"{r['majority_accuracy']:.1%}, {r['majority_macro_f1']:.3f} | {fit} | {pointing} | "
                        f"{'yes' if r['weak_model'] else 'no'} | {r['pipeline_seconds'] / 60:.1f} min |")
        s = result["summary"]
        if len(s["seeds"]) > 1:
            rows.append(f"| **{which}** | mean of {len(s['seeds'])} | | | {s['mean_test_accuracy']:.1%} ± {s['sd_test_accuracy']:.1%}, "
                        f"**{s['mean_test_macro_f1']:.3f} ± {s['sd_test_macro_f1']:.3f}** | | {s['mean_classical_macro_f1']:.3f} | | | "
                        f"| | {s['weak_model_runs']} of {len(s['seeds'])} | ≤ {s['max_pipeline_seconds'] / 60:.1f} min |")
    return "\n".join(rows) + "\n"


# ----------------------------------------------------------------------------- history
def bench_history(config: Config, args: Any) -> dict[str, Any]:
    """Open the Review page on a large synthetic predictions log and time it until its two History charts are drawn."""
    import random

    import yaml

    from metal_defect.screenshot import free_port, start_app, time_page

    lines = args.lines or 1_000_000
    root = Path(tempfile.mkdtemp(prefix="bench-history-"))
    artifacts = root / "artifacts"
    artifacts.mkdir()
    rng = random.Random(0)
    today = dt.datetime.now(dt.timezone.utc)
    verdicts = ["crazing", "inclusion", "patches", "scratches", "uncertain", "out_of_distribution"]
    with open(artifacts / "predictions.jsonl", "w", encoding="utf-8") as handle:  # the fields and order append_log writes
        for i in range(lines):
            when = today - dt.timedelta(days=120 * (lines - i) / lines)
            handle.write(json.dumps({"time": when.isoformat(timespec="seconds"), "source": "app", "file": f"img-{i}.png",
                                     "path": f"img-{i}.png", "sha256": f"{i:064x}", "label": "crazing",
                                     "verdict": rng.choice(verdicts), "confidence": 0.9}) + "\n")
    size_mb = (artifacts / "predictions.jsonl").stat().st_size / 1e6
    home = root / "home"
    shutil.copytree(Path(config.config_dir), home, ignore=shutil.ignore_patterns("artifacts", "logs", ".git", ".venv", "*.egg-info", "src",
                                                                               "tests", "docs", "research"))
    settings = yaml.safe_load((home / "config" / "config.yaml").read_text())
    settings["paths"] |= {"artifacts": str(artifacts), "review": str(root / "review"), "logs": str(root / "logs")}
    (home / "config" / "config.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    port = free_port()
    server = start_app(dict(os.environ, METAL_DEFECT_HOME=str(home), PYTHONUNBUFFERED="1"), port)
    try:
        shot = Path(config.paths.artifacts) / "bench" / "history-page.png"
        seconds = time_page(f"http://127.0.0.1:{port}/review", "[data-testid='stVegaLiteChart'] canvas, [data-testid='stVegaLiteChart'] svg",
                            2, shot)
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)
    log.info("history page over %d lines (%.0f MB): %s s per visit", lines, size_mb, seconds)
    return {"lines": lines, "log_mb": round(size_mb, 1), "seconds_per_visit": seconds, "screenshot": str(shot),
            "headline": {"lines": lines, "first_visit_s": seconds[0], "median_s": statistics.median(seconds)}}


# ----------------------------------------------------------------------------- model
def bench_model(config: Config, args: Any) -> dict[str, Any]:
    import numpy as np
    import tensorflow as tf

    from metal_defect.components import c04_model_builder as builder

    channels = 1 if config.base.color_mode == "grayscale" else 3
    shape = (args.size, args.size, channels)
    model = builder.build_model("custom_cnn", shape, 6, config.model).model
    counts = builder.parameter_counts(model)

    @tf.function(input_signature=[tf.TensorSpec((1, *shape), tf.uint8)])
    def predict(image: Any) -> Any:
        return model(image, training=False)

    images = np.random.default_rng(0).integers(0, 256, (210, 1, *shape), dtype=np.uint8)
    for image in images[:10]:
        predict(image).numpy()
    times = []
    for image in images[10:]:
        started = time.perf_counter()
        predict(image).numpy()
        times.append((time.perf_counter() - started) * 1000)
    result = {"size": args.size, "channels": channels, "pooling": config.model.custom_cnn.pooling, **counts,
              "compiled_p50_ms": round(float(np.percentile(times, 50)), 3), "compiled_p95_ms": round(float(np.percentile(times, 95)), 3)}
    result["headline"] = dict(result)
    return result


# ----------------------------------------------------------------------------- predict
def _served_predictor(config: Config, args: Any, backend: str = "compiled") -> Any:
    from metal_defect.serving.predictor import Predictor

    return Predictor.from_bundle(served_model.resolve_bundle(art.ArtifactStore(config.paths.artifacts), getattr(args, "model", None)), backend)


def _image_files(folder: Path, extensions: tuple[str, ...], n: int) -> list[Path]:
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in extensions)
    step = max(1, len(files) // n)
    return files[::step][:n]


def bench_predict(config: Config, args: Any) -> dict[str, Any]:
    """File bytes to verdict for one image at a time (no heatmap): p50/p95 per path, batch throughput, peak memory."""
    import resource
    import tempfile

    import numpy as np

    from metal_defect.serving.bundle import TFLITE_FILE
    from metal_defect.serving.export import LiteRtRunner, export_litert

    predictor = _served_predictor(config, args)
    files = _image_files(Path(config.data_ingestion.source), predictor.spec.extensions, 200)
    if len(files) < 20:
        raise art.ArtifactError(f"bench predict: fewer than 20 images under {config.data_ingestion.source}")
    payloads = [(str(f), f.read_bytes()) for f in files]

    def latency(answer: Any) -> dict[str, float]:
        for name, data in payloads[:10]:
            answer(data, name)
        times = []
        for name, data in payloads:
            started = time.perf_counter()
            answer(data, name)
            times.append((time.perf_counter() - started) * 1000)
        return {"p50_ms": round(float(np.percentile(times, 50)), 3), "p95_ms": round(float(np.percentile(times, 95)), 3), "n": len(times)}

    paths: dict[str, Any] = {}
    predictor.backend = "eager"
    paths["eager"] = latency(predictor.answer_file)
    predictor.backend = "compiled"
    paths["compiled"] = latency(predictor.answer_file)
    with tempfile.TemporaryDirectory() as tmp:
        tflite = (predictor.bundle / TFLITE_FILE) if (predictor.bundle / TFLITE_FILE).is_file() else export_litert(predictor.serving_model(), Path(tmp) / "m.tflite")
        predictor._litert, predictor.backend = LiteRtRunner(tflite, len(predictor.class_names)), "litert"
        paths["litert"] = latency(predictor.answer_file)
        # the same answers? probabilities of the LiteRT model against the compiled graph over the files
        arrays = np.stack([predictor.convert(data)[0] for _, data in payloads])
        lite = predictor.raw_probabilities(arrays, 32)
    predictor.backend = "compiled"
    compiled = predictor.raw_probabilities(arrays, 32)
    started = time.perf_counter()
    predictor.answer_paths([str(f) for f in files], batch_size=32)
    batch_seconds = time.perf_counter() - started
    default = min(("compiled", "litert"), key=lambda k: paths[k]["p50_ms"])
    result = {"p50_ms": paths[default]["p50_ms"], "p95_ms": paths[default]["p95_ms"], "default_path": default,
              "images_per_second": round(len(files) / batch_seconds, 1), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              "paths": paths, "files": len(files), "model": predictor.spec.model_name, "image_size": predictor.spec.image_size,
              "litert_max_abs_diff": float(np.abs(lite - compiled).max()), "litert_same_label": bool((lite.argmax(1) == compiled.argmax(1)).all())}
    result["headline"] = {k: result[k] for k in ("p50_ms", "p95_ms", "default_path", "images_per_second", "peak_rss_mb", "litert_max_abs_diff")}
    return result


# ----------------------------------------------------------------------------- ood
def outlier_sets(neu_files: list[Path], xsdd: Path, out: Path, size: tuple[int, int] = (200, 200)) -> dict[str, list[Path]]:
    """Write the OOD evaluation sets, each re-encoded as grayscale BMP at NEU's size so that size and format give nothing away.

    in-distribution variants of NEU test images: BMP, grayscale PNG, 256 px JPEG; far outliers:
    blank, noise, scikit-learn's sample photos (grey crops), inverted NEU; near: X-SDD in grayscale.
    """
    import numpy as np
    from PIL import Image, ImageOps
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(0)
    sets: dict[str, list[Path]] = {}

    def save(name: str, index: int, image: Image.Image, fmt: str = "bmp") -> None:
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{index:04d}.{fmt}"
        image.save(path)
        sets.setdefault(name, []).append(path)

    for i, f in enumerate(neu_files):
        grey = Image.open(f).convert("L")
        save("neu_bmp", i, grey)
        save("neu_png", i, grey, "png")
        save("neu_256_jpeg", i, grey.resize((256, 256), Image.Resampling.BILINEAR), "jpg")
        save("far_inverted_neu", i, ImageOps.invert(grey))
    for i in range(50):
        save("far_blank", i, Image.new("L", size, int(rng.integers(0, 256))))
        save("far_noise", i, Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)))
    photos = [Image.fromarray(p).convert("L") for p in load_sample_images().images]
    for i in range(50):
        photo = photos[i % len(photos)]
        x, y = int(rng.integers(0, photo.width - 300)), int(rng.integers(0, photo.height - 300))
        save("far_photos", i, photo.crop((x, y, x + 300, y + 300)).resize(size, Image.Resampling.BILINEAR))
    xsdd_files = sorted(p for p in xsdd.rglob("*") if p.suffix.lower() in (".jpg", ".png", ".bmp"))
    for i, f in enumerate(xsdd_files[:: max(1, len(xsdd_files) // 300)][:300]):
        save("near_xsdd_grey", i, Image.open(f).convert("L").resize(size, Image.Resampling.BILINEAR))
    return sets


def bench_ood(config: Config, args: Any) -> dict[str, Any]:
    """Out-of-distribution check of the served model on sets built offline (see outlier_sets)."""
    import tempfile

    import numpy as np

    from metal_defect.components.c03_dataset_loader import read_records
    from metal_defect.serving import ood
    from metal_defect.serving.predictor import OUT_OF_DISTRIBUTION

    predictor = _served_predictor(config, args)
    store = art.ArtifactStore(config.paths.artifacts)
    run = predictor.spec.run_id or served_model.read_pointer(store)["run_id"]
    prepared = Path(store.manifest(run)["stages"]["data_preprocessing"]["output"])
    test_sources = [Path(r["source"]) for r in read_records(prepared)["records"] if r["split"] == "test"]
    xsdd = Path(config.data_ingestion.source).parents[1] / "xsdd" / "images"
    results: dict[str, Any] = {}
    scores: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        sets = {"neu_test": test_sources, **outlier_sets(test_sources, xsdd, Path(tmp))}
        for name, files in sets.items():
            answers = predictor.answer_paths([str(f) for f in files])
            ok = [a for a in answers if a.error is None]
            scores[name] = np.array([a.ood_score for a in ok], dtype=np.float64)
            scores[name + "_msp"] = np.array([1 - a.confidence for a in ok])
            results[name] = {"n": len(answers), "errors": len(answers) - len(ok),
                             "out_of_distribution": sum(a.verdict == OUT_OF_DISTRIBUTION for a in ok),
                             "flagged": sum(a.flagged for a in ok)}
            results[name]["flagged_share"] = results[name]["flagged"] / max(len(ok), 1)
            log.info("ood %-18s n=%4d flagged %.1f %%", name, len(ok), 100 * results[name]["flagged_share"])
    far = [k for k in results if k.startswith("far_")]
    headline = {"neu_test_flagged_share": results["neu_test"]["flagged_share"],
                "in_distribution_variants_flagged_share": {k: results[k]["flagged_share"] for k in ("neu_bmp", "neu_png", "neu_256_jpeg")},
                "far_flagged_share": {k: results[k]["flagged_share"] for k in far},
                "far_flagged_share_all": sum(results[k]["flagged"] for k in far) / sum(results[k]["n"] - results[k]["errors"] for k in far),
                "near_xsdd_grey_flagged_share": results["near_xsdd_grey"]["flagged_share"],
                "auroc_xsdd_grey_vs_neu_test": ood.auroc(scores["neu_test"], scores["near_xsdd_grey"]),
                "auroc_xsdd_grey_vs_neu_test_max_softmax": ood.auroc(scores["neu_test_msp"], scores["near_xsdd_grey_msp"]),
                "ood_threshold": predictor.spec.ood.threshold if predictor.spec.ood else None,
                "uncertain_threshold": predictor.threshold}
    return {"sets": results, "headline": headline, "rule": predictor.spec.ood.rule if predictor.spec.ood else None}
