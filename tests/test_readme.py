"""The README's Python example runs as written (a newcomer copies it first)."""

from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def test_library_example_runs(tmp_path, monkeypatch):
    text = README.read_text()
    section = text[text.index("## The library from Python") :]
    block = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)  # the example writes tiny-clip/ and runs/ where it runs
    scope: dict = {}
    exec(compile(block, str(README), "exec"), scope)
    summary = scope["result"].summary
    # The synthetic stream is learnable: the head must beat chance (20 classes) by far.
    assert summary["last"] > 3 * 100 / 20
    f = np.asarray(scope["f"])
    np.testing.assert_allclose(np.linalg.norm(f, axis=-1), 1.0, rtol=1e-5)
    assert (tmp_path / "runs" / "my-run" / "metrics.jsonl").exists()
