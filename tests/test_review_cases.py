"""Cases of the outside reliability review (at 54146ce) that no other test file covers: damaged
files of a finished run folder (WD-2, WD-5, WD-6, WD-8, WD-13, WD-15, WD-16, WD-18), a report
over a damaged folder (RP-2), a concurrent command of another config (CO-2), `inc7,smoke`
(CF-12), a config variant naming a path (SE-4) and swapped random weights in the cache (CC-14).

Each damages what the review damaged and checks the outcome through `experiments.run.main` /
`experiments.report.main` (exit code, the one paragraph, what is left on disk) or the library.
The other cases live next to their code: see notes/review_rerun.md for the map.
"""

import json
import shutil

import numpy as np
import pytest

import calfuse_jax.continual
from experiments import pipeline, report, run
from experiments.configs import load_config


def smoke(workdir, *extra):
    # synthetic:smoke: generated features (no encoder), 4 tiny tasks. No training steps (the
    # head is fused, evaluated and checkpointed all the same): nothing here is about training,
    # and compiling the train step would double this file's time.
    args = ["--config", "synthetic:smoke", "--config.train.epochs=0", "--workdir", str(workdir)]
    return [*args, "-q", *extra]


def no_training(*args, **kwargs):
    raise AssertionError("a task was trained again on a resumed run")


def snapshot(folder):
    """{relative path: bytes} of every file under `folder` but its run.log (appended to)."""
    files = (p for p in folder.rglob("*") if p.is_file() and p.name != "run.log")
    return {str(p.relative_to(folder)): p.read_bytes() for p in files}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("review") / "run"
    assert run.main(smoke(workdir)) == 0
    return workdir


@pytest.fixture
def copy(finished, tmp_path):
    """A copy of the finished run folder, to damage."""
    return shutil.copytree(finished, tmp_path / "run")


def one_error(capsys) -> str:
    """The one `error:` paragraph the command printed (no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    return line


def test_derived_files_overwritten_with_garbage_are_rebuilt(copy, finished, monkeypatch):
    """WD-2 (metrics.jsonl zero-filled, as a crash on a delayed-allocation filesystem leaves it;
    summary.json emptied) and WD-8 (run_fingerprint.json edited into invalid JSON): the resume
    rebuilds each byte for byte from the checkpoints, training nothing."""
    (copy / "metrics.jsonl").write_bytes(b"\0" * (copy / "metrics.jsonl").stat().st_size)
    (copy / "summary.json").write_text("")
    (copy / "run_fingerprint.json").write_text("{'fingerprint': 'edited by hand'}")
    monkeypatch.setattr(calfuse_jax.continual, "_run_task", no_training)
    assert run.main(smoke(copy)) == 0
    for name in ("metrics.jsonl", "summary.json", "run_fingerprint.json"):
        assert (copy / name).read_bytes() == (finished / name).read_bytes(), name


@pytest.mark.parametrize("damaged", ["{", ""], ids=["WD-5-torn", "WD-6-empty"])
def test_a_damaged_config_json_is_named_with_the_fix(damaged, copy, capsys):
    """WD-5/WD-6: config.json cut to "{" or emptied. It alone records the run's config, so the
    resume is refused: exit 2, one paragraph naming the file and --overwrite, nothing changed."""
    (copy / "config.json").write_text(damaged)
    before = snapshot(copy)
    assert run.main(smoke(copy)) == 2
    error = one_error(capsys)
    assert f"{copy} holds results" in error and "without a readable config.json" in error
    assert "--overwrite" in error
    assert snapshot(copy) == before


def zero_task_arrays(workdir):  # WD-13: the array data of task 3's state, zeroed in place
    for path in (workdir / "checkpoints/tasks/3/state").rglob("d/*"):  # OCDBT's data files
        path.write_bytes(b"\0" * path.stat().st_size)


def damage_task_meta(workdir):  # WD-15: task 3's JSON meta (the last task's is read on resume)
    (workdir / "checkpoints/tasks/3/meta/metadata").write_text('{"task": 3, "rows": [')


@pytest.mark.parametrize("damage", [zero_task_arrays, damage_task_meta], ids=["WD-13", "WD-15"])
def test_a_damaged_task_checkpoint_is_named_and_its_fix_works(
    damage, copy, finished, capsys, monkeypatch
):
    """WD-13/WD-15: exit 2 naming task checkpoint 3 and how to resume without it (was a
    150-line TensorStore traceback, or a bare JSON error naming no file); following the fix
    retrains task 3 only and ends with the uninterrupted run's summary."""
    damage(copy)
    metrics = (copy / "metrics.jsonl").read_bytes()
    assert run.main(smoke(copy)) == 2
    error = one_error(capsys)
    tasks = copy.absolute() / "checkpoints" / "tasks"
    assert f"task checkpoint 3 ({tasks / '3'}) is unreadable" in error
    assert f"delete {tasks}/<t> for every t >= 3 to resume after task 2" in error
    assert (copy / "metrics.jsonl").read_bytes() == metrics  # nothing rewritten
    if damage is zero_task_arrays:  # the fix, followed once (one task of training)
        shutil.rmtree(tasks / "3")
        trained = []
        real = calfuse_jax.continual._run_task

        def run_task(run_, task, carry):
            trained.append(task)
            return real(run_, task, carry)

        monkeypatch.setattr(calfuse_jax.continual, "_run_task", run_task)
        assert run.main(smoke(copy)) == 0
        assert trained == [3]
        assert (copy / "summary.json").read_bytes() == (finished / "summary.json").read_bytes()


@pytest.mark.parametrize("folder", ["checkpoints", "checkpoints/tasks"])
def test_a_file_where_the_checkpoints_folder_belongs_is_named(folder, copy, capsys):
    """WD-18: a file in place of checkpoints/ (or checkpoints/tasks/): exit 2 naming it at once
    (was a NotADirectoryError traceback, for tasks/ only after training task 0 again)."""
    shutil.rmtree(copy / folder)
    (copy / folder).write_text("not a folder\n")
    assert run.main(smoke(copy)) == 2
    error = one_error(capsys)
    assert f"{copy.absolute() / folder} is a file where the run keeps its checkpoints" in error
    assert (copy / folder).read_text() == "not a folder\n"  # left for the user to move


def test_a_damaged_provenance_does_not_block_a_resume(copy, monkeypatch):
    """WD-16: provenance.json cut to "{" (a record, not an identity): the resume goes on and
    writes a readable provenance again (was exit 2, `Expecting property name ...`)."""
    (copy / "provenance.json").write_text("{")
    monkeypatch.setattr(calfuse_jax.continual, "_run_task", no_training)
    assert run.main(smoke(copy)) == 0
    provenance = json.loads((copy / "provenance.json").read_text())
    assert provenance["task_bounds"] == [0, 5, 10, 15, 20] and provenance["seed"] == 0


@pytest.mark.parametrize("name", ["summary.json", "config.json"])
def test_a_report_names_the_damaged_file(name, copy, capsys):
    """RP-2: `experiments.report` over a folder whose summary.json / config.json is empty:
    exit 2 naming the file (was `error: Expecting value: line 1 column 1 (char 0)`)."""
    (copy / name).write_text("")
    assert report.main([str(copy), "--out", str(copy.parent / "report")]) == 2
    assert f"{copy / name} is damaged" in one_error(capsys)
    assert not (copy.parent / "report").exists()


def test_a_concurrent_command_of_another_config_is_refused_and_writes_nothing(
    tmp_path, capsys, monkeypatch
):
    """CO-2: while one command runs on a new workdir, the same command with another lr starts
    on it: refused at once (exit 2, "in use"), writing nothing (it used to write config.json
    and provenance.json into the folder of the run that went on with the other lr)."""
    workdir = tmp_path / "run"
    rival = {}

    class Stop(Exception):
        pass

    real_prepare = run.prepare

    def prepare_while_a_rival_starts(config):
        if rival:  # the rival itself got this far (no lock): let it run
            return real_prepare(config)
        rival["code"] = None
        rival["code"] = run.main(smoke(workdir, "--config.train.lr=0.001"))
        rival["err"] = capsys.readouterr().err
        rival["files"] = sorted(p.name for p in workdir.iterdir())
        raise Stop  # the first command has seen what it needs: no training here

    monkeypatch.setattr(run, "prepare", prepare_while_a_rival_starts)
    with pytest.raises(Stop):
        run.main(smoke(workdir))
    assert rival["code"] == 2 and "is in use by another run" in rival["err"], rival["err"]
    assert rival["files"] == [".lock"]  # no config.json, provenance.json or checkpoints


def test_inc7_smoke_runs_inc7():
    """CF-12: `synthetic:inc7,smoke` ran Inc5 (smoke reset the split after the variants)."""
    for name in ("synthetic:inc7,smoke", "synthetic:smoke,inc7"):
        config = load_config(name)
        assert (config.continual.initial, config.continual.increment) == (7, 7), name
        assert config.dataset.num_classes == 20 and config.train.epochs == 1  # still a smoke
    b10 = load_config("synthetic:b10,smoke").continual
    assert (b10.initial, b10.increment) == (10, 5)


def test_a_variant_of_a_custom_config_cannot_move_the_default_workdir(tmp_path, monkeypatch):
    """SE-4: `--config my.py:../../../escaped` with a config that accepts any argument wrote to
    ./escaped-calfuse; the default workdir stays a direct child of runs/."""
    (tmp_path / "my.py").write_text(
        "from experiments.configs import synthetic\n\n"
        "def get_config(arg=None):\n"
        "    return synthetic.get_config('smoke')\n"
    )
    monkeypatch.chdir(tmp_path)
    for name in ("my.py:../../../escaped", "my.py:/tmp/abs", "my.py:..", "my.py:a/../../b"):
        workdir = run.default_workdir(name, load_config(name))
        resolved = (tmp_path / workdir).resolve()
        assert resolved.parent == tmp_path.resolve() / "runs", (name, workdir)
        assert not resolved.name.startswith("."), (name, workdir)


def test_swapped_random_weights_in_the_cache_are_rewritten(tmp_path, monkeypatch):
    """CC-14: the cached random-weight checkpoint replaced by another valid one (other values,
    same shapes) was used silently; `model_path` rewrites it, identical to the seeded original.
    (A seeded stand-in writer replaces the CLIP init, whose compile alone takes ~10 s.)"""
    from safetensors.numpy import save_file

    from calfuse_jax import clip

    def random_checkpoint(folder, variant, seed):
        weights = np.random.default_rng(seed).standard_normal((8, 4)).astype(np.float32)
        save_file({"w": weights}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"variant": variant}))

    monkeypatch.setattr(clip, "random_checkpoint", random_checkpoint)
    config = load_config("demo")
    config.cache_dir = str(tmp_path)
    weights = tmp_path / pipeline.model_path(config) / "model.safetensors"
    good = weights.read_bytes()
    save_file({"w": np.ones((8, 4), np.float32)}, str(weights))  # valid, other numbers
    assert tmp_path / pipeline.model_path(config) / "model.safetensors" == weights
    assert weights.read_bytes() == good
