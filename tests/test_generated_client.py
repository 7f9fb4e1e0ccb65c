"""A client generated from the published ``openapi.json`` by someone else's generator
(openapi-python-client) scores images against a live server: the schema is complete and exact enough for
typed SDKs, and what they send is what the server accepts."""

from __future__ import annotations

import base64
import importlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import LiveServer
from tests.helpers import SHIPPED_MODEL, data_images, require_data

PACKAGE = "ddm_generated_client"


@pytest.fixture(scope="module")
def server(live_server_module: Callable[..., LiveServer]) -> LiveServer:
    require_data("celeba", 1)
    require_data("mnist", 1)
    # the committed default profile, read only: nothing here creates profiles
    return live_server_module({"DDM_PROFILES_DIR": str(SHIPPED_MODEL / "profiles")})


@pytest.fixture(scope="module")
def generated(server: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The generated package, imported from a temporary folder."""
    generator = shutil.which("openapi-python-client") or str(
        Path(sys.executable).parent / "openapi-python-client"
    )
    workdir = tmp_path_factory.mktemp("generated")
    spec = workdir / "openapi.json"
    spec.write_text(json.dumps(httpx.get(f"{server.url}/openapi.json", timeout=30).json()))
    out = workdir / PACKAGE
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(
        [generator, "generate", "--path", str(spec), "--meta", "none", "--output-path", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    sys.path.insert(0, str(workdir))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(workdir))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
            del sys.modules[name]


def test_generated_client_scores_json_and_multipart(server: LiveServer, generated: Any) -> None:
    score_api = importlib.import_module(f"{PACKAGE}.api.scoring.score_v1_score_post")
    models = importlib.import_module(f"{PACKAGE}.models")
    types = importlib.import_module(f"{PACKAGE}.types")
    face, digit = data_images("celeba", 1)[0].read_bytes(), data_images("mnist", 1)[0].read_bytes()
    body = models.ScoreV1ScorePostJsonScoreRequest(
        images=[
            models.ScoreV1ScorePostJsonScoreRequestImageIn(data=base64.b64encode(face).decode(), id="face"),
            models.ScoreV1ScorePostJsonScoreRequestImageIn(data=base64.b64encode(digit).decode(), id="digit"),
        ]
    )
    with generated.Client(base_url=server.url, timeout=httpx.Timeout(120.0)) as client:
        answer = score_api.sync_detailed(client=client, body=body, features=True)
        assert answer.status_code == 200, answer.content
        parsed = answer.parsed
        assert isinstance(parsed, models.ScoreResponse)
        assert [r.id for r in parsed.results] == ["face", "digit"]
        assert parsed.profile.name == "default"
        digit_result = parsed.results[1]
        # AUROC 1.0 set
        assert digit_result.is_anomaly is True and digit_result.score > digit_result.threshold
        raw = httpx.post(
            f"{server.url}/v1/score",
            json={"images": [{"id": "face", "data": body.images[0].data}]},
            timeout=120,
        ).json()
        assert parsed.results[0].score == pytest.approx(raw["results"][0]["score"], rel=1e-9)

        # the multipart body the generator built from the schema: one ``files`` part per image
        files_body = models.ScoreV1ScorePostFilesBody(
            files=[types.File(payload=digit, file_name="digit.png")]
        )
        answer = score_api.sync_detailed(client=client, body=files_body)
        assert answer.status_code == 200, answer.content
        assert answer.parsed.results[0].score == pytest.approx(digit_result.score, rel=1e-9)


def test_generated_client_gets_typed_errors(server: LiveServer, generated: Any) -> None:
    score_api = importlib.import_module(f"{PACKAGE}.api.scoring.score_v1_score_post")
    models = importlib.import_module(f"{PACKAGE}.models")
    with generated.Client(base_url=server.url, timeout=httpx.Timeout(60.0)) as client:
        unknown = models.ScoreV1ScorePostJsonScoreRequest(
            images=[models.ScoreV1ScorePostJsonScoreRequestImageIn(data=base64.b64encode(b"x").decode())],
            profile="no-such-profile",
        )
        answer = score_api.sync_detailed(client=client, body=unknown)
        assert answer.status_code == 404  # the profile is looked up before any image is decoded
        assert isinstance(answer.parsed, models.ErrorBody)
        assert answer.parsed.error.code == "profile_not_found"
