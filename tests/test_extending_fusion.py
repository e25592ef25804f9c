"""README "Extending": changing the fusion rule is one override (the command executed here)."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

COMMAND = """python -m experiments.run --config synthetic:smoke \\
    --config.fusion.rules='adapter/kernel=qr,calib/.*=average' --workdir runs/average-gate"""

PLAN = """fusion after each task (fusion.rules):
  adapter/kernel: qr (due to 'adapter/kernel')
  calib/bias: average (due to 'calib/.*')
  calib/kernel: average (due to 'calib/.*')"""


def test_the_fusion_rule_is_an_override(tmp_path):
    argv = shlex.split(COMMAND.replace("\\\n", " "))
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    done = subprocess.run(
        [sys.executable, *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    logs = "\n".join(p.read_text() for p in (tmp_path / "runs" / "average-gate").rglob("run.log"))
    lines = [line.split(": ", 1)[-1] if " INFO " in line else line for line in logs.splitlines()]
    assert PLAN in "\n".join(lines)
    assert any((tmp_path / "runs" / "average-gate").rglob("metrics.jsonl"))
