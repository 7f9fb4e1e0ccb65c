"""The pages for people in a real browser: headless Chromium (Debian ``chromium`` + ``chromium-driver``)
driven by selenium against a live server, with every host but 127.0.0.1 unresolvable.

``/docs`` (Swagger UI) and ``/redoc`` render the API's operations from assets the server bundles; ``/ui``
takes the API key, lists the profiles, scores a CelebA face and an MNIST digit dropped on it and shows each
verdict (read back from the page, equal to ``/v1/score``'s) with its heat map. No page sends a request to
another origin. A screenshot of ``/ui`` is kept under ``$DDM_TEST_ARTIFACTS`` (default runs/test-artifacts).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.conftest import LiveServer
from tests.helpers import REPO, SHIPPED_MODEL, require_data, require_tool

pytestmark = [pytest.mark.live, pytest.mark.slow]

KEY = "browser-test-key"
ARTIFACTS = Path(os.environ.get("DDM_TEST_ARTIFACTS", REPO / "runs" / "test-artifacts"))
WAIT_S = 120  # page load plus a CPU scoring request on a busy 2-core machine


@pytest.fixture(scope="module")
def server(
    live_server_module: Callable[..., LiveServer], tmp_path_factory: pytest.TempPathFactory
) -> LiveServer:
    profiles = tmp_path_factory.mktemp("browser-profiles")
    shutil.copy(SHIPPED_MODEL / "profiles" / "default.json", profiles / "default.json")
    return live_server_module({"DDM_PROFILES_DIR": str(profiles), "DDM_API_KEYS": KEY})


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    chromium = require_tool(
        "chromium", "chromium-browser", hint="Debian package `chromium`; .ci/run installs it"
    )
    driver_path = require_tool("chromedriver", hint="Debian package `chromium-driver`; .ci/run installs it")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI containers run as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1000",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        # nothing but this machine's loopback resolves: a CDN reference could not load
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: webdriver.Chrome, condition: Callable[[webdriver.Chrome], Any], what: str) -> Any:
    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.2).until(condition)
    except TimeoutException:
        raise AssertionError(f"timed out after {WAIT_S} s waiting for {what}") from None


def foreign_requests(driver: webdriver.Chrome, server: LiveServer) -> list[str]:
    """Every request the browser sent (DevTools network log since the last call) to anywhere but the server.
    data: and blob: URLs are local; a request the page's Content-Security-Policy blocked never left."""
    sent: dict[str, str] = {}
    blocked: set[str] = set()
    for entry in driver.get_log("performance"):
        event = json.loads(entry["message"])["message"]
        params = event.get("params", {})
        if event.get("method") == "Network.requestWillBeSent":
            sent[params["requestId"]] = params["request"]["url"]
        elif event.get("method") == "Network.loadingFailed" and params.get("blockedReason") == "csp":
            blocked.add(params["requestId"])
    assert any(url.startswith(server.url + "/") for url in sent.values()), "no network log"
    local = (server.url + "/", "data:", "blob:")
    return sorted(url for rid, url in sent.items() if rid not in blocked and not url.startswith(local))


def console_errors(driver: webdriver.Chrome) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_swagger_ui_renders_the_operations_offline(browser: webdriver.Chrome, server: LiveServer) -> None:
    browser.get(f"{server.url}/docs")
    wait_for(
        browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) >= 8, "Swagger UI operations"
    )
    paths = {
        e.get_attribute("data-path") for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")
    }
    for path in ("/v1/score", "/v1/models", "/v1/profiles", "/v2", "/v2/models/{model_name}/infer"):
        assert path in paths, (path, sorted(p for p in paths if p))
    assert browser.find_element(By.CSS_SELECTOR, ".info .title").text.startswith("ddm-anomaly")
    assert foreign_requests(browser, server) == []
    assert console_errors(browser) == []


def test_redoc_renders_offline(browser: webdriver.Chrome, server: LiveServer) -> None:
    browser.get(f"{server.url}/redoc")
    wait_for(
        browser,
        lambda d: "Score images (Open Inference Protocol v2)" in d.find_element(By.TAG_NAME, "body").text,
        "ReDoc's operation list",
    )
    assert "Score images for anomaly" in browser.find_element(By.TAG_NAME, "body").text
    assert foreign_requests(browser, server) == []
    # the bundle's vendor logo (cdn.redoc.ly) is the one thing refused, by the page's policy, not sent
    errors = console_errors(browser)
    assert all("cdn.redoc.ly" in e and "Content Security Policy" in e for e in errors), errors


def test_inspection_page_scores_a_face_and_a_digit(
    browser: webdriver.Chrome, server: LiveServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # the sets number their files alike (000000.png): copies under telling names
    folder = tmp_path_factory.mktemp("ui-upload")
    face, digit = folder / "face.png", folder / "digit.png"
    shutil.copy(require_data("celeba", 1)[0], face)
    shutil.copy(require_data("mnist", 1)[0], digit)
    expected = httpx.post(
        f"{server.url}/v1/score",
        json={"images": [{"data": base64.b64encode(p.read_bytes()).decode()} for p in (face, digit)]},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=120,
    ).json()["results"]

    browser.get(f"{server.url}/ui")
    wait_for(
        browser, lambda d: "API key" in d.find_element(By.ID, "status").text, "the 401 hint without a key"
    )
    browser.find_element(By.ID, "api-key").send_keys(KEY)
    browser.find_element(By.ID, "reload").click()
    profile = wait_for(
        browser,
        lambda d: d.find_element(By.ID, "profile").is_enabled() and d.find_element(By.ID, "profile"),
        "profiles",
    )
    assert Select(profile).first_selected_option.get_attribute("value") == "default"
    assert "celeba32-ref@" in browser.find_element(By.ID, "model").text

    browser.find_element(By.ID, "files").send_keys(f"{face}\n{digit}")
    cards = wait_for(
        browser,
        lambda d: (
            len(d.find_elements(By.CSS_SELECTOR, ".result")) == 2
            and d.find_elements(By.CSS_SELECTOR, ".result")
        ),
        "two results",
    )
    shown = {card.get_attribute("data-name"): card for card in cards}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "ui-face-and-digit.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000

    verdicts = {
        name: card.find_element(By.CSS_SELECTOR, ".verdict").text.lower() for name, card in shown.items()
    }
    assert verdicts == {face.name: "normal", digit.name: "anomaly"}
    for path, result in zip((face, digit), expected, strict=True):
        card = shown[path.name]
        assert card.get_attribute("data-verdict") == ("anomaly" if result["is_anomaly"] else "normal")
        score = card.find_element(By.CSS_SELECTOR, 'dd[data-field="score"]').text
        assert score == f"{result['score']:.3f}"
        threshold = card.find_element(By.CSS_SELECTOR, 'dd[data-field="threshold"]').text
        assert threshold == f"{result['threshold']:.3f}"
        heat = card.find_element(By.CSS_SELECTOR, "img.heatmap")
        assert heat.get_attribute("src").startswith("data:image/png;base64,")
        assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", heat) > 0
    assert "1 anomalous" in browser.find_element(By.ID, "status").text
    assert foreign_requests(browser, server) == []
    # the one expected failure: the first profile listing, before the key was entered
    errors = console_errors(browser)
    assert len([e for e in errors if "v1/models" in e and "401" in e]) == 1, errors
    assert [e for e in errors if "401" not in e] == []


def test_inspection_page_shows_a_refusal(browser: webdriver.Chrome, server: LiveServer) -> None:
    browser.get(f"{server.url}/ui")
    key = browser.find_element(By.ID, "api-key")
    key.clear()
    key.send_keys("wrong-key")
    browser.find_element(By.ID, "reload").click()
    status = browser.find_element(By.ID, "status")
    wait_for(browser, lambda d: "invalid API key" in status.text, "the refusal message")
    assert "error" in (status.get_attribute("class") or "")


DROP_SCRIPT = """
const [name, b64] = arguments;
const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
const transfer = new DataTransfer();
transfer.items.add(new File([bytes], name, {type: "image/png"}));
document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true,
                                                                    cancelable: true}));
"""


def test_inspection_page_takes_a_dropped_image(browser: webdriver.Chrome, server: LiveServer) -> None:
    """The drop zone (a DragEvent carrying the file, as a drag from the desktop delivers it)."""
    digit = require_data("mnist", 1, start=1)[0]
    browser.get(f"{server.url}/ui")
    key = browser.find_element(By.ID, "api-key")
    key.clear()
    key.send_keys(KEY)
    browser.find_element(By.ID, "reload").click()
    wait_for(browser, lambda d: d.find_element(By.ID, "profile").is_enabled(), "profiles")
    browser.execute_script(DROP_SCRIPT, "dropped-digit.png", base64.b64encode(digit.read_bytes()).decode())
    card = wait_for(
        browser,
        lambda d: d.find_elements(By.CSS_SELECTOR, '.result[data-name="dropped-digit.png"]'),
        "the result",
    )[0]
    assert card.find_element(By.CSS_SELECTOR, ".verdict").text.lower() == "anomaly"
    assert card.find_element(By.CSS_SELECTOR, "img.heatmap").get_attribute("src").startswith("data:image/png")


def test_inspection_page_explains_its_heat_maps(
    browser: webdriver.Chrome, server: LiveServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The colour legend and the labelled opacity control are on the page; a wide photo (two textures side
    by side) gets the note that only its centred square was scored, and its flagged map is not dark."""
    folder = tmp_path_factory.mktemp("ui-wide")
    left, right = (Image.open(p).convert("RGB") for p in require_data("dtd", 2, start=3))
    wide = Image.new("RGB", (128, 64))
    wide.paste(left, (0, 0))
    wide.paste(right, (64, 0))
    path = folder / "wide-texture.png"
    wide.save(path)

    browser.get(f"{server.url}/ui")
    key = browser.find_element(By.ID, "api-key")
    key.clear()
    key.send_keys(KEY)
    browser.find_element(By.ID, "reload").click()
    wait_for(browser, lambda d: d.find_element(By.ID, "profile").is_enabled(), "profiles")
    legend = browser.find_element(By.ID, "legend")
    assert "typical" in legend.text and "threshold" in legend.text
    assert browser.find_element(By.CSS_SELECTOR, ".legend-bar").size["width"] > 200
    label = browser.find_element(By.CSS_SELECTOR, 'label[for="opacity"]')
    assert "Heat-map opacity" in label.text and "60 %" in label.text
    browser.find_element(By.ID, "files").send_keys(str(path))
    card = wait_for(
        browser,
        lambda d: d.find_elements(By.CSS_SELECTOR, '.result[data-name="wide-texture.png"] .note'),
        "the centre-square note",
    )[0]
    assert "centred 64 × 64 px square of this 128 × 64 px image" in card.text
    result = browser.find_element(By.CSS_SELECTOR, '.result[data-name="wide-texture.png"]')
    assert result.get_attribute("data-verdict") == "anomaly"
    # the map's brightest pixel (inferno's R+G+B rises with the value): 327 at mid-scale, 289 at 0.4
    brightest = browser.execute_script(BRIGHTEST_SCRIPT, result.find_element(By.CSS_SELECTOR, "img.heatmap"))
    assert brightest > 300
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "ui-legend-and-texture.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000


BRIGHTEST_SCRIPT = """
const img = arguments[0];
const canvas = document.createElement("canvas");
canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
const ctx = canvas.getContext("2d");
ctx.drawImage(img, 0, 0);
const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
let best = 0;
for (let i = 0; i < data.length; i += 4) {
  if (data[i + 3] > 0) best = Math.max(best, data[i] + data[i + 1] + data[i + 2]);
}
return best;
"""
