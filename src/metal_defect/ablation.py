"""`bench ablate`: which part of the training recipe keeps a network from fitting its data.

Each variant is the configured recipe with one part switched off (or changed), trained for the
same fixed number of epochs (no early stopping, no `train.min_steps` stretch, so every row gets
the same optimizer steps) through the train stage's own `train_one`, then scored without
augmentation on its own training images (the fit) and on validation. The per-epoch training
accuracy of every variant is drawn as one learning-curve plot beside the JSON and a Markdown table.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from metal_defect.artifacts import new_folder, write_json_atomic
from metal_defect.config import Recipe

log = logging.getLogger(__name__)


def _replace(section: Any, **changes: Any) -> Any:
    return dataclasses.replace(section, **changes)


def _aug(recipe: Recipe, **changes: Any) -> Recipe:
    loader = _replace(recipe.data_loader, augmentation=_replace(recipe.data_loader.augmentation, **changes))
    return _replace(recipe, data_loader=loader)


def _train(recipe: Recipe, **changes: Any) -> Recipe:
    return _replace(recipe, train=_replace(recipe.train, **changes))


def _cnn(recipe: Recipe, **changes: Any) -> Recipe:
    return _replace(recipe, model=_replace(recipe.model, custom_cnn=_replace(recipe.model.custom_cnn, **changes)))


def _all_off(recipe: Recipe) -> Recipe:
    recipe = _aug(recipe, flip_horizontal=False, flip_vertical=False, rotate90=False, rotation_degrees=0, brightness=0.0, contrast=0.0,
                  noise_std=0.0, resample_blur=0.0)
    return _cnn(_train(recipe, label_smoothing=0.0, weight_decay=0.0, class_weights=False), dropout=0.0)


FORMER_RESAMPLE_BLUR = 0.2  # off by default since it stopped paying with the five-block network (README, Results on NEU)

# name -> (what it changes, how): every regulariser of the recipe off in turn, all of them off, the resample
# blur on, and the alternatives the generalisation issue asks about (schedule, class-balanced draws)
VARIANTS: dict[str, tuple[str, Callable[[Recipe], Recipe]]] = {
    "default": ("the configured recipe", lambda r: r),
    "no_flips_rot90": ("flips and 90-degree turns off", lambda r: _aug(r, flip_horizontal=False, flip_vertical=False, rotate90=False)),
    "no_flips": ("flips off (90-degree turns kept)", lambda r: _aug(r, flip_horizontal=False, flip_vertical=False)),
    "no_rot90": ("90-degree turns off (flips kept)", lambda r: _aug(r, rotate90=False)),
    "resample_blur": (f"resample blur on ({FORMER_RESAMPLE_BLUR}, the default until 2026-12-07)",
                      lambda r: _aug(r, resample_blur=FORMER_RESAMPLE_BLUR)),
    "no_ramp": ("augmentation and dropout at full strength from the first epoch", lambda r: _train(r, regularisation_ramp=0.0)),
    "no_label_smoothing": ("label smoothing 0", lambda r: _train(r, label_smoothing=0.0)),
    "no_dropout": ("dropout 0", lambda r: _cnn(r, dropout=0.0)),
    "no_weight_decay": ("weight decay 0", lambda r: _train(r, weight_decay=0.0)),
    "no_class_weights": ("class weights off", lambda r: _train(r, class_weights=False)),
    "all_off": ("every regulariser above off", _all_off),
    "constant_lr": ("constant learning rate (no cosine decay)", lambda r: _replace(r, callbacks=_replace(r.callbacks, lr_schedule="constant"))),
    "balanced_draws": ("class-balanced draws instead of class weights",
                       lambda r: _train(_replace(r, data_loader=_replace(r.data_loader, class_sampling="balanced")), class_weights=False)),
}


def fixed_epochs(recipe: Recipe, epochs: int) -> Recipe:
    """The recipe trained for exactly `epochs` epochs: no early stopping, no min_steps stretch, no side files."""
    callbacks = _replace(recipe.callbacks, early_stopping=_replace(recipe.callbacks.early_stopping, enabled=False), tensorboard=False,
                         backup_and_restore=False)
    return _replace(_train(recipe, epochs=epochs, min_steps=0, verbose=0), callbacks=callbacks)


def ablate(prepared: Path, recipe: Recipe, variants: list[str], epochs: int, work: Path, progress: Path | None = None) -> dict[str, Any]:
    """Train each variant for `epochs` epochs on a c02 output folder; fit, validation and the learning curves.

    `progress`: a JSON file rewritten after every variant, so that an interrupted run keeps the rows it finished."""
    import keras
    from sklearn.metrics import f1_score

    from metal_defect.components.c03_dataset_loader import build_datasets, make_split
    from metal_defect.components.c06_training import HISTORY_FILE, TRAINED_MODEL, train_one
    from metal_defect.serving.bundle import load_model

    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown ablation variant(s) {unknown}: choose from {', '.join(VARIANTS)}")
    rows: dict[str, Any] = {}
    for name in variants:
        what, change = VARIANTS[name]
        varied = fixed_epochs(change(recipe), epochs)
        data = build_datasets(prepared, varied.data_loader, varied.base.seed)
        model_name = varied.train.models[0]
        folder = work / name
        shutil.rmtree(folder, ignore_errors=True)
        started = time.perf_counter()
        train_one(model_name, data, varied.base, varied.model, varied.callbacks, varied.train, folder)
        seconds = time.perf_counter() - started
        model = load_model(folder / TRAINED_MODEL)
        history = json.loads((folder / HISTORY_FILE).read_text())
        scores = {}
        for split in ("train", "valid"):
            part = data[split]
            plain = make_split(part.files, part.labels, data.image_shape, varied.data_loader, varied.base.seed, training=False)
            predicted = np.argmax(model.predict(plain.dataset, verbose=0), axis=1)
            scores[split] = {"accuracy": float(np.mean(predicted == part.labels)),
                             "macro_f1": float(f1_score(part.labels, predicted, average="macro", zero_division=0))}
        rows[name] = {"what": what, "epochs": epochs, "seconds": round(seconds, 1), "fit": scores["train"]["accuracy"],
                      "train_macro_f1": scores["train"]["macro_f1"], "valid_accuracy": scores["valid"]["accuracy"],
                      "valid_macro_f1": scores["valid"]["macro_f1"],
                      "restored_epoch": restored_epoch(history, varied.callbacks.checkpoint_monitor),
                      "curve": [round(float(row.get("accuracy", float("nan"))), 4) for row in history]}
        log.info("ablate %s (%s): fit %.3f, train macro F1 %.3f, valid accuracy %.3f, valid macro F1 %.3f, %.0f s", name, what,
                 rows[name]["fit"], rows[name]["train_macro_f1"], rows[name]["valid_accuracy"], rows[name]["valid_macro_f1"], seconds)
        keras.backend.clear_session()
        if progress is not None:
            write_json_atomic(progress, rows)
    return rows


def restored_epoch(history: list[dict[str, Any]], monitor: str) -> int | None:
    """The 1-based epoch whose weights the checkpoint kept (the best by `monitor`)."""
    from metal_defect.components.c05_callbacks import best_of

    values = [row[monitor] for row in history if monitor in row]
    best = best_of(values, monitor)
    return None if best is None else values.index(best) + 1


def ablation_table(rows: dict[str, Any]) -> str:
    """Markdown: one row per variant."""
    lines = ["| variant | change | fit of own training images | train macro F1 | valid accuracy | valid macro F1 | epoch kept | time |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['what']} | {r['fit']:.3f} | {r['train_macro_f1']:.3f} | {r['valid_accuracy']:.3f} | "
                     f"{r['valid_macro_f1']:.3f} | {r['restored_epoch']} of {r['epochs']} | {r['seconds'] / 60:.1f} min |")
    return "\n".join(lines) + "\n"


def plot_curves(rows: dict[str, Any], path: Path, title: str) -> None:
    """Training accuracy per epoch (augmented, as the fit sees it), one line per variant."""
    from metal_defect.plots import plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, r in rows.items():
        ax.plot(range(1, len(r["curve"]) + 1), r["curve"], label=f"{name} (fit {r['fit']:.2f})", linewidth=2 if name == "default" else 1.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training accuracy (during the epoch)")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def data_set_name(source: str | Path) -> str:
    """A readable name of a source folder: its own name, or its parent's when it is a generic one
    (`../shared/datasets/magnetic-tile/images` is "magnetic-tile", not "images")."""
    path = Path(str(source).rstrip("/"))
    return path.parent.name if path.name.lower() in GENERIC_FOLDER_NAMES and path.parent.name else path.name


GENERIC_FOLDER_NAMES = {"images", "image", "data", "dataset", "train", "imgs"}


def bench_ablate(config: Any, args: Any) -> dict[str, Any]:
    """Stages 1-2 of the configured run (cached), then every ablation variant on the prepared images."""
    from metal_defect.pipeline import Runner

    manifest = Runner(config, command="bench").run("data_preprocessing")
    prepared = Path(manifest["stages"]["data_preprocessing"]["output"])
    root = new_folder(Path(config.paths.artifacts) / "bench", "ablate-")
    variants = [v.strip() for v in (args.variants or ",".join(VARIANTS)).split(",") if v.strip()]
    epochs = args.epochs or 20
    rows = ablate(prepared, Recipe.of(config), variants, epochs, root / "work", progress=root / "rows-so-far.json")
    table = ablation_table(rows)
    (root / "table.md").write_text(table, encoding="utf-8")
    plot_curves(rows, root / "learning_curves.png", f"{data_set_name(config.data_ingestion.source)}: {epochs} epochs per variant")
    shutil.rmtree(root / "work", ignore_errors=True)
    return {"prepared": str(prepared), "variants": rows, "table": table, "plot": str(root / "learning_curves.png"),
            "headline": {k: {"fit": v["fit"], "valid_macro_f1": v["valid_macro_f1"]} for k, v in rows.items()}}
