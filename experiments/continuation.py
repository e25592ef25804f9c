"""`python -m experiments.run --continue-from RUN --config folder --config.dataset.root=DIR`:
a finished run takes the classes of another source as further tasks, into a new results folder.
The new classes' data fields (`DATA_KEYS`) come from `--config`, everything else from RUN's
config.json; RUN itself is only read."""

from __future__ import annotations

import argparse
import logging
import pathlib
import re

import ml_collections
import numpy as np

from calfuse_jax import rundir
from calfuse_jax.continuation import extend_stream, finished_run, seed_continuation
from calfuse_jax.sharding import is_primary
from experiments import pipeline, run
from experiments.pipeline import Prepared, UserError

log = logging.getLogger("experiments.run")

DATA_KEYS = ("name", "dataset", "order", "class_order", "continual")  # from --config


def _old_run(workdir: pathlib.Path) -> tuple[ml_collections.ConfigDict, dict]:
    """(config, provenance) of the finished one-seed run of `experiments.run` in `workdir`."""
    config, provenance = (rundir.readable_json(workdir / name)
                          for name in (rundir.CONFIG_FILE, "provenance.json"))  # fmt: skip
    if config is None or provenance is None or not (workdir / "checkpoints").is_dir():
        seeds = sorted(p.name for p in workdir.glob("seed_*") if p.is_dir())
        which = (
            f": it holds seeds, continue one of them, e.g. {workdir / seeds[0]}" if seeds else ""
        )
        raise UserError(
            f"--continue-from {workdir} is not the results folder of one finished run of "
            f"`python -m experiments.run` (config.json, provenance.json, checkpoints/){which}"
        )
    if not provenance.get("weights"):
        raise UserError(
            f"the run in {workdir} was trained on {provenance['dataset']['name']} features, not "
            "on images through CLIP weights: only a run on images can take image classes"
        )
    finished_run(workdir)  # unfinished: refused before any feature is extracted
    return ml_collections.ConfigDict(config), provenance


def _configs(old: ml_collections.ConfigDict, source: ml_collections.ConfigDict, overrides):
    """(the old run's config, the new classes', the continued run's); UserError for an override
    of a field that the continued run takes from the old one."""
    kept = sorted(
        o for o in overrides
        if o.partition("=")[0].strip().split(".")[0] not in DATA_KEYS
        and o.partition("=")[0].strip() not in rundir.RESUME_SAFE
    )  # fmt: skip
    if kept:
        raise UserError(
            f"{', '.join('--config.' + o for o in kept)}: a continued run keeps the method, "
            "training, model and prompt fields of the run it continues; only the new classes' "
            f"data fields ({', '.join(DATA_KEYS)}) and {', '.join(rundir.RESUME_SAFE)} may be set"
        )
    given = {o.partition("=")[0].strip() for o in overrides} | {"progress"}  # progress: -q
    safe = {k: v for k, v in rundir.flat(source.to_dict()).items() if k in given}
    base = _nested(rundir.flat(old.to_dict()) | safe)  # the old run's cache, unless given
    new = ml_collections.ConfigDict(base | {k: source.to_dict()[k] for k in DATA_KEYS})
    new = pipeline.with_data_fields(new)
    config = ml_collections.ConfigDict(base)
    config.name = f"{old.name}+{new.name}"
    return ml_collections.ConfigDict(base), new, config


def _nested(flat: dict) -> dict:
    """The nested dict of `rundir.flat`'s output, lists back to tuples (config.json's lists)."""
    out: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = tuple(value) if isinstance(value, list) else value
    return out


def _check_names(old_provenance: dict, new: ml_collections.ConfigDict) -> None:
    """UserError naming the new classes whose names the run has already."""
    names = pipeline.load_split(new, new.dataset.train_split).class_names
    clash = sorted(set(pipeline.prompt_names(new, names)) & set(
        old_provenance["prompts"]["class_names"]))  # fmt: skip
    if clash:
        raise UserError(
            f"the classes {', '.join(map(repr, clash[:10]))} of {new.dataset.root or new.name} "
            "already exist in the run being continued; rename or leave out those class folders "
            "(a class of the run is not trained again from other images)"
        )


def _merged(old_workdir, old: Prepared, new: Prepared) -> Prepared:
    """The whole stream (old tasks, then new) with the provenance of both sources."""
    if new.provenance["weights"]["sha256"] != old.provenance["weights"]["sha256"]:
        raise UserError(
            f"the new classes were encoded with other CLIP weights ({new.provenance['weights']}) "
            f"than the run in {old_workdir} ({old.provenance['weights']}); restore those weights"
        )
    stream, text = extend_stream(old.stream, old.text_features, new.stream, new.text_features)
    provenance = dict(old.provenance)
    provenance.update(
        dataset={"name": f"{old.provenance['dataset']['name']}+{new.provenance['dataset']['name']}",
                 "parts": [old.provenance["dataset"], new.provenance["dataset"]]},
        class_order=stream.split.class_order.tolist(), task_bounds=stream.split.bounds.tolist(),
        split_hash=pipeline.split_hash(stream.split, *(p.provenance["split_hash"]
                                                       for p in (old, new))),
        prompts=dict(old.provenance["prompts"], class_names=list(stream.class_names)),
    )  # fmt: skip
    return Prepared(stream, np.asarray(text, np.float32), old.logit_scale, provenance)


def continue_experiment(args: argparse.Namespace, source, overrides) -> tuple:
    """`--continue-from`: (config, summary) of the continued run; sets `args.workdir`."""
    old_workdir = pathlib.Path(args.continue_from).expanduser().absolute()
    old_config, old_provenance = _old_run(old_workdir)
    old_config, new_config, config = _configs(old_config, source, overrides)
    _check_names(old_provenance, new_config)
    name = re.sub(r"[^\w.,=+-]", "_", f"{old_workdir.name}+{new_config.name}")
    workdir = pathlib.Path(args.workdir or old_workdir.parent / name).absolute()
    args.workdir = str(workdir)
    config.continuation = {"run": str(old_workdir), "source": {
        k: new_config.to_dict()[k] for k in DATA_KEYS}}  # fmt: skip
    rundir.refuse_foreign(workdir)
    with rundir.lock(workdir):
        run.claim_workdir(workdir, config.to_dict(), args.overwrite)
        old, new = pipeline.prepare(old_config), pipeline.prepare(new_config)
        prepared = _merged(old_workdir, old, new)
        if is_primary():  # marks the folder ours before the checkpoints come
            rundir.write_json(workdir / rundir.CONFIG_FILE, config.to_dict())
        record = seed_continuation(old_workdir, prepared.stream, prepared.text_features, config,
                                   workdir, logit_scale=prepared.logit_scale)  # fmt: skip
        prepared.provenance["continued_from"] = record
        log.info("continuing %s with %d new classes -> %s", old_workdir,
                 len(record["added_labels"]), workdir)  # fmt: skip
        return config, run.run_seeds_together([(config, workdir)], prepared)[0]
