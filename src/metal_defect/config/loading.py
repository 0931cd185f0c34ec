"""Reading the three configuration files (bounded, duplicate keys refused), command-line overrides, and the whole check.

Relative paths inside the files resolve against the folder given by `--config` (the
checkout's top level by default); relative paths in command-line overrides resolve
against the current directory, as a shell user expects.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from metal_defect.config.checking import all_keys, convert, field_types, is_internal, suggest
from metal_defect.config.sections import CONFIG_FILE, PARAMS_FILE, SCHEMA_FILE, SECTION_FILES, Config, PathsConfig
from metal_defect.errors import ConfigError


def default_config_dir() -> Path:
    """The checkout holding params.yaml: $METAL_DEFECT_HOME, the source checkout, or cwd."""
    env = os.environ.get("METAL_DEFECT_HOME")
    if env:
        return Path(env).resolve()
    checkout = Path(__file__).resolve().parents[3]
    if (checkout / PARAMS_FILE).is_file():
        return checkout
    return Path.cwd().resolve()


def load_config(config_dir: Path | str | None = None, overrides: list[str] | None = None) -> Config:
    """Read the three YAML files in `config_dir`, apply `key=value` overrides and validate.

    Raises ConfigError listing every problem found (file, key, value, what is allowed).
    """
    config_dir = Path(config_dir).resolve() if config_dir else default_config_dir()
    if not config_dir.is_dir():
        raise ConfigError(f"--config {config_dir}: no such folder; it must hold params.yaml, schema.yaml and config/config.yaml")
    raw: dict[str, Any] = {}
    origins: dict[str, str] = {}
    files = {
        "config.yaml": config_dir / CONFIG_FILE,
        PARAMS_FILE: config_dir / PARAMS_FILE,
        SCHEMA_FILE: config_dir / SCHEMA_FILE,
    }
    for label, path in files.items():
        data = _read_yaml(path)
        if label == SCHEMA_FILE:
            raw["schema"] = data
            origins["schema"] = label
            continue
        for key, value in data.items():
            if SECTION_FILES.get(key) != label:
                owner = SECTION_FILES.get(key)
                if owner:
                    raise ConfigError(f"{label}: section '{key}' belongs in {owner}, not {label}")
                owned = [k for k, f in SECTION_FILES.items() if f == label]
                raise ConfigError(f"{label}: unknown section '{key}'{suggest(key, owned)}; allowed: {', '.join(owned)}")
            raw[key] = value
            origins[key] = label
    for override in overrides or []:
        _apply_override(raw, origins, override)
    problems: list[str] = []
    sections = {}
    for name, label in SECTION_FILES.items():
        cls = field_types(Config)[name]
        if name not in raw:
            problems.append(f"{label}: missing section '{name}'")
            continue
        sections[name] = convert(raw[name], cls, name, {}, origins, config_dir, problems)
    if "paths" in sections:
        problems.extend(_system_folder_problems(sections["paths"], origins.get("paths", "config.yaml")))
    if problems:
        if len(problems) == 1:
            raise ConfigError(f"invalid configuration: {problems[0]}")
        raise ConfigError(f"invalid configuration ({len(problems)} problems):\n  " + "\n  ".join(problems))
    # stage 1 reads the review store as a second source; where it is belongs to config.yaml's paths
    sections["data_ingestion"] = dataclasses.replace(sections["data_ingestion"], review_store=sections["paths"].review_root)
    return Config(**sections, config_dir=config_dir)


# Folders the program writes under: never the file system's root or a system folder, where a typo
# (`artifacts: /`) would write `/stages` and `/runs` beside the operating system's own.
SYSTEM_FOLDERS = {Path(p) for p in ("/", "/bin", "/boot", "/dev", "/etc", "/lib", "/lib64", "/proc", "/root", "/run", "/sbin",
                                    "/sys", "/usr", "/var", "/home", "/opt", "/srv", "/mnt", "/media", "/tmp")}


def _system_folder_problems(paths: PathsConfig, label: str) -> list[str]:
    problems = []
    for key in ("artifacts", "logs", "download_cache", "tuning"):
        folder = getattr(paths, key)
        if folder is not None and Path(folder).resolve() in SYSTEM_FOLDERS:
            problems.append(f"{label}: paths.{key} = {folder} is a system folder; give a folder of its own (e.g. {Path(folder) / 'metal-defect'})")
    return problems


MAX_YAML_BYTES = 1_000_000  # the three files are a few kilobytes
MAX_YAML_NODES = 100_000  # values after aliases (*name) are expanded: an alias bomb expands to billions


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error (YAML keeps the last silently),
    and a document whose aliases would expand past MAX_YAML_NODES values is refused before it is built."""

    def get_single_node(self) -> yaml.Node | None:
        node = super().get_single_node()
        if node is not None and _expanded_size(node, {}) > MAX_YAML_NODES:
            raise yaml.composer.ComposerError(None, None, f"more than {MAX_YAML_NODES:,} values once its aliases (*name) are expanded; "
                                              "write the values out instead of nesting aliases", node.start_mark)
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key '{key}' appears twice (lines {seen[key]} and {line}); keep one",
                                                        key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many values `node` stands for with every alias expanded (each shared node counted once per use)."""
    if id(node) not in sizes:
        sizes[id(node)] = 1  # a node that contains itself (a recursive alias) is counted once, not forever
        if isinstance(node, yaml.SequenceNode):
            sizes[id(node)] = 1 + sum(min(_expanded_size(child, sizes), MAX_YAML_NODES + 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            sizes[id(node)] = 1 + sum(min(_expanded_size(k, sizes) + _expanded_size(v, sizes), MAX_YAML_NODES + 1) for k, v in node.value)
    return sizes[id(node)]


def load_yaml_text(text: str) -> Any:
    """Parse YAML safely, refusing duplicate keys."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def _read_yaml(path: Path) -> dict[str, Any]:
    if path.exists() and not path.is_file():
        raise ConfigError(f"{path}: not a YAML file (a folder, a device or a FIFO); it must be a text file")
    if not path.is_file():
        raise ConfigError(f"{path}: file not found; --config must name a folder holding params.yaml, schema.yaml and config/config.yaml")
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_YAML_BYTES + 1)
        if len(raw) > MAX_YAML_BYTES:
            raise ConfigError(f"{path}: larger than {MAX_YAML_BYTES // 1000} kB; the configuration files are a few kilobytes")
        data = load_yaml_text(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text file (byte {exc.start} is not UTF-8); it must be YAML text") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})".replace("\n", " ")) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, found {type(data).__name__}")
    return data


def _spec_at(dotted: str) -> tuple[Any, bool] | None:
    """The type of a dotted key and whether it lies inside a free-form dict field."""
    tp: Any = Config
    parts = dotted.split(".")
    for part in parts:
        if dataclasses.is_dataclass(tp):
            types_ = field_types(tp)
            if part not in types_ or is_internal(tp, part):
                return None
            tp = types_[part]
        elif typing.get_origin(tp) is dict:
            return typing.get_args(tp)[1], True
        else:
            return None
    return tp, False


def _apply_override(raw: dict[str, Any], origins: dict[str, str], override: str) -> None:
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override '{override}': expected key=value, e.g. train.epochs=5")
    spec = _spec_at(key)
    if spec is None:
        raise ConfigError(f"override {override}: unknown key '{key}'{suggest(key, all_keys(Config))}")
    tp, _ = spec
    if dataclasses.is_dataclass(tp):
        raise ConfigError(f"override {override}: '{key}' is a section; set one of its keys, e.g. {all_keys(tp, key + '.')[0]}=...")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    accepts = typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)
    if str in accepts and not isinstance(value, str) and not (value is None and type(None) in accepts):
        value = text.strip()  # e.g. a sha256 of digits only, which YAML would read as a number
    relative_path = isinstance(value, str) and value and "://" not in value and not os.path.isabs(value)
    if relative_path and _is_pathish(tp, key) and not _is_keyword(key, value):
        value = str((Path.cwd() / value).resolve())
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value
    origins[key] = "command line"


def _is_pathish(tp: Any, dotted: str) -> bool:
    if tp is Path or Path in typing.get_args(tp):
        return True
    return bool(_meta_at(dotted).get("path_like"))


def _is_keyword(dotted: str, value: str) -> bool:
    return value in _meta_at(dotted).get("keywords", ())


def _meta_at(dotted: str) -> dict[str, Any]:
    parent, _, name = dotted.rpartition(".")
    spec = _spec_at(parent) if parent else (Config, False)
    if spec is None or not dataclasses.is_dataclass(spec[0]):
        return {}
    for f in dataclasses.fields(spec[0]):
        if f.name == name:
            return dict(f.metadata)
    return {}


def dump_yaml(config: Config) -> str:
    """The resolved configuration as YAML (written into every run folder)."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
