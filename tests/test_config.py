"""Method presets: each method's resolved switches, written out by hand from DESIGN.md §2, so a
preset cannot drift silently; the preset is the single place a method's switches are set."""

import numpy as np
import pytest

from calfuse_jax import methods
from calfuse_jax.config import METHODS, method_config, resolve_method

# (calibration.mode, calibration.value, fusion.rules, train.epochs, pseudo.classes_per_batch,
#  pseudo.hard_weight, loss.kd_weight); the base config sets kd_weight 0.5 to see who clears it.
EXPECTED = {
    "calfuse": ("dynamic", 0.5, ("adapter/kernel=qr", "calib/.*=keep_new"), 15, 2, 1.0, 0.5),
    "rapf": ("none", 0.5, ("adapter/kernel=svd", "calib/.*=keep_new"), 15, 2, 1.0, 0.5),
    "finetune": ("none", 0.5, (".*=keep_new",), 15, 0, 0.0, 0.0),
    "zeroshot": ("fixed", 1.0, (".*=keep_new",), 0, 2, 1.0, 0.5),  # plain CLIP: g = 1 is n(f0)
    # The closed-form baselines only stop training; joint trains without pseudo-features.
    **{m: ("dynamic", 0.5, ("adapter/kernel=qr", "calib/.*=keep_new"), 0, 2, 1.0, 0.5)
       for m in ("ncm", "ncm+text", "fecam", "ranpac")},
    "joint": ("dynamic", 0.5, (".*=keep_new",), 15, 0, 0.0, 0.0),
}  # fmt: skip


def switches(c):
    return (
        c.calibration.mode,
        c.calibration.value,
        c.fusion.rules,
        c.train.epochs,
        c.pseudo.classes_per_batch,
        c.pseudo.hard_weight,
        c.loss.kd_weight,
    )


@pytest.mark.parametrize("method", METHODS)
def test_each_preset_resolves_to_its_switches(method):
    config = method_config()
    config.method = method
    config.loss.kd_weight = 0.5
    resolved = resolve_method(config)
    assert switches(resolved) == EXPECTED[method]
    assert config.calibration.mode == "dynamic" and config.train.epochs == 15  # input untouched
    assert resolve_method(resolved).to_dict() == resolved.to_dict()  # resolving twice is a no-op


def test_every_method_has_an_expectation():
    assert set(EXPECTED) == set(METHODS)


def test_unknown_method_is_refused_with_the_choices():
    config = method_config()
    config.method = "clip"
    with pytest.raises(ValueError, match=r"'method' is 'clip'; choose one of calfuse, rapf"):
        resolve_method(config)


def test_distillation_without_pseudo_features_is_refused():
    # KD distils on the pseudo-features of the K old classes of each batch; with K = 0 the step
    # used to replay class position 0 in every batch just to feed it. Now the combination stops
    # with the fix, in the preset resolution and in the step settings alike.
    config = method_config()
    config.loss.kd_weight = 0.5
    config.pseudo.classes_per_batch = 0
    message = r"loss.kd_weight=0.5 needs pseudo.classes_per_batch >= 1.*or loss.kd_weight=0"
    with pytest.raises(ValueError, match=message):
        resolve_method(config)
    with pytest.raises(ValueError, match=message):
        methods.step_settings(config, logit_scale=100.0)
    # finetune clears both switches, so asking it for KD is not an error; K = 0 without KD draws
    # no pseudo-features at all.
    config.method = "finetune"
    assert resolve_method(config).loss.kd_weight == 0.0
    config.method, config.loss.kd_weight = "calfuse", 0.0
    settings = methods.step_settings(resolve_method(config), logit_scale=100.0)
    assert (settings.pseudo_per_class, settings.use_kd) == (0, False)
    config.pseudo.classes_per_batch, config.loss.kd_weight = 2, 0.5
    settings = methods.step_settings(resolve_method(config), logit_scale=100.0)
    assert (settings.pseudo_per_class, settings.use_kd) == (20, True)  # floor(10 * beta 2)
    assert methods.step_floats(config).kd_weight == np.float32(0.5)  # traced, not static
