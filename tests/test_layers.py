"""The layering the code relies on: what the service process imports (checked in a fresh interpreter)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

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
    assert "app.bootstrap" in reached and "app.engine.scorer" in reached  # the walk reached the engine
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
