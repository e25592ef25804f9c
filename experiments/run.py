"""Runs one benchmark end to end and writes a results folder.

    python -m experiments.run --config cifar100:inc5 --config.method=rapf --workdir runs/c5-rapf

The same command again resumes the run; exit codes are `cli.main_guard`'s."""

from __future__ import annotations

import argparse
import contextlib
import logging
import pathlib
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from typing import NamedTuple

import ml_collections

from calfuse_jax import rundir
from calfuse_jax.config import resolve_method
from calfuse_jax.sharding import barrier, is_primary
from experiments import cli, results
from experiments.configs import format_config, seeds_of, validate
from experiments.pipeline import Prepared, prepare, with_data_fields

log = logging.getLogger("experiments.run")

PACKAGES = ("calfuse-jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy",
            "transformers", "ml_collections", "tensorflow-datasets")  # fmt: skip


def default_workdir(config_name: str, config: ml_collections.ConfigDict, overrides=()) -> str:
    """runs/<config>-<method>[-<hash of the overrides>]: stable, so re-running resumes."""
    stem, variant = cli.name_parts(config_name, config)
    method = "" if config.method in variant.split("-") else config.method  # no "rapf-rapf"
    keep = [o for o in overrides if o.partition("=")[0].strip() != "method"]  # named already
    return str(cli.default_workdir((stem, variant, method), keep))


def claim_workdir(workdir: pathlib.Path, config: dict, overwrite: bool, ignore=()) -> bool:
    """`rundir.claim` of a run's folder (refusing another program's); True when it resumes."""
    rundir.refuse_foreign(workdir)
    return rundir.claim(workdir, rundir.CONFIG_FILE, config, overwrite, ignore, rundir.RESULT_FILES)


def _seed_folder(path: pathlib.Path) -> bool:
    return path.is_dir() and path.name.startswith("seed_") and (path / "config.json").exists()


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
    """`config.outputs.<name>` (plots, tensorboard); True without an `outputs` block."""
    return bool((config.get("outputs") or {}).get(name, True))


def trains_together(config: ml_collections.ConfigDict) -> bool:
    """`outputs.seeds_together`: "true", "false", or "auto" (together unless on a CPU)."""
    import jax

    value = str((config.get("outputs") or {}).get("seeds_together", "auto")).lower()
    return value == "true" or (value == "auto" and jax.default_backend() != "cpu")


def run_seeds_together(runs: list, prepared: Prepared) -> list[dict]:
    """The summaries of the (config, workdir) `runs`, trained together (`seeds.run_seeds`)."""
    from calfuse_jax.seeds import run_seeds

    with contextlib.ExitStack() as stack:
        curves = [stack.enter_context(_seed_files(c, prepared, w)) for c, w in runs]
        configs, workdirs = [c for c, _ in runs], [pathlib.Path(w) for _, w in runs]
        found = run_seeds(
            prepared.stream, prepared.text_features, configs, workdirs,
            progress=configs[0].progress, logit_scale=prepared.logit_scale, loss_callbacks=curves,
        )  # fmt: skip
        return [_seed_summary(c, prepared, w, r) for (c, w), r in zip(runs, found, strict=True)]


@contextlib.contextmanager
def _seed_files(config: ml_collections.ConfigDict, prepared: Prepared, workdir):
    """Around one seed's run: run.log, config.json, provenance.json; yields its loss callback."""
    workdir = pathlib.Path(workdir)
    primary, about = is_primary(), rundir.about(workdir)  # process 0 writes, all compute
    with cli.log_file(workdir) if primary else contextlib.nullcontext():
        try:
            if finished := len(rundir.read_metrics(workdir)):
                text = "resuming the run in %s after %d finished tasks"
                log.info(text, workdir, finished, extra=about)
        except rundir.RunFolderError as error:  # run_continual rewrites it from the checkpoints
            log.warning("%s (rebuilding it now)", error, extra=about)
        name, method, seed = config.name, config.method, config.seed
        log.info("%s %s seed %d -> %s", name, method, seed, workdir, extra=about)
        if primary:
            rundir.write_json(workdir / rundir.CONFIG_FILE, config.to_dict())
            env = dict(environment(), time=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            old = rundir.readable_json(workdir / "provenance.json")  # a resume adds its env
            if old is not None:
                old.setdefault("resumed", []).append(env)
            new = dict(prepared.provenance, seed=config.seed, method=config.method, **env)
            rundir.write_json(workdir / "provenance.json", new if old is None else old)
        writes_curves = primary and wants_output(config, "tensorboard")
        curves = results.TrainingCurves(workdir) if writes_curves else None
        with contextlib.closing(curves) if writes_curves else contextlib.nullcontext():
            yield curves


def _seed_summary(config, prepared: Prepared, workdir, result) -> dict:
    """A finished seed's summary.json, TensorBoard scalars and plots; returns the summary."""
    seen = prepared.stream.split.bounds[1:]
    summary = results.make_summary(
        dict(result.summary), result.accuracy_matrix, result.seen_accuracy, seen
    )
    summary.update(method=config.method, seed=config.seed, config=config.name)
    if is_primary():
        rundir.write_json(workdir / "summary.json", summary)
        if wants_output(config, "tensorboard"):
            results.write_tensorboard(workdir, rundir.read_metrics(workdir), summary)
        if wants_output(config, "plots"):
            title = f"{config.name} {config.method} (seed {config.seed})"
            results.write_plots(workdir, summary, title)
    avg, last = summary["avg"], summary["last"]
    log.info("Avg %.2f  Last %.2f  -> %s", avg, last, workdir, extra=rundir.about(workdir))
    return summary


def run_experiment(
    config: ml_collections.ConfigDict,
    workdir,
    overwrite: bool = False,
    prepared: Prepared | None = None,
) -> dict:
    """Runs every seed of `config` into `workdir` (several: `workdir/seed_<k>` each, plus a
    mean ± std summary.json); returns the summary. Finished seed folders are reused; `prepared`
    (`pipeline.prepare` of a config with the same data fields) shares features across runs."""
    return run_experiments([(config, workdir)], overwrite, prepared)[0]


def run_experiments(items, overwrite: bool = False, prepared: Prepared | None = None) -> list:
    """`run_experiment` of each (config, workdir) of `items`, of the same data fields, at once."""
    from calfuse_jax.seeds import together_key

    with contextlib.ExitStack() as stack:
        plans = []
        for config, workdir in items:
            validate(config)
            config, workdir = resolve_method(with_data_fields(config)), pathlib.Path(workdir)
            rundir.refuse_foreign(workdir)  # before the lock, which would write into it
            stack.enter_context(rundir.lock(workdir))  # one process per workdir
            plans.append(_plan(config, workdir, overwrite))
        barrier("calfuse_workdir_claimed")  # no process reads the folders while process 0 writes
        for plan in plans:
            if is_primary() and plan.runs[0][1] != plan.workdir:  # marks a seeds folder ours
                rundir.write_json(plan.workdir / rundir.CONFIG_FILE, plan.config.to_dict())
        groups = {}  # the seed runs to run, by `seeds.together_key` when they train together
        for config, folder in (r for p in plans for r in p.runs if r[1] not in p.finished):
            key = together_key(config) if trains_together(config) else str(folder)
            groups.setdefault(key, []).append((config, folder))
        if groups:
            prepared = prepared or prepare(plans[0].config)
        done = {}  # folder -> summary; each group trains here, one after another
        for group in groups.values():
            summaries = run_seeds_together(group, prepared)
            done.update({folder: s for (_, folder), s in zip(group, summaries, strict=True)})
        return [_finish(plan, done) for plan in plans]


class _Plan(NamedTuple):
    config: ml_collections.ConfigDict
    workdir: pathlib.Path
    runs: list  # (config, folder) of each seed; [(config, workdir)] for one seed in workdir
    finished: dict  # folder -> summary of the seeds that finished earlier (reused)


def _plan(config, workdir: pathlib.Path, overwrite: bool) -> _Plan:
    """Claims the locked `workdir` and its seed folders for `config`'s seeds."""
    seeds = seeds_of(config)
    own = any((workdir / m).exists() for m in ("metrics.jsonl", "checkpoints"))  # a one-seed run
    alone = (rundir.readable_json(workdir / rundir.CONFIG_FILE) or {}).get("seed") if own else None
    seed_folders = workdir.is_dir() and any(_seed_folder(p) for p in workdir.iterdir())
    if len(seeds) == 1 and not seed_folders and alone in (None, seeds[0]):
        config.seed = seeds[0]
        claim_workdir(workdir, config.to_dict(), overwrite, ignore=("seeds",))  # fail fast
        return _Plan(config, workdir, [(config, workdir)], {})
    runs = [
        (ml_collections.ConfigDict(config.to_dict() | {"seed": seed}), workdir / f"seed_{seed}")
        for seed in seeds
    ]
    # A folder of other seeds of this config resumes; a one-seed run there moves into seed_<k>.
    resumed = claim_workdir(workdir, config.to_dict(), overwrite, ignore=("seeds", "seed"))
    if resumed and alone is not None:
        barrier("calfuse_single_seed_inspected")
        if is_primary():
            seed_folders = [p.name for p in workdir.iterdir() if _seed_folder(p)]
            rundir.move_aside(workdir, keep=seed_folders, target=workdir / f"seed_{alone}")
            log.info("moved the one-seed run in %s into seed_%d/ to add seeds", workdir, alone)
        barrier("calfuse_single_seed_moved")
    finished = {}  # seed folders of this config that already hold a summary: reused, not rerun
    for seed_config, seed_dir in runs:
        # A seed folder is the run of its `seed`; its `seeds` (the whole list) may differ.
        if claim_workdir(seed_dir, seed_config.to_dict(), overwrite and not resumed, ("seeds",)):
            summary = rundir.readable_json(seed_dir / "summary.json")  # damaged: run it again
            if summary is not None:
                finished[seed_dir] = summary
    return _Plan(config, workdir, runs, finished)


def _finish(plan: _Plan, done: dict) -> dict:
    """The summary of `plan`'s run: its one seed's, or its seeds' mean ± std (written)."""
    if plan.runs[0][1] == plan.workdir:
        return done[plan.workdir]
    summaries = []
    for seed_config, seed_dir in plan.runs:
        if seed_dir in plan.finished:
            log.info("seed %d: finished earlier in %s, reused", seed_config.seed, seed_dir)
        summaries.append(plan.finished.get(seed_dir) or done[seed_dir])
    config, summary = plan.config, results.aggregate(summaries)
    summary.update(method=config.method, config=config.name)
    if is_primary():
        rundir.write_json(plan.workdir / "summary.json", summary)
        if wants_output(config, "plots"):
            title = f"{config.name} {config.method} ({len(plan.runs)} seeds)"
            results.write_plots(plan.workdir, summary, title)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (`cli.main_guard`)."""
    parser = cli.command_parser(
        "run",
        "Run a class-incremental CLIP benchmark; override any field with "
        "--config.KEY=VALUE (e.g. --config.train.epochs=5).",
    )
    parser.add_argument("--workdir", help="results folder (default: runs/<config>-<method>)")
    parser.add_argument("--overwrite", action="store_true", help="replace a run of another config")
    parser.add_argument(
        "--show-config", action="store_true", help="print every config key and value, then exit"
    )
    parser.add_argument(
        "--continue-from", metavar="RUN",
        help="a finished run to continue with --config's classes as further tasks (new folder "
        "RUN+<config name>, or --workdir)",
    )  # fmt: skip
    args, overrides = cli.parse_command(parser, argv)
    return cli.main_guard(args, overrides, lambda config: _main(args, config, overrides))


def _main(args: argparse.Namespace, config: ml_collections.ConfigDict, overrides) -> int:
    if args.show_config:
        print(format_config(resolve_method(config)))
        return 0
    if args.continue_from:  # `config` gives the new classes
        from experiments.continuation import continue_experiment

        config, summary = continue_experiment(args, config, overrides)
    else:
        config = with_data_fields(config)  # a folder config counts its classes
        args.workdir = args.workdir or default_workdir(args.config, config, overrides)
        summary = run_experiment(config, args.workdir, overwrite=args.overwrite)
    barrier("calfuse_run_finished")  # no process exits while process 0 still writes
    if is_primary():  # the other processes of a --distributed run computed the same numbers
        print(results.markdown_table([(f"{config.name} {config.method}", summary)]), end="")
        print(f"results: {args.workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
