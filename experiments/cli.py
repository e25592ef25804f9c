"""Command-line plumbing shared by `experiments.run` and `experiments.ablate`: overrides, exit
codes (`main_guard`), default results folders, `--distributed` flags and console logging."""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import logging
import os
import pathlib
import re
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import ml_collections

from calfuse_jax import interrupt, rundir, sharding
from calfuse_jax.rundir import RESUME_SAFE
from experiments import peers, pipeline
from experiments.configs import apply_overrides, catalog, load_config
from experiments.pipeline import UserError

if TYPE_CHECKING:
    from calfuse_jax.train import NonFiniteLossError

log = logging.getLogger("experiments.cli")

# Not part of a run's folder name: each seed runs in its own seed_<k> folder of the run's folder.
NOT_NAMING = (*RESUME_SAFE, "seeds", "seed")
# Problems a user fixes from the message alone (the library's and the configs' errors are
# ValueErrors): one paragraph, no traceback, exit 2. A NaN/Inf loss exits 3 (the run diverged).
USER_ERRORS = (UserError, ValueError, FileNotFoundError, FileExistsError)
EXIT_USER_ERROR, EXIT_NON_FINITE = 2, 3  # a signal: 128 + its number (130 Ctrl-C, 143 SIGTERM)
# Writes that fail because of the disk or its permissions: exit 2 as well, naming the file.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
DISK_FIX = (
    "Free disk space or make the folder writable (or choose another --workdir / "
    "--config.cache_dir), then run the same command again: it resumes from what was finished"
)


def name_parts(config_name: str, config) -> tuple[str, str]:
    """(stem, variant) of `--config NAME[:a,b]`: the file's stem, or the config's own name where
    it extends the stem (`folder` names itself `folder-<its root>`)."""
    stem = pathlib.Path(config_name.partition(":")[0]).stem
    own = str(config.get("name", "") if config is not None else "").partition(":")[0]
    variant = config_name.partition(":")[2].replace(",", "-")
    return (own if own.startswith(stem + "-") else stem), variant


def default_workdir(
    parts: Sequence[str], overrides: Sequence[str], extra: Sequence[str] = ()
) -> pathlib.Path:
    """runs/<non-empty parts joined by '-'>[-<sha1 of `extra` and the overrides>]; overrides of
    `NOT_NAMING` keys do not count, so more seeds or another cache resume the same folder."""
    # Only name characters: a config path or variant string can never lead out of runs/.
    name = re.sub(r"[^\w.,=+-]", "_", "-".join(p for p in parts if p)).lstrip(".") or "run"
    keys = [
        o.partition("=")[0].strip().removeprefix("--").removeprefix("config.") for o in overrides
    ]
    relevant = sorted(o for o, k in zip(overrides, keys, strict=True) if k not in NOT_NAMING)
    hashed = [*extra, *relevant]
    if hashed:
        name += "-" + hashlib.sha1("\n".join(hashed).encode()).hexdigest()[:8]
    return pathlib.Path("runs") / name


def enable_compile_cache(config: ml_collections.ConfigDict) -> None:
    """Keeps compiled programs in `<cache_dir>/xla` (unless the environment names a folder)."""
    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    jax.config.update("jax_compilation_cache_dir", str(pipeline.cache_dir_of(config) / "xla"))
    # The head's programs compile in well under the 1 s default threshold, yet add up over a grid.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def command_parser(name: str, description: str) -> argparse.ArgumentParser:
    """The parser of `python -m experiments.<name>`: --config, and the configs in its epilog."""
    parser = argparse.ArgumentParser(
        prog=f"python -m experiments.{name}",
        description=description,
        epilog=catalog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="name[:variant] or path/to/config.py")
    return parser


def parse_command(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> tuple[argparse.Namespace, list[str]]:
    """Adds the flags every command has to `parser` (once: after the command's own flags, as
    --help lists them) and parses `argv`: (args, the `--config.KEY=VALUE` overrides)."""
    parser.add_argument("--traceback", action="store_true", help="show tracebacks of user errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress")
    group = parser.add_argument_group(
        "multi-process runs (one process per host or GPU; process 0 writes the results)"
    )
    group.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() first; on TPU pods and SLURM no other flag is "
        "needed, a manual cluster also gives the three below to every process",
    )
    group.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address and port")
    group.add_argument("--num-processes", type=int, metavar="N", help="processes in the run")
    group.add_argument("--process-id", type=int, metavar="I", help="this process, 0..N-1")
    group.add_argument(
        "--peer-timeout", type=float, default=300.0, metavar="S",
        help="exit 2 when the other processes have not all joined, or told their config, "
        "within S seconds (default: %(default)s)",
    )  # fmt: skip
    args, rest = parser.parse_known_args(argv)
    for item in rest:
        if not item.startswith("--config."):
            parser.error(f"unrecognised argument {item!r}; overrides look like --config.KEY=VALUE")
    return args, [item[len("--config.") :] for item in rest]


# HOST:PORT with a name, an IPv4 address or a bracketed IPv6 address, and a port 1-65535.
COORDINATOR = re.compile(r"(\[[0-9a-fA-F:.]+\]|[\w.-]+):([1-9]\d{0,4})")


def start_distributed(args: argparse.Namespace) -> None:
    """Joins the multi-process JAX runtime when `args.distributed` (before any device is used);
    a process missing after `--peer-timeout` seconds ends the command with exit 2."""
    manual = {  # flag -> (jax.distributed.initialize's argument, value)
        "--coordinator": ("coordinator_address", args.coordinator),
        "--num-processes": ("num_processes", args.num_processes),
        "--process-id": ("process_id", args.process_id),
    }
    given = [flag for flag, (_, value) in manual.items() if value is not None]
    if not args.distributed:
        if given:
            raise UserError(f"{', '.join(given)} only apply with --distributed: add it")
        return
    count, index = args.num_processes, args.process_id
    if count is not None and count < 1 or index is not None and not 0 <= index < (count or 1 << 30):
        raise UserError(
            f"--process-id {index} with --num-processes {count}: the id must be in 0..N-1"
        )
    found = COORDINATOR.fullmatch(args.coordinator or "")
    if args.coordinator is not None and not (found and int(found[2]) < 65536):
        raise UserError(
            f"--coordinator {args.coordinator!r} is not HOST:PORT: give process 0's host name or "
            "address and a free port, e.g. --coordinator 10.0.0.1:12345 ([::1]:12345 for IPv6)"
        )
    import jax

    # CPU processes need a cross-process collective implementation; GPU and TPU ignore this flag.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # SIGTERM stays with calfuse_jax.interrupt (JAX's preemption notifier would swallow it).
    jax.config.update("jax_enable_preemption_service", False)
    watchdog = threading.Timer(args.peer_timeout, _give_up_joining, (args,))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            **{name: value for name, value in manual.values() if value is not None},
            initialization_timeout=int(args.peer_timeout) + 60,  # ours speaks first
        )
    except (RuntimeError, ValueError, IndexError) as err:
        raise UserError(
            f"jax.distributed.initialize failed: {err}. Outside TPU pods and SLURM, pass "
            "--coordinator HOST:PORT --num-processes N --process-id I to every process"
        ) from err
    finally:
        watchdog.cancel()
    log.info("process %d of %d, %d devices in all", jax.process_index(), jax.process_count(),
             jax.device_count())  # fmt: skip


def _give_up_joining(args: argparse.Namespace) -> None:  # JAX's connect cannot be interrupted
    where = f" at {args.coordinator}" if args.coordinator else ""
    print(
        f"error: not every process joined the run{where} within --peer-timeout "
        f"{args.peer_timeout:g} s. Start every process with the same --coordinator and "
        "--num-processes (and its own --process-id), or raise --peer-timeout",
        file=sys.stderr,
        flush=True,
    )
    os._exit(EXIT_USER_ERROR)


def check_same_run(args: argparse.Namespace, config: ml_collections.ConfigDict) -> None:
    """UserError unless every process runs the same config and flags (else collectives hang)."""
    if not args.distributed:
        return
    local = {"process_id", "coordinator", "quiet", "traceback", "peer_timeout"}
    flags = {k: v for k, v in sorted(vars(args).items()) if k not in local}
    text = json.dumps(flags, default=str) + config.to_json_best_effort(sort_keys=True)
    digest = hashlib.sha1(text.encode()).hexdigest()
    try:
        sharding.same_on_every_process("calfuse/run", digest, args.peer_timeout)
    except (TimeoutError, ValueError) as err:
        raise UserError(f"{err}; every process must run the same command") from err


def setup_console(quiet: bool) -> None:
    """INFO (WARNING with `quiet`) to stderr with timestamps, replacing absl's and
    huggingface_hub's own stderr handlers (every line would show in their format, or twice)."""
    from huggingface_hub.utils import logging as hub_logging  # its import adds that handler

    hub = hub_logging.get_logger()  # "huggingface_hub"
    for handler in list(hub.handlers):
        if type(handler) is logging.StreamHandler:
            hub.removeHandler(handler)
    root = logging.getLogger()
    for handler in list(root.handlers):
        stream = getattr(handler, "stream", None)
        plain = type(handler) is logging.StreamHandler and stream in (sys.stderr, sys.stdout)
        if plain or getattr(handler, "calfuse_console", False):  # absl's, or ours from a last call
            root.removeHandler(handler)
    console = logging.StreamHandler(sys.stderr)
    console.calfuse_console = True
    console.setLevel(logging.WARNING if quiet else logging.INFO)
    console.setFormatter(
        _ConsoleFormat("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    )
    root.addHandler(console)
    logging.raiseExceptions = False  # a log file on a full disk must not print tracebacks
    root.setLevel(logging.INFO)
    for chatty in ("absl", "orbax", "jax._src", "matplotlib"):  # per-save INFO lines drown ours
        logging.getLogger(chatty).setLevel(logging.WARNING)


class _ConsoleFormat(logging.Formatter):
    """Another library's error in one short line on the console (no traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info and not record.name.startswith(("calfuse_jax", "experiments")):
            record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None})
            return super().format(record)[:300]
        return super().format(record)


def _is_command() -> bool:  # `python -m experiments.<name>`
    command = getattr(sys.modules.get("__main__"), "__spec__", None)
    return command is not None and command.name.startswith("experiments.")


def main_guard(
    args: argparse.Namespace, overrides: Sequence[str], body: Callable[[Any], int]
) -> int:
    """Loads `--config` with its overrides and returns `body(config)`'s exit status; a user error
    (2), a NaN/Inf value (3), a lost peer (75), Ctrl-C (130) or SIGTERM (143) prints one paragraph
    instead of a traceback (unless `args.traceback`). `args.workdir`, once `body` has set it,
    names where the last good checkpoint is kept."""
    from calfuse_jax.train import NonFiniteLossError  # imports jax: after the flags are parsed

    setup_console(args.quiet)  # each run.log keeps INFO
    try:
        # Once stopped by a signal, the command ignores further ones on its way out.
        with interrupt.installed(ignore_after_stop=_is_command()):
            start_distributed(args)
            config = apply_overrides(load_config(args.config), overrides)
            check_same_run(args, config)
            if args.quiet:
                config.progress = False
            with peers.watched(args):
                return body(config)
    except (NonFiniteLossError, *USER_ERRORS, KeyboardInterrupt) as error:
        if args.traceback:
            raise
        if isinstance(error, KeyboardInterrupt):
            by = f" by {error}" if isinstance(error, interrupt.Interrupted) else ""
            print(f"interrupted{by}: run the same command again to resume", file=sys.stderr)
            return 128 + getattr(error, "signum", 2)  # a plain KeyboardInterrupt: SIGINT's
        if isinstance(error, NonFiniteLossError):
            print(non_finite_message(error, args.workdir), file=sys.stderr)
            return EXIT_NON_FINITE
        print(f"error: {error}\n(run with --traceback for the full trace)", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as error:  # a full or read-only disk: the user frees space or picks a folder
        if args.traceback or error.errno not in DISK_ERRNOS:
            raise
        if _is_command():  # other libraries' threads and exit handlers fail the same way
            threading.excepthook = lambda args: None
            sys.unraisablehook = lambda unraisable: None
            logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # Orbax's failed saves, at GC
        where = f"cannot write {error.filename}" if error.filename else "a write failed"
        print(f"error: {where}: {error.strerror}. {DISK_FIX}", file=sys.stderr)
        return EXIT_USER_ERROR


def non_finite_message(error: NonFiniteLossError, workdir: str | None) -> str:
    """One paragraph for a `calfuse_jax.train.NonFiniteLossError`."""
    at = f"task {error.task}" + ("" if error.step is None else f", step {error.step}")
    where = f" in {workdir}" if workdir else ""
    return (
        f"error: {error.quantity} became {error.value} at {at}, so the run stopped. The last good "
        f"checkpoint{where} is kept: running the same command again retries from it. If it "
        f"happens again, {error.hint.replace('config.', '--config.')}, with a new --workdir (or "
        "--overwrite to move this run aside). (run with --traceback for the full trace)"
    )


@contextlib.contextmanager
def log_file(workdir: pathlib.Path) -> Iterator[None]:
    """Copies every log record of this run into workdir/run.log (appending across resumes)."""
    workdir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(workdir / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    handler.addFilter(rundir.log_filter(workdir))  # not the lines of runs trained alongside
    logging.getLogger().addHandler(handler)
    # Our INFO lines reach the file even when the caller left the root at WARNING (restored after).
    levels = {
        logger: logger.level for logger in map(logging.getLogger, ("experiments", "calfuse_jax"))
    }
    for logger in levels:
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
        for logger, level in levels.items():
            logger.setLevel(level)
