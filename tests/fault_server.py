"""Test entry point: ``python -m tests.fault_server [serve flags]`` runs the service exactly as
``ddm-anomaly serve`` does, with the real engine wrapped in :class:`tests.faults.FaultyEngine` by the rules in
``DDM_TEST_FAULTS``. The live reliability tests start it through tests/conftest.py; nothing of it ships."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from app.bootstrap import engine_from_settings
from app.commands import serve
from app.web.app import create_app
from tests.faults import FaultRules, FaultyEngine


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="fault_server")
    serve.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(argv if argv is not None else sys.argv[1:])])
    settings = serve.settings_from_args(args)
    if settings is None:
        return 2
    rules = FaultRules.parse(os.environ.get("DDM_TEST_FAULTS", ""))
    logging.getLogger(__name__).warning("test server with injected faults: %s", rules)
    engine = FaultyEngine(engine_from_settings(settings), rules)
    return serve.serve_app(create_app(settings, engine=engine), settings)


if __name__ == "__main__":
    raise SystemExit(main())
