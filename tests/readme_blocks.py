"""The fenced code blocks of one README subsection, so tests run the examples exactly as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks(heading: str) -> list[str]:
    """Bodies of the ``` blocks under `## heading` or `### heading`, up to the next heading of
    level 2 or 3."""
    text = README.read_text()
    start = re.search(rf"\n###? {re.escape(heading)}\n", text).start()
    end = re.search(r"\n##?# ", text[start + 1 :])
    section = text[start : start + 1 + end.start()] if end else text[start:]
    return re.findall(r"```[a-z]*\n(.*?)```", section, flags=re.S)
