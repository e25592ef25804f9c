"""The method seam: what the training step, the evaluation and the task loop call.

A `Method` may add `update(params, features, labels, rng, inputs)` (called once per task before
training) and `joint = True` (train on every seen class's rows). `REGISTRY`: `config.method` ->
`Entry`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from calfuse_jax import calibration, fecam, fusion, losses, prototypes, ranpac, stats


class Method(Protocol):
    """What the train step, the evaluation and the task loop call: `init` (fresh params),
    `logits` ([B, C] of frozen features f0 [B, D]) and, when it trains, `loss` ((scalar, dict of
    terms) of one batch, see `loss_fn`)."""

    trains: bool  # False: no training steps and no fusion (zero-shot, NCM)
    fusion_rules: tuple[fusion.Rule, ...]  # how old and new params merge after a task

    def init(self, key: jax.Array) -> Any: ...
    def logits(self, params: Any, f0: jax.Array, inputs: TaskInputs) -> jax.Array: ...
    def loss(self, params: Any, batch, pseudo_ids, rng, inputs: TaskInputs): ...


class StepFloats(NamedTuple):
    """The step's float settings as traced float32 scalars (`FLOAT_FIELDS`), so runs differing
    only in these share one compile and can train together; their on/off switches (a weight of
    0) stay static, in `StepSettings`."""

    lr: jax.Array
    kd_weight: jax.Array
    kd_temperature: jax.Array
    hard_margin: jax.Array
    hard_weight: jax.Array


# The config fields of `StepFloats`, in its order.
FLOAT_FIELDS = ("train.lr", "loss.kd_weight", "loss.kd_temperature")
FLOAT_FIELDS += ("pseudo.hard_margin", "pseudo.hard_weight")


def step_floats(config: ml_collections.ConfigDict) -> StepFloats:
    """`config`'s `StepFloats` (NumPy float32 scalars)."""
    values = (config[group][name] for group, name in (f.split(".") for f in FLOAT_FIELDS))
    return StepFloats(*(np.float32(v) for v in values))


class TaskInputs(NamedTuple):
    """What a method reads besides params and batch: constant in a task, padded to all C classes."""

    text: jax.Array  # [C, D] unit text embeddings by position
    ctx: calibration.TaskContext  # num_old = 0 (task 0) turns the old-class terms off
    means: jax.Array  # [C, D] class means (zero rows for classes without statistics yet)
    chols: jax.Array  # [C, D, D] their Cholesky factors
    pairs: jax.Array  # int32 [P, 2] hard pairs (old, new), padded; P = 0: the run has none
    pair_mask: jax.Array  # float32 [P] 1 for a real pair
    teacher: Any  # the previous task's head params (the current ones on task 0)
    teacher_ctx: calibration.TaskContext  # the previous task's context
    floats: StepFloats | None = None  # None where nothing trains


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """Static (hashable) structure of a run's step; changing one means a new trace."""

    logit_scale: float
    pseudo_per_class: int  # floor(10 beta), 0 disables pseudo-features
    hard_per_class: int  # floor(20 beta), 0 disables the hinge
    use_kd: bool  # loss.kd_weight > 0


def make_head(config: ml_collections.ConfigDict, dim: int) -> calibration.CalibratedHead:
    """The `CalibratedHead` of `config` for features of width `dim`."""
    gate = config.calibration.to_dict()
    return calibration.CalibratedHead(dim=dim, adapter_init=config.head.init, **gate)


def step_settings(config: ml_collections.ConfigDict, logit_scale: float):
    """The static settings of a run; ValueError for switches that do not work together."""
    check_switches(config)
    pseudo = config.pseudo
    beta = float(pseudo.beta)
    return StepSettings(
        logit_scale=float(logit_scale),
        pseudo_per_class=int(np.floor(10 * beta)) if int(pseudo.classes_per_batch) > 0 else 0,
        hard_per_class=int(np.floor(20 * beta)) if float(pseudo.hard_weight) > 0 else 0,
        use_kd=float(config.loss.kd_weight) > 0,
    )


def head_apply(head, params, f0, text, ctx, settings: StepSettings):
    """(logits [B, C], calibrated features [B, D]) of the head on frozen features f0 [B, D]."""
    features, _ = head.apply({"params": params}, f0, ctx)
    return calibration.head_logits(features, text, settings.logit_scale), features


def loss_fn(params, batch, pseudo_ids, rng, inputs: TaskInputs, head, settings: StepSettings):
    """(total loss, its terms) of one batch (DESIGN.md §2): CE on real + pseudo features, hinge
    on hard pairs, KD on the pseudo-features. `batch`: (features [B, D], positions [B], mask
    [B]); `pseudo_ids` int32 [K] the old classes whose pseudo-features join it."""
    features, labels, mask = batch
    floats, n_p = inputs.floats, settings.pseudo_per_class
    num_pseudo = pseudo_ids.shape[0] * n_p
    has_old = (inputs.ctx.num_old > 0).astype(jnp.float32)  # old-class terms are off on task 0
    hard_rows = settings.hard_per_class if inputs.pairs.shape[0] else 0  # P = 0: no pair at all
    if n_p or hard_rows:
        # n_p rows of each pseudo class, then n_h rows of each hard pair's old class: one draw.
        block = math.gcd(n_p, hard_rows)  # gcd(n, 0) = n
        ids = [jnp.repeat(pseudo_ids, n_p // block)] if n_p else []
        if hard_rows:
            ids.append(jnp.repeat(inputs.pairs[:, 0], hard_rows // block))
        ids = jnp.concatenate(ids).astype(jnp.int32)
        extra, extra_labels = stats.sample_pseudo(rng, inputs.means, inputs.chols, ids, block)
        features = jnp.concatenate([features, extra])  # one pass of the head over everything
    logits, calibrated = head_apply(head, params, features, inputs.text, inputs.ctx, settings)
    real = labels.shape[0]
    ce_rows, terms = real + num_pseudo, {}
    if n_p:
        kd_mask = jnp.full((num_pseudo,), has_old)
        labels = jnp.concatenate([labels, extra_labels[:num_pseudo].astype(labels.dtype)])
        mask = jnp.concatenate([mask, kd_mask])
        if settings.use_kd:  # the teacher's logits get no gradient (`distillation_loss`)
            teacher, _ = head_apply(
                head, inputs.teacher, extra[:num_pseudo], inputs.text, inputs.teacher_ctx, settings
            )
            kd = losses.distillation_loss(
                logits[real:ce_rows], teacher, floats.kd_temperature, inputs.ctx.num_old, kd_mask
            )
            terms["kd"] = floats.kd_weight * kd
    terms["ce"] = losses.cross_entropy(
        logits[:ce_rows], labels, num_seen=inputs.ctx.num_seen, mask=mask
    )
    if hard_rows:
        own = jnp.repeat(inputs.text[inputs.pairs[:, 0]], hard_rows, axis=0)  # [P * n_h, D]
        other = jnp.repeat(inputs.text[inputs.pairs[:, 1]], hard_rows, axis=0)
        pair_mask = jnp.repeat(inputs.pair_mask, hard_rows) * has_old
        hinge = losses.hinge_loss(calibrated[ce_rows:], own, other, floats.hard_margin, pair_mask)
        terms["hinge"] = floats.hard_weight * hinge
    return sum(terms.values()), terms


@dataclasses.dataclass(frozen=True)
class CalibratedHeadMethod:
    """The calibrated head trained with the loss of DESIGN.md §2 (CalFuse, RAPF, ...)."""

    head: calibration.CalibratedHead
    settings: StepSettings
    fusion_rules: tuple[fusion.Rule, ...]
    trains: bool
    joint: bool = False

    @classmethod
    def build(cls, config, dim: int, logit_scale: float, num_classes: int, joint: bool = False):
        return cls(
            head=make_head(config, dim),
            settings=step_settings(config, logit_scale),
            fusion_rules=fusion.parse_rules(config.fusion.rules),
            trains=int(config.train.epochs) > 0,
            joint=joint,
        )

    def init(self, key: jax.Array):
        dummy = jnp.zeros((1, self.head.dim), jnp.float32)
        ctx = calibration.task_context([0, 1], 0)  # the parameters do not depend on the task
        return self.head.init(key, dummy, ctx)["params"]

    def logits(self, params, f0, inputs: TaskInputs):
        return head_apply(self.head, params, f0, inputs.text, inputs.ctx, self.settings)[0]

    def loss(self, params, batch, pseudo_ids, rng, inputs: TaskInputs):
        return loss_fn(params, batch, pseudo_ids, rng, inputs, self.head, self.settings)


class Entry(NamedTuple):
    """A registered method: its constructor and its preset (flat config names -> values)."""

    build: Callable[[ml_collections.ConfigDict, int, float, int], Method]
    preset: dict[str, Any]


_HEAD, _KEEP_NEW = CalibratedHeadMethod.build, (".*=keep_new",)
_NO_OLD = {"loss.kd_weight": 0.0, "pseudo.classes_per_batch": 0, "pseudo.hard_weight": 0.0}
REGISTRY: dict[str, Entry] = {
    "calfuse": Entry(_HEAD, {}),
    "rapf": Entry(
        _HEAD,
        {"calibration.mode": "none", "fusion.rules": ("adapter/kernel=svd", "calib/.*=keep_new")},
    ),
    "finetune": Entry(_HEAD, {"calibration.mode": "none", "fusion.rules": _KEEP_NEW, **_NO_OLD}),
    # Plain CLIP: no training, and a fixed gate g = 1, so the calibrated feature is n(f0).
    "zeroshot": Entry(
        _HEAD,
        {"train.epochs": 0, "fusion.rules": _KEEP_NEW}
        | {"calibration.mode": "fixed", "calibration.value": 1.0},
    ),
    # The frozen-feature baselines (closed form, no training) and the joint upper bound.
    "ncm": Entry(prototypes.NearestClassMean.build, {"train.epochs": 0, "ncm.text_weight": 0.0}),
    "ncm+text": Entry(prototypes.NearestClassMean.build, {"train.epochs": 0}),
    "fecam": Entry(fecam.FeCAM.build, {"train.epochs": 0}),
    "ranpac": Entry(ranpac.RanPAC.build, {"train.epochs": 0}),
    "joint": Entry(functools.partial(_HEAD, joint=True), {"fusion.rules": _KEEP_NEW, **_NO_OLD}),
}


def check_switches(config: ml_collections.ConfigDict) -> None:
    """ValueError on switches that cannot work together (KD runs on the pseudo-features, so
    `loss.kd_weight > 0` needs K > 0), an empty RanPAC ridge range or unparsable fusion rules."""
    if float(config.loss.kd_weight) > 0 and int(config.pseudo.classes_per_batch) <= 0:
        raise ValueError(
            f"loss.kd_weight={config.loss.kd_weight} needs pseudo.classes_per_batch >= 1: "
            "distillation runs on the pseudo-features of old classes, and "
            "pseudo.classes_per_batch=0 draws none; set pseudo.classes_per_batch (e.g. 2) or "
            "loss.kd_weight=0"
        )
    exponents = tuple(config.ranpac.ridge_exponents) if "ranpac" in config else (0, 0)
    if len(exponents) != 2 or exponents[0] > exponents[1]:
        raise ValueError(
            f"ranpac.ridge_exponents={exponents} must be (first, last) with first <= last: the "
            "ridge candidates are 10^k for k = first..last; set e.g. "
            "--config.ranpac.ridge_exponents='(-8, 13)'"
        )
    fusion.parse_rules(config.fusion.rules)
