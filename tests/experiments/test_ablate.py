"""experiments.ablate / experiments.grids: grid expansion, the table's numbers, resume, and the
`method` grid on the synthetic benchmark (calfuse >= rapf >= finetune on Last)."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from calfuse_jax import rundir
from experiments import ablate, grids, results
from experiments.configs import ConfigError, apply_overrides, load_config

REPO = Path(__file__).resolve().parents[2]

# The synthetic benchmark at 30 classes (3 tasks of 10) with its own (the paper's) schedule: 15
# epochs, lr x0.1 at epochs 4 and 10. A 5-epoch schedule (milestones 2, 4: ~16 full-lr steps per
# task) leaves RAPF's randomly initialised adapter undertrained, and its margin over fine-tuning
# then lies within seed noise (see notes/README_draft.md); steps are cheap, compiles are not.
TINY = ["--config.dataset.num_classes=30", "--config.progress=false"]


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


# --- grids: pure expansion ---------------------------------------------------------------------


def test_expand_is_the_cartesian_product_in_order():
    axes = grids.parse_grid(["calibration.mode=none,dynamic", "fusion.method=qr,svd,none"])
    cells = grids.expand(axes)
    assert [tuple(c.values.values()) for c in cells] == [
        ("none", "qr"), ("none", "svd"), ("none", "none"),
        ("dynamic", "qr"), ("dynamic", "svd"), ("dynamic", "none"),
    ]  # fmt: skip
    assert cells[1].overrides == ["calibration.mode=none", "fusion.method=svd"]
    assert cells[1].name == "calibration.mode-none__fusion.method-svd"
    assert cells[1].label == "mode=none method=svd"
    assert len({c.name for c in cells}) == 6


def test_presets():
    method = grids.expand(grids.preset("method"))
    assert [c.label for c in method] == ["calfuse", "rapf", "finetune", "zeroshot"]
    ablation = grids.expand(grids.preset("calfuse_ablation"))
    assert len(ablation) == 5 * 3 * 2
    # method is pinned (one value): in every cell's overrides, not in its name.
    assert all(c.values["method"] == "calfuse" for c in ablation)
    assert "method" not in ablation[0].varied
    assert (
        ablation[0].name
        == "calibration.mode-none__fusion.rules-adapter_kernel=qr__loss.kd_weight-0.0"
    )
    assert {c.values["loss.kd_weight"] for c in ablation} == {"0.0", grids.KD_ON}


def test_grid_replaces_a_preset_axis():
    axes = grids.combine(grids.preset("calfuse_ablation"), grids.parse_grid(["loss.kd_weight=0,2"]))
    assert dict(axes)["loss.kd_weight"] == ("0", "2")
    assert len(grids.expand(axes)) == 30


@pytest.mark.parametrize(
    "specs, message",
    [
        (["calibration.mode"], "KEY=V1,V2"),
        (["fusion.method="], "KEY=V1,V2"),
        (["fusion.method=qr,qr"], "twice"),
        (["fusion.method=qr", "fusion.method=svd"], "more than once"),
    ],
)
def test_bad_grid_specs(specs, message):
    with pytest.raises(grids.GridError, match=message):
        grids.parse_grid(specs)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(grids.GridError, match="method, baselines, calfuse_ablation"):
        grids.preset("methods")


def test_cells_are_checked_against_the_config_before_running():
    config = load_config("synthetic")
    with pytest.raises(ConfigError, match="did you mean 'calibration.mode'"):
        ablate.check_axes(config, grids.parse_grid(["calibration.mod=none,fixed"]))
    with pytest.raises(ConfigError, match="'adapter/kernel=lu' must read 'path_regex=action'"):
        ablate.check_axes(
            config, grids.parse_grid(["fusion.rules=adapter/kernel=qr,adapter/kernel=lu"])
        )
    with pytest.raises(ConfigError, match="wants a float"):
        ablate.check_axes(config, grids.parse_grid(["loss.kd_weight=0,high"]))
    with pytest.raises(grids.GridError, match="--seeds"):
        ablate.check_axes(config, grids.parse_grid(["seeds=0,1"]))


def test_cells_share_prepared_features_only_when_their_data_agree():
    base = load_config("synthetic")
    key = ablate.data_key(base)
    # Method fields and seeds do not change the features, the split or the data do.
    for same in (["method=rapf"], ["calibration.mode=none", "loss.kd_weight=1"], ["seeds=0,1"]):
        assert ablate.data_key(apply_overrides(base, same)) == key, same
    for other in (["continual.increment=5"], ["synthetic.noise=2"], ["order_seed=7"]):
        assert ablate.data_key(apply_overrides(base, other)) != key, other


def test_default_workdir_is_stable_and_names_the_grid():
    assert (
        str(ablate.default_workdir("cifar100", "method", [], [])) == "runs/ablate-cifar100-method"
    )
    a = ablate.default_workdir("demo:smoke", None, ["fusion.method=qr,svd"], ["train.epochs=3"])
    b = ablate.default_workdir("demo:smoke", None, ["fusion.method=qr,svd"], ["train.epochs=3"])
    c = ablate.default_workdir("demo:smoke", None, ["fusion.method=qr,svd"], ["train.epochs=4"])
    assert a == b != c and a.name.startswith("ablate-demo-smoke-grid-")


# --- the table from hand-made summaries ----------------------------------------------------------


def fake_cell(tmp_path, method, lasts, key="method"):
    """A CellResult whose summary is the mean ± std of per-seed summaries with the given Last
    (its grid `key` set to `method`)."""
    per_seed = []
    for seed, last in enumerate(lasts):
        seen = np.array([90.0, last])
        matrix = np.array([[90.0, np.nan], [last - 5, last + 5]])
        summary = results.make_summary(
            {"avg": seen.mean(), "last": last, "forgetting": 5.0, "bwt": -5.0},
            matrix,
            seen,
            [5, 10],
        )
        per_seed.append(dict(summary, seed=seed))
    cell = grids.Cell({key: method}, (key,))
    return ablate.CellResult(cell, tmp_path / cell.name, results.aggregate(per_seed), False)


def test_table_csv_and_plot_hold_mean_and_std(tmp_path):
    cells = [
        fake_cell(tmp_path, "calfuse", [80.0, 70.0]),
        fake_cell(tmp_path, "rapf", [60.0, 64.0]),
    ]
    path = ablate.write_outputs(cells, tmp_path, "toy", ["a note"])
    text = path.read_text()
    # Hand-computed: mean(80, 70) = 75, sample std = 7.07; Avg = mean(85, 80) = 82.5 ± 3.54.
    assert "| calfuse | 82.50 ± 3.54 | 75.00 ± 7.07 | 5.00 ± 0.00 | -5.00 ± 0.00 | 2 |" in text
    assert "| rapf | 76.00 ± 1.41 | 62.00 ± 2.83 |" in text
    assert "mean ± std over 2 seeds" in text and "a note" in text
    rows = read_csv(tmp_path / "ablation.csv")
    assert [r["method"] for r in rows] == ["calfuse", "rapf"]
    assert float(rows[0]["last"]) == 75.0
    assert float(rows[0]["last_std"]) == pytest.approx(np.std([80, 70], ddof=1))
    for name in ("comparison.png", "accuracy_curve.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cells_that_are_not_methods_plot_in_the_default_colours(tmp_path):
    """A grid over another key (the calfuse_ablation preset's gate modes) has no method colours:
    Avg and Last take matplotlib's first two (an invalid colour name once stopped that preset)."""
    cells = [fake_cell(tmp_path, m, [80.0, 70.0], "calibration.mode") for m in ("none", "fixed")]
    ablate.plot_comparison(cells, tmp_path / "comparison.png")
    assert (tmp_path / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_each_method_keeps_its_colour_in_every_chart_and_joint_is_dashed(tmp_path, monkeypatch):
    """The report's curves (labels like 'synthetic ranpac (3 seeds)') and the grid's bars give a
    method the same colour (results.METHOD_COLORS); `joint`, the upper bound, is dashed in both."""
    from matplotlib.colors import to_hex
    from matplotlib.figure import Figure

    figures = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *args, **kwargs: figures.append(self))
    methods = ["ranpac", "calfuse", "joint", "ncm"]
    cells = [fake_cell(tmp_path, m, [80.0, 70.0]) for m in methods]
    ablate.plot_comparison(cells, tmp_path / "comparison.png")
    curves = [(f"synthetic {m} (2 seeds)", c.summary) for m, c in zip(methods, cells, strict=True)]
    results.plot_accuracy_curves(curves[::-1], tmp_path / "curves.png")  # another order
    bars, lines = figures[0].axes[0].patches, figures[1].axes[0].get_lines()
    colour = {m: to_hex(results.METHOD_COLORS[m]) for m in methods}
    assert len(set(colour.values())) == len(methods)
    for line, method in zip(lines, methods[::-1], strict=True):
        assert to_hex(line.get_color()) == colour[method], method
        assert line.get_linestyle() == ("--" if method == "joint" else "-"), method
    # Avg bars, then Last bars, each in grid order top to bottom (y = 3, 2, 1, 0).
    for bar, method in zip(bars, methods * 2, strict=True):
        if method == "joint":
            assert not bar.get_fill() and bar.get_linestyle() == "--"
            assert to_hex(bar.get_edgecolor()) == colour["joint"]
        else:
            assert to_hex(bar.get_facecolor()) == colour[method], method


# --- end to end: the method grid on the synthetic benchmark --------------------------------------


@pytest.fixture(scope="module")
def method_grid(tmp_path_factory):
    """`python -m experiments.ablate --preset method` once, in its own process (it turns on the
    persistent compilation cache, a process-wide JAX setting)."""
    root = tmp_path_factory.mktemp("ablate")
    workdir, cache = root / "grid", root / "cache"
    args = ["--config", "synthetic", "--preset", "method", "--seeds", "0,1"]
    args += ["--workdir", str(workdir), f"--config.cache_dir={cache}", "-q", *TINY]
    # Without the suite's shared cache (tests/conftest.py), so that ablate picks its own folder.
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, "-m", "experiments.ablate", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir, cache, done.stdout


def test_method_grid_writes_one_table_and_plot(method_grid):
    workdir, cache, stdout = method_grid
    for name in (
        "ablation.md",
        "ablation.csv",
        "comparison.png",
        "accuracy_curve.png",
        "grid.json",
    ):
        assert (workdir / name).is_file(), name
    assert (cache / "xla").is_dir() and any((cache / "xla").iterdir())  # compiled once, reused
    rows = read_csv(workdir / "ablation.csv")
    assert [r["method"] for r in rows] == ["calfuse", "rapf", "finetune", "zeroshot"]
    assert "| calfuse |" in stdout and "| zeroshot |" in stdout
    # The table names what it was run with, so two tables can be compared.
    table = (workdir / "ablation.md").read_text()
    assert "Base-config overrides: `dataset.num_classes=30`." in table
    for row in rows:
        # Each cell is an ordinary run_experiment folder; the table's mean ± std must be those of
        # the per-seed summaries it holds.
        folder = workdir / row["folder"]
        seeds = [rundir.read_json(folder / f"seed_{s}" / "summary.json") for s in (0, 1)]
        for key in ("avg", "last", "forgetting", "bwt"):
            values = [s[key] for s in seeds]
            assert float(row[key]) == pytest.approx(np.mean(values), abs=1e-4)
            assert float(row[f"{key}_std"]) == pytest.approx(np.std(values, ddof=1), abs=1e-4)
        assert all(s["num_tasks"] == 3 for s in seeds)
        # Per-cell plots and TensorBoard files are off in a grid (its own table and plots stay).
        assert not list(folder.rglob("*.png")) and not list(folder.rglob("tensorboard"))


def test_method_grid_ranks_calfuse_over_rapf_over_finetune(method_grid):
    workdir, _, _ = method_grid
    last = {r["method"]: float(r["last"]) for r in read_csv(workdir / "ablation.csv")}
    assert last["calfuse"] >= last["rapf"] >= last["finetune"], last
    # Zero-shot does not train, so the seeds agree exactly.
    zeroshot = next(r for r in read_csv(workdir / "ablation.csv") if r["method"] == "zeroshot")
    assert float(zeroshot["last_std"]) == 0.0


def test_rerun_skips_finished_cells_and_resumes_the_rest(method_grid, monkeypatch):
    workdir, cache, _ = method_grid
    config = apply_overrides(
        load_config("synthetic"),
        [a.removeprefix("--config.") for a in TINY] + [f"cache_dir={cache}"],
    )
    before = (workdir / "ablation.csv").read_text()
    # Only the cell whose summary.json is gone may run again.
    (workdir / "method-finetune" / "summary.json").rename(workdir / "finetune-summary.bak")
    calls = []

    def recording_run(items, overwrite=False, prepared=None):
        calls.extend(Path(folder).name for _, folder in items)
        return [rundir.read_json(workdir / "finetune-summary.bak") for _ in items]

    monkeypatch.setattr(ablate, "run_experiments", recording_run)
    done = ablate.ablate(config, grids.preset("method"), workdir, seeds="0,1")
    assert calls == ["method-finetune"]
    assert [r.skipped for r in done] == [True, True, False, True]
    assert (workdir / "ablation.csv").read_text() == before
    (workdir / "finetune-summary.bak").rename(workdir / "method-finetune" / "summary.json")


def test_a_changed_config_is_refused_not_mixed(method_grid):
    workdir, cache, _ = method_grid
    overrides = [a.removeprefix("--config.") for a in TINY] + [f"cache_dir={cache}"]
    config = apply_overrides(load_config("synthetic"), [*overrides, "train.lr=0.01"])
    with pytest.raises(rundir.ConfigMismatchError, match="--overwrite"):
        ablate.ablate(config, grids.preset("method"), workdir, seeds="0,1")


def test_cli_usage_errors(capsys):
    assert ablate.main(["--config", "synthetic", "--grid", "calibration.mode=none,lu", "-q"]) == 2
    assert "choose one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ablate.main(["--config", "synthetic"])  # neither --preset nor --grid


def test_cells_differing_in_step_floats_train_together_with_the_same_table(tmp_path):
    """A grid over the learning rate and the fusion rule: its 4 cells x 2 seeds train as one
    vmapped program (one trace of the epoch) and give the table of the cells run one by one."""
    from calfuse_jax import train

    axes = grids.parse_grid(
        ["train.lr=0.001,0.003", "fusion.rules=adapter/kernel=qr,adapter/kernel=svd"]
    )
    tables = {}
    for together in ("true", "false"):
        overrides = ["synthetic.train_per_class=30", "train.epochs=3", "train.milestones=(2,)"]
        overrides += ["progress=false", f"outputs.seeds_together={together}"]
        config = apply_overrides(load_config("synthetic:smoke"), overrides)
        train.epoch_fn.cache_clear()
        before = train.TRACES["train_step"]
        ablate.ablate(config, axes, tmp_path / together, seeds="0,1")
        traces = train.TRACES["train_step"] - before
        tables[together] = (tmp_path / together / "ablation.md").read_text().splitlines()[2:]
        assert traces == (1 if together == "true" else 2)  # one by one: one per fusion rule
    assert tables["true"] == tables["false"]
    assert len({line.split("|")[4] for line in tables["true"] if line.startswith("| 0.0")}) > 1
