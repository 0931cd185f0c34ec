"""`bench ablate`: each variant changes what it names, and the command trains and scores every one."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest
from conftest import tiny_training_params, write_config

from metal_defect import ablation
from metal_defect.config import Recipe, load_config


def test_each_variant_switches_off_what_it_names_and_nothing_else():
    recipe = Recipe.of(load_config(None))
    aug = recipe.data_loader.augmentation
    assert aug.flip_horizontal and aug.rotate90 and recipe.train.label_smoothing > 0  # the defaults have them
    assert aug.resample_blur == 0  # off by default since 2026-12-07: its variant switches it on
    changed = {name: change(recipe) for name, (_, change) in ablation.VARIANTS.items()}
    assert changed["default"] == recipe
    assert not changed["no_flips_rot90"].data_loader.augmentation.rotate90
    assert changed["no_flips_rot90"].train == recipe.train
    flips_off, turns_off = changed["no_flips"].data_loader.augmentation, changed["no_rot90"].data_loader.augmentation
    assert (flips_off.flip_horizontal, flips_off.flip_vertical, flips_off.rotate90) == (False, False, True)
    assert (turns_off.flip_horizontal, turns_off.flip_vertical, turns_off.rotate90) == (True, True, False)
    assert changed["resample_blur"] == ablation._aug(recipe, resample_blur=ablation.FORMER_RESAMPLE_BLUR) != recipe
    assert changed["no_ramp"].train == dataclasses.replace(recipe.train, regularisation_ramp=0.0) and recipe.train.regularisation_ramp > 0
    assert changed["no_label_smoothing"].train.label_smoothing == 0
    assert changed["no_dropout"].model.custom_cnn.dropout == 0
    assert changed["no_weight_decay"].train.weight_decay == 0
    assert changed["no_class_weights"].train.class_weights is False
    assert changed["constant_lr"].callbacks.lr_schedule == "constant"
    balanced = changed["balanced_draws"]
    assert balanced.data_loader.class_sampling == "balanced" and balanced.train.class_weights is False
    off = changed["all_off"]
    assert (off.train.label_smoothing, off.train.weight_decay, off.train.class_weights, off.model.custom_cnn.dropout) == (0, 0, False, 0)
    assert not any([off.data_loader.augmentation.flip_horizontal, off.data_loader.augmentation.rotate90,
                    off.data_loader.augmentation.resample_blur])
    fixed = ablation.fixed_epochs(recipe, 7)
    assert (fixed.train.epochs, fixed.train.min_steps, fixed.callbacks.early_stopping.enabled) == (7, 0, False)


def test_bench_ablate_trains_every_variant_for_the_same_epochs_and_draws_the_curves(tmp_path):
    from metal_defect import synthetic

    data = synthetic.make_dataset(tmp_path / "data", per_class=10)
    params = tiny_training_params() | {"data_ingestion": {"source": str(data)}}
    folder = write_config(tmp_path / "cfg", params, {"classes": "auto", "aliases": {}})
    config = load_config(folder)
    args = argparse.Namespace(what="ablate", variants="default,all_off", epochs=2)
    result = ablation.bench_ablate(config, args)
    rows = result["variants"]
    assert list(rows) == ["default", "all_off"]
    for row in rows.values():
        assert len(row["curve"]) == 2 and 0 <= row["fit"] <= 1 and 0 <= row["valid_macro_f1"] <= 1 and row["restored_epoch"] in (1, 2)
    assert "| all_off |" in result["table"] and Path(result["plot"]).stat().st_size > 10_000
    json.dumps(result)  # what `bench` writes


def test_an_unknown_variant_is_refused_with_the_names_there_are(tmp_path):
    with pytest.raises(ValueError, match=r"no_such.*no_dropout"):
        ablation.ablate(tmp_path, Recipe.of(load_config(None)), ["no_such"], 1, tmp_path / "w")


def test_a_generic_source_folder_is_named_by_its_parent_in_the_plot_title():
    assert ablation.data_set_name("../shared/datasets/magnetic-tile/images") == "magnetic-tile"
    assert ablation.data_set_name("../shared/datasets/xsdd/") == "xsdd"


def test_two_benchmarks_started_in_the_same_second_get_folders_of_their_own(tmp_path, monkeypatch):
    # two `bench ablate` runs started in the same second once shared one timestamp-named folder, and the
    # first to finish deleted the other's work (FileNotFoundError .../phase_done)
    from metal_defect import artifacts

    ids = iter(["20261205-120000-aaaa", "20261205-120000-aaaa", "20261205-120000-bbbb"])
    monkeypatch.setattr(artifacts, "new_run_id", lambda: next(ids))
    first = artifacts.new_folder(tmp_path / "bench", "ablate-")
    second = artifacts.new_folder(tmp_path / "bench", "ablate-")
    assert first != second and first.is_dir() and second.is_dir()
    assert second.name == "ablate-20261205-120000-bbbb"
