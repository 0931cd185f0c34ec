"""Configuration: loading, every kind of validation error, overrides, path resolution."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import REPO, write_config

from metal_defect.config import Config, all_keys, fingerprint_of, load_config
from metal_defect.errors import ConfigError


def test_repository_config_loads_with_typed_sections():
    config = load_config(REPO)
    assert config.base.seed == 42 and config.base.image_size == "auto" and config.base.max_image_size == 160
    assert config.schema.classes[0] == "crazing" and len(config.schema.classes) == 6
    assert config.data_preprocessing.split.train == pytest.approx(0.70)
    assert config.paths.artifacts == REPO / "artifacts"


def _error(tmp_path: Path, overrides: list[str] | None = None, **files) -> str:
    folder = write_config(tmp_path / "c", **files)
    with pytest.raises(ConfigError) as info:
        load_config(folder, overrides)
    return str(info.value)


def test_unknown_key_in_file_names_file_key_and_suggestion(tmp_path):
    message = _error(tmp_path, params={"base": {"sede": 1}})
    assert "params.yaml" in message and "'base.sede'" in message and "did you mean 'base.seed'" in message


def test_unknown_section_suggests_closest(tmp_path):
    message = _error(tmp_path, params={"data_loder": {"batch_size": 3}})
    assert "unknown section 'data_loder'" in message and "did you mean 'data_loader'" in message


def test_section_in_wrong_file_is_named(tmp_path):
    message = _error(tmp_path, config={"base": {"seed": 1}})
    assert "section 'base' belongs in params.yaml" in message


def test_wrong_type_names_key_value_and_expectation(tmp_path):
    message = _error(tmp_path, params={"base": {"image_size": "big"}})
    assert "base.image_size = 'big'" in message and "an integer" in message


def test_bool_is_not_an_integer(tmp_path):
    message = _error(tmp_path, params={"data_loader": {"batch_size": True}})
    assert "data_loader.batch_size = True" in message


def test_out_of_range_value(tmp_path):
    message = _error(tmp_path, params={"data_loader": {"batch_size": 0}})
    assert "data_loader.batch_size = 0 is out of range; expected >= 1" in message


def test_choice_suggests_closest(tmp_path):
    message = _error(tmp_path, params={"base": {"color_mode": "greyscale"}})
    assert "one of 'grayscale', 'rgb'" in message and "did you mean 'grayscale'" in message


def test_missing_key_is_reported(tmp_path):
    folder = write_config(tmp_path / "c")
    params = yaml.safe_load((folder / "params.yaml").read_text())
    del params["base"]["seed"]
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=r"missing key 'base.seed'"):
        load_config(folder)


def test_cross_field_checks(tmp_path):
    assert "must sum to 1" in _error(tmp_path, params={"data_preprocessing": {"split": {"train": 0.8}}})
    assert "aliases.crazy" in _error(tmp_path / "b", schema={"aliases": {"crazy": ["x"]}})
    assert "must start with a dot" in _error(tmp_path / "c", schema={"extensions": ["jpg"]})


def test_several_problems_are_all_reported(tmp_path):
    message = _error(tmp_path, params={"base": {"seed": -1, "image_size": 2}})
    assert "2 problems" in message and "base.seed" in message and "base.image_size" in message


def test_invalid_yaml_and_missing_file(tmp_path):
    folder = write_config(tmp_path / "c")
    (folder / "params.yaml").write_text("base: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(folder)
    (folder / "params.yaml").unlink()
    with pytest.raises(ConfigError, match=r"params\.yaml: file not found"):
        load_config(folder)
    with pytest.raises(ConfigError, match="no such folder"):
        load_config(tmp_path / "nowhere")


def test_override_typo_suggests_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'base.sed'; did you mean 'base.seed'"):
        load_config(REPO, ["base.sed=3"])
    with pytest.raises(ConfigError, match=r"did you mean 'data_loader.batch_size'"):
        load_config(REPO, ["data_loadr.batch_size=3"])


def test_override_goes_through_validation():
    assert load_config(REPO, ["base.seed=7"]).base.seed == 7
    assert load_config(REPO, ["schema.classes=auto"]).schema.classes == "auto"
    assert load_config(REPO, ["data_loader.augmentation.rotate90=false"]).data_loader.augmentation.rotate90 is False
    with pytest.raises(ConfigError, match=r"command line: base.seed = 'x'"):
        load_config(REPO, ["base.seed=x"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(REPO, ["base.seed"])
    with pytest.raises(ConfigError, match="is a section"):
        load_config(REPO, ["base=1"])


def test_relative_paths_resolve_against_config_folder_not_cwd(tmp_path, monkeypatch):
    folder = write_config(tmp_path / "elsewhere", params={"data_ingestion": {"source": "data/images"}}, config={"paths": {"artifacts": "out"}})
    monkeypatch.chdir(tmp_path)
    config = load_config(folder)
    assert config.paths.artifacts == folder / "out"
    assert config.data_ingestion.source == str(folder / "data" / "images")
    assert config.config_dir == folder


def test_relative_override_paths_resolve_against_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(REPO, ["data_ingestion.source=mydata", "paths.artifacts=arts"])
    assert config.data_ingestion.source == str(tmp_path / "mydata")
    assert config.paths.artifacts == tmp_path / "arts"
    url = "https://example.com/neu.zip"
    assert load_config(REPO, [f"data_ingestion.source={url}"]).data_ingestion.source == url


def test_fingerprint_is_stable_and_sensitive():
    a, b = load_config(REPO), load_config(REPO)
    assert fingerprint_of(a.base) == fingerprint_of(b.base)
    assert fingerprint_of(a.base) != fingerprint_of(load_config(REPO, ["base.seed=1"]).base)


def test_every_key_is_listed():
    keys = all_keys(Config)
    assert "data_loader.augmentation.noise_std" in keys and "schema.aliases" in keys and "paths.artifacts" in keys
