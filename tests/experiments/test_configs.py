"""Every experiment config loads, builds its model abstractly, and rejects bad overrides."""

import functools

import jax
import pytest

from calfuse_jax import clip
from calfuse_jax.models.clip import CLIP
from experiments.configs import (
    CONFIGS,
    ConfigError,
    apply_overrides,
    defaults,
    load_config,
    seeds_of,
    validate,
)

IMAGE_CONFIGS = ("cifar100", "imagenet_r", "imagenet100", "cub200", "demo", "folder")

# DESIGN.md §3, typed in by hand: (increment, fusion bias, threshold, beta, K).
PAPER_VALUES = {
    "cifar100": (10, 0.6, 0.55, 2.0, 2),
    "imagenet_r": (20, 0.7, 0.65, 1.0, 5),
    "imagenet100": (10, 0.5, 0.65, 1.0, 2),
    "cub200": (20, 0.8, 0.65, 1.0, 10),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_loads_and_validates(name):
    config = load_config(name)
    validate(config)
    assert config.name.replace("-{root}", "") == name  # folder-{root}: named after its data
    assert seeds_of(config) == [0]
    if config.order == "fixed":
        assert sorted(config.class_order) == list(range(config.dataset.num_classes))


@functools.cache
def abstract_model(variant):
    """(arch, abstract params, abstract image embeddings [2, D]); cached: 4 configs share B/16."""
    arch = clip.VARIANTS[variant]
    model = CLIP(arch)
    pixels = jax.ShapeDtypeStruct((2, arch.image_size, arch.image_size, 3), "float32")
    tokens = jax.ShapeDtypeStruct((3, arch.context_length), "int32")
    params = jax.eval_shape(model.init, jax.random.key(0), pixels, tokens)["params"]
    image = jax.eval_shape(
        lambda p, x: model.apply({"params": p}, x, method=model.encode_image), params, pixels
    )
    return arch, params, image


@pytest.mark.parametrize("name", IMAGE_CONFIGS)
def test_every_image_config_builds_its_model_under_eval_shape(name):
    config = load_config(name)
    arch, params, image = abstract_model(config.model.variant)
    assert image.shape == (2, arch.embed_dim)
    assert params["visual_projection"]["kernel"].shape == (arch.vision_width, arch.embed_dim)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_rejects_an_unknown_key(name):
    config = load_config(name)
    with pytest.raises(ConfigError, match=r"unknown config key 'train.epoch'; did you mean "
                       r"'train.epochs'\?"):  # fmt: skip
        apply_overrides(config, ["train.epoch=3"])


@pytest.mark.parametrize("name", sorted(PAPER_VALUES))
def test_benchmark_configs_carry_the_design_values(name):
    config = load_config(name)
    increment, bias, threshold, beta, k = PAPER_VALUES[name]
    assert (config.continual.initial, config.continual.increment) == (increment, increment)
    assert config.fusion.mix_bias == bias
    assert config.pseudo.hard_threshold == threshold
    assert config.pseudo.beta == beta
    assert config.pseudo.classes_per_batch == k
    assert config.model.name == "openai/clip-vit-base-patch16"


def test_continual_clip_cifar_order_starts_as_published():
    # DESIGN.md §3: "CIFAR-100 order starts 87, 0, 52, 58, 44, 91, 68, 97".
    assert load_config("cifar100").class_order[:8] == (87, 0, 52, 58, 44, 91, 68, 97)


def test_variants():
    inc5 = load_config("cifar100:inc5")
    assert (inc5.continual.initial, inc5.continual.increment) == (5, 5)
    assert inc5.pseudo.classes_per_batch == 4  # RAPF's K for CIFAR-100 Inc5
    half = load_config("imagenet_r:b100,inc20,rapf,seeded")
    assert (half.continual.initial, half.continual.increment) == (100, 20)
    assert half.method == "rapf" and half.order == "seeded"
    smoke = load_config("cub200:smoke")
    assert smoke.train.epochs == 1 and smoke.dataset.max_per_class == 5
    # The synthetic benchmark trains on the design's schedule; its smoke variant stays 1 epoch.
    synthetic = load_config("synthetic")
    assert (synthetic.train.epochs, synthetic.train.milestones) == (15, (4, 10))
    assert load_config("synthetic:smoke").train.epochs == 1
    with pytest.raises(ConfigError, match="unknown config variant 'inc'"):
        load_config("cifar100:inc")


def test_variant_tokens_parse_to_typed_fields_in_any_order():
    assert defaults.parse_arg("b50,inc10,rapf") == defaults.Variant(inc=10, b=50, method="rapf")
    assert defaults.parse_arg(None) == defaults.Variant()
    # b<n> names the first task whatever comes after it (the token chain let inc20 undo b10).
    for arg in ("b10,inc20", "inc20,b10"):
        config = load_config(f"cifar100:{arg}")
        assert (config.continual.initial, config.continual.increment) == (10, 20), arg
    b0 = load_config("cifar100:b0,inc5")
    assert (b0.continual.initial, b0.continual.increment) == (5, 5)
    with pytest.raises(ConfigError, match="'inc10' repeats 'inc'"):
        load_config("cifar100:inc5,inc10")


def test_overrides_parse_to_the_field_type():
    config = apply_overrides(
        load_config("cifar100"),
        [
            "train.epochs=3",
            "train.lr=1e-2",
            "fusion.mix_bias=1",  # an int literal for a float field
            "train.milestones=2,5",
            "dataset.root=/data/cifar",
            "dataset.download=false",
            "dataset.mirror=http://127.0.0.1:8000/files",
            "prompt.templates=a photo of a {}.",
            "method=rapf",
            "seeds=0,1,2",
        ],
    )
    assert config.train.epochs == 3 and isinstance(config.train.epochs, int)
    assert config.train.lr == 0.01
    assert config.fusion.mix_bias == 1.0 and isinstance(config.fusion.mix_bias, float)
    assert config.train.milestones == (2, 5)
    assert config.dataset.root == "/data/cifar"
    assert config.dataset.download is False  # the default fetches missing archives
    assert config.dataset.mirror == "http://127.0.0.1:8000/files"
    assert config.prompt.templates == ("a photo of a {}.",)
    assert seeds_of(config) == [0, 1, 2]
    # The original is untouched: overrides work on a copy.
    assert load_config("cifar100").train.epochs == 15


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epochs=abc", "config key 'train.epochs' wants a int, got 'abc'"),
        ("dataset.download=maybe", "wants true or false"),
        ("method=rapff", "config key 'method' is 'rapff'; choose one of calfuse, rapf"),
        ("calibration.mode=dinamic", "choose one of none, fixed, schedule, learned, dynamic"),
        ("dataset.source=ftp", "choose one of auto, tfds, files"),
        ("seeds=0,0", "seeds must be distinct integers"),
        ("continual.initial=500", "exceeds dataset.num_classes=100"),
        ("class_order=1,2,3", "class_order must list each of the 100 labels"),
        ("fusion=qr", "unknown config key 'fusion'"),
        ("train.epochs", "needs the form --config.train.epochs=VALUE"),
    ],
)
def test_bad_overrides_are_rejected_with_the_fix(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        apply_overrides(load_config("cifar100"), [override])


def test_unknown_config_name_and_path(tmp_path):
    with pytest.raises(ConfigError, match="unknown config 'cifar10'; did you mean 'cifar100'"):
        load_config("cifar10")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.py"))
    path = tmp_path / "mine.py"
    path.write_text(
        "from experiments.configs import cifar100\n"
        "def get_config(arg=None):\n"
        "    c = cifar100.get_config(arg)\n"
        "    c.name = 'mine'\n"
        "    return c\n"
    )
    config = load_config(f"{path}:inc20")
    assert config.name == "mine:inc20" and config.continual.increment == 20


def test_distillation_without_pseudo_features_is_a_config_error():
    config = load_config("cifar100")
    with pytest.raises(ConfigError, match=r"loss.kd_weight=0.5 needs pseudo.classes_per_batch"):
        apply_overrides(config, ["loss.kd_weight=0.5", "pseudo.classes_per_batch=0"])
    apply_overrides(config, ["loss.kd_weight=0.5", "method=finetune"])  # finetune clears both
