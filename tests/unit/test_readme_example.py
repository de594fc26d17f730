"""The README's "adding a strategy" example is the code the MPI test runs, line for line."""

from __future__ import annotations

import re

from tests.conftest import ROOT


def _readme_example() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Adding a strategy") :]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block is not None, "no python block in the README's 'Adding a strategy' section"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_example_is_the_tested_code() -> None:
    script = (ROOT / "tests" / "mpi" / "scripts" / "strategy_example.py").read_text()
    start = script.index("# --- the example")
    end = script.index("# --- end of the example")
    tested = [line for line in script[start:end].splitlines()[1:] if line.strip()]
    example = [line for line in _readme_example() if not line.startswith("from ")]
    assert example == tested
    imports = [line for line in _readme_example() if line.startswith("from ")]
    assert imports and all(line in script for line in imports)
