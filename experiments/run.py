"""Runs one benchmark end to end and writes a results folder.

    python -m experiments.run --config imagenet_r
    python -m experiments.run --config cifar100:inc5 --config.method=rapf --workdir runs/c5-rapf
    python -m experiments.run --config demo                      # offline, under a minute on CPU
    python -m experiments.run --config synthetic --config.seeds=0,1,2
    python -m experiments.run --config cifar100 --distributed    # on each host: TPU pod, SLURM
    python -m experiments.run --config synthetic:smoke --distributed \
        --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 0   # a manual cluster, per host

Running the same command again resumes an interrupted run (finished tasks come from checkpoints,
features from the cache); a workdir that holds a different config is refused unless `--overwrite`
(more seeds are not a different config: only the new ones run). Exit codes: 2 for a user error,
3 for a NaN/Inf loss (the last good checkpoint is kept).
From Python: `run_experiment(load_config("synthetic"), "runs/x")` returns the summary dict.

`--distributed` starts one process per host (or GPU) of a multi-process JAX run: it calls
`jax.distributed.initialize()` before anything touches a device (no arguments needed on TPU pods
and under SLURM; a manual cluster passes `--coordinator HOST:PORT --num-processes N --process-id I`
to every process, same command otherwise). Every process computes the same run over one global
mesh; process 0 alone writes the results folder (and moves an --overwritten run aside) while the
others wait for it at a barrier. The workdir and the cache must be on a filesystem all processes
see. On CPU the processes exchange gradients through gloo collectives.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import pathlib
import platform
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from importlib import metadata

import ml_collections

from calfuse_jax.config import resolve_method
from calfuse_jax.sharding import barrier, is_primary
from experiments import results
from experiments.cli import (
    add_distributed_flags,
    parse_with_overrides,
    setup_console,
    start_distributed,
)
from experiments.configs import (
    ConfigError,
    apply_overrides,
    format_config,
    load_config,
    seeds_of,
    validate,
)
from experiments.pipeline import Prepared, UserError, prepare

log = logging.getLogger("experiments.run")

# Problems a user can fix from the message alone (missing files, bad config, a workdir holding
# another run: calfuse_jax's ConfigMismatchError is a ValueError): printed as one message, no
# traceback, exit code 2. A NaN/Inf loss exits with 3 instead (the config was valid, the run
# diverged), also as one message: see `non_finite_message`.
EXPECTED_ERRORS = (ConfigError, UserError, FileNotFoundError, FileExistsError, ValueError)
EXIT_USER_ERROR, EXIT_NON_FINITE = 2, 3

# Fields that change where things are or how they are shown, not what a run computes: a resume
# may change them freely.
NOT_COMPARED = (
    "progress",
    "cache_dir",
    "features.batch_size",
    "train.eval_batch_size",
    "dataset.root",
    "dataset.data_dir",
    "dataset.download",
    "dataset.mirror",
    "outputs.plots",
    "outputs.tensorboard",
)
RESULT_MARKERS = ("config.json", "metrics.jsonl", "checkpoints", "summary.json")
PACKAGES = ("calfuse-jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy",
            "transformers", "ml_collections", "tensorflow-datasets")  # fmt: skip


def default_workdir(config_name: str, config: ml_collections.ConfigDict, overrides=()) -> str:
    """runs/<config>-<method>[-<hash of the overrides>]: stable, so re-running resumes."""
    stem = pathlib.Path(config_name.partition(":")[0]).stem
    variant = config_name.partition(":")[2].replace(",", "-")
    method = "" if config.method in variant.split("-") else config.method  # no "rapf-rapf"
    name = "-".join(p for p in (stem, variant, method) if p)
    keys = [o.partition("=")[0].strip() for o in overrides]
    relevant = sorted(
        o for o, k in zip(overrides, keys, strict=True) if k != "method" and k not in NOT_COMPARED
    )
    if relevant:
        name += "-" + hashlib.sha1("\n".join(relevant).encode()).hexdigest()[:8]
    return str(pathlib.Path("runs") / name)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = list(value) if isinstance(value, tuple | list) else value
    return out


def claim_workdir(workdir: str | os.PathLike, config: dict, overwrite: bool) -> bool:
    """Checks that `workdir` is new, a resume of the same config, or explicitly overwritten
    (then moves its content aside into overwritten-<time>/: nothing is deleted). Returns True
    when an existing run is resumed."""
    workdir = pathlib.Path(workdir)
    if not workdir.exists() or not any(p for p in workdir.iterdir() if not _aside(p)):
        return False
    is_results = any((workdir / m).exists() for m in RESULT_MARKERS)
    if not is_results:
        raise UserError(
            f"workdir {workdir} is not empty and holds no calfuse results; pass an empty or new "
            "--workdir (nothing was written)"
        )
    old_path = workdir / "config.json"
    old = _flat(results.read_json(old_path)) if old_path.exists() else {}
    new = _flat(results.jsonable(config))
    differ = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    differ = [k for k in differ if k not in NOT_COMPARED]
    layout = _several(old.get("seeds")), _several(new.get("seeds"))
    if "seeds" in differ and layout[0] is not None and layout[0] == layout[1]:
        # More (or fewer) seeds: each seed_<k> folder is its own run (its `seed` is compared),
        # so the finished ones are reused. Only one seed vs several changes the folder layout.
        differ.remove("seeds")
    if not differ and old:
        return True
    if not overwrite and not old:
        present = ", ".join(m for m in RESULT_MARKERS if (workdir / m).exists())
        raise UserError(
            f"workdir {workdir} holds results ({present}) but no config.json, so it cannot be "
            "resumed safely. Pass --overwrite to move them aside, or choose another --workdir."
        )
    if not overwrite:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differ[:5])
        more = f" (and {len(differ) - 5} more)" if len(differ) > 5 else ""
        raise UserError(
            f"workdir {workdir} holds a run of a different config ({shown}{more}). "
            "Pass --overwrite to replace it, or choose another --workdir; nothing was changed."
        )
    barrier("calfuse_claim_inspected")  # every process decided on the untouched folder
    if is_primary():
        aside = workdir / time.strftime("overwritten-%Y%m%d-%H%M%S")
        aside.mkdir()
        for path in workdir.iterdir():
            if not _aside(path):
                os.replace(path, aside / path.name)
        log.warning("--overwrite: moved the earlier run in %s aside to %s", workdir, aside)
    barrier("calfuse_claim_moved")
    return False


def _several(seeds: object) -> bool | None:
    """Whether a config's `seeds` text names more than one seed (the seed_<k> folder layout);
    None when it is missing or unreadable (then `seeds` is compared as it is)."""
    try:
        return len(seeds_of(ml_collections.ConfigDict({"seeds": str(seeds)}))) > 1
    except ConfigError:
        return None


def _aside(path: pathlib.Path) -> bool:
    return path.name.startswith("overwritten-")


@contextlib.contextmanager
def _log_file(workdir: pathlib.Path) -> Iterator[None]:
    """Copies every log record of this run into workdir/run.log (appending across resumes)."""
    workdir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(workdir / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    root.addHandler(handler)
    # Our INFO lines reach the file even when the caller (a notebook, pytest) left the root at
    # WARNING; the levels are restored afterwards.
    ours = [logging.getLogger(name) for name in ("experiments", "calfuse_jax")]
    levels = [logger.level for logger in ours]
    for logger in ours:
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
        for logger, level in zip(ours, levels, strict=True):
            logger.setLevel(level)


def environment() -> dict:
    """Package versions, devices, Python, host and the git commit of the code that ran."""
    import jax

    versions = {}
    for package in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    repo = pathlib.Path(__file__).resolve().parents[1]
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                              text=True, timeout=10)  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=repo, capture_output=True, text=True, timeout=10)  # fmt: skip
        if head.returncode == 0:
            commit = head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    return {
        "packages": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "devices": [str(d) for d in jax.devices()],
        "git_commit": commit,
    }


def wants_output(config: ml_collections.ConfigDict, name: str) -> bool:
    """`config.outputs.<name>` (plots, tensorboard); True for configs without an `outputs` block."""
    outputs = config.get("outputs") or {}
    return bool(outputs.get(name, True))


def run_seed(config: ml_collections.ConfigDict, prepared: Prepared, workdir) -> dict:
    """One seed of one method into `workdir` (checked with `claim_workdir` first); returns its
    summary (also summary.json)."""
    from calfuse_jax.continual import run_continual

    workdir = pathlib.Path(workdir)
    primary = is_primary()  # multi-process runs: process 0 writes, all compute
    with _log_file(workdir) if primary else contextlib.nullcontext():
        finished = len(results.read_metrics(workdir))
        if finished:
            log.info("resuming the run in %s after %d finished tasks", workdir, finished)
        log.info("%s %s seed %d -> %s", config.name, config.method, config.seed, workdir)
        if primary:
            results.write_json(workdir / "config.json", config.to_dict())
            _write_provenance(workdir, dict(prepared.provenance, seed=config.seed,
                                            method=config.method))  # fmt: skip
        result = run_continual(
            prepared.stream,
            prepared.text_features,
            config,
            str(workdir),
            overwrite=False,  # an --overwrite already moved the old run aside
            progress=config.progress,
            logit_scale=prepared.logit_scale,
        )
        seen = prepared.stream.split.bounds[1:]
        summary = results.make_summary(
            dict(result.summary), result.accuracy_matrix, result.seen_accuracy, seen
        )
        summary.update(method=config.method, seed=config.seed, config=config.name)
        if primary:
            results.write_json(workdir / "summary.json", summary)
            if wants_output(config, "tensorboard"):
                results.write_tensorboard(workdir, results.read_metrics(workdir), summary)
            if wants_output(config, "plots"):
                title = f"{config.name} {config.method} (seed {config.seed})"
                results.write_plots(workdir, summary, title)
        log.info("Avg %.2f  Last %.2f  -> %s", summary["avg"], summary["last"], workdir)
    return summary


def _write_provenance(workdir: pathlib.Path, provenance: dict) -> None:
    """provenance.json of the first start; a resume appends its own environment under
    `resumed` (the code or machine may differ between the two)."""
    path = workdir / "provenance.json"
    env = dict(environment(), time=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    if not path.exists():
        results.write_json(path, {**provenance, **env})
        return
    old = results.read_json(path)
    old.setdefault("resumed", []).append(env)
    results.write_json(path, old)


def run_experiment(
    config: ml_collections.ConfigDict,
    workdir,
    overwrite: bool = False,
    prepared: Prepared | None = None,
) -> dict:
    """Runs every seed of `config` (method preset resolved) into `workdir`; returns the summary.

    One seed writes its results into `workdir`; several write `workdir/seed_<k>` each plus a
    mean ± std `summary.json` and plots in `workdir`. The features are prepared once and shared;
    a grid over method fields may pass `prepared=pipeline.prepare(config)` to share them across
    runs too (it must come from a config with the same dataset, model, prompt and split fields).
    """
    validate(config)
    config = resolve_method(config)
    workdir = pathlib.Path(workdir)
    seeds = seeds_of(config)
    if len(seeds) == 1:
        config.seed = seeds[0]
        claim_workdir(workdir, config.to_dict(), overwrite)  # before any work: fail fast
        barrier("calfuse_workdir_claimed")  # no process reads the folder while process 0 writes
        return run_seed(config, prepared or prepare(config), workdir)
    runs = []
    for seed in seeds:
        seed_config = ml_collections.ConfigDict(config.to_dict())
        seed_config.seed = seed
        runs.append((seed_config, workdir / f"seed_{seed}"))
    resumed = claim_workdir(workdir, config.to_dict(), overwrite)
    finished = {}  # seed folders of this config that already hold a summary: reused, not rerun
    for seed_config, seed_dir in runs:
        if claim_workdir(seed_dir, seed_config.to_dict(), overwrite and not resumed):
            if (seed_dir / "summary.json").exists():
                finished[seed_dir] = results.read_json(seed_dir / "summary.json")
    barrier("calfuse_workdir_claimed")  # no process reads the folders while process 0 writes
    if is_primary():
        results.write_json(workdir / "config.json", config.to_dict())  # marks the folder as ours
    if len(finished) < len(runs):
        prepared = prepared or prepare(config)
    summaries = []
    for seed_config, seed_dir in runs:
        if seed_dir in finished:
            log.info("seed %d: finished earlier in %s, reused", seed_config.seed, seed_dir)
            summaries.append(finished[seed_dir])
        else:
            summaries.append(run_seed(seed_config, prepared, seed_dir))
    summary = results.aggregate(summaries)
    summary.update(method=config.method, config=config.name)
    if is_primary():
        results.write_json(workdir / "summary.json", summary)
        if wants_output(config, "plots"):
            title = f"{config.name} {config.method} ({len(seeds)} seeds)"
            results.write_plots(workdir, summary, title)
    return summary


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.run",
        description="Run a class-incremental CLIP benchmark; override any field with "
        "--config.KEY=VALUE (e.g. --config.train.epochs=5).",
    )
    parser.add_argument("--config", required=True, help="name[:variant] or path/to/config.py")
    parser.add_argument("--workdir", help="results folder (default: runs/<config>-<method>)")
    parser.add_argument("--overwrite", action="store_true", help="replace a run of another config")
    parser.add_argument(
        "--show-config", action="store_true", help="print every config key and value, then exit"
    )
    parser.add_argument("--traceback", action="store_true", help="show tracebacks of user errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress")
    add_distributed_flags(parser)
    return parse_with_overrides(parser, argv)


def non_finite_message(error: FloatingPointError, workdir: str | os.PathLike | None) -> str:
    """One paragraph for a NaN/Inf training loss (`calfuse_jax.train.NonFiniteLossError`)."""
    task, step = getattr(error, "task", "?"), getattr(error, "step", "?")
    value = getattr(error, "value", "NaN/Inf")
    where = f" in {workdir}" if workdir else ""
    return (
        f"error: the training loss became {value} at task {task}, step {step}, so the run "
        f"stopped. The last good checkpoint{where} is kept: running the same command again "
        "retries from it. If the loss diverges again, lower --config.train.lr or check the "
        "features for NaN/Inf, with a new --workdir (or --overwrite to move this run aside). "
        "(run with --traceback for the full trace)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status: 0 done, 2 a user error (bad config, missing
    files, a workdir of another run), 3 a NaN/Inf loss, 130 interrupted."""
    from calfuse_jax.continual import ConfigMismatchError, NonFiniteLossError  # imports jax

    args, overrides = parse_args(argv)
    workdir = None
    setup_console(args.quiet)  # run.log keeps INFO
    try:
        start_distributed(args)
        config = apply_overrides(load_config(args.config), overrides)
        if args.quiet:
            config.progress = False
        if args.show_config:
            print(format_config(resolve_method(config)))
            return 0
        workdir = args.workdir or default_workdir(args.config, config, overrides)
        summary = run_experiment(config, workdir, overwrite=args.overwrite)
        barrier("calfuse_run_finished")  # no process exits while process 0 still writes
    except NonFiniteLossError as err:
        if args.traceback:
            raise
        print(non_finite_message(err, workdir), file=sys.stderr)
        return EXIT_NON_FINITE
    except (ConfigMismatchError, *EXPECTED_ERRORS) as err:
        if args.traceback:
            raise
        print(f"error: {err}\n(run with --traceback for the full trace)", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        if args.traceback:
            raise
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    if is_primary():  # the other processes of a --distributed run computed the same numbers
        print(results.markdown_table([(f"{config.name} {config.method}", summary)]), end="")
        print(f"results: {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
