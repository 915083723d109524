"""End to end in headless Chromium: type a query, see the result grid, click a caption, save a screenshot.

Uses Debian's ``chromium`` + ``chromium-driver`` (``/usr/bin/chromium``, ``/usr/bin/chromedriver``)
through Selenium. Skips when they are missing locally; fails in CI (``CI=true``), where the
Makefile installs them. The screenshot lands in tests/artifacts/ (gitignored).
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

from laion_tasks import layout
from laion_tasks.config import IndexConfig
from laion_tasks.serve import create_app
from laion_tasks.stages.index import build_index
from tests.browser import chromium, require_browser, screenshot
from tests.index_fixtures import SNAPSHOT, SUBSET, generate, tiny_encoder, tiny_settings


@pytest.fixture
def image_server() -> Iterator[str]:
    """Serves a small coloured PNG for every result URL, so the grid shows real images."""
    from PIL import Image
    import io
    import zlib

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            seed = zlib.crc32(self.path.encode())
            buf = io.BytesIO()
            Image.new("RGB", (96, 96), (seed & 255, (seed >> 8) & 255, (seed >> 16) & 255)).save(buf, "PNG")
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(buf.tell()))
            self.end_headers()
            self.wfile.write(buf.getvalue())

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/img"
    server.shutdown()


@pytest.fixture
def search_server(tmp_path: Path, image_server: str) -> Iterator[tuple[str, dict[str, str]]]:
    import uvicorn

    generated = generate(tmp_path, tiny_encoder(), shards=2, rows_per_shard=40, url_base=image_server)
    out = layout.index_dir(str(tmp_path), SNAPSHOT, SUBSET)
    build_index(generated.embedding_uris, generated.clip_uris, out, IndexConfig(), generated.subset_uris)
    config = uvicorn.Config(create_app(out, tiny_settings()), host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/", generated.captions
    server.should_exit = True
    thread.join(10)


def test_search_page_in_headless_chromium(search_server: tuple[str, dict[str, str]]) -> None:
    require_browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, captions = search_server
    with chromium() as driver:
        driver.get(url)
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: "images" in d.find_element(By.ID, "info").text)
        query = list(captions.values())[10]
        box = driver.find_element(By.ID, "q")
        box.clear()
        box.send_keys(query)
        driver.find_element(By.ID, "search").click()
        wait.until(lambda d: int(d.find_element(By.ID, "grid").get_attribute("data-count")) > 0)
        cards = driver.find_elements(By.CSS_SELECTOR, "#grid .result")
        assert len(cards) == 40
        first_caption = cards[0].find_element(By.CSS_SELECTOR, ".caption")
        assert first_caption.text == query
        assert "score 1.000" in cards[0].find_element(By.CSS_SELECTOR, ".scores").text
        # Result images are loaded from their URLs.
        wait.until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('#grid img')].some(i => i.complete && i.naturalWidth > 0)"
        ))
        screenshot(driver, "serve_search.png")

        # Clicking a caption searches for it.
        other = cards[5].find_element(By.CSS_SELECTOR, ".caption")
        other_text = other.text
        other.click()
        wait.until(lambda d: d.find_element(By.ID, "q").get_attribute("value") == other_text)
        wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, "#grid .result .caption"), other_text))
        assert driver.find_elements(By.CSS_SELECTOR, "#grid .result .caption")[0].text == other_text

        # A filter with no possible match shows an empty grid, not an error.
        driver.find_element(By.ID, "min_aesthetic").send_keys("100")
        driver.find_element(By.ID, "search").click()
        wait.until(lambda d: d.find_element(By.ID, "grid").get_attribute("data-count") == "0")
        assert "0 results" in driver.find_element(By.ID, "status").text
