"""Method defaults shared by the library and every experiment config.

`method_config()` holds every choice of DESIGN.md §2 as a field, so the paper's exact settings
are a config change, never a code change. `experiments/configs/` adds dataset and model fields on
top of it; `resolve_method(config)` turns the `method` preset into concrete switches.
"""

from __future__ import annotations

import ml_collections

from calfuse_jax import methods

METHODS = tuple(methods.REGISTRY)  # the registered methods (`methods.REGISTRY`)


def method_config() -> ml_collections.ConfigDict:
    """Default CalFuse settings (CIFAR-100 B0 Inc10 values where a dataset matters)."""
    c = ml_collections.ConfigDict()
    c.method = "calfuse"  # a key of methods.REGISTRY: calfuse | rapf | finetune | zeroshot
    c.seed = 0
    c.logit_scale = 100.0  # CLIP's exp(logit_scale); overwritten from the checkpoint when known

    c.head = ml_collections.ConfigDict()
    c.head.init = "pytorch"  # pytorch (uniform +-1/sqrt(d)) | identity

    c.calibration = ml_collections.ConfigDict()
    c.calibration.mode = "dynamic"  # none | fixed | schedule | learned | dynamic
    c.calibration.value = 0.5  # g for `fixed`
    c.calibration.schedule = "linear"  # linear (g_first -> g_last) | old_fraction
    c.calibration.g_first = 0.0
    c.calibration.g_last = 0.5
    c.calibration.init_bias = (
        0.0  # initial gate pre-activation for learned/dynamic (sigmoid(0)=0.5)
    )

    c.fusion = ml_collections.ConfigDict()
    # "path_regex=action" (fusion.fuse_params): the adapter is QR-fused, the gate keeps its
    # newest values; any leaf no rule matches keeps its new value too.
    c.fusion.rules = ("adapter/kernel=qr", "calib/.*=keep_new")
    c.fusion.mix_bias = 0.6  # b in M = min(1, D / max(D) + b)

    c.stats = ml_collections.ConfigDict()
    c.stats.cov_eps = 1e-4
    c.stats.shrinkage = False

    c.pseudo = ml_collections.ConfigDict()
    c.pseudo.classes_per_batch = 2  # K old classes per batch
    c.pseudo.beta = 2.0  # floor(10*beta) samples per old class, floor(20*beta) per hard pair
    c.pseudo.hard_threshold = 0.55  # ||T_j - T_i|| below this is a hard pair
    c.pseudo.hard_margin = 0.1
    c.pseudo.hard_weight = 1.0

    c.loss = ml_collections.ConfigDict()
    c.loss.kd_weight = 0.0  # 0 disables distillation
    c.loss.kd_temperature = 2.0

    c.train = ml_collections.ConfigDict()
    c.train.epochs = 15
    c.train.batch_size = 128  # global batch, independent of the number of devices; the dataset
    # configs set RAPF's per split (experiments/configs, e.g. CIFAR-100 100, ImageNet-R 64)
    c.train.lr = 1e-3
    c.train.milestones = (4, 10)  # epochs where lr is multiplied by lr_decay
    c.train.lr_decay = 0.1
    c.train.checkpoint_every_steps = 0  # 0: only task checkpoints; >0 also step checkpoints
    c.train.eval_batch_size = 1024

    c.continual = ml_collections.ConfigDict()
    c.continual.initial = 10  # classes in the first task (B0: equal to increment)
    c.continual.increment = 10
    return c


def resolve_method(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Returns a copy of `config` with the `method` preset applied (`methods.REGISTRY`: e.g.
    rapf: SVD fusion, no calibration; zeroshot: no training, g = 1).

    Raises ValueError on an unknown method and on switches that cannot work together
    (`methods.check_switches`).
    """
    if config.method not in methods.REGISTRY:
        choices = ", ".join(methods.REGISTRY)
        raise ValueError(f"unknown method {config.method!r}; choose one of {choices}")
    c = ml_collections.ConfigDict(config.to_dict())
    c.update_from_flattened_dict(dict(methods.REGISTRY[c.method].preset))
    methods.check_switches(c)
    return c
