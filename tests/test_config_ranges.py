"""Every config value is checked before anything runs (review cases CF-12 to CF-20): each number
of every shipped config has a range rule, --show-config prints it, and a value outside it (or
NaN/Inf) stops the library and the command line at once, naming the field, the value and the rule,
with nothing written."""

import ml_collections
import pytest

from calfuse_jax import methods
from calfuse_jax.config import check_ranges, method_config, resolve_method
from calfuse_jax.continual import run_continual
from calfuse_jax.data.synthetic import make_synthetic_stream
from experiments import run
from experiments.configs import CONFIGS, RULES, load_config


def numeric_leaves(config, prefix=""):
    """Dotted names of the int and float fields (tuples of numbers, typed placeholders too)."""
    for key in config.keys():
        value, name = config[key], prefix + key
        if isinstance(value, ml_collections.ConfigDict):
            yield from numeric_leaves(value, name + ".")
            continue
        kind = config.get_ref(key).get_type() if value is None else type(value)
        items = value if isinstance(value, tuple) else [value]
        if kind in (int, float) or any(type(v) in (int, float) for v in items):
            yield name


@pytest.mark.parametrize("variant", ["", ":smoke", ":rapf"])
@pytest.mark.parametrize("name", CONFIGS)
def test_every_number_of_every_shipped_config_has_a_range_it_keeps(name, variant):
    config = load_config(name + variant)
    missing = [key for key in numeric_leaves(config) if not isinstance(RULES.get(key), str)]
    assert not missing, f"give these fields a rule where they are declared: {missing}"
    check_ranges(config, RULES)  # every rule parses and every shipped value keeps it


@pytest.mark.parametrize(
    "key, value, rule",
    [
        ("fusion.mix_bias", -5.0, "0 <= x <= 1"),  # CF-13: a negative mask
        ("calibration.value", 1.5, "0 <= x <= 1"),  # CF-14: an extrapolated gate
        ("train.lr", -1.0, "x > 0"),  # CF-15: gradient ascent
        ("fusion.mix_bias", float("nan"), "0 <= x <= 1"),  # CF-16: a NaN checkpoint as "good"
        ("stats.cov_eps", -1.0, "x >= 0"),  # CF-18
        ("pseudo.beta", -1.0, "x > 0"),  # CF-19: a negative sample count
        ("logit_scale", float("inf"), "x > 0"),
        ("train.milestones", (4, -1), "x >= 0"),
    ],
)
def test_the_library_refuses_a_bad_value_before_writing(tmp_path, key, value, rule):
    config = method_config()
    section, _, leaf = key.rpartition(".")
    (config[section] if section else config)[leaf] = value
    with pytest.raises(ValueError, match=f"'{key}' is .*; choose a finite value x with {rule}"):
        resolve_method(config)
    stream, text = make_synthetic_stream(num_classes=4, dim=8, train_per_class=2, initial=2,
                                         increment=2, test_per_class=1, close_pairs=0)  # fmt: skip
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        run_continual(stream, text, config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "override, shown, rule",
    [
        ("fusion.mix_bias=-5", "-5.0", "0 <= x <= 1"),
        ("calibration.value=1.5", "1.5", "0 <= x <= 1"),
        ("train.lr=-1", "-1.0", "x > 0"),
        ("fusion.mix_bias=nan", "nan", "0 <= x <= 1"),
        ("synthetic.dim=0", "0", "x >= 1"),  # CF-20: a zero-size adapter after a task's work
    ],
)
def test_the_command_line_exits_2_naming_the_field_with_nothing_written(
    tmp_path, monkeypatch, capsys, override, shown, rule
):
    monkeypatch.chdir(tmp_path)  # the default workdir would be runs/ here
    assert run.main(["--config", "synthetic:smoke", f"--config.{override}"]) == 2
    err = capsys.readouterr().err
    key = override.partition("=")[0]
    assert f"config key '{key}' is {shown}; choose a finite value x with {rule}" in err
    assert f"--config.{key}=VALUE" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_show_config_prints_each_rule(capsys):
    assert run.main(["--config", "synthetic", "--show-config"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "fusion.mix_bias = 0.6  # 0 <= x <= 1" in lines
    assert "train.lr = 0.001  # x > 0" in lines
    assert "synthetic.dim = 64  # x >= 1" in lines
    assert f"method = 'calfuse'  # one of {', '.join(methods.REGISTRY)}" in lines


def test_a_variant_is_not_undone_by_smoke():
    # CF-12: synthetic's smoke shrink used to reset the split to Inc5 after `inc7`.
    config = load_config("synthetic:inc7,smoke")
    assert (config.continual.initial, config.continual.increment) == (7, 7)
    assert config.synthetic.dim == 32 and config.train.epochs == 1  # smoke still applies
