"""Mutation check: plant one small deliberate bug at a time in a copy of the repository and run the tests
that should notice it. On demand only (minutes per mutation on 2 cores), never in CI.

    python benchmarks/mutation_check.py                   # every mutation, on the committed HEAD
    python benchmarks/mutation_check.py --list            # names, files and tests
    python benchmarks/mutation_check.py --only ssim-lambda-ignored batch-delay-ignored
    python benchmarks/mutation_check.py --worktree        # the working tree as it is (uncommitted edits too)
    python benchmarks/mutation_check.py --json runs/mutation.json
    python benchmarks/mutation_check.py --only input-range-0-1 --tests tests/test_goldens.py  # goldens alone

Each mutation is a textual patch (``old`` -> ``new``) that must match its file exactly once; a patch that no
longer applies is reported as ``stale`` (the code moved: update the mutation). For each mutation the copy is
patched, ``pytest -x`` runs the mutation's tests (files or node ids, all part of ``make test``), and the
mutation is ``killed`` when they fail, ``survived`` when they pass. A baseline run of every selected test
on the unpatched copy comes first: a test that fails without a mutation would kill everything.

The copy finds the test data through ``DDM_TEST_DATA`` (default: ``../shared/data`` beside this checkout)
and runs with this interpreter (the project's .venv). docs/TESTING.md keeps the latest score table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("DDM_TEST_DATA", ROOT.parent / "shared" / "data"))
GOLDENS = "tests/test_goldens.py"
SECURITY = "tests/test_security.py::test_every_configured_key_is_accepted_not_only_the_last"
PRECHECK = "tests/test_security.py::test_a_declared_body_over_the_cap_is_refused_before_any_byte_is_read"


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    what: str
    listed: bool = False  # one of the survivors the first mutation round found (--listed)


MUTATIONS: tuple[Mutation, ...] = (
    # --- the survivors of the first mutation round ----------------------------------------------------
    Mutation(
        "input-range-0-1",
        "app/engine/preprocessing.py",
        ".float().div_(127.5).sub_(1.0)",
        ".float().div_(255.0)",
        ("tests/test_engine_math.py", GOLDENS),
        "model input scaled to [0, 1] instead of [-1, 1]",
        listed=True,
    ),
    Mutation(
        "ssim-lambda-ignored",
        "app/engine/methods/diffpath_v2.py",
        "return 1.0 + options.ssim_lambda * dissimilarity",
        "return 1.0 + dissimilarity",
        ("tests/test_engine_math.py", GOLDENS),
        "amplification always 1 + dissimilarity (ssim_lambda ignored)",
        listed=True,
    ),
    Mutation(
        "in-sample-thresholds",
        "app/engine/calibration/thresholds.py",
        "    for train_idx, test_idx in splitter.split(features):\n"
        "        fold_density = density_cls.fit(features[train_idx], **density_kwargs)\n"
        "        held_out[test_idx] = -fold_density.log_density(features[test_idx])\n",
        "    held_out = -density_cls.fit(features, **density_kwargs).log_density(features)\n",
        ("tests/test_calibration.py", GOLDENS),
        "thresholds from in-sample instead of cross-fitted scores",
        listed=True,
    ),
    Mutation(
        "batch-delay-ignored",
        "app/service/batcher.py",
        "wait = self._queue[0].enqueued + self.max_batch_delay_s - time.monotonic()",
        "wait = 0.0",
        ("tests/test_batcher.py",),
        "the batch delay ignored: partial batches close at once (in process)",
        listed=True,
    ),
    Mutation(
        "batch-delay-ignored-live",
        "app/service/batcher.py",
        "wait = self._queue[0].enqueued + self.max_batch_delay_s - time.monotonic()",
        "wait = 0.0",
        ("tests/test_live_guards.py",),
        "the batch delay ignored: partial batches close at once (live server)",
        listed=True,
    ),
    Mutation(
        "content-length-precheck-removed",
        "app/web/middleware.py",
        "if declared is not None and declared > limit:",
        "if False and declared is not None and declared > limit:",
        (PRECHECK,),
        "no refusal from the declared Content-Length (in process)",
        listed=True,
    ),
    Mutation(
        "content-length-precheck-removed-live",
        "app/web/middleware.py",
        "if declared is not None and declared > limit:",
        "if False and declared is not None and declared > limit:",
        ("tests/test_live_guards.py",),
        "no refusal from the declared Content-Length (live server, headers only)",
        listed=True,
    ),
    Mutation(
        "only-last-api-key",
        "app/web/deps.py",
        "matched |= secrets.compare_digest(",
        "matched = secrets.compare_digest(",
        (SECURITY, "tests/test_live_guards.py"),
        "only the last configured API key accepted",
        listed=True,
    ),
    # --- more of the engine's numbers ----------------------------------------------------------------
    Mutation(
        "ddim-eps-not-rederived",
        "app/engine/trajectory.py",
        "    eps_k = implied_noise(x_t, xhat0, abar)\n    x_next =",
        "    eps_k = eps\n    x_next =",
        (GOLDENS,),
        "DDIM step keeps the raw prediction instead of the noise re-derived from the clipped x0",
    ),
    Mutation(
        "timesteps-spacing",
        "app/engine/trajectory.py",
        "return [round(top * k / (steps - 1)) for k in range(steps)]",
        "return [round(top * k / steps) for k in range(steps)]",
        (GOLDENS,),
        "trajectory timesteps stop short of the top of the range",
    ),
    Mutation(
        "per-step-no-log",
        "app/engine/methods/aggregations.py",
        "return energies.clamp_min(ENERGY_FLOOR).log()",
        "return energies.clamp_min(ENERGY_FLOOR)",
        (GOLDENS,),
        "per-step features are raw energies instead of their logs",
    ),
    Mutation(
        "sigma-scaling-squared",
        "app/engine/methods/path_sums.py",
        "error = error / (1 - step.abar).sqrt()",
        "error = error / (1 - step.abar)",
        (GOLDENS,),
        "sigma scaling divides by the variance instead of sigma",
    ),
    Mutation(
        "noise-seed-constant",
        "app/engine/trajectory.py",
        'seed = int.from_bytes(hashlib.blake2b(digest, digest_size=8).digest(), "little") & ((1 << 63) - 1)',
        "seed = 0",
        (GOLDENS,),
        "per-image noise no longer seeded by the image content",
    ),
    Mutation(
        "scaler-jacobian-dropped",
        "app/engine/calibration/density.py",
        "return logsumexp(np.stack(log_probs, axis=1), axis=1) - np.log(self.scale).sum()",
        "return logsumexp(np.stack(log_probs, axis=1), axis=1)",
        (GOLDENS,),
        "density of the standardised instead of the raw features",
    ),
    Mutation(
        "conformal-rank",
        "app/engine/calibration/thresholds.py",
        "rank = math.ceil((n + 1) * (1 - fpr))",
        "rank = math.ceil(n * (1 - fpr))",
        ("tests/test_calibration.py", GOLDENS),
        "split-conformal rank without the +1",
    ),
    Mutation(
        "p-value-not-conformal",
        "app/engine/calibration/thresholds.py",
        "p_value = (1 + len(cal) - below) / (len(cal) + 1)",
        "p_value = (len(cal) - below) / len(cal)",
        ("tests/test_calibration.py", GOLDENS),
        "p-value without the conformal +1",
    ),
    # --- the service ------------------------------------------------------------------------------------
    Mutation(
        "full-batch-waits",
        "app/service/batcher.py",
        "if len(self._queue) >= limit or wait <= 0 or self._closed:",
        "if len(self._queue) > limit or wait <= 0 or self._closed:",
        ("tests/test_batcher.py",),
        "a full batch waits for the delay",
    ),
    Mutation(
        "scoring-auth-off",
        "app/web/deps.py",
        "    if settings.api_keys:\n        _check_key(request, settings)\n\n\nasync def admit",
        "    if False:\n        _check_key(request, settings)\n\n\nasync def admit",
        (SECURITY,),
        "scoring open although API keys are configured",
    ),
    # --- tests that let real bugs through, found by planting them by hand ------------------------------
    Mutation(
        "latency-in-milliseconds",
        "app/web/middleware.py",
        "self.metrics.request_latency.labels(endpoint=endpoint).observe(seconds)",
        "self.metrics.request_latency.labels(endpoint=endpoint).observe(seconds * 1000)",
        ("tests/test_api.py::test_request_latency_is_observed_in_seconds",),
        "request latency observed in milliseconds (the p99 alert and latency panels off 1000x)",
    ),
    Mutation(
        "case-conflict-one-side",
        "app/engine/calibration/store.py",
        "if existing.casefold() == name.casefold() and existing != name:",
        "if existing == name.casefold() and existing != name:",
        ("tests/test_calibration.py::test_a_name_that_differs_only_by_case_from_an_existing_one_is_refused",),
        "an existing 'Widgets' no longer blocks 'widgets' or 'WIDGETS'",
    ),
    Mutation(
        "profile-written-in-place",
        "app/engine/calibration/profile.py",
        'fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)',
        "fd, tmp = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), str(path)",
        ("tests/test_calibration.py::test_a_write_that_fails_part_way_leaves_the_existing_profile_intact",),
        "a profile written in place: an error part-way through destroys the profile it replaces",
    ),
    Mutation(
        "stein-error-sign",
        "app/engine/methods/path_sums.py",
        "error = step.eps_theta - step.eps_star",
        "error = step.eps_star - step.eps_theta",
        ("tests/test_goldens.py::test_non_default_options_match_the_goldens[aggregation=sum]",),
        "the Stein error's sign flipped (shows only in the sum aggregation's odd powers)",
    ),
)


@dataclass
class Outcome:
    name: str
    what: str
    listed: bool
    status: str  # killed | survived | stale | error
    seconds: float
    killed_by: list[str] = field(default_factory=list)
    tests: list[str] = field(default_factory=list)
    tail: str = ""


def copy_repo(dest: Path, worktree: bool) -> None:
    """The committed HEAD (git archive), or the working tree's tracked and untracked-not-ignored files."""
    if worktree:
        listed = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
        ).stdout.split(b"\0")
        for raw in filter(None, listed):
            rel = raw.decode()
            src = ROOT / rel
            if src.is_file():
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / rel)
    else:
        archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def run_tests(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, str, float]:
    env = {
        **os.environ,
        "DDM_TEST_DATA": str(DATA),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    env.pop("CI", None)  # a missing tool skips here as it would locally; the mutation's own tests matter
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider", *tests]
    started = time.monotonic()
    try:
        done = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
        return done.returncode, done.stdout + done.stderr, time.monotonic() - started
    except subprocess.TimeoutExpired as exc:
        out = (
            (exc.stdout or b"").decode(errors="replace")
            if isinstance(exc.stdout, bytes)
            else exc.stdout or ""
        )
        return -1, out + f"\n[timed out after {timeout:.0f} s]", time.monotonic() - started


def failed_tests(output: str) -> list[str]:
    return sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", output, re.M)))


def check(mutation: Mutation, copy: Path, timeout: float) -> Outcome:
    path = copy / mutation.file
    original = path.read_text()
    outcome = Outcome(mutation.name, mutation.what, mutation.listed, "error", 0.0, tests=list(mutation.tests))
    if original.count(mutation.old) != 1:
        outcome.status = "stale"
        outcome.tail = f"{mutation.file}: the patch matches {original.count(mutation.old)} times, not once"
        return outcome
    path.write_text(original.replace(mutation.old, mutation.new))
    try:
        code, output, seconds = run_tests(copy, mutation.tests, timeout)
    finally:
        path.write_text(original)
    outcome.seconds = round(seconds, 1)
    outcome.killed_by = failed_tests(output)
    outcome.tail = "\n".join(output.strip().splitlines()[-15:])
    if code == 0:
        outcome.status = "survived"
    elif code in (1, -1) and (outcome.killed_by or code == -1):
        outcome.status = "killed"
        if code == -1:
            outcome.killed_by = outcome.killed_by or ["(timeout)"]
    else:
        outcome.status = "error"  # collection error, usage error, no tests (5): not a kill
    return outcome


def table(outcomes: list[Outcome]) -> str:
    lines = ["| mutation | what | result | killed by (first failing test) | s |", "|---|---|---|---|---:|"]
    for o in outcomes:
        first = o.killed_by[0] if o.killed_by else "-"
        mark = " (first round)" if o.listed else ""
        lines.append(f"| `{o.name}`{mark} | {o.what} | {o.status} | `{first}` | {o.seconds:.0f} |")
    killed = sum(o.status == "killed" for o in outcomes)
    lines.append("")
    lines.append(f"score: {killed}/{len(outcomes)} killed")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", metavar="NAME", help="run these mutations only")
    p.add_argument("--listed", action="store_true", help="only the survivors of the first mutation round")
    p.add_argument("--list", action="store_true", help="print the mutations and exit")
    p.add_argument("--worktree", action="store_true", help="mutate the working tree, not HEAD")
    p.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the tests")
    p.add_argument(
        "--tests", nargs="+", metavar="TARGET", help="run these tests instead of each mutation's own"
    )
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per pytest run (a timeout kills)")
    p.add_argument("--keep", action="store_true", help="keep the temporary copy")
    p.add_argument("--json", type=Path, help="write the outcomes here")
    args = p.parse_args(argv)
    chosen = [
        m for m in MUTATIONS if (not args.only or m.name in args.only) and (m.listed or not args.listed)
    ]
    if args.tests:  # e.g. do the goldens alone catch the engine mutations?
        chosen = [dataclasses.replace(m, tests=tuple(args.tests)) for m in chosen]
    unknown = set(args.only or ()) - {m.name for m in MUTATIONS}
    if unknown:
        p.error(f"unknown mutations: {', '.join(sorted(unknown))}")
    if args.list:
        for m in chosen:
            print(f"{m.name:38} {m.file:30} {' '.join(m.tests)}\n{'':38} {m.what}")
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="mutation-check-"))
    copy = workdir / "repo"
    copy.mkdir()
    try:
        copy_repo(copy, args.worktree)
        print(f"copy of {'the working tree' if args.worktree else 'HEAD'} in {copy}", flush=True)
        if not args.no_baseline:
            tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
            code, output, seconds = run_tests(copy, tests, args.timeout * 2)
            print(
                f"baseline ({len(tests)} test targets, unmutated): rc {code} in {seconds:.0f} s", flush=True
            )
            if code != 0:
                print(output[-4000:])
                print("the tests fail without any mutation: fix that first", file=sys.stderr)
                return 2
        outcomes = []
        for m in chosen:
            outcome = check(m, copy, args.timeout)
            outcomes.append(outcome)
            first = outcome.killed_by[0] if outcome.killed_by else ""
            print(f"{m.name:38} {outcome.status:9} {outcome.seconds:6.0f} s  {first}", flush=True)
            if outcome.status in ("survived", "error", "stale"):
                print("    " + outcome.tail.replace("\n", "\n    "), flush=True)
        print()
        print(table(outcomes))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps([asdict(o) for o in outcomes], indent=1) + "\n")
        return 0 if all(o.status == "killed" for o in outcomes) else 1
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
