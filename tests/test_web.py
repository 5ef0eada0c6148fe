"""The web page at ``GET /``: served by the app itself, self-contained, and driven in a real browser
(Debian's chromium, headless, through Selenium and chromium-driver): search shows ranked passages,
score shows the loss, the probabilities and the positive's rank, the mode switch searches by dense,
BM25 or hybrid (and offers only what the index serves), bad input and a missing key show readable
errors, and passage text containing HTML is shown as text.

Without chromium, chromium-driver or selenium the browser tests are skipped with a message naming
what is missing (``.ci/run`` installs them). Screenshots go to the test's tmp_path and, when
``DPR_SCREENSHOT_DIR`` is set, there too.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import write_beir
from fastapi.testclient import TestClient

from dpr_service.api.app import OPEN_ROUTES, create_app
from dpr_service.api.settings import Settings
from dpr_service.api.web import PAGE
from dpr_service.core.checkpoint import load_base_model, save_checkpoint
from dpr_service.core.config import EncoderConfig
from index.build import build

ROOT = Path(__file__).resolve().parents[1]
KEY = "web-s3cret"
# A passage whose title and text are HTML: the page must show them as text, never run or render them.
HTML_PASSAGE = {"_id": "x-html", "title": "<b>bold</b> apple",
                "text": "apple river <script>window.__xss = 1</script> <b>not bold</b> <img src=x onerror=\"window.__xss = 2\">"}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("web")
    cfg = EncoderConfig(pooling="mean", similarity="dot", query_max_length=16, passage_max_length=48)
    encoder, tokenizer = load_base_model(str(tiny_model), cfg)
    save_checkpoint(root / "ckpt", encoder, tokenizer)
    beir = write_beir(root / "beir", n=30)
    with open(beir / "corpus.jsonl", "a") as fh:
        fh.write(json.dumps(HTML_PASSAGE) + "\n")
    build(root / "ckpt", beir, root / "index", factory="Flat", progress=False)
    return root


def settings(artifact, **overrides) -> Settings:
    return Settings(index=artifact / "index", device="cpu", batch_max_wait_ms=1, **overrides)


# ---- without a browser


def test_page_is_served_self_contained_and_outside_the_schema(artifact):
    with TestClient(create_app(settings(artifact))) as c:
        r = c.get("/")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/html")
        page = r.text
        assert "<title>dpr-service</title>" in page
        # nothing from the internet: no URL to another host, no external script, style or font
        assert re.findall(r"(?i)\b(?:https?:)?//[\w.-]+", re.sub(r"(?s)/\*.*?\*/|<!--.*?-->", "", page)) == []
        assert not re.search(r"(?i)<(script|link|img|iframe)[^>]*\b(src|href)\s*=", page)
        assert "@import" not in page and "url(" not in page
        # passage text goes in as text: the script never parses strings as HTML
        assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(", page)
        csp = r.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "'sha256-" in csp
        assert "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]
        assert "/" not in c.get("/openapi.json").json()["paths"]


def test_page_needs_no_key_but_the_api_does(artifact):
    assert "/" in OPEN_ROUTES
    with TestClient(create_app(settings(artifact, api_key=KEY))) as c:
        assert c.get("/").status_code == 200
        assert c.get("/info").status_code == 401
        assert c.get("/info", headers={"X-API-Key": KEY}).status_code == 200


def test_page_is_package_data():
    """A non-editable install ships the page: pyproject's package-data names it."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["dpr_service"]
    rel = PAGE.relative_to(ROOT / "dpr_service").as_posix()
    assert PAGE.is_file() and any(fnmatch.fnmatch(rel, g) for g in globs), (rel, globs)


def local_references(page: str) -> list[str]:
    """Every src/href of a page's tags, after checking that none names another host."""
    refs = re.findall(r"""(?i)\b(?:src|href)\s*=\s*["']([^"']+)["']""", page)
    assert refs, "no assets referenced"
    return refs


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_api_docs_reference_only_assets_this_server_serves(artifact, path):
    """/docs and /redoc loaded Swagger UI and ReDoc from a CDN: blank offline."""
    with TestClient(create_app(settings(artifact))) as c:
        r = c.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        page = r.text
        assert re.findall(r"(?i)\b(?:https?:)?//[\w.-]+", page) == [], "a URL to another host"
        assert "fonts.googleapis" not in page and "cdn" not in page.lower()
        refs = local_references(page)
        assert all(ref.startswith("/") and not ref.startswith("//") for ref in refs), refs
        scripts = [ref for ref in refs if ref.endswith(".js")]
        assert scripts, refs
        for ref in refs:
            asset = c.get(ref)
            assert asset.status_code == 200 and len(asset.content) > 1000, ref
        types = {ref.rsplit(".", 1)[1]: c.get(ref).headers["content-type"] for ref in refs}
        assert types.get("js", "text/javascript").startswith("text/javascript")
        assert types.get("css", "text/css").startswith("text/css")
        assert '"/openapi.json"' in page or "'/openapi.json'" in page
        csp = r.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "img-src 'self' data:" in csp and "connect-src 'self'" in csp
        assert "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]
        assert c.get("/docs-assets/../pyproject.toml").status_code == 404
        assert c.get("/docs-assets/core.py").status_code == 404


def test_docs_assets_come_from_a_declared_and_pinned_package():
    from dpr_service.api.routes.web import ASSET_DIR, ASSETS

    assert all((ASSET_DIR / name).is_file() for name in ASSETS)
    tomllib = pytest.importorskip("tomllib")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("fastapi-offline") for d in deps), deps
    from importlib.metadata import version

    pins = (ROOT / "docker" / "constraints.txt").read_text().splitlines()
    assert f"fastapi-offline=={version('fastapi-offline')}" in pins


def test_docs_need_the_key_like_the_schema(artifact):
    with TestClient(create_app(settings(artifact, api_key=KEY))) as c:
        for path in ("/docs", "/redoc", "/docs-assets/swagger-ui-bundle.js", "/openapi.json"):
            assert c.get(path).status_code == 401, path
            assert c.get(path, headers={"X-API-Key": KEY}).status_code == 200, path


# ---- in a real browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The real app under uvicorn on a loopback port, in a thread."""

    def __init__(self, app_settings: Settings):
        import uvicorn

        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(app_settings), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.base}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError("the server never became ready")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(artifact):
    with Server(settings(artifact)) as s:
        yield s


@pytest.fixture(scope="module")
def dense_only_server(artifact):
    """A server of an index built with --no-bm25."""
    index = build(artifact / "ckpt", artifact / "beir", artifact / "index-dense-only", factory="Flat", progress=False, bm25=False)
    with Server(Settings(index=index, device="cpu", batch_max_wait_ms=1)) as s:
        yield s


@pytest.fixture(scope="module")
def keyed_server(artifact):
    with Server(settings(artifact, api_key=KEY)) as s:
        yield s


def _browser_parts() -> tuple[str, str]:
    missing = []
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package (pip install -e '.[test]')")
    chromium = os.environ.get("DPR_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    driver = os.environ.get("DPR_CHROMEDRIVER") or shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not os.access(chromium, os.X_OK):
        missing.append(f"chromium ({chromium}; apt-get install chromium)")
    if not os.access(driver, os.X_OK):
        missing.append(f"chromedriver ({driver}; apt-get install chromium-driver)")
    if missing:
        pytest.skip("browser test skipped, missing: " + ", ".join(missing))
    return chromium, driver


@pytest.fixture(scope="module")
def browser():
    chromium, driver_path = _browser_parts()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager download a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000", "--force-device-scale-factor=1", "--lang=en-US", "--no-first-run",
                "--disable-extensions", "--disable-background-networking"):
        options.add_argument(arg)
    try:
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
    except Exception as e:  # installed but not startable is a failure, not a skip
        pytest.fail(f"chromium is installed but did not start under chromedriver: {e}")
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def screenshot(driver, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    size = driver.get_window_size()
    height = driver.execute_script("return document.documentElement.scrollHeight + window.outerHeight - window.innerHeight")
    driver.set_window_size(size["width"], max(size["height"], min(height, 4000)))  # the whole page
    try:
        driver.save_screenshot(str(path))
    finally:
        driver.set_window_size(size["width"], size["height"])
    assert path.stat().st_size > 5000, "empty screenshot"
    if os.environ.get("DPR_SCREENSHOT_DIR"):
        out = Path(os.environ["DPR_SCREENSHOT_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, out / path.name)
    return path


def wait_for(driver, predicate, timeout: float = 20, what: str = "the page"):
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout).until(lambda d: predicate(d))
    except Exception:
        errors = [e.text for e in driver.find_elements("css selector", ".error, .notice") if e.is_displayed()]
        pytest.fail(f"timed out waiting for {what}; messages on the page: {errors}")


def by_id(driver, id_):
    return driver.find_element("id", id_)


def open_page(driver, base: str, key: str | None = None) -> None:
    driver.get(base + "/")
    driver.execute_script("sessionStorage.clear()")
    driver.get(base + "/")
    if key is not None:
        by_id(driver, "api-key").send_keys(key)
        by_id(driver, "key-save").click()
    wait_for(driver, lambda d: by_id(d, "status").text in ("ready", "key needed", "wrong key", "not ready", "offline"),
             what="the /info header")


def type_into(driver, id_: str, text: str) -> None:
    field = by_id(driver, id_)
    field.clear()
    if text:
        field.send_keys(text)


def search(driver, query: str, top_k: int | str) -> None:
    type_into(driver, "search-query", query)
    type_into(driver, "search-top-k", str(top_k))
    by_id(driver, "search-submit").click()


def percent(p: float) -> str:
    return "<0.1%" if 0 < p < 0.0005 else f"{p * 100:.1f}%"


def results(driver) -> list:
    return driver.find_elements("css selector", "#search-results li.hit")


def test_header_shows_index_checkpoint_and_model(browser, server, artifact):
    open_page(browser, server.base)
    info = httpx.get(f"{server.base}/info").json()
    assert by_id(browser, "status").text == "ready"
    assert "31 passages" in by_id(browser, "info-index").text
    assert info["checkpoint"]["fingerprint"][:12] in by_id(browser, "info-checkpoint").text
    model = by_id(browser, "info-model").text
    assert "mean pooling" in model and "dot" in model
    assert by_id(browser, "info-device").text == "cpu"
    assert by_id(browser, "notice").is_displayed() is False


def test_search_shows_ranked_results_with_scores_and_highlights(browser, server, tmp_path):
    open_page(browser, server.base)
    query = "what is the apple near the river"
    search(browser, query, 5)
    wait_for(browser, lambda d: len(results(d)) == 5, what="5 search results")
    expected = httpx.post(f"{server.base}/search", json={"query": query, "top_k": 5}).json()["results"][0]
    hits = results(browser)
    assert [h.get_attribute("data-id") for h in hits] == [e["id"] for e in expected]
    assert [h.find_element("css selector", ".rank").text for h in hits] == ["1", "2", "3", "4", "5"]
    assert [h.find_element("css selector", ".score .val").text for h in hits] == [f"{e['score']:.4f}" for e in expected]
    for hit, e in zip(hits, expected):
        assert hit.find_element("css selector", ".hit-text").text == e["text"]
    marks = {m.text.lower() for m in browser.find_elements("css selector", "#search-results mark")}
    assert marks and marks <= {"apple", "river", "near"}, marks  # query terms, not stop words
    assert "5 passages in" in by_id(browser, "search-meta").text
    shot = screenshot(browser, tmp_path, "web-search")
    assert shot.is_file()


def choose_mode(driver, mode: str) -> None:
    driver.find_element("css selector", f'label[for="search-mode-{mode}"]').click()
    assert by_id(driver, f"search-mode-{mode}").is_selected()


@pytest.mark.parametrize("mode, label, meta", [("bm25", "BM25", "· BM25"), ("hybrid", "FUSED", "· hybrid (RRF)"),
                                               ("dense", "SCORE", "· dense")])
def test_the_mode_switch_searches_by_dense_bm25_or_hybrid(browser, server, tmp_path, mode, label, meta):
    open_page(browser, server.base)
    assert all(by_id(browser, f"search-mode-{m}").is_enabled() for m in ("dense", "bm25", "hybrid"))
    assert by_id(browser, "search-mode-dense").is_selected()  # dense by default
    choose_mode(browser, mode)
    query = "apple near the river"
    search(browser, query, 4)
    wait_for(browser, lambda d: len(results(d)) == 4 and by_id(d, "search-results").get_attribute("data-mode") == mode,
             what=f"4 {mode} results")
    expected = httpx.post(f"{server.base}/search", json={"query": query, "top_k": 4, "mode": mode}).json()["results"][0]
    hits = results(browser)
    assert [h.get_attribute("data-id") for h in hits] == [e["id"] for e in expected]
    assert [h.find_element("css selector", ".score .val").text for h in hits] == [f"{e['score']:.4f}" for e in expected]
    assert {h.find_element("css selector", ".score .lbl").text for h in hits} == {label}
    assert by_id(browser, "search-meta").text.endswith(meta)
    assert mode.lower() in by_id(browser, "search-mode-hint").text.lower()
    if mode == "hybrid":
        screenshot(browser, tmp_path, "web-hybrid")


def test_an_index_without_bm25_offers_dense_only(browser, dense_only_server):
    open_page(browser, dense_only_server.base)
    assert by_id(browser, "search-mode-dense").is_enabled() and by_id(browser, "search-mode-dense").is_selected()
    for mode in ("bm25", "hybrid"):
        assert not by_id(browser, f"search-mode-{mode}").is_enabled()
        assert "--no-bm25" in browser.find_element("css selector", f'label[for="search-mode-{mode}"]').get_attribute("title")
    browser.find_element("css selector", 'label[for="search-mode-hybrid"]').click()  # a disabled choice stays unchosen
    assert by_id(browser, "search-mode-dense").is_selected()
    search(browser, "apple", 2)
    wait_for(browser, lambda d: len(results(d)) == 2, what="2 dense results")


def test_passage_html_is_shown_as_text(browser, server):
    open_page(browser, server.base)
    search(browser, "apple river", 31)  # the whole index: the HTML passage is among the results
    wait_for(browser, lambda d: len(results(d)) == 31, what="31 search results")
    hit = browser.find_element("css selector", '#search-results li[data-id="x-html"]')
    text = hit.find_element("css selector", ".hit-text")
    title = hit.find_element("css selector", ".hit-title")
    assert "<script>window.__xss = 1</script>" in text.text and "<b>not bold</b>" in text.text
    assert title.text.startswith("<b>bold</b> apple")
    # no element came out of the passage: only the page's own <mark> highlights
    assert hit.find_elements("css selector", ".hit-text script, .hit-text b, .hit-text img, .hit-title b") == []
    assert {m.text.lower() for m in text.find_elements("css selector", "mark")} == {"apple", "river"}
    assert browser.execute_script("return window.__xss === undefined")


def test_score_shows_loss_probabilities_and_rank(browser, server, tmp_path):
    open_page(browser, server.base)
    by_id(browser, "tab-score").click()
    item = {"question": "what is the zebra near the guitar",
            "positive": {"title": "zebra", "text": "the zebra is near the guitar fact"},
            "negatives": ["the comet and the walnut story", "the helmet and the island story", "a lantern in winter"]}
    type_into(browser, "score-question", item["question"])
    type_into(browser, "score-positive-title", item["positive"]["title"])
    type_into(browser, "score-positive", item["positive"]["text"])
    type_into(browser, "score-negatives", "\n".join(item["negatives"][:2]) + "\n\n" + item["negatives"][2] + "\n")
    by_id(browser, "score-submit").click()
    wait_for(browser, lambda d: by_id(d, "score-result").is_displayed(), what="the score result")
    expected = httpx.post(f"{server.base}/score", json={"items": [item]}).json()["results"][0]
    loss = by_id(browser, "score-loss")
    assert loss.text == f"{expected['loss']:.4f}"
    assert float(loss.get_attribute("data-value")) == pytest.approx(expected["loss"], abs=1e-6)
    assert by_id(browser, "score-ppos").text == percent(expected["probabilities"][0])
    assert by_id(browser, "score-rank").get_attribute("data-value") == str(expected["rank"])
    assert by_id(browser, "score-rank").text.replace("\n", " ") == f"{expected['rank']} of 4"
    bars = browser.find_elements("css selector", "#score-bars li")
    assert len(bars) == 4  # the positive and three negatives; the blank line is not a passage
    assert [b.find_element("css selector", ".who").text for b in bars] == ["Positive", "Negative 1", "Negative 2", "Negative 3"]
    for bar, p in zip(bars, expected["probabilities"]):
        assert float(bar.get_attribute("data-probability")) == pytest.approx(p, abs=1e-6)
        assert bar.find_element("css selector", ".pct").text == percent(p)
        width = browser.execute_script("return arguments[0].querySelector('.fill').style.width", bar)
        assert float(width.rstrip("%")) == pytest.approx(p * 100, abs=0.01)
    assert sum(float(b.get_attribute("data-probability")) for b in bars) == pytest.approx(1, abs=1e-5)
    screenshot(browser, tmp_path, "web-score")


def test_search_result_fills_the_score_form(browser, server):
    open_page(browser, server.base)
    search(browser, "comet walnut", 3)
    wait_for(browser, lambda d: len(results(d)) == 3, what="3 search results")
    hits = results(browser)
    first_text = hits[0].find_element("css selector", ".hit-text").text
    hits[0].find_element("css selector", ".use-pos").click()
    hits[1].find_element("css selector", ".use-neg").click()
    hits[2].find_element("css selector", ".use-neg").click()
    by_id(browser, "tab-score").click()
    assert by_id(browser, "score-question").get_attribute("value") == "comet walnut"
    assert by_id(browser, "score-positive").get_attribute("value") == first_text
    assert len(by_id(browser, "score-negatives").get_attribute("value").split("\n")) == 2
    by_id(browser, "score-submit").click()
    wait_for(browser, lambda d: by_id(d, "score-result").is_displayed(), what="the score result")
    assert len(browser.find_elements("css selector", "#score-bars li")) == 3


def test_invalid_input_shows_a_readable_error(browser, server, tmp_path):
    open_page(browser, server.base)
    search(browser, "   ", 5)
    error = by_id(browser, "search-error")
    wait_for(browser, lambda d: error.is_displayed(), what="the search error")
    assert "Invalid input" in error.text and "Question: must not be empty" in error.text
    assert error.get_attribute("data-status") == "422" and results(browser) == []
    search(browser, "apple", 1000)
    wait_for(browser, lambda d: "Top k: at most 100, got 1000" in error.text, what="the top_k error")
    search(browser, "apple", 2)  # a good request clears the error
    wait_for(browser, lambda d: len(results(d)) == 2 and not error.is_displayed(), what="results after an error")

    by_id(browser, "tab-score").click()
    type_into(browser, "score-question", "what is the apple")
    type_into(browser, "score-positive", "")
    by_id(browser, "score-submit").click()
    score_error = by_id(browser, "score-error")
    wait_for(browser, lambda d: score_error.is_displayed(), what="the score error")
    assert "Invalid input" in score_error.text and "Positive passage" in score_error.text
    assert not by_id(browser, "score-result").is_displayed()
    screenshot(browser, tmp_path, "web-error")


def test_api_key_missing_wrong_and_right(browser, keyed_server, tmp_path):
    open_page(browser, keyed_server.base)
    assert by_id(browser, "status").text == "key needed"
    notice = by_id(browser, "notice")
    assert notice.is_displayed() and "needs an API key" in notice.text
    search(browser, "apple", 3)
    error = by_id(browser, "search-error")
    wait_for(browser, lambda d: error.is_displayed(), what="the 401 error")
    assert "API key required" in error.text and error.get_attribute("data-status") == "401"
    screenshot(browser, tmp_path, "web-no-key")

    type_into(browser, "api-key", "not-the-key")
    by_id(browser, "key-save").click()
    wait_for(browser, lambda d: by_id(d, "status").text == "wrong key", what="the wrong-key status")
    assert "refused the key" in notice.text

    type_into(browser, "api-key", KEY)
    by_id(browser, "key-save").click()
    wait_for(browser, lambda d: by_id(d, "status").text == "ready", what="the ready status")
    assert not notice.is_displayed() and "31 passages" in by_id(browser, "info-index").text
    search(browser, "apple", 3)
    wait_for(browser, lambda d: len(results(d)) == 3, what="results with the key")
    # kept for this tab only, and sent as the X-API-Key header the API checks
    assert browser.execute_script("return sessionStorage.getItem('dpr-service.api-key')") == KEY
    assert browser.execute_script("return localStorage.length") == 0
    browser.refresh()
    wait_for(browser, lambda d: by_id(d, "status").text == "ready", what="ready after a reload")


@pytest.mark.parametrize("path, rendered", [
    ("/docs", "#swagger-ui .information-container .title"),
    ("/redoc", "redoc h1"),
])
def test_api_docs_render_offline_from_local_assets(browser, server, tmp_path, path, rendered):
    """Chromium loads the docs with every request outside this server refused: the page renders
    the schema's title, and every resource it loaded came from this server."""
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["https://*"]})  # every CDN; this server is plain http
    try:
        browser.get(server.base + path)
        wait_for(browser, lambda d: "dpr-service" in " ".join(e.text for e in d.find_elements("css selector", rendered)),
                 what=f"{path} to render")
        # every resource that got an answer came from this server (ReDoc's sidebar logo, its one
        # reference to another host, is refused by the page's Content-Security-Policy, unanswered)
        loaded = browser.execute_script(
            "return performance.getEntriesByType('resource').filter(e => e.responseStatus > 0).map(e => e.name)")
        assert loaded and all(u.startswith(server.base + "/") for u in loaded), loaded
        assert any(u.endswith(".js") for u in loaded) and any(u.endswith("/openapi.json") for u in loaded), loaded
        screenshot(browser, tmp_path, "docs" if path == "/docs" else "redoc")
    finally:
        browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": []})
