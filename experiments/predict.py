"""Labels images with the model of a finished run (`calfuse_jax.load_classifier`).

    python -m experiments.predict --workdir runs/demo-calfuse --top-k 3 --json images/ > out.json

Exit codes as `experiments.run`: 2 with one paragraph for a user error, 130 for Ctrl-C."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Sequence

from calfuse_jax.data.images import IMAGE_EXTENSIONS
from experiments import cli
from experiments.pipeline import UserError


def image_paths(items: Sequence[str]) -> tuple[list[pathlib.Path], bool]:
    """(image files of `items`, whether any was a folder); UserError for a missing one."""
    paths, folders = [], False
    for item in map(pathlib.Path, items):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {item}")
            paths, folders = paths + found, True
        elif item.is_file():
            paths.append(item)
        else:
            raise UserError(f"no image or folder {item}: check the path")
    return paths, folders


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns 0, 2 for a user error or 130 when interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.predict",
        description="Classify images with the model of a finished `experiments.run` run.",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER")
    parser.add_argument("--workdir", required=True, help="the results folder of the run")
    parser.add_argument("--task", type=int, help="the model after this task (default: the last)")
    parser.add_argument("--weights", help="CLIP folder or hub id (default: the run's own)")
    parser.add_argument("--top-k", type=int, default=5, help="classes per image (default: 5)")
    parser.add_argument("--json", action="store_true", help="one JSON list on stdout")
    parser.add_argument("--traceback", action="store_true", help="show tracebacks of user errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress")
    args = parser.parse_args(argv)
    cli.setup_console(args.quiet)
    try:
        from calfuse_jax import load_classifier

        paths, folders = image_paths(args.images)
        classifier = load_classifier(args.workdir, args.task, args.weights)
        labels, names, probs = classifier.top_k(paths, args.top_k, folders and not args.quiet)
    except (*cli.USER_ERRORS, KeyboardInterrupt) as error:
        if args.traceback:
            raise
        if isinstance(error, KeyboardInterrupt):
            print("interrupted", file=sys.stderr)
            return 130
        print(f"error: {error}\n(run with --traceback for the full trace)", file=sys.stderr)
        return cli.EXIT_USER_ERROR
    rows = zip(paths, labels.tolist(), names, probs.tolist(), strict=True)
    if args.json:
        out = [{"image": str(path), "top_k": [{"label": label, "name": name, "probability": p}
                for label, name, p in zip(*row, strict=True)]} for path, *row in rows]  # fmt: skip
        print(json.dumps(out, indent=1))
    else:
        for path, _, row_names, row_probs in rows:
            best = ", ".join(f"{n} {p:.3f}" for n, p in zip(row_names, row_probs, strict=True))
            print(f"{path}: {best}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
