"""Ablation grids: named presets and `key=v1,v2` axes, expanded into one cell per combination.

An axis is `(dotted config key, value texts)`; an axis with one value is a fixed setting of every
cell. `experiments.ablate` runs the cells.
"""

import dataclasses
import itertools
import re
from collections.abc import Sequence

from calfuse_jax.calibration import GATE_MODES
from calfuse_jax.config import METHODS

Axis = tuple[str, tuple[str, ...]]

# Distillation "on" weight of `calfuse_ablation`: DESIGN.md §2 gives none; 1.0 is the hinge's.
KD_ON = "1.0"

BASELINES = ("ncm", "ncm+text", "fecam", "ranpac", "joint")  # issue 14; joint: an upper bound
PRESETS: dict[str, tuple[Axis, ...]] = {
    "method": (("method", tuple(m for m in METHODS if m not in BASELINES)),),
    "baselines": (("method", BASELINES),),
    "calfuse_ablation": (
        ("method", ("calfuse",)),
        ("calibration.mode", GATE_MODES),
        ("fusion.rules", ("adapter/kernel=qr", "adapter/kernel=svd", "adapter/kernel=keep_new")),
        ("loss.kd_weight", ("0.0", KD_ON)),
    ),
}


class GridError(ValueError):
    """A grid that cannot be expanded (bad syntax, unknown preset, repeated key)."""


@dataclasses.dataclass(frozen=True)
class Cell:
    """One combination: `{key: value text}` of every axis in order; `varied`: the keys of the
    axes with several values."""

    values: dict[str, str]
    varied: tuple[str, ...]

    @property
    def overrides(self) -> list[str]:
        return [f"{key}={value}" for key, value in self.values.items()]

    @property
    def name(self) -> str:
        """A folder name of the varied settings (`calibration.mode-none__loss.kd_weight-1.0`)."""
        parts = [f"{key}-{self.values[key]}" for key in self.varied]
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", "__".join(parts)) or "default"

    @property
    def label(self) -> str:
        """`rapf` when one key varies, else `mode=none kd_weight=1.0`."""
        if len(self.varied) == 1:
            return self.values[self.varied[0]]
        return " ".join(f"{short_key(key)}={self.values[key]}" for key in self.varied) or "default"


def short_key(key: str) -> str:
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
    """`base` axes, less those whose key an `extra` axis has, then `extra`."""
    keys = {key for key, _ in extra}
    return tuple(axis for axis in base if axis[0] not in keys) + tuple(extra)


def expand(axes: Sequence[Axis]) -> list[Cell]:
    """Every combination of `axes`, the last axis varying fastest."""
    if not axes:
        raise GridError("empty grid: pass --preset NAME or --grid KEY=V1,V2 ...")
    keys = [key for key, _ in axes]
    varied = tuple(key for key, values in axes if len(values) > 1)
    product = itertools.product(*(values for _, values in axes))
    return [Cell(dict(zip(keys, combo, strict=True)), varied) for combo in product]
