"""The frozen-feature baselines (ncm, ncm+text, fecam, ranpac) and the joint upper bound.

Each baseline runs end to end through `run_continual`, and its accuracy after every task is
checked against an independent NumPy transcription of the paper's formula on the same stream;
RanPAC's accumulated solution is checked against the batch ridge solution on all seen rows; the
`baselines` preset runs from the command line, joint on every seen class's rows.
"""

import jax
import numpy as np
import pytest

from calfuse_jax import ranpac, rundir
from calfuse_jax.config import method_config
from calfuse_jax.continual import run_continual
from calfuse_jax.data.synthetic import make_synthetic_stream
from experiments import ablate, grids


@pytest.fixture(scope="module")
def stream():
    # Noisy enough that every method makes mistakes (so the comparisons can fail), 15 rows per
    # class so that the 32-d covariances are singular before FeCAM's shrinkage.
    return make_synthetic_stream(
        num_classes=15, dim=32, train_per_class=15, test_per_class=8, initial=5, increment=5,
        noise=3.0,
    )  # fmt: skip


def run(stream, tmp_path, method, **fields):
    config = method_config()
    config.method = method
    config.update_from_flattened_dict(fields)
    return run_continual(*stream, config, tmp_path / method, progress=False)


def numpy_accuracy(stream, scores) -> np.ndarray:
    """[T] accuracy (%) on the seen classes after each task; `scores(test [M, D], seen)` gives
    [M, seen] scores of the first `seen` classes (by position), trained on their rows."""
    s = stream[0]
    bounds, position = s.split.bounds, np.argsort(s.split.class_order)
    test_positions = position[s.test_labels]
    accuracy = []
    for task in range(len(bounds) - 1):
        seen = test_positions < bounds[task + 1]
        predicted = np.argmax(scores(s.test_features[seen].astype(np.float64), bounds[task + 1]), 1)
        accuracy.append(100.0 * np.mean(predicted == test_positions[seen]))
    return np.array(accuracy)


def class_rows(stream, c: int) -> np.ndarray:
    """float64 training features of the class at position c."""
    s = stream[0]
    return s.train_features[s.train_labels == s.split.class_order[c]].astype(np.float64)


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("method, weight", [("ncm", 0.0), ("ncm+text", 0.3)])
def test_ncm_matches_numpy(stream, tmp_path, method, weight):
    result = run(stream, tmp_path, method, **{"ncm.text_weight": 0.3})
    protos = unit(np.stack([unit(class_rows(stream, c)).mean(0) for c in range(15)]))
    text = unit(stream[1][stream[0].split.class_order].astype(np.float64))

    def scores(test, seen):
        return unit(test) @ ((1 - weight) * protos[:seen] + weight * text[:seen]).T

    expected = numpy_accuracy(stream, scores)
    assert [row["steps"] for row in result.rows] == [0, 0, 0]
    assert 20 < expected[-1] < 90
    np.testing.assert_allclose(result.seen_accuracy, expected, rtol=1e-6)


def numpy_fecam(rows: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """(mean, precision) of one class as Goswami et al. write it: covariance, shrinkage with
    gamma 1 (off-diagonal mean over the nonzero entries), correlation normalisation, pinv."""
    x = np.sign(rows) * np.abs(rows) ** beta
    cov = np.cov(x.T)
    off = cov - np.diag(np.diag(cov))
    eye = np.eye(len(cov))
    cov = cov + np.diag(cov).mean() * eye + off[off != 0].mean() * (1 - eye)
    sd = np.sqrt(np.diag(cov))
    return x.mean(0), np.linalg.pinv(cov / np.outer(sd, sd))


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_fecam_matches_numpy(stream, tmp_path, beta):
    result = run(stream, tmp_path, "fecam", **{"fecam.tukey": beta})
    gaussians = [numpy_fecam(class_rows(stream, c), beta) for c in range(15)]

    def scores(test, seen):
        x = unit(np.sign(test) * np.abs(test) ** beta)
        return np.stack(
            [-np.einsum("nd,de,ne->n", x - unit(m), p, x - unit(m)) for m, p in gaussians[:seen]],
            axis=1,
        )

    expected = numpy_accuracy(stream, scores)
    assert 20 < expected[-1] < 90
    np.testing.assert_allclose(result.seen_accuracy, expected, rtol=1e-6)


def test_ranpac_matches_numpy(stream, tmp_path):
    # lambda fixed at 1000 (one candidate), so the check is the closed form itself.
    fields = {"ranpac.dim": 256, "ranpac.ridge_exponents": (3, 3)}
    result = run(stream, tmp_path, "ranpac", **fields)
    w = np.asarray(result.params["projection"], np.float64)  # [D, M], drawn from the seed

    def scores(test, seen):
        h = np.concatenate([np.maximum(class_rows(stream, c) @ w, 0) for c in range(seen)])
        y = np.repeat(np.eye(seen), 15, axis=0)
        head = np.linalg.solve(h.T @ h + 1e3 * np.eye(len(h.T)), h.T @ y)
        return np.maximum(test @ w, 0) @ head

    expected = numpy_accuracy(stream, scores)
    assert 2 * 100 / 15 < expected[-1] < 95  # well above chance
    np.testing.assert_allclose(result.seen_accuracy, expected, rtol=1e-6)
    assert float(result.params["ridge"]) == 1e3


@pytest.mark.parametrize("cuts", [(100,), (7, 150, 151), (1, 2, 3, 250)])
def test_ranpac_incremental_equals_batch_ridge(cuts):
    """Any split of the rows into tasks gives the ridge solution on all rows (fixed lambda)."""
    rng = np.random.default_rng(0)
    features = rng.standard_normal((300, 8)).astype(np.float32)
    labels = rng.integers(0, 6, 300).astype(np.int32)
    method = ranpac.RanPAC(dim=8, num_classes=6, projection_dim=64, ridge_exponents=(-1, -1))
    params = method.init(jax.random.PRNGKey(0))
    for task, rows in enumerate(np.split(np.arange(300), cuts)):
        params = method.update(params, features[rows], labels[rows], jax.random.PRNGKey(task), None)
    h = np.maximum(features.astype(np.float64) @ np.asarray(params["projection"]), 0)
    expected = np.linalg.solve(h.T @ h + 0.1 * np.eye(64), h.T @ np.eye(6)[labels])
    np.testing.assert_allclose(params["weights"], expected, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("rows", [40, 100])  # fewer and more rows than the 64 features
def test_ridge_errors_match_numpy(rows):
    rng = np.random.default_rng(1)
    h = np.maximum(rng.standard_normal((rows, 64)), 0)
    y = np.eye(4)[rng.integers(0, 4, rows)]
    held = np.arange(rows) >= int(0.8 * rows)
    ridges = 10.0 ** np.arange(-2, 4)
    fit, test = h[~held], h[held]
    parts = (h * ~held[:, None], y * ~held[:, None], h * held[:, None], y * held[:, None], ridges)
    errors = ranpac.ridge_errors(*(np.float32(a) for a in parts))
    expected = []
    for r in ridges:
        head = np.linalg.solve(fit.T @ fit + r * np.eye(64), fit.T @ y[~held])
        expected.append(np.sum((test @ head - y[held]) ** 2))
    np.testing.assert_allclose(errors, expected, rtol=2e-3)


def test_holdout_mask_holds_out_the_paper_share_of_real_rows():
    valid = np.arange(103) < 97  # 6 padding rows
    held = np.asarray(ranpac.holdout_mask(jax.random.PRNGKey(3), valid, 0.2))
    assert held.sum() == 97 - int(0.8 * 97) and not held[~valid].any()


def test_baselines_preset_from_the_command_line(tmp_path, capsys):
    # The preset on a small stream: every baseline runs and gets a row of the table, and joint
    # trains on every seen class's rows: 150, 300, 450, 600 rows of 4 tasks, batch 128, 1 epoch.
    args = ["--config", "synthetic:smoke", "--preset", "baselines", "--seeds", "0"]
    args += ["--workdir", str(tmp_path), "--no-compile-cache", "-q", "--config.train.epochs=1"]
    assert ablate.main([*args, "--config.ranpac.dim=300"]) == 0
    rows = capsys.readouterr().out
    for method in grids.BASELINES:
        assert f"| {method} |" in rows
    assert (tmp_path / "comparison.png").is_file()
    (metrics,) = tmp_path.glob("method-joint/**/metrics.jsonl")
    assert [row["steps"] for row in rundir.read_metrics(metrics.parent)] == [2, 3, 4, 5]
