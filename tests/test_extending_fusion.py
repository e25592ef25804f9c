"""README "Extending": changing the fusion rule is one override (the command executed here)."""

import shlex

from readme_blocks import blocks

from experiments import run

# README's two blocks: the command, and the plan its run.log shows.
COMMAND, PLAN = blocks("Changing the fusion rule")


def test_the_fusion_rule_is_an_override(tmp_path, monkeypatch):
    argv = shlex.split(COMMAND.replace("\\\n", " "))
    assert argv[:3] == ["python", "-m", "experiments.run"]
    monkeypatch.chdir(tmp_path)  # runs/ and the cache stay in tmp_path
    assert run.main([*argv[3:], f"--config.cache_dir={tmp_path / 'cache'}"]) == 0
    logs = "\n".join(p.read_text() for p in (tmp_path / "runs" / "average-gate").rglob("run.log"))
    lines = [line.split(": ", 1)[-1] if " INFO " in line else line for line in logs.splitlines()]
    assert PLAN.strip() in "\n".join(lines)
    assert any((tmp_path / "runs" / "average-gate").rglob("metrics.jsonl"))
