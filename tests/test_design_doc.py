"""DESIGN.md exists and every `DESIGN.md §N` cited in the code, tests, notebooks and README names
one of its sections; LICENSE is the Apache-2.0 text pyproject declares."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_design_reference_names_an_existing_section():
    sections = set(re.findall(r"^## (\d+)\. ", (ROOT / "DESIGN.md").read_text(), re.MULTILINE))
    cited = {}
    for folder in ("calfuse_jax", "experiments", "tests", "notebooks", "benchmarks"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".ipynb", ".md"):
                for number in re.findall(r"DESIGN\.md §(\d+)", path.read_text()):
                    cited.setdefault(number, path.relative_to(ROOT))
    for number in re.findall(r"DESIGN\.md §(\d+)", (ROOT / "README.md").read_text()):
        cited.setdefault(number, "README.md")
    assert {"2", "3", "4"} <= set(cited)  # the code cites these
    missing = {n: str(where) for n, where in cited.items() if n not in sections}
    assert not missing, f"DESIGN.md has no section for {missing}"


def test_license_is_the_declared_apache_text():
    assert 'license = { text = "Apache-2.0" }' in (ROOT / "pyproject.toml").read_text()
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("Copyright ") and "The calfuse_jax authors" in text.splitlines()[0]
    assert "Apache License\n                           Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
