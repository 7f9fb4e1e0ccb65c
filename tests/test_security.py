"""Security: API keys (constant-time, header only, never logged), profile names and limits, no pickle on any
load path (source inspection plus a booby-trapped .bin model), and pip-audit over requirements.lock.

The live refusals (401 for missing, wrong, prefixed or query-parameter keys; traversal and unicode names)
are cases of tests/test_reliability_input.py; here are the in-process and static checks.
"""

from __future__ import annotations

import ast
import json
import logging
import pathlib
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import app.web.deps as deps
from app.commands.serve import RedactQuerySecrets
from app.engine.calibration.fit import fit_profile
from app.engine.calibration.store import MAX_PROFILES, ProfileStore, validate_profile_name
from app.engine.model.loading import ModelLoadError, load_model
from app.engine.types import MethodOptions
from app.errors import InvalidInput, PayloadTooLarge
from app.settings import Settings
from app.web.app import create_app
from tests.helpers import make_tiny_model
from tests.service_fakes import FakeEngine, png

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
ALLOWLIST = ROOT / "pip-audit-allowlist.txt"


@contextmanager
def running(tmp_path: Path, **overrides: Any) -> Iterator[TestClient]:
    fake = FakeEngine()
    app = create_app(Settings(profiles_dir=tmp_path / "profiles", **overrides), engine=fake)
    with TestClient(app, raise_server_exceptions=False) as client:
        end = time.monotonic() + 10
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < end
        yield client


# --- API keys ------------------------------------------------------------------------------------------
def test_keys_are_compared_with_compare_digest_against_every_key(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return a == b

    monkeypatch.setattr(deps.secrets, "compare_digest", spy)
    configured = Settings(api_keys="first,second,third")  # type: ignore[arg-type]
    assert deps.key_matches("first", configured.api_keys)  # a match on the first key ...
    assert len(calls) == 3  # ... still compares against all three: no early exit
    assert not deps.key_matches("fourth", configured.api_keys) and len(calls) == 6
    source = ast.parse(Path(deps.__file__).read_text())
    secret_reads = [
        n for n in ast.walk(source) if isinstance(n, ast.Attribute) and n.attr == "get_secret_value"
    ]
    assert len(secret_reads) == 1  # the key is read in one place: inside key_matches
    for node in ast.walk(source):  # and no key or token is ever compared with ==
        if isinstance(node, ast.Compare) and any(isinstance(op, ast.Eq | ast.NotEq) for op in node.ops):
            names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            assert not names & {"token", "key", "given"}, ast.unparse(node)


def test_every_configured_key_is_accepted_not_only_the_last(tmp_path: Path) -> None:
    """Key rotation: with several keys configured, each one (the first above all) opens scoring and
    metadata; anything else is refused."""
    keys = ("first-key", "second-key", "third-key")
    with running(tmp_path, api_keys=",".join(keys)) as client:
        for key in keys:
            auth = {"authorization": f"Bearer {key}"}
            assert client.get("/v1/models", headers=auth).status_code == 200, key
            scored = client.post("/v1/score", content=png(1), headers={**auth, "content-type": "image/png"})
            assert scored.status_code in (200, 404), (key, scored.text)  # 404: no profile yet, but let in
            assert scored.status_code != 401
        for wrong in ("first", "third-ke", "fourth-key", "first-key,second-key"):
            refused = client.get("/v1/models", headers={"authorization": f"Bearer {wrong}"})
            assert refused.status_code == 401, wrong


async def test_a_declared_body_over_the_cap_is_refused_before_any_byte_is_read() -> None:
    """The Content-Length pre-check: 413 from the headers alone, the body never read and the route never
    called (the streaming cap would only answer after reading past the cap)."""
    from prometheus_client import CollectorRegistry

    from app.service.metrics import Metrics
    from app.web.middleware import RequestContext

    reached: list[str] = []

    async def route(scope: Any, receive: Any, send: Any) -> None:
        reached.append("route")
        await receive()

    async def receive() -> Any:
        raise AssertionError("the middleware read the body of a request it should have refused")

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    metrics = Metrics(CollectorRegistry())
    middleware = RequestContext(route, metrics=metrics, body_limit=lambda path: 1024)
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/score",
        "headers": [(b"content-type", b"image/png"), (b"content-length", b"1000000000000")],
    }
    await middleware(scope, receive, send)
    assert reached == []
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 413
    body = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    assert body["error"]["code"] == "too_large"
    assert metrics.registry.get_sample_value("anomaly_refusals_total", {"reason": "too_large"}) == 1


def test_keys_are_secret_and_never_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    configured = Settings(api_keys="s3cret-key")  # type: ignore[arg-type]
    assert "s3cret-key" not in repr(configured) and "s3cret-key" not in str(configured.model_dump())
    caplog.set_level(logging.DEBUG)
    with running(tmp_path, api_keys="s3cret-key") as client:
        bad = {"authorization": "Bearer guessed-token-123", "content-type": "image/png"}
        assert client.post("/v1/score", content=png(1), headers=bad).status_code == 401
        assert client.post("/v1/score", params={"api_key": "s3cret-key"}, content=png(1),
                           headers={"content-type": "image/png"}).status_code == 401  # fmt: skip
        for path in ("/openapi.json", "/metrics", "/livez", "/readyz"):
            assert "s3cret-key" not in client.get(path).text
    ours = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("httpx"))
    assert "guessed-token-123" not in ours and "s3cret-key" not in ours


def test_access_log_redacts_secrets_in_query_strings() -> None:
    args = ("1.2.3.4:5", "POST", "/v1/score?profile=a&api_key=k1&token=k2", "1.1", 401)
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d', args, None
    )
    assert RedactQuerySecrets().filter(record)
    assert (
        record.getMessage()
        == '1.2.3.4:5 - "POST /v1/score?profile=a&api_key=[redacted]&token=[redacted] HTTP/1.1" 401'
    )


def test_open_profile_creation_flag_does_not_bypass_configured_keys(tmp_path: Path) -> None:
    with running(tmp_path, admin_api_keys="admin-key", allow_open_profile_creation=True) as client:
        files = [("files", (f"{i}.png", png(i), "image/png")) for i in range(10)]
        refused = client.post("/v1/profiles", data={"name": "p"}, files=files)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
        ok = client.post("/v1/profiles", data={"name": "p"}, files=files,
                         headers={"authorization": "Bearer admin-key"})  # fmt: skip
        assert ok.status_code == 201, ok.text


# --- profile names and limits --------------------------------------------------------------------------
@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.text(max_size=100))
def test_any_profile_name_is_refused_or_stays_inside_the_folder(name: str) -> None:
    store = ProfileStore("/srv/profiles", "m@0", MethodOptions())
    try:
        path = store.path(name)
    except InvalidInput:
        return
    assert path.parent == pathlib.Path("/srv/profiles") and path.name == f"{name}.json"
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) and len(name) <= 81 and ".." not in name


@pytest.mark.parametrize(
    "name", ["/etc/passwd", "..", "a\\b", "a\x00b", "a\nb", "ｄｅｆａｕｌｔ", "٣", "x.y.z"]
)
def test_more_hostile_profile_names(name: str) -> None:
    with pytest.raises(InvalidInput):
        validate_profile_name(name)


def test_profile_count_is_capped(tmp_path: Path) -> None:
    store = ProfileStore(tmp_path, "m@0", MethodOptions())
    for i in range(MAX_PROFILES):
        (tmp_path / f"p{i}.json").write_text("{}")
    features = np.random.default_rng(0).normal(size=(20, 6))
    profile = fit_profile("one-more", features, model_id="m@0", options=MethodOptions())
    with pytest.raises(PayloadTooLarge, match=f"at most {MAX_PROFILES}"):
        store.save(profile)


def test_profile_upload_caps_bytes_and_images(tmp_path: Path) -> None:
    big = [("files", (f"{i}.png", png(i, size=(32, 32)), "image/png")) for i in range(3)]
    assert sum(len(f[1][1]) for f in big) > 4096
    admin = {"authorization": "Bearer admin-key"}
    with running(tmp_path, admin_api_keys="admin-key", max_profile_upload_bytes=4096) as client:
        r = client.post("/v1/profiles", data={"name": "big"}, files=big, headers=admin)
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
    # anonymous (open) creation gets the scoring cap, not the admin one
    with running(tmp_path, allow_open_profile_creation=True, max_upload_bytes=4096) as client:
        r = client.post("/v1/profiles", data={"name": "big"}, files=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
    with running(tmp_path, allow_open_profile_creation=True, max_profile_images=12) as client:
        many = [("files", (f"{i}.png", png(i), "image/png")) for i in range(13)]
        r = client.post("/v1/profiles", data={"name": "many"}, files=many)
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"


# --- no pickle on any load path -------------------------------------------------------------------------
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _call_name(node: ast.Call) -> str:
    return ast.unparse(node.func)


def _keyword(node: ast.Call, name: str) -> Any:
    for kw in node.keywords:
        if kw.arg == name:
            return ast.literal_eval(kw.value) if isinstance(kw.value, ast.Constant) else "<expr>"
    return None


def test_no_pickle_anywhere_in_app() -> None:
    """Every loader in app/ is pickle-free: no pickle-family imports, torch.load only with
    weights_only=True, numpy never with allow_pickle=True, no yaml.load, eval or exec."""
    problems = []
    for path in sorted((ROOT / "app").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        where = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + (
                    [node.module] if isinstance(node, ast.ImportFrom) else []
                )
                if any(n and n.split(".")[0] in UNSAFE_MODULES for n in names):
                    problems.append(f"{where}:{node.lineno}: imports {names}")
            if not isinstance(node, ast.Call):
                continue
            name = _call_name(node)
            if name.endswith("torch.load") and _keyword(node, "weights_only") is not True:
                problems.append(f"{where}:{node.lineno}: {name} without weights_only=True")
            if name in ("np.load", "numpy.load") and _keyword(node, "allow_pickle") not in (None, False):
                problems.append(f"{where}:{node.lineno}: {name} with allow_pickle")
            if name in ("yaml.load", "yaml.unsafe_load", "eval", "exec", "pd.read_pickle"):
                problems.append(f"{where}:{node.lineno}: {name}")
    assert not problems, problems


class _Trap:
    """Unpickling this calls open(marker, "w"), creating the file: what a booby-trapped checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (open, (str(self.marker), "w"))


def test_bin_weights_load_with_weights_only_and_a_booby_trapped_bin_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = make_tiny_model(tmp_path / "model", safe=False)
    weights = folder / "unet" / "diffusion_pytorch_model.bin"
    assert weights.is_file() and not weights.with_suffix(".safetensors").exists()
    seen: list[dict[str, Any]] = []
    real_load = torch.load

    def recording_load(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    assert load_model(folder, device="cpu").info.sample_size == 16  # a plain .bin state dict loads
    assert seen and all(kw.get("weights_only") is True for kw in seen)

    marker = tmp_path / "pwned"
    state = torch.load(weights, weights_only=True)
    state["trap"] = _Trap(marker)  # type: ignore[assignment]
    torch.save(state, weights)
    with pytest.raises(ModelLoadError):
        load_model(folder, device="cpu")
    assert not marker.exists()  # the trap was never sprung


# --- dependencies ----------------------------------------------------------------------------------------
def _lock() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"requirements.lock: not an exact pin: {line!r}"
            pins[canonicalize_name(name)] = version
    return pins


def _requirements_closure() -> set[str]:
    """Every distribution ddm-anomaly[dev,bulk] needs, transitively, on this interpreter."""
    todo = [("ddm-anomaly", frozenset({"dev", "bulk"}))]
    seen: set[str] = set()
    while todo:
        name, extras = todo.pop()
        dist = metadata.distribution(name)
        for text in dist.requires or []:
            req = Requirement(text)
            envs = [{"extra": e} for e in extras] or [{"extra": ""}]
            if req.marker is not None and not any(req.marker.evaluate(env) for env in envs):
                continue
            key = canonicalize_name(req.name)
            if key not in seen:
                seen.add(key)
                todo.append((req.name, frozenset(req.extras)))
    return seen


def test_lock_pins_every_dependency_at_the_installed_version() -> None:
    pins = _lock()
    missing = sorted(_requirements_closure() - set(pins) - {"pip", "setuptools", "wheel"})  # tooling
    assert not missing, f"requirements.lock lacks {missing}: regenerate it (see its header)"
    stale = {}
    for name, version in pins.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # pinned for another platform or Python
        if installed.split("+")[0] != version:
            stale[name] = (version, installed)
    assert not stale, f"requirements.lock differs from the environment (lock, installed): {stale}"


def _allowlist() -> dict[str, str]:
    allowed = {}
    for line in ALLOWLIST.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            vuln_id, _, why = line.partition(" ")
            assert why.strip(), f"{ALLOWLIST.name}: {vuln_id} needs a reason"
            allowed[vuln_id] = why.strip()
    return allowed


def audit_problems(report: dict[str, Any]) -> list[str]:
    """What a pip-audit JSON report says is wrong: known vulnerabilities (those on the allow-list were
    passed as --ignore-vuln and are not in it), and more than three packages it could not audit."""
    dependencies = report["dependencies"]
    problems = [
        f"{d['name']}=={d['version']}: {v['id']} (fixed in {', '.join(v.get('fix_versions', [])) or '-'})"
        for d in dependencies
        for v in d.get("vulns", [])
    ]
    unaudited = [d["name"] for d in dependencies if "skip_reason" in d]
    if len(unaudited) > 3:
        problems.append(f"could not audit {unaudited}")
    return problems


def test_audit_report_judgement() -> None:
    clean = {"dependencies": [{"name": "a", "version": "1", "vulns": []}, {"name": "t", "skip_reason": "x"}]}
    assert audit_problems(clean) == []
    vulnerable = {
        "dependencies": [{"name": "a", "version": "1", "vulns": [{"id": "PYSEC-1", "fix_versions": ["2"]}]}]
    }
    assert audit_problems(vulnerable) == ["a==1: PYSEC-1 (fixed in 2)"]
    blind = {"dependencies": [{"name": str(i), "skip_reason": "not found"} for i in range(4)]}
    assert audit_problems(blind) and "could not audit" in audit_problems(blind)[0]


def test_pip_audit_of_the_lock_finds_nothing_outside_the_allowlist() -> None:
    """pip-audit over requirements.lock (exact pins, no resolution). Skips, saying why, when its
    vulnerability service (the PyPI JSON API) cannot be reached from this machine."""
    probe = f"https://pypi.org/pypi/fastapi/{_lock()['fastapi']}/json"  # what pip-audit's PyPI service reads
    try:
        reachable = httpx.get(probe, timeout=10).status_code == 200
    except httpx.HTTPError:
        reachable = False
    if not reachable:
        pytest.skip(f"pip-audit: its vulnerability service (the PyPI JSON API, {probe}) is not reachable")
    command = [sys.executable, "-m", "pip_audit", "-r", str(LOCK), "--no-deps", "--disable-pip",
               "--format", "json", "--progress-spinner", "off", "--timeout", "20"]  # fmt: skip
    for vuln_id in _allowlist():
        command += ["--ignore-vuln", vuln_id]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=240, check=False)
    except subprocess.TimeoutExpired:
        pytest.skip("pip-audit: the vulnerability service did not answer within 240 s")
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        if re.search(r"ConnectionError|NameResolution|Max retries|timed out", done.stderr):
            pytest.skip("pip-audit: the vulnerability service is unreachable from here")
        raise AssertionError(f"pip-audit failed ({done.returncode}):\n{done.stderr[-3000:]}") from None
    problems = audit_problems(report)
    assert not problems, f"fix the pins (or allow-list with a reason in {ALLOWLIST.name}): {problems}"
