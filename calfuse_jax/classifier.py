"""A finished run of `experiments.run` as an image classifier: frozen CLIP and the run's head.

classifier = load_classifier("runs/cifar100-calfuse")      # after its last task
labels, names, probabilities = classifier.predict(["cat.jpg", pil_image, uint8_array])
labels, names, probabilities = classifier.top_k(images, 5)  # [N, 5] each
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from PIL import Image

from calfuse_jax import calibration, clip, features, methods, paths, rundir, sharding
from calfuse_jax.checkpoint import RunCheckpoints
from calfuse_jax.continual import unit_rows
from calfuse_jax.data.images import decode_image
from calfuse_jax.feature_cache import weights_id
from calfuse_jax.preprocess import preprocess


class ClassifierError(ValueError):
    """A run folder that cannot be used as a classifier (missing, unfinished, other weights)."""


@dataclasses.dataclass(frozen=True)
class Classifier:
    """A run after task `task`: `labels` [S], `names` and unit `text` [S, D] of the seen classes."""

    weights_id: str
    task: int
    method: Any = dataclasses.field(repr=False)
    params: Any = dataclasses.field(repr=False)
    inputs: methods.TaskInputs = dataclasses.field(repr=False)
    text: np.ndarray = dataclasses.field(repr=False)
    labels: np.ndarray
    names: tuple[str, ...]
    image_size: int
    batch_size: int
    clip_params: Any = dataclasses.field(repr=False)
    mesh: Any = dataclasses.field(repr=False)
    apply: Any = dataclasses.field(repr=False)  # jitted (clip, head, inputs, pixels) -> [B, S]

    def logits(self, images: Sequence, progress: bool = False) -> np.ndarray:
        """float32 [N, S] logits of N images (paths, PIL images or uint8 arrays [H, W, 3])."""
        from tqdm.auto import tqdm

        one = isinstance(images, str | os.PathLike | Image.Image) or np.ndim(images) == 3
        images = [images] if one else list(images)
        size = sharding.padded_size(min(self.batch_size, len(images)), self.mesh)
        out = []
        with tqdm(total=len(images), unit="img", desc="classify", disable=not progress) as bar:
            for start in range(0, len(images), size):
                part = [decode_image(x) if isinstance(x, str | os.PathLike) else x
                        for x in images[start : start + size]]  # fmt: skip
                pixels = preprocess(part, self.image_size)
                pixels = np.pad(pixels, [(0, size - len(part))] + [(0, 0)] * 3)
                batch = sharding.shard_batch(pixels, self.mesh)
                logits = self.apply(self.clip_params, self.params, self.inputs, batch)
                out.append(sharding.to_host(logits)[: len(part)])
                bar.update(len(part))
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)), np.float32)

    def top_k(self, images: Sequence, k: int = 5, progress: bool = False):
        """(labels int [N, k], names [N][k], probabilities [N, k]), best (then earliest) first."""
        logits = self.logits(images, progress).astype(np.float64)
        order = np.argsort(-logits, axis=1, kind="stable")[:, : max(1, min(k, logits.shape[1]))]
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = np.take_along_axis(probs / probs.sum(axis=1, keepdims=True), order, axis=1)
        names = [[self.names[i] for i in row] for row in order]
        return self.labels[order], names, probs.astype(np.float32)

    def predict(self, images: Sequence, progress: bool = False):
        """(labels int [N], names [N], probabilities float32 [N]) of the top class per image."""
        labels, names, probs = self.top_k(images, 1, progress)
        return labels[:, 0], [row[0] for row in names], probs[:, 0]


def _read_run(workdir: Path) -> dict:
    if not workdir.is_dir():
        raise ClassifierError(f"no run folder {workdir}: give the --workdir of a finished run")
    seeds = sorted(p.name for p in workdir.glob("seed_*") if (p / "checkpoints").is_dir())
    if seeds and not (workdir / "checkpoints").is_dir():
        raise ClassifierError(
            f"{workdir} holds several seeds ({', '.join(seeds)}): give one of them, e.g. "
            f"{workdir / seeds[0]}"
        )
    provenance = rundir.readable_json(workdir / "provenance.json")
    if provenance is None or not (workdir / "checkpoints" / "tasks").is_dir():
        raise ClassifierError(
            f"{workdir} is not a results folder of `python -m experiments.run` with a finished "
            "task (it needs provenance.json and checkpoints/tasks/); train it first"
        )
    if not provenance.get("weights"):
        raise ClassifierError(
            f"the run in {workdir} was trained on {provenance['dataset']['name']} features, not "
            "on images through a CLIP encoder: there is no image model to load"
        )
    return provenance


def _pick_task(workdir: Path, task: int | None, finished: list[int], num_tasks: int) -> int:
    done = f"finished tasks {finished} of 0..{num_tasks - 1}"
    if not finished:
        raise ClassifierError(
            f"the run in {workdir} has not finished a task yet: run its "
            "`python -m experiments.run` command again to train it"
        )
    if task is None and finished[-1] != num_tasks - 1:
        raise ClassifierError(
            f"the run in {workdir} is unfinished ({done}): run its `python -m experiments.run` "
            f"command again to resume it, or ask for the model after a finished task (task="
            f"{finished[-1]}, --task {finished[-1]})"
        )
    task = finished[-1] if task is None else task
    if task not in finished:
        raise ClassifierError(f"task {task} of the run in {workdir} is not finished ({done})")
    return task


def _clip_weights(recorded: dict, weights: str | os.PathLike | None):
    """(model, params, tokenizer, sha256) of `weights`, else of the run's, checked by sha256."""
    wanted = recorded["sha256"]
    candidates = [weights] if weights is not None else [recorded.get("path"), recorded["name"]]
    problems = []
    for candidate in [str(c) for c in candidates if c and not str(c).startswith("random:")]:
        try:
            found = weights_id(candidate)
        except (OSError, ValueError) as error:  # missing folder, offline hub id, no weight file
            problems.append(f"{candidate}: {' '.join(str(error).split())[:200]}")
            continue
        if found != wanted:
            raise ClassifierError(
                f"the CLIP weights at {candidate} (sha256 {found[:12]}…) are not the ones the run "
                f"was trained with ({recorded['name']}, sha256 {wanted[:12]}…): pass those "
                "weights (weights=PATH, --weights PATH)"
            )
        return *clip.from_pretrained(candidate), clip.load_tokenizer(candidate), found
    raise ClassifierError(
        f"cannot find the CLIP weights the run was trained with ({recorded['name']}, sha256 "
        f"{wanted[:12]}…): {'; '.join(problems) or 'no local path recorded'}. Pass a local copy "
        "of those weights (weights=PATH, --weights PATH)"
    )


def load_classifier(
    workdir: str | os.PathLike, task: int | None = None, weights: str | os.PathLike | None = None
) -> Classifier:
    """The classifier of the run in `workdir` after task `task` (default: the last of a finished
    run), with the CLIP `weights` (default: the run's). ClassifierError when it cannot be built."""
    workdir = Path(workdir).expanduser().absolute()
    provenance = _read_run(workdir)
    bounds = np.asarray(provenance["task_bounds"])
    checkpoints = RunCheckpoints(workdir / "checkpoints")
    try:
        task = _pick_task(workdir, task, checkpoints.finished_tasks(), len(bounds) - 1)
        model, clip_params, tokenizer, sha256 = _clip_weights(provenance["weights"], weights)
        config = ml_collections.ConfigDict(checkpoints.task_meta(task)["config"])
        dim, scale = model.arch.embed_dim, clip.logit_scale(clip_params)
        method = methods.REGISTRY[config.method].build(config, dim, scale, int(bounds[-1]))
        mesh = sharding.make_mesh()
        placement, num_tasks = sharding.replicated(mesh), len(bounds) - 1
        params = checkpoints.restore_head(task, method.init, num_tasks, placement)["params"]
        class_stats = checkpoints.class_stats(task, bounds, dim, placement)
    finally:
        checkpoints.close()
    prompts, order = provenance["prompts"], np.asarray(provenance["class_order"])
    text = features.text_features(
        prompts["class_names"], model, clip_params, tokenizer, templates=prompts["templates"],
        cache_dir=paths.cache_root(config.get("cache_dir")) / "features", weights_id=sha256,
    )  # fmt: skip
    text = unit_rows(text[order])
    ctx = calibration.task_context(bounds, task)
    inputs = methods.TaskInputs(
        text, ctx, class_stats["means"], class_stats["chols"], np.zeros((1, 2), np.int32),
        np.zeros((1,), np.float32), params, ctx,
    )  # fmt: skip
    seen = int(bounds[task + 1])
    encoder = features.with_compute_dtype(model, features.default_compute_dtype())

    def apply(clip_params, head_params, inputs, pixels):  # [B, S, S, 3] -> [B, seen]
        f0 = features.encode_images(encoder, clip_params, pixels)
        return method.logits(head_params, f0, inputs)[:, :seen]

    return Classifier(
        weights_id=sha256,
        task=task,
        method=method,
        params=params,
        inputs=sharding.replicate(inputs, mesh),
        text=text[:seen],
        labels=order[:seen],
        names=tuple(prompts["class_names"][label] for label in order[:seen]),
        image_size=int(provenance["image_size"]),
        batch_size=int(config.features.batch_size),
        clip_params=sharding.replicate(clip_params, mesh),
        mesh=mesh,
        apply=jax.jit(apply, out_shardings=sharding.replicated(mesh)),
    )
