"""`--help` of both commands lists every config and the variants a config name takes."""

import pytest

from experiments import ablate, run
from experiments.configs import CONFIGS, load_config
from experiments.configs.defaults import VARIANTS


@pytest.mark.parametrize("main", [run.main, ablate.main])
def test_help_names_every_config_and_variant(main, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in CONFIGS:
        load_config(name)  # every config listed exists
        assert f"\n  {name} " in out, name
    for token in ("inc<k>", "b0", "b<n>", "seeded", "rapf", "zeroshot", "smoke"):
        assert token in out, token
    assert all(meaning in out for _, meaning in VARIANTS)
    assert "Your own images" in out  # each config's one-line description
