"""Method defaults shared by the library and every experiment config (DESIGN.md §2)."""

from __future__ import annotations

import copy
import math
import operator

import ml_collections

from calfuse_jax import methods
from calfuse_jax.calibration import GATES, HEAD_INITS, SCHEDULES

METHODS = tuple(methods.REGISTRY)

# dotted name -> (default, rule): a range ("0 <= x <= 1", kept by each item of a tuple), the
# choices, or None (any value). Defaults are CIFAR-100 B0 Inc10 values where a dataset matters.
FIELDS = {
    "method": ("calfuse", methods.REGISTRY),  # calfuse | rapf | finetune | zeroshot | ...
    "seed": (0, "x >= 0"),
    "logit_scale": (100.0, "x > 0"),  # CLIP's exp(logit_scale); overwritten from the checkpoint
    "head.init": ("pytorch", HEAD_INITS),  # pytorch (uniform +-1/sqrt(d)) | identity
    "calibration.mode": ("dynamic", GATES),  # live: a registered gate mode is accepted
    "calibration.value": (0.5, "0 <= x <= 1"),  # g for `fixed`
    "calibration.schedule": ("linear", SCHEDULES),  # linear (g_first -> g_last) | old_fraction
    "calibration.g_first": (0.0, "0 <= x <= 1"),
    "calibration.g_last": (0.5, "0 <= x <= 1"),
    "calibration.init_bias": (0.0, "-inf < x < inf"),  # gate pre-activation (learned/dynamic)
    # "path_regex=action" (fusion.fuse_params); a leaf no rule matches keeps its new value.
    "fusion.rules": (("adapter/kernel=qr", "calib/.*=keep_new"), None),
    "fusion.mix_bias": (0.6, "0 <= x <= 1"),  # b in M = min(1, D / max(D) + b)
    "stats.cov_eps": (1e-4, "x >= 0"),
    "stats.shrinkage": (False, None),
    "pseudo.classes_per_batch": (2, "x >= 0"),  # K old classes per batch
    "pseudo.beta": (2.0, "x > 0"),  # floor(10*beta) samples per old class, floor(20*beta) per pair
    "pseudo.hard_threshold": (0.55, "x >= 0"),  # ||T_j - T_i|| below this is a hard pair
    "pseudo.hard_margin": (0.1, "x >= 0"),
    "pseudo.hard_weight": (1.0, "x >= 0"),
    "loss.kd_weight": (0.0, "x >= 0"),  # 0 disables distillation
    "loss.kd_temperature": (2.0, "x > 0"),
    "train.epochs": (15, "x >= 0"),
    "train.batch_size": (128, "x >= 1"),  # global, whatever the number of devices
    "train.lr": (1e-3, "x > 0"),
    "train.milestones": ((4, 10), "x >= 0"),  # epochs where lr is multiplied by lr_decay
    "train.lr_decay": (0.1, "x > 0"),
    # N > 0: also a step checkpoint at the end of each epoch that passes a multiple of N steps
    "train.checkpoint_every_steps": (0, "x >= 0"),
    "train.eval_batch_size": (1024, "x >= 1"),
    # Classes in the first task and per later task (0: decided from the data by the experiments)
    "continual.initial": (10, "x >= 0"),
    "continual.increment": (10, "x >= 0"),
    "ncm.text_weight": (0.5, "0 <= x <= 1"),  # ncm+text: w in (1 - w) cos(f, mean) + w cos(f, text)
    "fecam.tukey": (1.0, "x > 0"),  # Tukey power beta, 1 = off (the paper: 0.5, ReLU features)
    "ranpac.dim": (10_000, "x >= 1"),  # M random features (G is 4 M^2 bytes)
    "ranpac.holdout": (0.2, "0 < x < 1"),  # share of each task's rows that scores the ridges
    "ranpac.ridge_exponents": ((-8, 13), "-30 <= x <= 30"),  # lambda = 10^k, k first..last
}


def rules_of(fields: dict) -> dict:
    return {key: rule for key, (_, rule) in fields.items()}


RULES = rules_of(FIELDS)
_COMPARE = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


def build(fields: dict, c: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """`c` (default: a new ConfigDict) with the defaults of a `FIELDS`-style table."""
    c = ml_collections.ConfigDict() if c is None else c
    for key, (default, _) in fields.items():
        *path, leaf = key.split(".")
        node = c
        for part in path:
            if part not in node:
                node[part] = ml_collections.ConfigDict()
            node = node[part]
        node[leaf] = copy.deepcopy(default)  # placeholders are references: one per config
    return c


def method_config() -> ml_collections.ConfigDict:
    return build(FIELDS)


def describe(rule) -> str:
    """A rule as --show-config prints it: '0 <= x <= 1', 'x > 0', 'one of a, b' or ''."""
    return (rule or "") if rule is None or isinstance(rule, str) else "one of " + ", ".join(rule)


def _allowed(value, rule) -> bool:
    if isinstance(value, bool) or value is None:
        return True
    if isinstance(value, float) and not math.isfinite(value):
        return False
    if not isinstance(rule, str):
        return rule is None or value in rule
    t = [value if word == "x" else word for word in rule.split()]  # "0 <= x <= 1"
    pairs = zip(t[:-1:2], t[1::2], t[2::2], strict=True)  # (0, <=, x), (x, <=, 1)
    return all(_COMPARE[op](float(a), float(b)) for a, op, b in pairs)


def check_ranges(config: ml_collections.ConfigDict, rules: dict | None = None) -> None:
    """ValueError naming a field that breaks its rule (`rules`, default `RULES`) or is NaN/Inf."""
    for key, value in flat_items(config):
        rule = (RULES if rules is None else rules).get(key)
        if not all(_allowed(v, rule) for v in (value if isinstance(value, tuple) else [value])):
            want = f"a finite value x with {rule}" if isinstance(rule, str) else describe(rule)
            raise ValueError(
                f"config key {key!r} is {value!r}; choose {want or 'a finite value'}: set "
                f"--config.{key}=VALUE (--show-config prints every field's rule)"
            )


def flat_items(config: ml_collections.ConfigDict, prefix: str = ""):
    """(dotted name, value) of every leaf field, in order."""
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from flat_items(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


def resolve_method(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A checked copy of `config` with its `method` preset (`methods.REGISTRY`) applied."""
    check_ranges(config)
    c = ml_collections.ConfigDict(config.to_dict())
    c.update_from_flattened_dict(dict(methods.REGISTRY[c.method].preset))
    methods.check_switches(c)
    return c
