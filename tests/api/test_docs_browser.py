"""/docs and /redoc in a real headless browser (Debian's chromium, driven by selenium through Debian's
chromedriver), against a live server, with every request to another host refused: the pages render the
operations, Swagger UI's "Try it out" runs a real /generate, and the browser asked nothing of anyone else.

CI installs the browser (.ci/run); elsewhere the test is skipped when it is absent."""

from __future__ import annotations

import json
import os
import shutil
from urllib.parse import urlparse

import pytest

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER) and not os.environ.get("CI"):
    pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; "
                ".ci/run installs them)", allow_module_level=True)

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

GENERATE = "operations-generate-generate_generate_post"  # Swagger UI's id of POST /generate's block
LIVE = ".live-responses-table tr.response"  # the answer Swagger UI got


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic",
                 # Any host but this machine's loopback fails to resolve: a page that needs the internet shows it.
                 "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def requested_hosts(driver) -> set[str]:
    """Every host the page sent a request to, from the browser's own network log."""
    hosts = set()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            url = message["params"]["request"]["url"]
            if url.startswith(("http://", "https://")):
                hosts.add(urlparse(url).netloc)
    return hosts


def test_swagger_ui_renders_and_try_it_out_runs_generate(browser, llama_server):
    browser.get(f"{llama_server.url}/docs")
    wait = WebDriverWait(browser, 60)
    block = wait.until(expected_conditions.presence_of_element_located((By.ID, GENERATE)))
    operations = browser.find_elements(By.CSS_SELECTOR, ".opblock")
    assert len(operations) >= 10  # every operation rendered
    block.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    wait.until(lambda _: block.find_elements(By.CSS_SELECTOR, ".try-out__btn"))[0].click()
    body = wait.until(lambda _: block.find_elements(By.CSS_SELECTOR, "textarea.body-param__text"))[0]
    body.clear()
    body.send_keys(json.dumps({"text": "Hello from the docs page", "max_new_tokens": 4}))
    block.find_element(By.CSS_SELECTOR, ".execute").click()
    status = wait.until(lambda _: block.find_elements(By.CSS_SELECTOR, f"{LIVE} .response-col_status"))
    assert status[0].text.strip().startswith("200"), status[0].text
    answer = block.find_element(By.CSS_SELECTOR, f"{LIVE} .response-col_description pre").text
    assert json.loads(answer)["usage"]["completion_tokens"] == 4
    assert requested_hosts(browser) == {urlparse(llama_server.url).netloc}  # nothing off the server


def test_redoc_renders_the_operations_offline(browser, llama_server):
    browser.get(f"{llama_server.url}/redoc")
    WebDriverWait(browser, 60).until(lambda d: "/generate" in d.find_element(By.TAG_NAME, "body").text)
    text = browser.find_element(By.TAG_NAME, "body").text
    assert "/v1/chat/completions" in text and "/prompts/{task}" in text
    assert requested_hosts(browser) == {urlparse(llama_server.url).netloc}
