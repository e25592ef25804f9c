"""Ablation grids: named presets and `key=v1,v2` axes, expanded into one cell per combination.

    method             CalFuse, RAPF, finetune, zero-shot, each with its own preset settings
    baselines          the frozen-feature baselines (issue 14) and the joint upper bound
    calfuse_ablation   CalFuse with gate mode x adapter fusion x distillation on/off (30 cells)

A grid is a tuple of axes `(key, values)`: `key` is a dotted config field (`calibration.mode`) and
`values` are the texts `--config.key=value` would take. An axis with one value is a fixed setting
of every cell (the presets pin `method=calfuse` this way, so `calibration.*` is not overridden by
another method's preset). The value lists come from the library (`config.METHODS`,
`calibration.GATE_MODES`); `experiments.ablate` runs the cells.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Sequence

from calfuse_jax.calibration import GATE_MODES
from calfuse_jax.config import METHODS

Axis = tuple[str, tuple[str, ...]]

# Distillation "on" weight of the `calfuse_ablation` grid: DESIGN.md §2 names the KL term but not
# its weight, so 1.0 (the same weight as the hinge) is this grid's choice; --grid changes it.
KD_ON = "1.0"

BASELINES = ("ncm", "ncm+text", "fecam", "ranpac", "joint")  # issue 14; joint: an upper bound
PRESETS: dict[str, tuple[Axis, ...]] = {
    "method": (("method", tuple(m for m in METHODS if m not in BASELINES)),),
    "baselines": (("method", BASELINES),),
    "calfuse_ablation": (
        ("method", ("calfuse",)),
        ("calibration.mode", GATE_MODES),
        # One rule each (a leaf no rule matches keeps its new value, so the gate does).
        ("fusion.rules", ("adapter/kernel=qr", "adapter/kernel=svd", "adapter/kernel=keep_new")),
        ("loss.kd_weight", ("0.0", KD_ON)),
    ),
}


class GridError(ValueError):
    """A grid that cannot be expanded (bad syntax, unknown preset, repeated key)."""


@dataclasses.dataclass(frozen=True)
class Cell:
    """One combination of a grid.

    Attributes:
      values: `{key: value text}` for every axis, fixed ones included, in axis order.
      varied: the keys of the axes with several values (what tells cells apart).
    """

    values: dict[str, str]
    varied: tuple[str, ...]

    @property
    def overrides(self) -> list[str]:
        """`key=value` strings for `experiments.configs.apply_overrides`."""
        return [f"{key}={value}" for key, value in self.values.items()]

    @property
    def name(self) -> str:
        """A folder name made of the varied settings, e.g. `calibration.mode-none__fusion.method-qr`
        (`default` when nothing varies)."""
        parts = [f"{key}-{self.values[key]}" for key in self.varied]
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", "__".join(parts)) or "default"

    @property
    def label(self) -> str:
        """A short human label: the value alone when one key varies (`rapf`), else the values
        with the last part of their keys (`mode=none method=qr`)."""
        if len(self.varied) == 1:
            return self.values[self.varied[0]]
        return " ".join(f"{short_key(key)}={self.values[key]}" for key in self.varied) or "default"


def short_key(key: str) -> str:
    """The last part of a dotted key (`calibration.mode` -> `mode`), used as a column title."""
    return key.rsplit(".", 1)[-1]


def parse_axis(spec: str) -> Axis:
    """`"calibration.mode=none,fixed"` -> `("calibration.mode", ("none", "fixed"))`."""
    key, eq, text = spec.partition("=")
    key = key.strip().removeprefix("--").removeprefix("config.")
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    if not eq or not key or not values:
        raise GridError(
            f"grid axis {spec!r} needs the form KEY=V1,V2,... (e.g. calibration.mode=none,dynamic)"
        )
    if len(set(values)) != len(values):
        raise GridError(f"grid axis {spec!r} lists a value twice")
    return key, values


def parse_grid(specs: Sequence[str]) -> tuple[Axis, ...]:
    """Axes from `KEY=V1,V2` strings; a key may appear once."""
    axes = tuple(parse_axis(spec) for spec in specs)
    keys = [key for key, _ in axes]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise GridError(f"grid key(s) {', '.join(repeated)} given more than once; merge the values")
    return axes


def preset(name: str) -> tuple[Axis, ...]:
    """The axes of a named preset grid (see `PRESETS`)."""
    if name not in PRESETS:
        raise GridError(f"unknown preset grid {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def combine(base: Sequence[Axis], extra: Sequence[Axis]) -> tuple[Axis, ...]:
    """`base` axes with `extra` ones added; an extra axis replaces a base axis of the same key
    (so `--preset calfuse_ablation --grid loss.kd_weight=0,0.5` changes the KD weights)."""
    extra_keys = {key for key, _ in extra}
    merged = [axis for axis in base if axis[0] not in extra_keys]
    return tuple(merged) + tuple(extra)


def expand(axes: Sequence[Axis]) -> list[Cell]:
    """Every combination of `axes`, the last axis varying fastest."""
    if not axes:
        raise GridError("empty grid: pass --preset NAME or --grid KEY=V1,V2 ...")
    keys = [key for key, _ in axes]
    varied = tuple(key for key, values in axes if len(values) > 1)
    product = itertools.product(*(values for _, values in axes))
    return [Cell(dict(zip(keys, combo, strict=True)), varied) for combo in product]
