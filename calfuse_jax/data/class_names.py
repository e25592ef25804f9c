"""Class names of the benchmark datasets in label order (tables in `names/*.txt`); the ImageNet
tables hold `(wnid, name)` pairs, sorted by wnid (how ImageNet-1k labels are numbered)."""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources


def _table(name: str, pairs: bool = False) -> tuple:
    """`names/<name>.txt`: one name per line, or `wnid name` per line when `pairs`."""
    rows = resources.files(__package__).joinpath(f"names/{name}.txt").read_text("utf-8")
    return tuple(tuple(row.split(" ", 1)) if pairs else row for row in rows.splitlines())


CIFAR100 = _table("cifar100")  # fine labels, alphabetical as in the archive's `meta`
IMAGENET_R = _table("imagenet_r", pairs=True)  # its 200 ImageNet classes
IMAGENET100 = _table("imagenet100", pairs=True)
CUB200 = _table("cub200")  # by `classes.txt` id


def prompt_names(names: Sequence[str], *, underscores_to_spaces: bool = True) -> tuple[str, ...]:
    """Names as they go into a prompt: `_` -> space (`"maple_tree"` -> `"maple tree"`), trimmed."""
    if not underscores_to_spaces:
        return tuple(names)
    return tuple(" ".join(name.replace("_", " ").split()) for name in names)


def wnids(table: Sequence[tuple[str, str]]) -> tuple[str, ...]:
    """The WordNet ids of an ImageNet `(wnid, name)` table, in label order."""
    return tuple(wnid for wnid, _ in table)


def names(table: Sequence[tuple[str, str]]) -> tuple[str, ...]:
    """The names of an ImageNet `(wnid, name)` table, in label order."""
    return tuple(name for _, name in table)


def synset_names(path: str) -> dict[str, str]:
    """wnid -> first name of an ImageNet `LOC_synset_mapping.txt` (`wnid name[, synonym...]`)."""
    mapping = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            wnid, _, rest = line.strip().partition(" ")
            if wnid:
                mapping[wnid] = rest.split(",")[0].strip() or wnid
    return mapping
