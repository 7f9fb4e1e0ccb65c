"""The layering the code relies on: what the service process imports (checked in a fresh interpreter)."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import REPO


def test_the_service_imports_no_offline_tool_no_training_and_no_test_code() -> None:
    probe = (
        "import sys, app.web.app, app.commands.serve; "
        "print('\\n'.join(m for m in sys.modules if m.startswith(('app.offline', 'app.training', 'tests'))))"
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
