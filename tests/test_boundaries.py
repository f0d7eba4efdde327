"""The import rules the layout states (README "Layout of the code"): the service never loads training code,
the Jupyter API never loads the web layer or the jobs, and the core imports nothing of the project outside
itself. Each rule is checked so that it can fail: the forbidden names are shown to exist."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("flownp", "ingest", "service")


def loaded_after(module: str) -> set[str]:
    """The project modules in sys.modules after `import module` in a fresh interpreter."""
    code = (f"import json, sys; import {module}; "
            f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {PROJECT!r})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def _is(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_forbidden_modules_exist_so_the_rules_can_fail():
    for mod in ("flownp/jobs/train.py", "flownp/jobs/finetune.py", "ingest/build.py", "ingest/tasks.py",
                "service/app.py"):
        assert (ROOT / mod).is_file(), mod
    # and loading them is seen: the check below is not blind
    assert {"flownp.jobs.train", "ingest.tasks"} <= loaded_after("flownp.jobs.finetune")


def test_the_service_loads_no_training_code():
    mods = loaded_after("service.app")
    assert "service.app" in mods and "flownp.inference" in mods
    bad = sorted(m for m in mods if _is(m, ("flownp.jobs", "ingest.build", "ingest.tasks")))
    assert not bad, f"import service.app loads {bad}"


def test_the_jupyter_api_loads_neither_the_service_nor_the_jobs():
    mods = loaded_after("flownp.api")
    assert "flownp.api" in mods
    bad = sorted(m for m in mods if _is(m, ("service", "flownp.jobs")))
    assert not bad, f"import flownp.api loads {bad}"


def test_import_flownp_is_light():
    mods = loaded_after("flownp")
    assert mods == {"flownp", "ingest"}, mods  # ingest for the one version string


def _imports(path: Path, pkg: str | None = None) -> list[tuple[int, str]]:
    """Every imported module name of a file (module level and inside functions), resolved if relative
    (`pkg`: the file's package, by default from its place under the repository root)."""
    pkg = pkg if pkg is not None else ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out += [(node.lineno, base)] + [(node.lineno, f"{base}.{a.name}") for a in node.names
                                             if _is(base, PROJECT)]
    return out


CORE = sorted((ROOT / "flownp" / "core").glob("*.py"))


def test_the_core_exists():
    assert {p.stem for p in CORE} >= {"config", "encoding", "model", "paths", "solvers", "likelihood", "sampling", "gav"}


@pytest.mark.parametrize("path", CORE, ids=lambda p: p.name)
def test_the_core_imports_nothing_of_the_project_outside_the_core(path):
    bad = [(line, name) for line, name in _imports(path)
           if _is(name, PROJECT) and not _is(name, ("flownp.core",)) and name != "flownp"]
    # `from flownp import core` style would name flownp.core; a bare `import flownp` pulls the package only
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_the_ast_check_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "probe.py"
    f.write_text("def f():\n    from service.engine import Engine\n    from . import model\n    import ingest.tasks\n")
    names = [n for _, n in _imports(f, "flownp.core")]
    assert {"service.engine", "flownp.core.model", "ingest.tasks"} <= set(names)
