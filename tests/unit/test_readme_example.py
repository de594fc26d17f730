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


def test_quickstart_sample_output_is_what_the_code_prints() -> None:
    """The README's sample rounds 1-2 carry the landmark loss and groups of the recorded
    quickstart run (tests/data/reference_runs.json, checked against live runs by the
    integration tests), so the sample cannot silently go stale."""
    import json

    import numpy as np

    text = (ROOT / "README.md").read_text()
    ref = json.loads((ROOT / "tests" / "data" / "reference_runs.json").read_text())["quickstart"]
    loss = np.asarray(ref["values"]["round/test_loss"])
    groups = ref["values"]["round/group"]
    for r in range(loss.shape[0]):
        line = re.search(rf"^round\s+{r + 1}/5 .*$", text, re.M)
        assert line is not None, f"no sample line for round {r + 1}"
        landmarks = float(re.search(r"landmarks loss=([0-9.]+)", line.group(0)).group(1))
        assert landmarks == round(float(loss[r, 3:].mean()), 3), line.group(0)
        assert f"groups={''.join(map(str, groups[r]))}" in line.group(0)


def test_every_flag_the_readme_shows_exists() -> None:
    """Each `colnet-mpi <command> ... --flag` in the README is a real option of that command."""
    from colnet_mpi.cli import _parser

    parser = _parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    options = {
        name: {s for a in p._actions for s in a.option_strings}
        for name, p in sub.choices.items()  # type: ignore[attr-defined]
    }
    text = (ROOT / "README.md").read_text()
    seen = 0
    for m in re.finditer(r"colnet-mpi (run|sweep|report|check-config)\b([^`\n]*)", text):
        command = m.group(1)
        rest = re.split(r"#|\)|\||;|&&", m.group(2))[0]  # up to a comment or the next command
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", rest):
            seen += 1
            assert flag in options[command], (
                f"README: `colnet-mpi {command} ... {flag}` is no option"
            )
    assert seen >= 15, seen
