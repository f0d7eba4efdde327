"""The project's own promises: README commands, CI, pins."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    return [ln.strip() for ln in (ROOT / "README.md").read_text().splitlines()[:10] if ln.startswith("    ")]


def test_readme_opens_with_run_and_test_commands_and_ci_runs_the_test_one():
    cmds = _readme_commands()
    assert len(cmds) == 2, cmds
    run, test = cmds
    assert "constraints/cpu.txt" in run and "constraints/cpu.txt" in test
    assert "pytest" in test
    ci = (ROOT / ".ci" / "run").read_text()
    assert test in ci, "the README's test command must be what .ci/run runs"


def test_cpu_constraint_pins_the_local_torch_build():
    pins = [ln for ln in (ROOT / "constraints" / "cpu.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    assert pins == ["torch==2.13.0"]
    assert re.search(r'"torch>=[0-9.]+"', (ROOT / "pyproject.toml").read_text())
