"""Command line: `python main.py [run|runs|promote|evaluate|bench] ...` (also `metal-defect`).

Errors a user can act on print one line and exit non-zero (2 config, 3 data, 4 artifact);
the traceback goes to the log file only.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metal_defect.config import PARAMS_FILE
from metal_defect.errors import MetalDefectError

log = logging.getLogger("metal_defect.cli")

LOG_FILE = "metal_defect.log"
EPILOG = """\
examples:
  python main.py                              run every stage (reusing finished ones)
  python main.py run --stages 1-2             ingestion and preprocessing only
  python main.py run --force data_preprocessing base.image_size=96
  python main.py run --config ~/my-dataset-config data_loader.batch_size=64
"""


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; each subcommand's --help explains itself.

    One long function on purpose: it is a declaration, one subcommand after another, read like a table.
    """
    from metal_defect.pipeline import STAGES

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", metavar="DIR", type=Path, default=None,
        help="folder holding params.yaml, schema.yaml and config/config.yaml (default: the checkout's top level); "
        "relative paths inside them resolve against it",
    )
    parser = argparse.ArgumentParser(
        prog="main.py",
        description="metal-defect: train, judge and serve a steel surface defect classifier.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from metal_defect import __version__

    parser.add_argument("--version", action="version", version=f"metal-defect {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    stage_list = "\n".join(f"  {i}. {s.name:<20} {s.description}" for i, s in enumerate(STAGES, 1))
    run = sub.add_parser(
        "run", parents=[common], help="run the pipeline stages (the default command)",
        description="Run pipeline stages in order, reusing every finished stage whose inputs, params and code are unchanged.",
        epilog=f"stages:\n{stage_list}\n\noverrides: KEY=VALUE sets any key of the three YAML files, e.g. base.seed=43 "
        "train.epochs=5; relative paths in overrides resolve against the current directory.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--stages", metavar="SEL", help="stages to run: names, numbers or ranges, e.g. 2, 1-2, data_ingestion,train (default: all); "
                     "stages they need are reused or run too")
    run.add_argument("--force", metavar="STAGE", action="append", default=[], help="re-run this stage (name, number or 'all') even if a finished output exists; repeatable")
    run.add_argument("--source", metavar="PATH|URL", help="data source (same as data_ingestion.source=...): folder, .zip/.tar.gz or http(s) URL")
    run.add_argument("--tune-chief", metavar="HOST:PORT", help="run the tune stage as the chief of a distributed Keras Tuner search, serving "
                     "its oracle on HOST:PORT (sets KERASTUNER_TUNER_ID=chief, KERASTUNER_ORACLE_IP/PORT); workers: `tune-worker`")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="configuration overrides")

    worker = sub.add_parser("tune-worker", parents=[common], help="take trials from a distributed search's chief (Keras Tuner worker)",
                            description="Wait for a chief (`run --tune-chief HOST:PORT`) to announce its search in paths.tuning, prepare "
                            "the data from this config (reused when the artifacts folder is shared), refuse when the data or training "
                            "recipe differs from the chief's, then train trials until the chief has none left.")
    worker.add_argument("--chief", metavar="HOST:PORT", help="the chief's oracle address (default: the one it announced)")
    worker.add_argument("--id", metavar="NAME", help="this worker's id (default worker-<host>-<pid>; must not contain 'chief')")
    worker.add_argument("--wait", type=float, default=3600, metavar="SECONDS", help="how long to wait for a chief (default 3600)")
    worker.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="configuration overrides (keep them equal to the chief's)")

    runs = sub.add_parser("runs", parents=[common], help="list runs with their status and key metrics",
                          description="List runs (newest last) with status, duration, chosen model and metrics; * marks the served run.")
    runs.add_argument("--limit", type=int, default=20, help="show the last N runs (default 20)")

    promote = sub.add_parser("promote", parents=[common], help="serve the model of another run (roll back or forward)",
                             description="Point the served model at the evaluated model of RUN_ID (see `runs`).")
    promote.add_argument("run_id", metavar="RUN_ID")

    evaluate = sub.add_parser("evaluate", parents=[common], help="evaluate the served model on a labelled folder",
                              description="Evaluate the served model (or --model RUN_ID) on any labelled folder or archive in a layout "
                              "ingestion recognises; writes metrics.json and plots under artifacts/evaluations/.")
    evaluate.add_argument("folder", metavar="DIR", type=Path, help="labelled images: class folders, train/valid/test tree or Cr_1.bmp names")
    evaluate.add_argument("--model", metavar="RUN_ID|DIR", help="a run id or a bundle folder (default: the served model)")
    evaluate.add_argument("--out", metavar="DIR", type=Path, help="where to write the results (default: artifacts/evaluations/<id>)")

    predict = sub.add_parser("predict", parents=[common], help="answer images with the served model (or --model)",
                             description="Answer every image: files, folders (walked for the model's image extensions) and globs. "
                             "Each answer: label, calibrated confidence, verdict (the class, 'uncertain' or 'out_of_distribution'), "
                             "OOD score and all class probabilities. Every answer is appended to artifacts/predictions.jsonl. "
                             "Exit code 3 when a named file could not be read (its row says why).")
    predict.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders or globs")
    predict.add_argument("--model", metavar="RUN_ID|DIR", help="a run id or a bundle folder (default: $METAL_DEFECT_BUNDLE, then the served model)")
    predict.add_argument("--csv", metavar="FILE", type=Path, help="write the answers as CSV")
    predict.add_argument("--json", metavar="FILE", type=Path, help="write the answers as JSON")
    predict.add_argument("--threshold", type=float, metavar="T", help="uncertain below this confidence (default: the bundle's, fitted on validation)")
    predict.add_argument("--heatmaps", metavar="DIR", type=Path, help="write a Grad-CAM overlay PNG per answered image into DIR and add "
                         "heat_peak_x, heat_peak_y (the heatmap's maximum in the image's pixels) to the CSV/JSON rows")
    predict.add_argument("--backend", choices=("compiled", "litert", "eager"), default="compiled",
                         help="compiled TensorFlow graph (default), the bundle's LiteRT model, or eager Keras")
    predict.add_argument("--no-review", action="store_true", help="do not put flagged answers in the review queue "
                         "(also: METAL_DEFECT_NO_REVIEW=1)")

    review = sub.add_parser("review", help="the review queue: flagged and disputed images, and their labels",
                            description="Images whose answers were flagged (uncertain, out_of_distribution) or marked wrong are kept in "
                            "the review store (paths.review, default artifacts/review). List them, label them, export the labelled "
                            "ones as class folders, or count them.")
    actions = review.add_subparsers(dest="action", required=True, metavar="ACTION")
    review_list = actions.add_parser("list", parents=[common], help="one line per queued image: sha256, original name, verdict, confidence, status")
    review_list.add_argument("--status", choices=("all", "unreviewed", "reviewed"), default="all")
    review_label = actions.add_parser("label", parents=[common], help="record the true class of a queued image")
    review_label.add_argument("sha256", metavar="SHA256_PREFIX", help="at least 6 characters of the image's sha256 (see `review list`)")
    review_label.add_argument("label", metavar="CLASS", help=f"a class of the model, or {'not_valid'} (not a valid image: kept out of training)")
    review_label.add_argument("--by", metavar="NAME", help="the reviewer's name (default: anonymous)")
    review_add = actions.add_parser("add", parents=[common], help="the command line's 'this answer is wrong': queue images with their "
                                    "true class and label them (answered by the served model first)")
    review_add.add_argument("paths", nargs="+", metavar="FILE", type=Path)
    review_add.add_argument("--label", required=True, metavar="CLASS", help="the images' true class")
    review_add.add_argument("--by", metavar="NAME", help="the reviewer's name (default: anonymous)")
    review_export = actions.add_parser("export", parents=[common], help="write the labelled images as class folders, ready to train on")
    review_export.add_argument("destination", metavar="DIR", type=Path)
    actions.add_parser("stats", parents=[common], help="counts by status, class, reason and reviewer")

    compare = sub.add_parser("compare", parents=[common], help="two runs' models on the same images, side by side",
                             description="Evaluate the models two (or more) runs chose on the same images: by default the last run's "
                             "test split and its reviewed slice (reviewed images kept out of training), or --on DIR. Prints and writes "
                             "the table: accuracy, macro F1, per-class recall, flagged share.")
    compare.add_argument("runs", nargs="+", metavar="RUN_ID", help="two or more run ids (see `python main.py runs`); the last one's images")
    compare.add_argument("--on", metavar="DIR", type=Path, help="a labelled folder (class folders) to compare on instead")
    compare.add_argument("--out", metavar="DIR", type=Path, help="where to write the results (default: artifacts/compare/<time>-<runs>)")

    export = sub.add_parser("export", parents=[common], help="write a self-contained model bundle (Keras + LiteRT)",
                            description="Copy the served model (or --model) into DIR with model.keras, model.tflite, serving.json, "
                            "the OOD reference, metrics, model card and a sha256 manifest checked on load.")
    export.add_argument("destination", metavar="DIR", type=Path)
    export.add_argument("--model", metavar="RUN_ID|DIR", help="a run id or a bundle folder (default: the served model)")

    app = sub.add_parser("app", parents=[common], help="start the Streamlit app on 0.0.0.0:$PORT (default 8501)",
                         description="Start st_app_predict.py with Streamlit, bound to all interfaces on --port ($PORT, else 8501).")
    app.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8501")))
    app.add_argument("--address", default="0.0.0.0")

    shot = sub.add_parser("screenshot", parents=[common], help="the app answering one image with the served model, as a PNG",
                          description="Start the app, upload an image (default: the served run's last test image) in Debian's "
                          "chromium through Playwright, and save a screenshot (the README picture). Needs requirements-dev.txt.")
    shot.add_argument("--image", type=Path, metavar="PATH", help="the image to upload")
    shot.add_argument("--out", type=Path, default=Path("docs/images/app.png"), metavar="PNG", help="default docs/images/app.png")

    bench = sub.add_parser("bench", parents=[common], help="measure accuracy, time and overhead; writes JSON under artifacts/bench/",
                           description="Benchmarks (not tests): `bench data` times ingestion + preprocessing and its throughput at 1x and "
                           "10x synthetic size; `bench train` runs the pipeline for several seeds and compares the training loop "
                           "with a bare model.fit; `bench datasets` runs the default params on NEU, X-SDD, magnetic tile and the proxy set beside the baselines.")
    bench.add_argument("what", choices=("data", "train", "datasets", "model", "predict", "ood", "ablate", "history", "reviews"))
    bench.add_argument("--images", type=int, help="reviews: changed test images, half labelled, half held out (default 60)")
    bench.add_argument("--lines", type=int, help="history: answers in the synthetic predictions log (default 1,000,000)")
    bench.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="configuration overrides, as for run (e.g. "
                       "data_ingestion.source=DIR schema.classes=auto for `bench ablate` on another data set)")
    bench.add_argument("--variants", help="ablate: comma-separated recipe variants (default: all of them; see metal_defect.ablation.VARIANTS)")
    bench.add_argument("--model", metavar="RUN_ID|DIR", help="predict, ood: the model to measure (default: the served model)")
    bench.add_argument("--size", type=int, default=160, help="model: input size in px (default 160, the auto cap)")
    bench.add_argument("--datasets", default="neu,xsdd,magnetic-tile,proxy", help="datasets: which data sets (default neu,xsdd,magnetic-tile,proxy)")
    bench.add_argument("--tuning", choices=("on", "off", "auto"), default="auto",
                       help="datasets: the c07 search on every data set, off, or auto (the default params: only where the base model leaves room)")
    proxy = sub.add_parser("proxy-data", parents=[common], help="make the offline proxy data set from NEU and its defect boxes",
                           description="Write a data set with the traits of an unseen plant's images (majority 'no defect' class, "
                           "small defects, non-square 222-632 px grayscale images, imbalanced counts) from the NEU images and "
                           "their Pascal VOC boxes. Deterministic for a seed; see src/metal_defect/proxy.py.")
    proxy.add_argument("--neu", metavar="DIR", type=Path, help="NEU folder holding images/ and annotations/ (default: the parent of "
                       "data_ingestion.source)")
    proxy.add_argument("--out", metavar="DIR", type=Path, help="where to write it (default: artifacts/datasets/neu-proxy)")
    proxy.add_argument("--seed", type=int, default=0, help="crop seed (default 0)")
    bench.add_argument("--seeds", help="train: seeds for the full pipeline runs (default 42,43,44); datasets: one run per data set "
                       "and seed, with the mean and spread (default: base.seed only)")
    bench.add_argument("--repeats", type=int, default=3, help="train: alternating repeats of the loop-overhead comparison (default 3)")
    bench.add_argument("--epochs", type=int, help="train: epochs per overhead measurement (default 5); ablate: epochs per variant (default 20)")
    bench.add_argument("--skip", default="", help="train: parts to skip, comma-separated: seeds, overhead")
    return parser


def _normalise_argv(argv: Sequence[str], parser: argparse.ArgumentParser) -> list[str]:
    """`main.py` and `main.py key=value ...` mean `main.py run ...`."""
    argv = list(argv)
    commands = set(_subcommands(parser))
    if not argv or (argv[0] not in commands and argv[0] not in ("-h", "--help", "--version")):
        argv.insert(0, "run")
    return argv


def _subcommands(parser: argparse.ArgumentParser) -> list[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices)
    return []


def setup_logging(console_level: str = "INFO") -> logging.Handler:
    """Console handler on the package logger; file handlers are added once paths are known."""
    logger = logging.getLogger("metal_defect")
    logger.setLevel(logging.DEBUG)
    for handler in list(logger.handlers):
        if getattr(handler, "_metal_defect_console", False):
            logger.removeHandler(handler)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(console_level)
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S"))
    console._metal_defect_console = True  # type: ignore[attr-defined]
    logger.addHandler(console)
    logger.propagate = False
    return console


def attach_log_file(logs_dir: Path) -> Path:
    """Append everything (DEBUG, tracebacks) to logs/metal_defect.log."""
    from metal_defect.artifacts import ensure_dir

    ensure_dir(logs_dir, "paths.logs")
    path = logs_dir / LOG_FILE
    logger = logging.getLogger("metal_defect")
    if not any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path.resolve() for h in logger.handlers):
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setLevel(logging.DEBUG)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    return path


def installed_defaults() -> Path | None:
    """The default params.yaml, schema.yaml and config/config.yaml that `pip install .` puts in
    <prefix>/share/metal-defect, or None (an editable install or a checkout has its own)."""
    folder = Path(sys.prefix) / "share" / "metal-defect"
    return folder if (folder / PARAMS_FILE).is_file() else None


def _sigterm_as_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for `python main.py` and the `metal-defect` command; returns the exit code."""
    from metal_defect.runtime import QUIET_LEVEL

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", QUIET_LEVEL)  # see runtime.py
    parser = build_parser()
    args = parser.parse_args(_normalise_argv(sys.argv[1:] if argv is None else argv, parser))
    console = setup_logging()
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    log_file: Path | None = None
    try:
        from metal_defect.config import default_config_dir, load_config

        config_dir = args.config or default_config_dir()
        overrides = list(getattr(args, "overrides", []) or [])
        packaged = args.config is None and not (Path(config_dir) / PARAMS_FILE).is_file() and installed_defaults() is not None
        if packaged:
            # the installed command outside a checkout: packaged defaults, outputs in the current folder
            config_dir = args.config = installed_defaults()
            overrides = [f"paths.{key}={Path.cwd() / value}" for key, value in
                         (("artifacts", "artifacts"), ("logs", "logs"), ("download_cache", "artifacts/downloads"))] + overrides
        with contextlib.suppress(MetalDefectError):  # best effort: the configured log folder is checked once loaded
            log_file = attach_log_file(Path(config_dir) / "logs") if Path(config_dir).is_dir() and not packaged else None
        if getattr(args, "source", None):
            overrides.append(f"data_ingestion.source={args.source}")
        config = load_config(args.config, overrides)
        args.resolved_overrides = overrides  # benchmarks that load a config per data set or seed start from these
        console.setLevel(config.logging.level)
        log_file = attach_log_file(config.paths.logs)
        return _dispatch(args, config)
    except MetalDefectError as exc:
        log.debug("error details", exc_info=True)
        log.error("%s", exc)
        return exc.exit_code
    except KeyboardInterrupt:
        log.debug("interrupted", exc_info=True)
        log.error("interrupted; finished stages are kept, partial state is resumed by the same command")
        return 130
    except Exception as exc:
        log.debug("unexpected error", exc_info=True)
        where = f"; traceback in {log_file}" if log_file else ""
        log.error("unexpected error (a bug, please report it): %s: %s%s", type(exc).__name__, exc, where)
        return 1


def _dispatch(args: argparse.Namespace, config: Any) -> int:
    from metal_defect import commands, runtime

    if args.command in ("promote", "evaluate", "bench", "predict", "export", "compare"):
        runtime.import_tensorflow()  # before anything imports it, so that its start-up lines go to the log

    if args.command == "run":
        from metal_defect.pipeline import Runner

        if args.tune_chief:
            from metal_defect.components.c07_hyper_tuning.distributed import join_search

            join_search("chief", args.tune_chief, "--tune-chief")
        manifest = Runner(config, command="run").run(args.stages, args.force)
        return 0 if manifest["status"] == "succeeded" else 1
    if args.command == "tune-worker":
        print(commands.tune_worker(config, args.chief, args.id, args.wait))
        return 0
    if args.command == "runs":
        print(commands.list_runs(config, args.limit))
        return 0
    if args.command == "promote":
        print(commands.promote(config, args.run_id))
        return 0
    if args.command == "evaluate":
        print(commands.evaluate(config, args.folder, args.model, args.out))
        return 0
    if args.command == "predict":
        text, code = commands.predict(config, args.paths, args.model, args.csv, args.json, args.threshold, args.backend, args.heatmaps,
                                      review=not args.no_review)
        print(text)
        return code
    if args.command == "review":
        print(commands.review(config, args))
        return 0
    if args.command == "export":
        print(commands.export(config, args.destination, args.model))
        return 0
    if args.command == "compare":
        from metal_defect.compare import compare_runs
        from metal_defect.errors import ConfigError

        if len(args.runs) < 2:
            raise ConfigError("compare: give two run ids (RUN_A RUN_B); `python main.py runs` lists them")
        result = compare_runs(config, args.runs, args.on, args.out)
        print(result["table"] + f"results in {result['out']}")
        return 0
    if args.command == "app":
        from metal_defect import launch_app

        launch_app.main(["--port", str(args.port), "--address", args.address])
        return 0  # pragma: no cover - main() replaces this process
    if args.command == "screenshot":
        print(commands.screenshot(config, args.image, args.out))
        return 0
    if args.command == "proxy-data":
        print(commands.proxy_data(config, args.neu, args.out, args.seed))
        return 0
    if args.command == "bench":
        from metal_defect import bench

        print(bench.run(config, args))
        return 0
    raise AssertionError(f"unhandled command {args.command}")  # argparse only lets known commands through


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
