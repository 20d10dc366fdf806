"""The status socket through nginx (`agent_status on;`) and the dashboard in
a real browser: Debian's chromium, driven by selenium through chromedriver.

The browser runs headless with a fresh profile and every background service
off, so nothing is fetched from the network. The page must show the running
worker, follow the pool as it grows, and restart the app with the admin
token; it saves a screenshot (copied to docs/dashboard.png when
AGENT_UPDATE_DOCS=1, so that a test run leaves the tree as it was).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from tests.integration import apps
from tests.integration.stack import REPO, AppSpec, Stack, unsanitized_env, wait_until

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SCREENSHOT_COPY = REPO / "docs" / "dashboard.png"

SLOW = AppSpec("shop", apps.SLOW, "/", directives={"agent_min_instances": "1", "agent_max_instances": "3"})

# nginx's htpasswd files accept a plain-text scheme: no crypt needed here
HTPASSWD_LINE = "ops:{PLAIN}opensesame\n"


class StatusStack(Stack):
    """The stack with two doors to the status socket: /agent/ open, and
    /locked/ behind nginx's auth_basic."""

    def config_text(self) -> str:
        listen = f"listen 127.0.0.1:{self.port};\n"
        status_locations = f"""        location /agent/ {{
            agent_status on;
        }}
        location /locked/ {{
            auth_basic "agent status";
            auth_basic_user_file {self.root / 'htpasswd'};
            agent_status on;
        }}
"""
        text = super().config_text()
        assert listen in text
        return text.replace(listen, listen + status_locations, 1)

    def write_config(self) -> Path:
        (self.root / "htpasswd").write_text(HTPASSWD_LINE)
        return super().write_config()

    def admin_token(self) -> str:
        return (self.instance / "admin.token").read_text().strip()


@pytest.fixture(scope="module")
def stack() -> Iterator[StatusStack]:
    # as running_stack does, for the subclass
    root = Path(tempfile.mkdtemp(prefix="agent-it-", dir="/tmp"))
    root.chmod(0o755)
    status_stack = StatusStack(root, [SLOW])
    try:
        status_stack.start()
        yield status_stack
    except BaseException:
        print(status_stack.logs())
        raise
    finally:
        status_stack.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1280,1300", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # The browser is no part of the agent: under `make sanitize` it does not
    # get the sanitizer runtime that the suite preloads for the agent's
    # extension (Chromium refuses to start under ASan's preload).
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER, env=unsanitized_env()), options=options)
    try:
        yield driver
    finally:
        driver.quit()


# -- the status socket through nginx ------------------------------------------


def test_status_location_strips_its_prefix_and_reaches_the_status_socket(stack: StatusStack) -> None:
    response = stack.get("/agent/server", headers={"Accept": "application/json"})
    assert response.status == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    server = json.loads(response.body)
    assert server["pid"] == stack.core_pid()
    assert server["instance_dir"] == str(stack.instance)


def test_query_string_and_unknown_paths_pass_through(stack: StatusStack) -> None:
    missing = stack.get("/agent/no-such-resource")
    assert missing.status == 404
    assert "error" in json.loads(missing.body)
    unknown_app = stack.request("POST", "/agent/apps/restart?app=/no/such/app",
                                headers={"Authorization": f"Bearer {stack.admin_token()}"})
    # the query string arrived: the agent names the app it could not find
    assert unknown_app.status == 404, unknown_app.text
    assert "/no/such/app" in unknown_app.text


def test_actions_through_nginx_need_the_admin_token(stack: StatusStack) -> None:
    app = str(stack.app_root(SLOW))
    # nginx's worker user is the peer: it may read, not act
    assert stack.request("POST", f"/agent/apps/restart?app={app}").status == 403
    wrong = stack.request("POST", f"/agent/apps/restart?app={app}", headers={"Authorization": "Bearer 00"})
    assert wrong.status == 403
    read_token = (stack.instance / "read.token").read_text().strip()
    as_reader = stack.request("POST", f"/agent/apps/restart?app={app}",
                              headers={"Authorization": f"Bearer {read_token}"})
    assert as_reader.status == 403


def test_auth_basic_guards_a_status_location(stack: StatusStack) -> None:
    assert stack.get("/locked/server").status == 401
    wrong = stack.get("/locked/server", headers={"Authorization": "Basic b3BzOm5vcGU="})  # ops:nope
    assert wrong.status == 401
    # the Basic credentials are nginx's: they must not reach the status
    # socket, which would take them for a wrong token
    right = stack.get("/locked/server", headers={"Authorization": "Basic b3BzOm9wZW5zZXNhbWU="})  # ops:opensesame
    assert right.status == 200, right.text
    assert json.loads(right.body)["pid"] == stack.core_pid()


def test_dashboard_is_served_under_the_location(stack: StatusStack) -> None:
    response = stack.get("/agent/dashboard")
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "<title>Agent dashboard</title>" in response.text
    # an absolute path would leave the location: the page fetches relative ones
    script = response.text.split("<script>", 1)[1]
    assert "fetch(" in script
    assert not re.search(r"""(fetch|getJSON)\(\s*["'`]/""", script)


# -- the dashboard in a browser -----------------------------------------------


def table_pids(driver: webdriver.Chrome) -> set[int]:
    rows = driver.find_elements(By.CSS_SELECTOR, "#processes tbody tr[data-pid]")
    try:
        return {int(row.get_attribute("data-pid") or 0) for row in rows}
    except WebDriverException:
        return set()  # the table was redrawn while it was being read


def restart_result(driver: webdriver.Chrome, app: str) -> str:
    card = driver.find_element(By.CSS_SELECTOR, f"article.app[data-app='{app}']")
    return card.find_element(By.CSS_SELECTOR, "output.result").text


def test_dashboard_follows_the_pool_and_restarts_the_app(stack: StatusStack, browser: webdriver.Chrome,
                                                         tmp_path: Path) -> None:
    app = str(stack.app_root(SLOW))
    assert stack.get("/?0").status == 200
    wait_until(lambda: len(stack.worker_pids(SLOW)) == 1, timeout=20,
               what=f"the first worker (workers: {stack.worker_pids(SLOW)})")
    first = stack.worker_pids(SLOW)

    browser.get(f"http://127.0.0.1:{stack.port}/agent/dashboard")
    wait_until(lambda: first <= table_pids(browser), timeout=15, what=f"the page to show worker {first}")
    row = browser.find_element(By.CSS_SELECTOR, f"#processes tr[data-pid='{next(iter(first))}']")
    assert app in row.text
    assert browser.find_element(By.ID, "connection").text == "live"

    # three requests that each hold a worker for a while: the queue grows and
    # the agent starts more workers (up to agent_max_instances 3)
    stop = threading.Event()

    def keep_busy() -> None:
        while not stop.is_set():
            stack.get("/?1.5")

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(keep_busy) for _ in range(3)]
        try:
            wait_until(lambda: len(stack.worker_pids(SLOW)) >= 2, timeout=30, what="a second worker")
            grown = stack.worker_pids(SLOW)
            wait_until(lambda: grown - first <= table_pids(browser), timeout=15,
                       what=f"the page to show the new workers {grown - first}")
            busy = browser.find_elements(By.CSS_SELECTOR, "#processes td.state-serving")
            assert busy, "no worker is shown serving while every worker is busy"
        finally:
            stop.set()
        for future in futures:
            future.result()

    # without the token the restart is refused, and the page says why
    button = browser.find_element(By.CSS_SELECTOR, f"button.restart[data-app='{app}']")
    button.click()
    wait_until(lambda: "needs the admin token" in restart_result(browser, app), timeout=10,
               what="the 403 to be shown")
    assert "403" in restart_result(browser, app)

    def memory_label() -> str:
        return browser.find_element(By.ID, "mem-chart").get_attribute("aria-label") or ""

    before = stack.worker_pids(SLOW)
    # A worker the pool started just now has no memory sample yet: the chart
    # can keep only lines it has drawn.
    wait_until(lambda: all(f"· {pid} " in memory_label() for pid in before), timeout=15,
               what=f"every worker before the restart {before} in the memory chart")
    token = browser.find_element(By.ID, "token")
    token.send_keys(stack.admin_token())
    # the token is kept for the next visit
    assert browser.execute_script("return localStorage.getItem('agent.adminToken')") == stack.admin_token()
    button.click()
    wait_until(lambda: restart_result(browser, app).startswith("ok"), timeout=10, what="the restart to be accepted")

    # a rolling restart: every worker is replaced, and the page follows
    wait_until(lambda: stack.worker_pids(SLOW) and not stack.worker_pids(SLOW) & before, timeout=60,
               what="every worker to be replaced")
    after = stack.worker_pids(SLOW)
    wait_until(lambda: table_pids(browser) == after, timeout=15,
               what=f"the page to show only the new workers {after}")
    assert not table_pids(browser) & before

    # steady traffic shows in the requests chart (and gives the screenshot
    # some history to draw)
    def current_rate() -> float:
        label = browser.find_element(By.ID, "rps-chart").get_attribute("aria-label") or ""
        match = re.search(r"now ([0-9.,]+)", label)
        return float(match.group(1).replace(",", "")) if match else 0.0

    def steady_traffic(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert stack.get("/?0.02").status == 200

    with ThreadPoolExecutor(2) as pool:
        load = [pool.submit(steady_traffic, 12) for _ in range(2)]
        wait_until(lambda: current_rate() >= 5, timeout=10, what="the requests chart to show the traffic")
        for future in load:
            future.result()
    # the memory chart keeps the replaced workers' lines beside the new ones
    wait_until(lambda: all(f"· {pid} " in memory_label() for pid in after | before), timeout=10,
               what="every worker, old and new, in the memory chart")

    logged = browser.get_log("browser")  # type: ignore[no-untyped-call]  # selenium leaves it unannotated
    errors = [entry for entry in logged
              if entry["level"] == "SEVERE" and "apps/restart" not in entry["message"]]
    assert not errors, errors

    screenshot = tmp_path / "dashboard.png"
    assert browser.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 10_000
    if os.environ.get("AGENT_UPDATE_DOCS") == "1":
        shutil.copyfile(screenshot, SCREENSHOT_COPY)

