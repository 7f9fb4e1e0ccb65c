"""Random (not derandomized) schemathesis run over the live OpenAPI schema, with every check.

    # starts `python -m app serve` itself (API keys on, the committed default profile copied to a
    # temporary folder), runs schemathesis' CLI, writes its JUnit report and a summary:
    python benchmarks/schema_fuzz.py --max-examples 100 --out benchmarks/results/schemathesis

    # against a server you started (with API key KEY):
    python benchmarks/schema_fuzz.py --url http://127.0.0.1:8000 --api-key KEY

Every schemathesis check runs except ``positive_data_acceptance``: a schema-valid body carries random
base64 that is no image, and 400/415 is the right answer to it. A schema-invalid request must be refused
with one of the error statuses the API documents (``benchmarks/schemathesis.toml``; 413 included: more
images than the cap is "too large"). Exit code 0 = no failure. ``make test`` runs the derandomized twin
(``tests/test_reliability_input.py::test_openapi_schema_fuzzing``); this one draws new cases each run,
takes a few minutes, and is not part of CI. docs/RELIABILITY.md#schema-fuzzing has the latest result.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = Path(__file__).resolve().parent / "schemathesis.toml"
DEFAULT_PROFILE = ROOT / "model_store" / "celeba32-ref" / "profiles" / "default.json"
KEY = "schema-fuzz-key"


def start_server(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    from service_load import spawn_server  # beside this script: the same start-up and readiness wait

    profiles = workdir / "profiles"
    profiles.mkdir()
    shutil.copy(DEFAULT_PROFILE, profiles / "default.json")
    return spawn_server({"DDM_API_KEYS": KEY, "DDM_ADMIN_API_KEYS": KEY, "DDM_LOG_LEVEL": "warning"}, workdir)


def run(url: str, api_key: str, max_examples: int, out: Path, seed: int | None) -> int:
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H%M%SZ")
    cli = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    command = [
        cli,
        "--config-file",
        str(CONFIG),
        "run",
        f"{url}/openapi.json",
        "-H",
        f"Authorization: Bearer {api_key}",
        "--checks",
        "all",
        "--exclude-checks",
        "positive_data_acceptance",
        "--max-examples",
        str(max_examples),
        "--workers",
        "1",
        "--generation-database",
        "none",
        "--no-color",
        "--output-truncate",
        "true",
        "--report",
        "junit",
        "--report-junit-path",
        str(out / f"junit-{stamp}.xml"),
        *(["--seed", str(seed)] if seed is not None else []),
    ]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.monotonic() - started
    # repository-relative paths: the log is a committed result, not a record of one machine's folders
    log = (done.stdout + done.stderr).replace(f"{ROOT}/", "./")
    (out / f"run-{stamp}.log").write_text(log)
    summary = log[log.rfind("=== SUMMARY ===") :] if "=== SUMMARY ===" in log else log[-3000:]
    generated = re.search(r"(\d+) generated", summary)
    found = re.search(r"found (\d+) unique failure", summary)
    line = (
        f"{stamp}  {generated.group(1) if generated else '?'} cases, "
        f"{found.group(1) if found else 0} unique failures, exit {done.returncode}, {seconds:.0f} s"
    )
    with (out / "README.md").open("a") as fh:
        if fh.tell() == 0:
            fh.write("# Random schemathesis runs (`python benchmarks/schema_fuzz.py`)\n\n")
        fh.write(f"- {line}\n")
    print(summary.strip())
    print(line)
    return done.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="a running server (default: start one)")
    parser.add_argument("--api-key", default=KEY, help="bearer key of --url's server")
    parser.add_argument("--max-examples", type=int, default=100, help="cases per operation and phase")
    parser.add_argument("--seed", type=int, help="repeat a run (its seed is printed in the log)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "schemathesis")
    args = parser.parse_args(argv)
    if args.url:
        return run(args.url.rstrip("/"), args.api_key, args.max_examples, args.out, args.seed)
    with tempfile.TemporaryDirectory(prefix="schema-fuzz-") as tmp:
        process, url = start_server(Path(tmp))
        try:
            return run(url, KEY, args.max_examples, args.out, args.seed)
        finally:
            process.terminate()
            process.wait(60)


if __name__ == "__main__":
    raise SystemExit(main())
