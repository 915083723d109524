"""Logged in to a real Airflow in headless Chromium: the Trigger form, a run, and the LAION views.

A real deployment on loopback (``laion_tasks.airflow_local``: api-server, scheduler,
dag-processor, triggerer, LocalExecutor, PostgreSQL for Airflow and lineage) with
SimpleAuthManager and one user with a password, not all-admins. The browser:

- is refused with a wrong password, then logs in through Airflow's login page;
- opens the snapshot DAG's Trigger form: every Param is shown with its description;
- triggers a run from the form (pointing it at the fixture crawl) and sees it succeed; the
  asset-triggered index and train -> eval DAGs follow, every candidate is accounted for, and the
  outputs agree with the truth the fixture crawl planted (tests/world_checks.py);
- opens "LAION lineage" and "LAION search" from Airflow's Browse menu, the snapshot's
  page with its funnel and shard status, the dataset card with its charts and sample grid,
  and a search over the index the asset-triggered index DAG built. Scored with the demo's world
  model, the search shows what was asked for: the results' pictures are checked against the truth
  the fixture crawl planted.

Without a session the plugin routes answer 401/403. Last, ``airflow backfill create`` of the monthly
ingest over two months succeeds and skips the done shards. This is the LocalExecutor deployment test
(tests/test_deployment.py runs the CeleryExecutor one). Screenshots: tests/artifacts/airflow_*.png.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest

from laion_tasks import demo, storage
from laion_tasks.airflow_local import AirflowStack
from laion_tasks.config import load_settings
from laion_tasks.fixtures.crawl import Truth
from laion_tasks.fixtures.world_report import SEARCH_K, SEARCH_QUERY
from laion_tasks.lineage import Lineage
from tests.airflow_checks import (
    assert_after_snapshot_run,
    assert_monthly_backfill_skips_done_shards,
    asset_dags,
)
from tests.browser import chromium, require_browser, screenshot
from tests.world_checks import MIN_SEARCH_PRECISION, assert_world_checks

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parent.parent
SNAPSHOT = demo.DEMO_CRAWL
DAG = "laion_snapshot_" + SNAPSHOT.replace("-", "_")
USER = "alice"
RUN_TIMEOUT_S = 900
PLUGIN_ROUTES = (
    "/laion-lineage/",
    f"/laion-lineage/snapshot/{SNAPSHOT}",
    "/laion-lineage/api/snapshots",
    "/laion-lineage/static/airflow.css",
    "/laion-lineage/openapi.json",
    "/laion-search/",
    "/laion-search/api/info",
    "/laion-search/openapi.json",
)
CSS = REPO / "laion_tasks" / "web" / "airflow.css"
# Run inside a LAION page in Airflow's iframe: its mode, Airflow's mode, the body's background,
# and the stylesheet's light and dark --bg values resolved by the same engine (so "#ffffff"
# and "rgb(255, 255, 255)", or two spellings of an oklch colour, compare equal).
THEME_PROBE = """
const [light, dark] = arguments;
const root = document.documentElement;
const probe = document.createElement('div');
document.body.appendChild(probe);
const resolve = (value) => { probe.style.backgroundColor = value; return getComputedStyle(probe).backgroundColor; };
const seen = {
  airflowDark: window.parent.document.documentElement.classList.contains('dark'),
  pageDark: root.classList.contains('dark'),
  embedded: root.classList.contains('embedded'),
  body: getComputedStyle(document.body).backgroundColor,
  light: resolve(light),
  dark: resolve(dark),
};
probe.remove();
return seen;
"""


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, postgres, world_model) -> Iterator[tuple[AirflowStack, demo.DemoEnv]]:  # type: ignore[no-untyped-def]
    require_browser()
    work = tmp_path_factory.mktemp("airflow-browser")
    tag = secrets.token_hex(3)
    lineage_url = postgres.create_database(f"browser_lineage_{tag}")
    env = demo.prepare(work / "demo", lineage_url=lineage_url, n_wat=2, pages_per_wat=6, world=world_model)
    try:
        stack = AirflowStack(
            work / "airflow",
            dags_folder=REPO / "dags",
            plugins_folder=REPO / "plugins",
            metadata_url=postgres.create_database(f"browser_airflow_{tag}"),
            extra_env={"LAION_CONFIG": str(env.config_path)},
            users={USER: secrets.token_urlsafe(12)},
        )
        with stack:
            yield stack, env
    finally:
        env.stop()


def test_plugin_routes_refuse_requests_without_a_session(deployment: tuple[AirflowStack, demo.DemoEnv]) -> None:
    stack, _ = deployment
    options: dict[str, Any] = {"base_url": stack.base_url, "timeout": 30, "trust_env": False, "follow_redirects": False}
    with httpx.Client(**options) as client, httpx.Client(cookies={"_token": "not-a-jwt"}, **options) as forging:
        for route in PLUGIN_ROUTES:
            anonymous = client.get(route)
            assert anonymous.status_code in (401, 403) or anonymous.is_redirect, (route, anonymous.status_code)
            assert SNAPSHOT not in anonymous.text
            forged = forging.get(route)
            assert forged.status_code in (401, 403) or forged.is_redirect, (route, forged.status_code)
        # the same routes answer a logged-in user (so the refusals above are not 404s)
        token = {"Authorization": f"Bearer {stack.token()}"}
        assert client.get("/laion-lineage/", headers=token).status_code == 200
        assert client.get("/laion-search/", headers=token).status_code == 200
    bad = httpx.post(f"{stack.base_url}/auth/token", json={"username": USER, "password": "wrong"}, timeout=30, trust_env=False)
    assert bad.status_code in (400, 401, 403)


def _wait(driver: Any, condition: Callable[[Any], Any], timeout: float = 60, message: str = "") -> Any:
    from selenium.common.exceptions import (
        NoSuchElementException,
        StaleElementReferenceException,
    )
    from selenium.webdriver.support.ui import WebDriverWait

    # React re-renders replace elements under our feet: look again rather than fail
    ignored = (StaleElementReferenceException, NoSuchElementException)
    return WebDriverWait(driver, timeout, poll_frequency=0.5, ignored_exceptions=ignored).until(condition, message)


def _type(element: Any, text: str) -> None:
    """Type into a React-controlled input one key at a time, then check what it holds."""
    from selenium.webdriver.common.keys import Keys

    for _ in range(3):
        element.send_keys(Keys.CONTROL, "a")
        element.send_keys(Keys.DELETE)
        for ch in text:
            element.send_keys(ch)
        if element.get_attribute("value") == text:
            return
    raise AssertionError(f"input holds {element.get_attribute('value')!r}, not {text!r}")


def _button(scope: Any, text: str) -> Any:
    from selenium.webdriver.common.by import By

    found = [b for b in scope.find_elements(By.TAG_NAME, "button") if b.is_displayed() and b.text.strip() == text]
    return found[0] if found else None


def _login(driver: Any, base_url: str, password: str) -> None:
    from selenium.webdriver.common.by import By

    _wait(driver, lambda d: d.find_elements(By.NAME, "username"), message="Airflow's login page")
    _type(driver.find_element(By.NAME, "username"), USER)
    _type(driver.find_element(By.NAME, "password"), password)
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()


def _open_from_browse_menu(driver: Any, name: str) -> Any:
    """Click Browse -> ``name`` in Airflow's navigation; switch into the view's iframe."""
    from selenium.webdriver.common.by import By

    driver.switch_to.default_content()
    _wait(driver, lambda d: _button(d, "Browse"), message="Browse menu").click()
    item = _wait(
        driver,
        lambda d: next((i for i in d.find_elements(By.CSS_SELECTOR, "[role=menuitem]") if i.is_displayed() and i.text == name), None),
        message=f"{name} in the Browse menu",
    )
    item.click()
    frame = _wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, "main iframe, iframe"), message=f"{name} iframe")
    driver.switch_to.frame(frame)
    return frame


def css_custom_property(selector: str, name: str) -> str:
    """The value airflow.css gives ``name`` in its ``selector { ... }`` block (``:root`` or ``html.dark``)."""
    text = CSS.read_text(encoding="utf-8")
    block = re.search(re.escape(selector) + r"\s*\{([^}]*)\}", text)
    assert block, f"{CSS} has no '{selector}' block"
    value = re.search(re.escape(name) + r"\s*:\s*([^;]+);", block.group(1))
    assert value, f"{CSS}: '{selector}' sets no {name}"
    return value.group(1).strip()


def _wait_for_theme(driver: Any, airflow_dark: bool | None, timeout: float = 15) -> dict[str, Any]:
    """Wait until the page (in Airflow's iframe) is in Airflow's mode with that mode's --bg as its background.

    ``airflow_dark``: the mode Airflow must be in (None: whichever it is). Returns what the page showed.
    """
    light, dark = css_custom_property(":root", "--bg"), css_custom_property("html.dark", "--bg")
    seen: dict[str, Any] = {}

    def themed(d: Any) -> bool:
        seen.update(d.execute_script(THEME_PROBE, light, dark))
        want = seen["dark"] if seen["airflowDark"] else seen["light"]
        return (
            airflow_dark in (None, seen["airflowDark"])
            and seen["embedded"]
            and seen["pageDark"] == seen["airflowDark"]
            and seen["light"] != seen["dark"]  # the two modes can be told apart, so the check means something
            and seen["body"] == want
        )

    from selenium.common.exceptions import TimeoutException

    try:
        _wait(driver, themed, timeout)
    except TimeoutException:
        raise AssertionError(f"page not drawn by airflow.css in Airflow's mode (airflow_dark={airflow_dark}): {seen}") from None
    return dict(seen)


def _toggle_airflow_dark_mode(driver: Any) -> None:
    """Flip the class Airflow's UI (next-themes) keeps on its <html>, from inside its iframe."""
    driver.execute_script("window.parent.document.documentElement.classList.toggle('dark')")


def _images_loaded(driver: Any, selector: str) -> bool:
    return bool(
        driver.execute_script(
            "const imgs = [...document.querySelectorAll(arguments[0])];"
            "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);",
            selector,
        )
    )


def test_login_trigger_form_run_and_laion_views(deployment: tuple[AirflowStack, demo.DemoEnv]) -> None:
    from selenium.webdriver.common.by import By

    stack, env = deployment
    password = stack.users[USER]
    stack.wait_dag(DAG)  # the dag-processor may still be parsing it
    params = stack.api("GET", f"dags/{DAG}/details")["params"]
    assert {"wat_paths_uri", "storage_root", "force"} <= set(params)
    for dag_id in asset_dags(SNAPSHOT):  # the curate tasks' asset events start them; the index backs the search view
        stack.unpause(dag_id)
    settings = load_settings(env.config_path, environ={})
    storage.configure(settings.storage)
    lineage = Lineage(settings.lineage.url)
    wat_paths = f"{env.base_url}crawl-data/{SNAPSHOT}/wat.paths.gz"

    with chromium(1400, 1000) as driver:
        # a wrong password is refused; the right one logs in
        driver.get(stack.base_url + "/")
        _login(driver, stack.base_url, "not-" + password)
        _wait(driver, lambda d: "Invalid credentials" in d.find_element(By.TAG_NAME, "body").text, message="refusal")
        assert "/auth/login" in driver.current_url and not _button(driver, "Browse")
        screenshot(driver, "airflow_login_refused.png")
        driver.get(stack.base_url + "/auth/login")
        _login(driver, stack.base_url, password)
        _wait(driver, lambda d: _button(d, "Browse"), message="Airflow UI after login")

        # the Trigger form shows every Param with its description
        driver.get(f"{stack.base_url}/dags/{DAG}")
        _wait(driver, lambda d: _button(d, "Trigger"), message="Trigger button").click()
        dialog = _wait(
            driver,
            lambda d: next((x for x in d.find_elements(By.CSS_SELECTOR, "[role=dialog]") if x.is_displayed() and "Trigger Dag" in x.text), None),
            message="Trigger form",
        )
        _wait(driver, lambda d: "Run Parameters" in dialog.text and params_shown(dialog, params) == [], 30, "every Param in the form")
        field = dialog.find_element(By.NAME, "element_wat_paths_uri")
        _type(field, wat_paths)
        screenshot(driver, "airflow_trigger_form.png")
        _button(dialog, "Trigger").click()
        _wait(driver, lambda d: "/runs/" in d.current_url, message="run page after Trigger")
        run_id = unquote(driver.current_url.split("/runs/", 1)[1].split("/")[0].split("?")[0])
        run = stack.api("GET", f"dags/{DAG}/dagRuns/{run_id}")
        assert run["conf"]["wat_paths_uri"] == wat_paths and run["run_type"] == "manual"

        state = stack.wait_run(DAG, run_id, RUN_TIMEOUT_S)
        assert state == "success", stack.failure_report(DAG, run_id)
        assert_after_snapshot_run(stack, settings, lineage, SNAPSHOT)
        assert_world_checks(settings, SNAPSHOT, env.truth_path, env.crawl_dir)
        driver.get(f"{stack.base_url}/dags/{DAG}/runs/{run_id}")
        _wait(driver, lambda d: "success" in d.find_element(By.TAG_NAME, "body").text.lower(), message="run shown as success")
        time.sleep(1)
        screenshot(driver, "airflow_run_success.png")

        # LAION lineage from the Browse menu: the snapshot, its funnel chart and shard status
        _open_from_browse_menu(driver, "LAION lineage")
        _wait(driver, lambda d: d.find_element(By.LINK_TEXT, SNAPSHOT), message="snapshot in the lineage view").click()
        _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "svg.funnel"), message="funnel chart")
        body = driver.find_element(By.TAG_NAME, "body").text
        for stage in ("extract", "download", "clip", "tag", "curate/laion2B-en"):
            assert stage in body, stage
        assert "Shards per stage" in body and "Failed shards (0 failing" in body
        # drawn by airflow.css in Airflow's own mode, and following Airflow when its mode changes
        theme = _wait_for_theme(driver, None)
        _toggle_airflow_dark_mode(driver)
        _wait_for_theme(driver, not theme["airflowDark"])
        _toggle_airflow_dark_mode(driver)
        _wait_for_theme(driver, theme["airflowDark"])
        driver.switch_to.default_content()
        screenshot(driver, "airflow_lineage.png")

        # the dataset card, rendered from Markdown with its charts and sample grid
        driver.switch_to.frame(driver.find_element(By.CSS_SELECTOR, "iframe"))
        driver.find_element(By.LINK_TEXT, "Dataset card").click()
        _wait(driver, lambda d: _images_loaded(d, ".markdown img"), message="card charts loaded")
        sources = [i.get_attribute("src").rsplit("/", 1)[-1] for i in driver.find_elements(By.CSS_SELECTOR, ".markdown img")]
        assert {"funnel.png", "samples_kept.png", "samples_dropped.png"} <= set(sources), sources
        assert driver.find_elements(By.CSS_SELECTOR, ".markdown table")
        driver.switch_to.default_content()
        screenshot(driver, "airflow_card.png")
        driver.switch_to.frame(driver.find_element(By.CSS_SELECTOR, "iframe"))
        driver.execute_script("document.querySelector(\"img[src='samples_kept.png']\").scrollIntoView()")
        driver.switch_to.default_content()
        screenshot(driver, "airflow_card_samples.png")

        # LAION search from the Browse menu, over the index the asset-triggered index DAG built
        _open_from_browse_menu(driver, "LAION search")
        _wait(driver, lambda d: "images" in d.find_element(By.ID, "info").text, 120, "search index info")
        _type(driver.find_element(By.ID, "q"), SEARCH_QUERY)
        driver.find_element(By.ID, "search").click()
        _wait(driver, lambda d: int(d.find_element(By.ID, "grid").get_attribute("data-count")) > 0, message="search results")
        _wait(driver, lambda d: _images_loaded(d, "#grid img"), message="result images from the fixture crawl")
        driver.switch_to.default_content()
        screenshot(driver, "airflow_search.png")
        driver.switch_to.frame(driver.find_element(By.CSS_SELECTOR, "iframe"))
        shown = [i.get_attribute("src") for i in driver.find_elements(By.CSS_SELECTOR, "#grid img")][:SEARCH_K]
        assert_pictures_show(env, shown, SEARCH_QUERY)

    assert_monthly_backfill_skips_done_shards(stack, settings, lineage, SNAPSHOT)


def params_shown(dialog: Any, params: dict[str, Any]) -> list[str]:
    """Params whose name or description the form does not show."""
    text = dialog.text
    missing = []
    for name, spec in params.items():
        description = (spec or {}).get("description") or ""
        if name not in text or not description or description not in text:
            missing.append(name)
    return missing


def assert_pictures_show(env: demo.DemoEnv, urls: list[str], query: str) -> None:
    """The search page's first results show what ``query`` asks for, by the truth the crawl planted
    (the query names a colour and a shape: "a green triangle")."""
    scenes = {lk.url: lk.scene for lk in Truth.read(env.truth_path).links if lk.scene}
    shows = [f"{scenes[u]['color']} {scenes[u]['shape']}" if u in scenes else f"unknown {u}" for u in urls]
    wanted = query.removeprefix("a ").removeprefix("an ")
    hits = sum(s == wanted for s in shows)
    assert len(urls) == SEARCH_K and hits >= MIN_SEARCH_PRECISION * SEARCH_K, (query, shows)
