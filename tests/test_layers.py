"""The layering the code relies on: what the service process imports (checked in a fresh interpreter)."""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import REPO


def test_the_service_imports_no_offline_tool_no_training_and_no_test_code() -> None:
    # nor the bulk jobs and Ray (an optional extra the service image is built without)
    probe = (
        "import sys, app.web.app, app.commands.serve; print('\\n'.join(m for m in sys.modules "
        "if m.startswith(('app.offline', 'app.training', 'app.bulk', 'tests')) or m.split('.')[0] == 'ray'))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == []


def test_the_offline_tools_are_importable_on_their_own() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import app.offline.datasets, app.offline.evaluation"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr


# The commands that work on files, without the HTTP service; their run functions import lazily.
OFFLINE_COMMANDS = ("score", "score_dataset", "calibrate", "evaluate", "train", "sample", "import_")


def _module_file(name: str) -> Path | None:
    base = REPO.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _app_imports(name: str) -> set[str]:
    """The ``app`` modules that module ``name`` imports anywhere in its source (inside functions too, so
    lazy imports count), with the packages above them (importing ``a.b.c`` runs ``a/b/__init__``)."""
    path = _module_file(name)
    assert path is not None, name
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    named: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            named.add(base)
            named.update(f"{base}.{alias.name}" for alias in node.names)  # ``from pkg import module``
    found = set()
    for module in named:
        parts = module.split(".")
        found.update(
            prefix
            for prefix in (".".join(parts[: i + 1]) for i in range(len(parts)))
            if prefix.startswith("app") and _module_file(prefix) is not None
        )
    return found


def _app_import_closure(roots: list[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(_app_imports(name) - seen)
    return seen


def test_the_import_closure_follows_lazy_imports() -> None:
    # the check below is only as good as this walk: serve imports the web app inside its run function
    assert "app.web.app" in _app_import_closure(["app.commands.serve"])


def test_the_offline_commands_import_no_service_and_no_web_code() -> None:
    reached = _app_import_closure([f"app.commands.{name}" for name in OFFLINE_COMMANDS])
    assert "app.bootstrap" in reached and "app.engine.engine" in reached  # the walk reached the engine
    assert sorted(m for m in reached if m.startswith(("app.service", "app.web"))) == []
    # and at run time, in a fresh interpreter (module-level imports)
    probe = (
        "import sys, importlib; "
        f"[importlib.import_module('app.commands.' + n) for n in {OFFLINE_COMMANDS!r}]; "
        "print('\\n'.join(m for m in sys.modules if m.startswith(('app.service', 'app.web'))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == []


# --- light imports: what the client and the settings pull in ---------------------------------------------
SCIENCE = ("torch", "diffusers", "numpy", "scipy", "sklearn")
LIGHT_MODULES = {
    "app.settings": SCIENCE,
    "app.web.schemas": SCIENCE,
    # the client is what users install beside their own code: no web framework either (web/__init__.py)
    "app.client": (*SCIENCE, "fastapi", "starlette", "uvicorn"),
}


@pytest.mark.parametrize("module", sorted(LIGHT_MODULES))
def test_light_modules_import_with_the_heavy_ones_blocked(module: str) -> None:
    """In a fresh interpreter where importing any blocked package fails (``sys.modules[name] = None``
    makes ``import name`` and ``import name.sub`` raise), the module still imports."""
    blocked = LIGHT_MODULES[module]
    probe = f"import sys; sys.modules.update(dict.fromkeys({blocked!r})); import {module}"
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr


def test_the_blocking_probe_catches_a_heavy_import() -> None:
    # the check above is only as good as the block: the engine's calibration needs scipy and must fail
    probe = "import sys; sys.modules['scipy'] = None; import app.engine.calibration.thresholds"
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode != 0 and "scipy" in done.stderr


# --- no import cycles in app/ ----------------------------------------------------------------------------
def _runs_at_import(body: list[ast.stmt], lazy: bool) -> Iterator[ast.stmt]:
    """The statements of a module body that run when it is imported (``if TYPE_CHECKING:`` blocks never
    do); with ``lazy``, function bodies too (an import inside a function runs at its first call)."""
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and not lazy:
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from _runs_at_import(node.orelse, lazy)
            continue
        yield node
        for name in ("body", "orelse", "finalbody", "handlers"):
            children = getattr(node, name, None)
            if isinstance(children, list):
                yield from _runs_at_import(children, lazy)


def _import_edges(name: str, lazy: bool) -> set[str]:
    """The ``app`` modules that importing ``name`` imports, with the packages above them, except the
    packages ``name`` itself lies in (they are being initialised already: a package's ``__init__``
    importing its own submodules is no cycle)."""
    path = _module_file(name)
    assert path is not None, name
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    named: set[str] = set()
    for node in _runs_at_import(ast.parse(path.read_text()).body, lazy):
        if isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            named.add(base)
            named.update(f"{base}.{alias.name}" for alias in node.names)
    edges = set()
    for module in named:
        parts = module.split(".")
        for prefix in (".".join(parts[: i + 1]) for i in range(len(parts))):
            enclosing = f"{name}.".startswith(f"{prefix}.")
            if prefix.split(".")[0] == "app" and not enclosing and _module_file(prefix) is not None:
                edges.add(prefix)
    return edges


def _app_modules() -> list[str]:
    names = []
    for path in sorted((REPO / "app").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """None when ``graphlib`` can order the graph; otherwise the one cycle it names."""
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        return [list(exc.args[1])]
    return []


@pytest.mark.parametrize("lazy", [False, True], ids=["module-level", "with-function-level"])
def test_app_has_no_import_cycle(lazy: bool) -> None:
    """The import graph of app/ read from the source (ast): module-level imports (what runs at import
    time), then with the imports inside functions too. ``if TYPE_CHECKING:`` imports are left out."""
    graph = {name: _import_edges(name, lazy) for name in _app_modules()}
    assert (
        len(graph) > 50 and "app.engine.types" in graph["app.engine.trajectory"] | graph["app.engine.engine"]
    )
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) != []
    assert "app.engine.methods" in _import_edges("app.engine.calibration.fit", lazy=False)
