"""The import rules and the no-pickle rule, checked on the source tree."""

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["dpr_service", "trainer", "index"]
DISPATCHER = ROOT / "dpr_service" / "cli.py"  # names other stages' modules as strings, imported lazily


def sources():
    for pkg in PACKAGES:
        yield from sorted((ROOT / pkg).rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_nothing_imports_trainer():
    offenders = [
        str(p.relative_to(ROOT)) for p in sources()
        if not p.is_relative_to(ROOT / "trainer") and any(m.split(".")[0] == "trainer" for m in imported_modules(p))
    ]
    assert offenders == []


def test_core_is_a_leaf_without_web_stack():
    web = {"fastapi", "starlette", "uvicorn", "pydantic_settings"}
    for path in (ROOT / "dpr_service" / "core").rglob("*.py"):
        mods = {m.split(".")[0] for m in imported_modules(path)}
        assert not mods & web, f"{path} imports {mods & web}"
        assert not mods & {"trainer", "index"}, f"{path} imports another stage"
    code = "import sys, dpr_service.core; print(sorted(m for m in sys.modules if m.split('.')[0] in ('fastapi', 'starlette', 'uvicorn', 'trainer', 'index')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"


def test_no_pickle_and_safe_torch_load():
    for path in sources():
        text = path.read_text()
        assert not re.search(r"^\s*(import pickle|from pickle|import dill|import joblib)", text, re.M), path
        for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in call.group(1), f"{path}: {call.group(0)}"
        assert "pickle.load" not in text, path


def test_dispatcher_lists_modules_that_exist():
    sys.path.insert(0, str(ROOT))
    from dpr_service.cli import COMMANDS

    for target, _ in COMMANDS.values():
        module, function = target.split(":")
        path = ROOT / (module.replace(".", "/") + ".py")
        assert path.is_file(), module
        assert f"def {function}(" in path.read_text(), target
    assert DISPATCHER.is_file()
