"""Tokenizer ids equal the references on real class names with the real 49,408-token vocabulary.

The vocabulary ships in the open_clip_torch wheel (bpe_simple_vocab_16e6.txt.gz); the test fetches
the wheel with pip (no import of open_clip itself, which needs torch + ftfy) and builds vocab.json /
merges.txt from it the way OpenAI CLIP does. References: transformers' own
`CLIPTokenizer.from_pretrained(folder)` and OpenAI's BPE code as shipped in that wheel's
`open_clip/tokenizer.py`, executed with a pass-through `ftfy` stub when ftfy is absent (it only
repairs mojibake, which these names do not contain).
"""

import gzip
import importlib.util
import json
import subprocess
import sys
import types
import zipfile

import numpy as np
import pytest

from calfuse_jax import clip
from calfuse_jax.tokenizer import tokenizer_from_folder, vocab_from_merges, write_vocab_files

CLASS_NAMES = [
    # CIFAR-100 (underscores)
    "aquarium_fish", "maple_tree", "sweet_pepper", "lawn_mower", "pickup_truck", "willow_tree",
    # ImageNet-R (spaces, hyphens, apostrophes, capitals)
    "goldfish", "great white shark", "West Highland white terrier", "Granny Smith",
    "jack-o'-lantern", "St. Bernard", "Shih-Tzu", "pirate ship",
    # CUB-200 folder names (numbers, dots, underscores)
    "001.Black_footed_Albatross", "Chuck_will_Widow", "Brewer_Blackbird", "Le_Conte_Sparrow",
    "Anna's hummingbird", "yellow-headed blackbird",
    # prompts and awkward text
    "a good photo of a maple tree.", "a photo of a 7-eleven store, 3D!", "  many   spaces\there ",
    "ALL CAPS (and parentheses)", "café au lait", "",
    "a very long prompt " * 30,  # > 77 tokens: truncated to 76 + EOT
]  # fmt: skip


@pytest.fixture(scope="module")
def wheel_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(out)]
    try:
        subprocess.run([*cmd, "open_clip_torch==3.3.0"], check=True, timeout=180,
                       capture_output=True)  # fmt: skip
    except (subprocess.SubprocessError, OSError) as err:
        pytest.skip(
            f"real CLIP vocabulary unavailable: pip download open_clip_torch failed ({err})"
        )
    (wheel,) = out.glob("open_clip_torch-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        for name in ("open_clip/bpe_simple_vocab_16e6.txt.gz", "open_clip/tokenizer.py"):
            archive.extract(name, out)
    return out / "open_clip"


@pytest.fixture(scope="module")
def real_folder(wheel_dir, tmp_path_factory):
    lines = gzip.open(wheel_dir / "bpe_simple_vocab_16e6.txt.gz").read().decode("utf-8")
    # OpenAI CLIP keeps merges 1 .. 48894 of the file (49152 - 256 - 2 of them).
    merges = [tuple(line.split()) for line in lines.split("\n")[1 : 49152 - 256 - 2 + 1]]
    folder = tmp_path_factory.mktemp("real_vocab")
    assert write_vocab_files(folder, tuple(merges)) == 49408
    return folder


@pytest.fixture(scope="module")
def openai_tokenizer(wheel_dir):
    """OpenAI's SimpleTokenizer from the wheel's source (imports torch at module level)."""
    pytest.importorskip("torch")
    saved = sys.modules.get("ftfy")
    if importlib.util.find_spec("ftfy") is None:
        sys.modules["ftfy"] = types.SimpleNamespace(fix_text=lambda text: text)
    try:
        spec = importlib.util.spec_from_file_location(
            "openai_clip_tokenizer", wheel_dir / "tokenizer.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            sys.modules.pop("ftfy", None)
    return module.SimpleTokenizer()


def test_vocab_matches_openai_layout(real_folder):
    vocab = json.loads((real_folder / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["!"] == 0 and vocab["a</w>"] == 320  # ids every CLIP user knows


def test_ids_equal_transformers_reference(real_folder):
    from transformers import CLIPTokenizer

    ours = clip.load_tokenizer(real_folder)(CLASS_NAMES)
    reference = CLIPTokenizer.from_pretrained(real_folder)
    expected = reference(CLASS_NAMES, padding="max_length", truncation=True, max_length=77)
    assert len(reference) == 49408
    np.testing.assert_array_equal(ours, np.asarray(expected["input_ids"], np.int32))


def test_ids_equal_openai_bpe(real_folder, openai_tokenizer):
    ours = tokenizer_from_folder(real_folder)(CLASS_NAMES)
    expected = openai_tokenizer(CLASS_NAMES).numpy()  # pads with 0 after EOT
    assert ours.shape == expected.shape == (len(CLASS_NAMES), 77)
    for row, name in enumerate(CLASS_NAMES):
        end = int(np.argmax(expected[row] == 49407)) + 1  # through the first EOT
        np.testing.assert_array_equal(ours[row, :end], expected[row, :end], err_msg=name)
        # padding differs by convention only (EOT here, 0 there); neither reaches the pooled token
        assert (ours[row, end:] == 49407).all() and (expected[row, end:] == 0).all()
    assert ours[-1, 76] == 49407 and (ours[-1] != 49407).sum() == 76  # truncated, EOT kept


def test_missing_files_and_broken_vocab_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="lacks vocab.json, merges.txt"):
        tokenizer_from_folder(tmp_path)
    write_vocab_files(tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    del vocab["<|endoftext|>"]
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(ValueError, match="lacks the special tokens"):
        tokenizer_from_folder(tmp_path)


def test_silent_tiny_vocabulary_is_detected(tmp_path, monkeypatch):
    # transformers 5 ignores vocab_file= and builds a 2-token vocabulary; simulate a constructor
    # that drops the files and check that we raise instead of returning near-constant ids.
    import transformers

    write_vocab_files(tmp_path)
    original = transformers.CLIPTokenizer

    def dropping(*args, vocab=None, merges=None, **kwargs):
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers, "CLIPTokenizer", dropping)
    with pytest.raises(ValueError, match="built a 2-token CLIP tokenizer .* has 522 entries"):
        tokenizer_from_folder(tmp_path)


def test_tiny_vocab_is_openai_layout():
    vocab = vocab_from_merges((("t", "h"),))
    assert len(vocab) == 515 and vocab["th"] == 512 and vocab["<|endoftext|>"] == 514
