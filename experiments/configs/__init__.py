"""Experiment configs: `load_config("cifar100:inc5")`, `apply_overrides(config, ["x.y=3"])`.

A config is a file with `get_config(arg=None) -> ConfigDict` (big_vision style), named by module
or path (`my/exp.py[:arg]`); an override's value is parsed to the type the field already has.
"""

import copy
import difflib
import functools
import importlib
import importlib.util
import operator
import pathlib
from collections.abc import Iterable
from typing import Any

import ml_collections

from calfuse_jax.config import check_ranges, describe, flat_items, resolve_method
from calfuse_jax.config import rules_of as config_rules
from experiments.configs import defaults, synthetic
from experiments.configs.defaults import VARIANTS

_FOLDER = pathlib.Path(__file__).parent
CONFIGS = tuple(sorted(p.stem for p in _FOLDER.glob("[!_]*.py") if p.stem != "defaults"))

# Every shipped config field's rule: `validate` enforces them, --show-config prints them.
RULES = {**defaults.RULES, **config_rules(synthetic.FIELDS)}


class ConfigError(ValueError):
    """A config that cannot be loaded or an override that does not fit it."""


def load_config(name_or_path: str) -> ml_collections.ConfigDict:
    """Loads `name[:arg]` from experiments/configs/ or `path/to/file.py[:arg]`."""
    name, _, arg = name_or_path.partition(":")
    if name.endswith(".py") or "/" in name:
        path = pathlib.Path(name).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        if name not in CONFIGS and not (_FOLDER / f"{name}.py").is_file():
            close = difflib.get_close_matches(name, CONFIGS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(
                f"unknown config {name!r}; {hint}choose one of {', '.join(CONFIGS)} "
                "or pass the path of a .py file with get_config(arg=None)"
            )
        module = importlib.import_module(f"experiments.configs.{name}")
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config {name!r} has no get_config(arg=None) function")
    try:
        config = module.get_config(arg or None)
    except ValueError as e:  # a bad variant: say which config it was
        raise ConfigError(f"config {name_or_path!r}: {e}") from None
    if arg and "name" in config:
        config.name = f"{config.name}:{arg}"  # labels and reports tell variants apart
    return config


def catalog() -> str:
    """The configs and variants, as `--help` lists them: one line each."""
    lines = ["configs (--config NAME[:VARIANT,...], or path/to/config.py):"]
    for name in CONFIGS:
        doc = importlib.import_module(f"experiments.configs.{name}").__doc__ or ""
        lines.append(f"  {name:<12} {doc.strip().splitlines()[0] if doc.strip() else ''}")
    lines.append("variants (any config, comma-separated, e.g. cifar100:b50,inc10,rapf):")
    for token, meaning in VARIANTS:
        lines.append(f"  {token:<12} {meaning}" if len(token) < 13 else f"  {token}: {meaning}")
    return "\n".join(lines)


def format_config(config: ml_collections.ConfigDict) -> str:
    """One `key = value  # rule` line per field (long tuples shortened), for --show-config."""
    lines = []
    for key, value in flat_items(config):
        if isinstance(value, tuple) and len(value) > 12:
            line = f"{key} = ({', '.join(map(str, value[:8]))}, ... {len(value)} values)"
        else:
            line = f"{key} = {value!r}"
        rule = describe(RULES.get(key))
        lines.append(f"{line}  # {rule}" if rule else line)
    return "\n".join(lines)


def _parent(config: ml_collections.ConfigDict, key: str) -> tuple[ml_collections.ConfigDict, str]:
    keys = [k for k, _ in flat_items(config)]
    if key not in keys:
        close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else "; --show-config lists every key"
        raise ConfigError(f"unknown config key {key!r}{hint}")
    *path, leaf = key.split(".")
    return functools.reduce(operator.getitem, path, config), leaf


def _parse_scalar(text: str, kind: type, key: str) -> Any:
    if kind is bool:
        low = text.strip().lower()
        if low in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return low in ("true", "1", "yes", "on")
        raise ConfigError(f"config key {key!r} wants true or false, got {text!r}")
    try:
        return kind(text.strip()) if kind in (int, float) else text
    except ValueError:
        raise ConfigError(f"config key {key!r} wants a {kind.__name__}, got {text!r}") from None


def parse_value(config: ml_collections.ConfigDict, key: str, text: str) -> Any:
    """Parses `text` to the type of field `key` (tuples: comma-separated; placeholders: 'none')."""
    node, leaf = _parent(config, key)
    current = node[leaf]
    kind = type(current) if current is not None else node.get_ref(leaf).get_type()
    if current is None and text.strip().lower() in ("none", "null", ""):
        return None
    if kind is tuple:
        items = [t.strip() for t in text.strip("()[] ").split(",") if t.strip()]
        item_kind = type(current[0]) if current else str
        if item_kind is str and items and all(t.lstrip("-").isdigit() for t in items):
            item_kind = int  # an empty tuple default gives no type; digits are ints
        return tuple(_parse_scalar(t, item_kind, key) for t in items)
    if kind is int and text.strip().lower().endswith(".0"):
        text = text.strip()[:-2]
    return _parse_scalar(text, kind, key)


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Iterable[str]
) -> ml_collections.ConfigDict:
    """Applies `key=value` strings in order (on a copy); raises ConfigError on a bad one."""
    config = copy.deepcopy(config)  # keeps the types of placeholder fields
    for item in overrides:
        key, eq, text = item.partition("=")
        key = key.strip().removeprefix("--").removeprefix("config.")
        if not eq:
            raise ConfigError(f"override {item!r} needs the form --config.{key}=VALUE")
        node, leaf = _parent(config, key)
        node[leaf] = parse_value(config, key, text)
        if key == "seed":  # `seeds` decides what runs; a lone --config.seed=3 means seeds=3
            config.seeds = str(config.seed)
    validate(config)
    return config


def validate(config: ml_collections.ConfigDict) -> None:
    """Rejects values that have the right type but cannot work; names the field and the fix."""
    try:  # every field's rule (RULES: ranges, choices, no NaN/Inf) and the preset's switches
        check_ranges(config, RULES)
        resolve_method(config)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    seeds_of(config)
    num_classes = config.dataset.num_classes
    if num_classes == 0 and config.dataset.name == "synthetic":
        raise ConfigError(
            f"dataset.num_classes={num_classes}: give the number of classes (0, 'count the "
            "class folders', only works for image datasets)"
        )
    if num_classes and config.continual.initial > num_classes:
        raise ConfigError(
            f"continual.initial={config.continual.initial} exceeds dataset.num_classes="
            f"{num_classes}"
        )
    fixed = config.order == "fixed" and num_classes
    if fixed and sorted(config.class_order) != list(range(num_classes)):
        raise ConfigError(
            f"class_order must list each of the {num_classes} labels 0..{num_classes - 1} once "
            f"(got {len(config.class_order)} entries); or set --config.order=seeded"
        )


def seeds_of(config: ml_collections.ConfigDict) -> list[int]:
    """The run seeds of `config.seeds` ("0", "0,1,2" or "0-4")."""
    text = str(config.seeds).strip()
    try:
        if "-" in text and "," not in text:
            lo, hi = (int(t) for t in text.split("-"))
            seeds = list(range(lo, hi + 1))
        else:
            seeds = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be distinct integers like '0' or '0,1,2', got {text!r}")
    return seeds
