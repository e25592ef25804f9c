"""Seeds trained together (one vmapped program) against the same seeds run one after another:
the same accuracy matrices and metrics rows, parameters within float error, the same run folders;
a stop inside a task and a NaN behave as in a one-seed run."""

import json

import jax
import numpy as np
import pytest
from test_continual import tiny_config, tiny_stream

from calfuse_jax import train
from calfuse_jax.continual import NonFiniteLossError, run_continual
from calfuse_jax.seeds import run_seeds

SEEDS = (0, 5)


def _configs():
    configs = []
    for seed in SEEDS:
        config = tiny_config()
        config.seed = seed
        configs.append(config)
    return configs


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    stream, text = tiny_stream()
    root = tmp_path_factory.mktemp("sequential")
    return [
        run_continual(stream, text, config, root / f"seed_{config.seed}", progress=False)
        for config in _configs()
    ]


def _rows(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "train_seconds"} for line in lines]


def _assert_equal_runs(results, expected):
    for got, want in zip(results, expected, strict=True):
        np.testing.assert_array_equal(got.accuracy_matrix, want.accuracy_matrix)
        for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        rows, want_rows = _rows(got.workdir), _rows(want.workdir)
        losses, want_losses = [r.pop("loss") for r in rows], [r.pop("loss") for r in want_rows]
        assert losses == pytest.approx(want_losses, rel=1e-5)
        assert rows == want_rows


def test_seeds_together_equal_seeds_one_after_another(sequential, tmp_path):
    stream, text = tiny_stream()
    before = train.TRACES["train_step"]
    workdirs = [tmp_path / f"seed_{seed}" for seed in SEEDS]
    results = run_seeds(stream, text, _configs(), workdirs, progress=False)
    assert train.TRACES["train_step"] - before == 1  # both seeds, every task: one program
    _assert_equal_runs(results, sequential)
    assert not np.array_equal(results[0].accuracy_matrix, results[1].accuracy_matrix)
    # Finished folders: a second call trains nothing and returns the same results.
    again = run_seeds(stream, text, _configs(), workdirs, progress=False)
    _assert_equal_runs(again, sequential)


def test_seeds_together_stop_inside_a_task_and_resume(sequential, tmp_path, monkeypatch):
    stream, text = tiny_stream()
    workdirs = [tmp_path / f"seed_{seed}" for seed in SEEDS]
    original = train.train_task

    def ctrl_c_after_epoch_2(*args, **kwargs):  # the second task, after 6 of its 9 steps
        def stop(task, step):
            if (task, step) == (1, 6):
                raise KeyboardInterrupt

        return original(*args, **kwargs, step_callback=stop)

    monkeypatch.setattr(train, "train_task", ctrl_c_after_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run_seeds(stream, text, _configs(), workdirs, progress=False)
    for workdir in workdirs:  # every seed saved its step checkpoint
        assert (workdir / "checkpoints" / "steps" / str(1 * 10_000_000 + 6)).exists()
    monkeypatch.setattr(train, "train_task", original)
    _assert_equal_runs(run_seeds(stream, text, _configs(), workdirs, progress=False), sequential)


def test_a_nan_names_the_seed(tmp_path):
    stream, text = tiny_stream()
    configs = _configs()
    for config in configs:
        config.train.lr = 1e30  # diverges at once
    with pytest.raises(NonFiniteLossError, match="the training loss of seed 0") as error:
        run_seeds(stream, text, configs, [tmp_path / "a", tmp_path / "b"], progress=False)
    assert error.value.task == 0


def _cells():
    """Three cells that differ in the step's floats and in the fusion rule (the same step)."""
    configs = [tiny_config() for _ in range(3)]
    configs[1].train.lr, configs[1].pseudo.hard_margin = 3e-3, 0.2
    configs[2].loss.kd_weight, configs[2].loss.kd_temperature = 2.0, 1.5
    configs[2].fusion.rules, configs[2].fusion.mix_bias = ("adapter/kernel=svd",), 0.3
    return configs


def test_cells_differing_in_step_floats_and_fusion_train_together(tmp_path):
    stream, text = tiny_stream()
    train.epoch_fn.cache_clear()
    before = train.TRACES["train_step"]
    one_by_one = [
        run_continual(stream, text, config, tmp_path / f"one_{k}", progress=False)
        for k, config in enumerate(_cells())
    ]
    # Floats are traced: the lr, margin and weights do not recompile; only another fusion rule
    # (a method that is not equal) traces the same step once more.
    assert train.TRACES["train_step"] - before == 2
    assert len({tuple(r.accuracy_matrix[-1]) for r in one_by_one}) == 3  # the settings matter
    before = train.TRACES["train_step"]
    workdirs = [tmp_path / f"together_{k}" for k in range(3)]
    together = run_seeds(stream, text, _cells(), workdirs, progress=False)
    assert train.TRACES["train_step"] - before == 1
    _assert_equal_runs(together, one_by_one)


def test_runs_with_another_step_run_one_after_another(tmp_path):
    stream, text = tiny_stream()
    configs = _configs()
    configs[1].pseudo.beta = 1.0  # fewer pseudo-features per class: another step program
    configs[1].loss.kd_weight = 0.0  # distillation off: another step program too
    workdirs = [tmp_path / "a", tmp_path / "b"]
    train.epoch_fn.cache_clear()
    before = train.TRACES["train_step"]
    results = run_seeds(stream, text, configs, workdirs, progress=False)
    assert train.TRACES["train_step"] - before == 2  # no vmapped program: each its own step
    expected = [
        run_continual(stream, text, c, tmp_path / f"alone_{k}", progress=False)
        for k, c in enumerate(configs)
    ]
    for got, want in zip(results, expected, strict=True):
        np.testing.assert_array_equal(got.accuracy_matrix, want.accuracy_matrix)
