"""The operator console (`/console`) in headless Chromium against the real server on the tiny model.

The server runs with inference API keys on, an admin key, and `--no-watch-activate` (a
version the trainer publishes is loaded, not activated). Version 1 is trained and published
by the training CLI before the server starts; versions 2 and 3 while it runs. The browser is the
system Chromium driven by selenium through the system chromedriver (Debian `chromium` +
`chromium-driver`; nothing is downloaded). Each check compares what the page shows with
what the server's JSON API answers for the same request: the streamed answer equals the
non-streamed one, the routing grid has the trace's layers and the manifest's expert count
with the traced experts marked, the A/B comparison counts the layers whose routes differ,
the trainer's new version appears with its evaluation and is activated from the page, and
a bad image and a missing key are shown as the server's own error messages. Screenshots at
1280x800 and at a narrow width go to the test's temporary folder (and to
`$SMOLORA_SCREENSHOT_DIR` when set, which is how `docs/console*.png` are made).
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from smolora.adapters.checkpoint import list_versions
from tests.e2e.conftest import ADMIN_KEY, RemoteServer
from tests.server.api.helpers import wait_until

pytestmark = pytest.mark.e2e

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402

API_KEY = "console-e2e-key"
QUESTION = "What colour is the square?\nAnswer the question using a single word or phrase."
CAPTION = "Provide a one-sentence caption for the provided image."
MAX_TOKENS = 12
ENGINE = [
    "--engine-option",
    "max_model_len=256",
    "--engine-option",
    f"kv_cache_bytes={32 * 1024 * 1024}",
    "--engine-option",
    "max_num_seqs=4",
]


def _browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        hint = "apt-get install chromium chromium-driver (scripts/test.sh does it as root)"
        if os.environ.get("CI"):
            pytest.fail(f"chromium and chromedriver are needed: {hint}")
        pytest.skip(f"chromium / chromedriver not installed: {hint}")
    return chromium, driver


def _train(work: Path, model_dir: Path, registry: Path, tasks: str) -> None:
    """The training CLI: SMoLoRA over `tasks`, publishing one version per task into `registry`
    (it resumes after the tasks the registry already holds)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "smolora.training",
            "train",
            "--method",
            "smolora",
            "--data",
            str(work / "data"),
            "--base",
            str(model_dir),
            "--out",
            str(work / "run"),
            "--registry",
            str(registry),
            "--tasks",
            tasks,
            "--steps-per-task",
            "2",
            "--batch-size",
            "4",
            "--test-limit",
            "4",
            "--eval-batch-size",
            "4",
            "--no-unseen",
            "--no-robustness",
            "--threads",
            "1",
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    """mini-CVIT at 32 px and version 1 (task sqa) trained and published by the training CLI."""
    work = tmp_path_factory.mktemp("console-train")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "smolora.training",
            "build-data",
            "--out",
            str(work / "data"),
            "--image-size",
            "32",
            "--train-per-task",
            "16",
            "--test-per-task",
            "4",
            "--pretrain-size",
            "16",
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    registry = work / "registry"
    _train(work, tiny_model_dir, registry, "sqa")
    return {"work": work, "registry": registry}


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, trained: dict[str, Path]
) -> Iterator[RemoteServer]:
    work = tmp_path_factory.mktemp("console-server")
    keys = work / "api.keys"
    keys.write_text(API_KEY + "\n")
    extra = [*ENGINE, "--api-key-file", str(keys), "--no-watch-activate"]
    extra += ["--max-resident-versions", "3"]
    with RemoteServer(work, tiny_model_dir, trained["registry"], extra) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium, driver_path = _browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    try:
        _viewport(driver, 1280, 800)
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("console-images")
    im = Image.new("RGB", (32, 32), (30, 90, 200))
    for x in range(8, 24):
        for y in range(8, 24):
            im.putpixel((x, y), (220, 40, 40))
    good = folder / "square.png"
    im.save(good, "PNG")
    bad = folder / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"this is not really an image" * 4)
    return {"good": good, "bad": bad}


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folders = [tmp_path_factory.mktemp("console-screenshots")]
    extra = os.environ.get("SMOLORA_SCREENSHOT_DIR")
    if extra:
        folders.append(Path(extra))
    return folders


# --------------------------------------------------------------------------- helpers
def _viewport(driver: Any, width: int, height: int) -> None:
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
    )


def _data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _chat(server: RemoteServer, image: Path, text: str, **smolora: Any) -> httpx.Response:
    """The request the page sends, without streaming, straight to the JSON API."""
    body = {
        "model": "tiny-llava",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": _data_url(image)}},
                    {"type": "text", "text": text},
                ],
            }
        ],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "smolora": {"trace": True, **smolora},
    }
    return httpx.post(
        server.url + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=120,
    )


def _wait(driver: Any, predicate: Any, timeout_s: float, what: str) -> None:
    """Poll `predicate(driver)`; an element the page re-drew meanwhile counts as not yet."""

    def attempt() -> bool:
        try:
            return bool(predicate(driver))
        except StaleElementReferenceException:
            return False

    wait_until(attempt, timeout_s, what)


def _js(driver: Any, script: str, *args: Any) -> Any:
    """Run `script` in the page (reads one consistent state of the DOM)."""
    return driver.execute_script(script, *args)


def _fill(driver: Any, element_id: str, text: str) -> None:
    node = driver.find_element(By.ID, element_id)
    node.clear()
    node.send_keys(text)


def _run(driver: Any, slot: str, image: Path) -> Any:
    """Choose `image`, submit into result `slot`, and wait until the page has the outcome."""
    driver.find_element(By.ID, "image-file").send_keys(str(image))
    _wait(
        driver,
        lambda d: d.find_element(By.ID, "image-name").text.startswith(image.name),
        10,
        "the image to be read",
    )
    card = driver.find_element(By.ID, f"result-{slot}")
    driver.find_element(By.ID, f"run-{slot.lower()}").click()
    _wait(
        driver,
        lambda d: card.get_attribute("data-state") in ("done", "error"),
        120,
        f"result {slot}",
    )
    return card


def _set_instruction(driver: Any, mode: str, text: str = "") -> None:
    Select(driver.find_element(By.ID, "instruction-mode")).select_by_value(mode)
    if mode == "text":
        _fill(driver, "instruction-text", text)


def _grid(card: Any) -> dict[str, Any]:
    table = card.find_element(By.CSS_SELECTOR, "table.route-grid")
    rows = table.find_elements(By.CSS_SELECTOR, "tbody tr")
    return {
        "layers": int(table.get_attribute("data-layers")),
        "experts": int(table.get_attribute("data-experts")),
        "rows": [
            {
                "layer": r.get_attribute("data-layer"),
                "vu": int(r.get_attribute("data-vu")),
                "if": int(r.get_attribute("data-if")),
                "cells": [
                    ("chosen" in (c.get_attribute("class") or ""), c.get_attribute("data-w"))
                    for c in r.find_elements(By.CSS_SELECTOR, "td.cell")
                ],
                "diff": len(r.find_elements(By.CSS_SELECTOR, "td.cell.diff")),
            }
            for r in rows
        ],
    }


def _screenshot(driver: Any, shots: list[Path], name: str) -> None:
    png = driver.get_screenshot_as_png()
    for folder in shots:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(png)
    assert Image.open(io.BytesIO(png)).size[0] > 0


# --------------------------------------------------------------------------- tests
def test_without_a_key_the_page_says_what_to_type(browser: Any, server: RemoteServer) -> None:
    browser.get(server.url + "/console")
    message = browser.find_element(By.ID, "versions-message")
    _wait(browser, lambda d: message.is_displayed(), 20, "the versions panel's error")
    assert "HTTP 401" in message.text and "API key" in message.text, message.text
    r = httpx.get(server.url + "/console/api/versions")
    assert r.status_code == 401 and r.json()["error"]["message"] in message.text
    assert API_KEY not in browser.page_source
    _fill(browser, "api-key", API_KEY)
    _wait(browser, lambda d: not message.is_displayed(), 20, "the error to clear once keyed")
    status = browser.find_element(By.ID, "server-status")
    _wait(browser, lambda d: "ready" in status.text and "v1" in status.text, 20, "ready v1")


def test_answer_streams_and_the_grid_matches_the_json_trace(
    browser: Any, server: RemoteServer, images: dict[str, Path]
) -> None:
    _fill(browser, "question", QUESTION)
    _fill(browser, "max-tokens", str(MAX_TOKENS))
    _set_instruction(browser, "auto")
    card = _run(browser, "A", images["good"])
    assert card.get_attribute("data-state") == "done", card.text
    reference = _chat(server, images["good"], QUESTION).json()
    answer = card.find_element(By.CSS_SELECTOR, "pre.answer")
    assert answer.get_attribute("textContent") == reference["choices"][0]["message"]["content"]
    chunks = int(answer.get_attribute("data-chunks"))
    generated = reference["usage"]["completion_tokens"]
    assert 1 < chunks <= generated, (chunks, generated)  # token by token, not one block
    ext = reference["smolora"]
    assert ext["instruction"]["source"] in card.text and "tiny-llava@1" in card.text
    layers = ext["trace"][0]["layers"]
    grid = _grid(card)
    versions = httpx.get(
        server.url + "/console/api/versions", headers={"Authorization": f"Bearer {API_KEY}"}
    ).json()
    experts = next(v for v in versions["versions"] if v["version"] == 1)["num_experts"]
    assert experts == 16  # the trainer's default SMoLoRA config
    assert grid["layers"] == len(layers) == len(grid["rows"]) and grid["experts"] == experts
    for row, ref in zip(grid["rows"], layers, strict=True):
        assert (row["layer"], row["vu"], row["if"]) == (
            ref["layer"],
            ref["vu_expert"],
            ref["if_expert"],
        )
        assert len(row["cells"]) == experts
        chosen = [i for i, (is_chosen, _) in enumerate(row["cells"]) if is_chosen]
        assert chosen == [ref["vu_expert"], ref["if_expert"]]  # VU half first, then IF half
        assert row["cells"][ref["vu_expert"]][1] == f"{ref['w_vu']:.2f}"
        assert row["cells"][ref["if_expert"]][1] == f"{ref['w_if']:.2f}"
    assert ref["vu_expert"] < experts // 2 <= ref["if_expert"]


def test_two_requests_compare(browser: Any, server: RemoteServer, images: dict[str, Path]) -> None:
    _set_instruction(browser, "text", CAPTION)
    card_b = _run(browser, "B", images["good"])
    assert card_b.get_attribute("data-state") == "done", card_b.text
    a = _chat(server, images["good"], QUESTION).json()["smolora"]["trace"][0]["layers"]
    b = _chat(server, images["good"], QUESTION, instruction=CAPTION).json()["smolora"]
    assert b["instruction"]["source"] == "explicit"
    b = b["trace"][0]["layers"]
    vu_diff = sum(x["vu_expert"] != y["vu_expert"] for x, y in zip(a, b, strict=True))
    if_diff = sum(x["if_expert"] != y["if_expert"] for x, y in zip(a, b, strict=True))
    assert if_diff > 0  # another instruction embedding routes the IF half elsewhere
    summary = browser.find_element(By.ID, "compare-summary")
    _wait(browser, lambda d: summary.is_displayed(), 10, "the comparison")
    assert summary.get_attribute("data-layers") == str(len(a))
    assert summary.get_attribute("data-vu-diff") == str(vu_diff)
    assert summary.get_attribute("data-if-diff") == str(if_diff)
    assert f"IF experts in {if_diff} of {len(a)}" in summary.text
    for slot in ("A", "B"):  # both grids outline the cells where they differ from the other
        grid = _grid(browser.find_element(By.ID, f"result-{slot}"))
        assert sum(r["diff"] for r in grid["rows"]) == vu_diff + if_diff


def test_a_published_version_appears_and_is_activated_from_the_page(
    browser: Any, server: RemoteServer, trained: dict[str, Path], tiny_model_dir: Path
) -> None:
    # The run over both tasks is a new run (its settings differ from the sqa-only one), so
    # it publishes sqa again and then textvqa: versions 2 and 3, the newest learned both.
    _train(trained["work"], tiny_model_dir, trained["registry"], "sqa,textvqa")
    latest = list_versions(trained["registry"])[-1].version
    assert latest == 3
    row_css = f"#versions-table tr[data-version='{latest}']"
    _wait(
        browser,
        lambda d: any(
            r.get_attribute("data-state") == "resident"
            for r in d.find_elements(By.CSS_SELECTOR, row_css)
        ),
        120,
        f"version {latest} to be listed as resident",
    )
    row_text = _js(browser, "return document.querySelector(arguments[0]).innerText", row_css)
    assert "textvqa" in row_text and "sqa" in row_text  # tasks learned so far
    assert "textvqa:" in row_text  # its evaluation row from the manifest
    button_css = row_css + " button[data-action='activate']"
    assert _js(browser, "return document.querySelector(arguments[0]).disabled", button_css)
    _fill(browser, "admin-key", ADMIN_KEY)
    _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, button_css).is_enabled(), 10, "admin")
    _wait(
        browser, lambda d: d.find_element(By.CSS_SELECTOR, button_css).click() is None, 10, "click"
    )
    message = browser.find_element(By.ID, "versions-message")
    _wait(browser, lambda d: f"version {latest} is active" in message.text, 60, "the message")
    ready = httpx.get(server.url + "/ready").json()
    assert ready["active_version"] == latest
    _wait(
        browser,
        lambda d: d.find_element(By.CSS_SELECTOR, row_css).get_attribute("data-state") == "active",
        20,
        f"the row to show v{latest} active",
    )
    assert ADMIN_KEY not in browser.page_source
    assert browser.execute_script("return window.localStorage.length") == 0
    _wait(  # the hot load and the activation are marked on the live panel's time axis
        browser,
        lambda d: (
            {f"v{latest} loaded", f"v{latest} active"}
            <= {t.text for t in d.find_elements(By.CSS_SELECTOR, "#timeline .event-label")}
        ),
        10,
        "the load and the activation on the timeline",
    )


def test_bad_image_shows_a_readable_error(
    browser: Any, server: RemoteServer, images: dict[str, Path]
) -> None:
    _set_instruction(browser, "auto")
    card = _run(browser, "A", images["bad"])
    assert card.get_attribute("data-state") == "error"
    error = _chat(server, images["bad"], QUESTION)
    assert error.status_code == 400
    shown = card.find_element(By.CSS_SELECTOR, ".request-error").text
    body = error.json()["error"]
    assert shown.startswith(f"HTTP 400 · {body['code']}: ") and body["message"] in shown, shown


def test_live_metrics_and_screenshots(
    browser: Any, server: RemoteServer, images: dict[str, Path], shots: list[Path]
) -> None:
    card = _run(browser, "A", images["good"])  # the good image again, for the screenshot
    assert card.get_attribute("data-state") == "done"
    summary = httpx.get(
        server.url + "/console/api/metrics", headers={"Authorization": f"Bearer {API_KEY}"}
    ).json()
    usage = {u["layer"]: u for u in summary["expert_usage"]}
    _wait(
        browser,
        lambda d: (
            d.find_elements(By.CSS_SELECTOR, "#expert-usage table")
            and int(
                d.find_element(By.CSS_SELECTOR, "#expert-usage table").get_attribute("data-layers")
            )
            == len(usage)
        ),
        20,
        "the expert-usage table",
    )
    assert summary["requests"]["total"] >= 5 and summary["latency"]["ttft"]["p50"] is not None
    tiles = browser.find_element(By.ID, "tiles").text
    assert "TTFT p50" in tiles and "queue depth" in tiles and "tok/s" in tiles
    assert browser.execute_script("return document.documentElement.scrollWidth") <= 1280
    _screenshot(browser, shots, "console.png")
    _viewport(browser, 420, 1400)
    browser.execute_script("window.dispatchEvent(new Event('resize'))")
    _wait(
        browser,
        lambda d: d.execute_script("return document.documentElement.scrollWidth") <= 420,
        10,
        "no horizontal overflow at 420 px",
    )
    _screenshot(browser, shots, "console_narrow.png")
    _viewport(browser, 1280, 800)
