"""transformers prints "PyTorch was not found" on every import without torch (as users run: torch
is only the parity tests' reference). The project's transformers imports drop exactly that notice;
any other transformers warning still shows."""

import os
import subprocess
import sys

import pytest
from processes import REPO

from calfuse_jax import clip

NOTICE = "PyTorch was not found"
# transformers looks for torch with importlib.util.find_spec, which gives None for this entry.
HIDE_TORCH = 'import sys; sys.modules["torch"] = None\n'


def run_without_torch(code):
    return subprocess.Popen(
        [sys.executable, "-c", HIDE_TORCH + code],
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return clip.random_checkpoint(tmp_path_factory.mktemp("quiet"), variant="tiny", seed=0)


def test_only_the_pytorch_notice_is_silenced(folder):
    plain = run_without_torch("import transformers")  # the mechanism, without the project
    ours = run_without_torch(
        "from calfuse_jax import clip\n"
        f"model, params = clip.from_pretrained({str(folder)!r})\n"
        f"clip.load_tokenizer({str(folder)!r})(['a cat'])\n"
        "import transformers\n"
        "transformers.logging.get_logger('transformers').warning('another transformers warning')\n"
    )
    (_, plain_err), (_, our_err) = plain.communicate(timeout=60), ours.communicate(timeout=60)
    assert plain.returncode == 0 and NOTICE in plain_err, plain_err[-2000:]
    assert ours.returncode == 0, our_err[-3000:]
    assert NOTICE not in our_err and "another transformers warning" in our_err
