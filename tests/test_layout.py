"""The import rules and the no-pickle rule, checked on the source tree."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["dpr_service", "trainer", "index"]
DISPATCHER = ROOT / "dpr_service" / "cli.py"  # names other stages' modules as strings, imported lazily


def sources():
    for pkg in PACKAGES:
        yield from sorted((ROOT / pkg).rglob("*.py"))


def module_name(path: Path) -> str:
    """``dpr_service/core/search.py`` -> ``dpr_service.core.search`` (a package's ``__init__`` is the package)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module ``source`` (the text of ``module``) imports, relative imports made absolute;
    ``from a import b`` counts as ``a`` and ``a.b`` (b may be a submodule)."""
    package = module if is_package else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def layer(module: str) -> str:
    """Which part of the layout a module belongs to: core, api, index, trainer, the dispatcher, or
    third-party (anything else)."""
    parts = module.split(".")
    if parts[0] == "dpr_service":
        return {"core": "core", "api": "api"}.get(parts[1] if len(parts) > 1 else "", "dpr_service")
    return parts[0] if parts[0] in ("index", "trainer") else "third-party"


# the rule, as (importer's layer -> layers it may import); "dpr_service" is the package root and its dispatcher
ALLOWED = {
    "core": {"core", "third-party"},
    "api": {"api", "core", "third-party"},
    "index": {"index", "core", "third-party"},
    "trainer": {"trainer", "core", "third-party"},
    "dpr_service": {"dpr_service", "third-party"},  # cli.py names stages only as strings, imported lazily
}
WEB_STACK = {"fastapi", "starlette", "uvicorn", "pydantic_settings", "prometheus_client"}


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """The imports of ``module`` that break the layout rule (empty when it keeps it)."""
    here = layer(module)
    found = []
    for name in sorted(imported_modules(source, module, is_package)):
        there = layer(name)
        if there not in ALLOWED[here]:
            found.append(f"{module} ({here}) imports {name} ({there})")
        elif here == "core" and name.split(".")[0] in WEB_STACK:
            found.append(f"{module} (core) imports the web stack ({name})")
    return found


@pytest.mark.parametrize("module, source", [
    ("dpr_service.core.search", "import index.build"),
    ("dpr_service.core.search", "from trainer.step import forward_backward"),
    ("dpr_service.core.search", "from ..api import app"),
    ("dpr_service.core.search", "from dpr_service.api.schemas import Hit"),
    ("dpr_service.core.search", "import fastapi"),
    ("dpr_service.core.search", "from starlette.requests import Request"),
    ("dpr_service.api.app", "from index.build import build"),
    ("dpr_service.api.routes.search", "from ...cli import main"),
    ("dpr_service.api.app", "import trainer"),
    ("index.build", "from dpr_service.api.app import create_app"),
    ("index.build", "from trainer.evaluate import evaluate"),
    ("trainer.train", "from dpr_service.api import settings"),
    ("trainer.train", "import index.search"),
    ("dpr_service.cli", "import trainer.cli"),
])
def test_the_rule_catches_each_kind_of_violation(module, source):
    assert violations(source, module)


@pytest.mark.parametrize("module, source", [
    ("dpr_service.core.search", "from .artifact import Manifest\nimport faiss\nfrom . import fsio"),
    ("dpr_service.api.app", "from dpr_service.core.search import Searcher\nfrom .routes import search\nimport fastapi"),
    ("dpr_service.api.routes.search", "from ..deps import CurrentResources\nfrom ...core.scoring import score_items"),
    ("index.build", "from dpr_service.core.artifact import write_manifest\nfrom .cli import main"),
    ("trainer.train", "from dpr_service.core.checkpoint import load_checkpoint\nfrom . import distributed"),
])
def test_the_rule_allows_the_layout(module, source):
    assert violations(source, module) == []


def test_the_source_tree_keeps_the_import_rule():
    """core imports no stage, no api and no web stack; the api imports only the core; index and
    trainer never import the api; nothing imports trainer."""
    problems = [msg for path in sources() for msg in
                violations(path.read_text(), module_name(path), path.name == "__init__.py")]
    assert problems == []


@pytest.mark.parametrize("package, forbidden", [
    ("dpr_service.core", ("fastapi", "starlette", "uvicorn", "trainer", "index", "dpr_service.api")),
    ("dpr_service.api.app", ("trainer", "index")),
])
def test_importing_a_layer_loads_nothing_it_must_not(package, forbidden):
    """The same rule at run time (an import hidden in a function or a dependency is seen here)."""
    code = (f"import sys, {package}; print(sorted(m for m in sys.modules "
            f"if any(m == f or m.startswith(f + '.') for f in {forbidden!r})))")
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
