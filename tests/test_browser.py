"""The admin in a real browser: headless Chromium driven by Selenium.

Needs Debian's ``chromium`` and ``chromium-driver`` packages and selenium
(in the ``test`` extra); ``.ci/run`` installs the packages, elsewhere these
tests skip saying what to install. Screenshots of every page are saved under
``.artefacts/browser/`` (``MAILER_TEST_ARTEFACTS`` to choose another place).
"""

from __future__ import annotations

import http.server
import os
import shutil
import tempfile
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from django.core.mail import EmailMultiAlternatives
from django.urls import reverse
from django.utils import timezone

from mailer.models import (
    PRIORITY_DEFERRED,
    PRIORITY_MEDIUM,
    RESULT_FAILURE,
    RESULT_SUCCESS,
    Message,
    MessageLog,
    queue_emails,
)
from tests.conftest import ROOT

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
MISSING = (
    "needs headless Chromium: apt-get install chromium chromium-driver (Debian), "
    "and selenium: pip install selenium (in the 'test' extra)"
)

try:
    from selenium import webdriver
    from selenium.common.exceptions import (
        NoAlertPresentException,
        UnexpectedAlertPresentException,
    )
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait
except ImportError:  # pragma: no cover - depends on the environment
    webdriver = None

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(webdriver is None or not CHROMIUM or not CHROMEDRIVER, reason=MISSING),
    pytest.mark.django_db(transaction=True),
]

ARTEFACTS = Path(os.environ.get("MAILER_TEST_ARTEFACTS", ROOT / ".artefacts")) / "browser"

PASSWORD = "browser-test-password"


@pytest.fixture(scope="module")
def browser():
    profile = tempfile.mkdtemp(prefix="mailer-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",  # as root in a container
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    # Alerts are left open for the tests to find (no_alert), not dismissed.
    options.unhandled_prompt_behavior = "ignore"
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def admin_browser(browser, live_server, django_user_model):
    """The browser, logged in to the admin through its login form."""
    django_user_model.objects.create_superuser("boss", "boss@example.com", PASSWORD)
    # A page of an earlier test (the control page) may have left alerts open,
    # which would swallow this navigation and the form's submit.
    for _ in range(20):
        if no_alert(browser):
            break
    browser.get("about:blank")
    browser.delete_all_cookies()
    browser.get(live_server.url + reverse("admin:login"))
    browser.find_element(By.NAME, "username").send_keys("boss")
    browser.find_element(By.NAME, "password").send_keys(PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    # The submit navigates asynchronously: wait for the page after the login.
    WebDriverWait(browser, 15).until(lambda d: "Log in |" not in d.title)
    assert "Log out" in browser.page_source or "logout" in browser.page_source
    browser.base = live_server.url
    return browser


def screenshot(driver, name: str) -> Path:
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    # The whole page, not only the window.
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, max(1000, min(int(height) + 100, 6000)))
    path = ARTEFACTS / f"{name}.png"
    assert driver.save_screenshot(str(path)), path
    assert path.stat().st_size > 5000  # a real picture, not an empty one
    driver.set_window_size(1400, 1000)
    return path


def queue_html(subject: str, html: str, attachments=()) -> Message:
    email = EmailMultiAlternatives(
        subject, "The plain text version.", "shop@example.com", ["carol@example.com"]
    )
    email.attach_alternative(html, "text/html")
    for name, content, mimetype in attachments:
        email.attach(name, content, mimetype)
    queue_emails([email])
    return Message.objects.latest("id")


def no_alert(driver) -> bool:
    try:
        driver.switch_to.alert.dismiss()
    except NoAlertPresentException:
        return True
    return False


# --- pages ---------------------------------------------------------------------------------


def test_message_list_with_the_overview(admin_browser):
    now = timezone.now()
    for i in range(3):
        queue_html(f"Order {i}", f"<p>Order {i}</p>")
    Message.objects.filter(subject_text="Order 2").update(priority=PRIORITY_DEFERRED)
    logs = []
    for hours_ago in range(0, 48, 3):
        for j in range(5 + hours_ago % 7):
            result = RESULT_FAILURE if j == 0 and hours_ago % 2 else RESULT_SUCCESS
            when = now - timedelta(hours=hours_ago, minutes=j)
            logs.append(
                MessageLog(
                    when_added=when,
                    when_attempted=when,
                    priority=PRIORITY_DEFERRED if hours_ago % 4 == 1 else PRIORITY_MEDIUM,
                    result=result,
                    log_message="451 try later" if result == RESULT_FAILURE else "",
                    message_id=f"<chart.{hours_ago}.{j}@example.com>",
                    recipients="carol@example.com",
                    subject_text="Charted",
                )
            )
    MessageLog.objects.bulk_create(logs)
    driver = admin_browser
    driver.get(driver.base + reverse("admin:mailer_message_changelist"))
    states = driver.find_element(By.CSS_SELECTOR, ".mailer-overview .mailer-states").text
    assert "2 queued" in states and "1 deferred" in states
    chart = driver.find_element(By.CSS_SELECTOR, "svg.mailer-chart")
    assert chart.size["width"] > 400 and chart.size["height"] > 100  # laid out, visible
    assert len(driver.find_elements(By.CSS_SELECTOR, "svg.mailer-chart g.mailer-hour")) == 48
    assert driver.find_elements(By.CSS_SELECTOR, "svg.mailer-chart rect.mailer-bar-sent")
    assert driver.find_elements(By.CSS_SELECTOR, "svg.mailer-chart rect.mailer-bar-failed")
    # The list itself is still there below it.
    rows = driver.find_elements(By.CSS_SELECTOR, "#result_list tbody tr")
    assert len(rows) == 3
    screenshot(driver, "message-list-overview")


def test_message_with_html_and_attachments(admin_browser):
    msg = queue_html(
        "Your invoice",
        "<h1 style='color: #2e7d32'>Invoice 42</h1><p>Total: <b>12.00 EUR</b></p>"
        "<img alt='dot' src='data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAf"
        "FcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=='>",
        attachments=[
            ("invoice-42.pdf", b"%PDF-1.4 not really", "application/pdf"),
            ("notes.txt", "Thanks for your order", "text/plain"),
        ],
    )
    driver = admin_browser
    driver.get(driver.base + reverse("admin:mailer_message_change", args=[msg.pk]))
    attachments = driver.find_element(By.CSS_SELECTOR, "table.mailer-attachments").text
    assert "invoice-42.pdf" in attachments and "notes.txt" in attachments
    frame = driver.find_element(By.CSS_SELECTOR, "iframe.mailer-html-preview")
    assert frame.get_attribute("sandbox") == ""
    driver.switch_to.frame(frame)
    try:
        assert driver.find_element(By.TAG_NAME, "h1").text == "Invoice 42"  # it renders
    finally:
        driver.switch_to.default_content()
    screenshot(driver, "message-detail-html-attachments")


def test_the_log(admin_browser):
    msg = queue_html("Logged", "<p>hi</p>")
    MessageLog.objects.log(msg, RESULT_SUCCESS)
    MessageLog.objects.log(msg, RESULT_FAILURE, "(451, b'4.3.0 try again later')")
    driver = admin_browser
    driver.get(driver.base + reverse("admin:mailer_messagelog_changelist"))
    rows = driver.find_elements(By.CSS_SELECTOR, "#result_list tbody tr")
    assert len(rows) == 2
    assert "try again later" in driver.find_element(By.ID, "result_list").text
    screenshot(driver, "message-log")
    entry = MessageLog.objects.get(result=RESULT_FAILURE)
    driver.get(driver.base + reverse("admin:mailer_messagelog_change", args=[entry.pk]))
    assert "try again later" in driver.page_source
    screenshot(driver, "message-log-entry")


# --- hostile HTML runs nothing and loads nothing ----------------------------------------------


class Tracker(http.server.BaseHTTPRequestHandler):
    """Counts every request: a tracking pixel or a remote script would land here."""

    hits: list[str] = []

    def do_GET(self):
        Tracker.hits.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(b"document.documentElement.setAttribute('data-pwned-remote', 'yes');")

    def log_message(self, *args):
        pass


@pytest.fixture
def tracker():
    Tracker.hits = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Tracker)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def hostile_html(tracker_url: str) -> str:
    mark = "document.documentElement.setAttribute"
    return (
        f"<script>{mark}('data-pwned-script', 'yes'); parent.document.title = 'pwned'; "
        "alert('script');</script>"
        f"<script src='{tracker_url}/evil.js'></script>"
        f"<img id='broken' src='x-does-not-exist' onerror=\"{mark}('data-pwned-onerror', 'yes')\">"
        f"<img id='pixel' src='{tracker_url}/pixel.gif'>"
        f"<a id='jslink' href=\"javascript:{mark}('data-pwned-link', 'yes')\">Click me</a>"
        f"<svg onload=\"{mark}('data-pwned-svg', 'yes')\"></svg>"
        "<p id='marker'>hostile message</p>"
    )


PWNED = "return [...document.documentElement.attributes].map(a => a.name).filter(n => n.startsWith('data-pwned'))"


def test_the_detector_sees_scripts_run_outside_the_sandbox(browser, tracker):
    """Control: the same HTML in a normal page does run, so the test below can fail."""
    page = Path(tempfile.mkdtemp(prefix="mailer-hostile-")) / "page.html"
    page.write_text(hostile_html(tracker))
    try:
        browser.get(page.as_uri())
        alerted = False
    except UnexpectedAlertPresentException:
        alerted = True
    alerted = not no_alert(browser) or alerted  # the first script's alert, dismissed
    assert alerted
    WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.ID, "marker"))
    browser.find_element(By.ID, "jslink").click()
    WebDriverWait(browser, 10).until(lambda d: len(d.execute_script(PWNED)) >= 5)
    fired = browser.execute_script(PWNED)
    assert {
        "data-pwned-script",
        "data-pwned-remote",
        "data-pwned-onerror",
        "data-pwned-link",
        "data-pwned-svg",
    } == set(fired), fired
    assert Tracker.hits, "the control page should have fetched from the tracker"
    shutil.rmtree(page.parent, ignore_errors=True)


def test_html_preview_runs_nothing(admin_browser, tracker):
    msg = queue_html("Hostile", hostile_html(tracker))
    driver = admin_browser
    driver.get(driver.base + reverse("admin:mailer_message_change", args=[msg.pk]))
    assert no_alert(driver), "a script opened an alert"
    title = driver.title
    assert "pwned" not in title
    frame = driver.find_element(By.CSS_SELECTOR, "iframe.mailer-html-preview")
    driver.switch_to.frame(frame)
    try:
        # The message is shown...
        assert driver.find_element(By.ID, "marker").text == "hostile message"
        # ...and clicking its javascript: link does nothing.
        driver.find_element(By.ID, "jslink").click()
        assert no_alert(driver)
        fired = driver.execute_script(PWNED)
    finally:
        driver.switch_to.default_content()
    assert fired == [], fired
    assert driver.title == title and "pwned" not in driver.title
    assert driver.current_url.endswith(reverse("admin:mailer_message_change", args=[msg.pk]))
    # Nothing was fetched: no remote script, no tracking pixel.
    assert Tracker.hits == [], Tracker.hits
    screenshot(driver, "message-detail-hostile-html")


# --- the list fits the window -----------------------------------------------------------------

FITS = """
const results = document.querySelector('#changelist-form .results');
const box = results.getBoundingClientRect();
const columns = {};
for (const th of document.querySelectorAll('#result_list thead th')) {
  const r = th.getBoundingClientRect();
  columns[th.className.split(' ').find(c => c.startsWith('column-')) || th.className] =
      [Math.round(r.left - box.left), Math.round(r.right - box.left)];
}
return {scroll: results.scrollWidth, client: results.clientWidth, columns: columns};
"""


def test_message_list_fits_1400_pixels(admin_browser):
    """At 1400 px wide (the navigation sidebar open) "When added" was cut off."""
    now = timezone.now()
    for i in range(4):
        email = EmailMultiAlternatives(
            f"Your order #10023{i} has shipped: track your parcel with the link inside",
            "The plain text version.",
            "shop@example.com",
            ["carol.longname-customer@example-customer-domain.com", "second@example.org",
             "third@example.org", "fourth@example.org"][: i + 1],
        )
        queue_emails([email])
    # Ids as a busy site has them (and as a database that ran other tests first).
    for offset, pk in enumerate(Message.objects.order_by("id").values_list("id", flat=True)):
        Message.objects.filter(pk=pk).update(id=4_812_650 + offset)
    deferred = Message.objects.order_by("id").first()
    Message.objects.filter(pk=deferred.pk).update(
        priority=PRIORITY_DEFERRED, not_before=now + timedelta(minutes=10), retry_count=3
    )
    MessageLog.objects.log(
        Message.objects.get(pk=deferred.pk), RESULT_FAILURE,
        "(451, b'4.7.1 Greylisted, please try again in 300 seconds (mx.example-customer-domain"
        ".com)')",
    )
    driver = admin_browser
    driver.set_window_size(1400, 1000)
    driver.get(driver.base + reverse("admin:mailer_message_changelist"))
    layout = driver.execute_script(FITS)
    screenshot(driver, "message-list-1400")
    when_added = layout["columns"]["column-when_added_display"]
    assert when_added[1] <= layout["client"], layout  # not cut off
    # Every column the list had in 2.3.2 is in view; with seven-digit ids
    # only our own last one, the Message-ID (also searchable, and on the
    # message's page), may reach past the edge.
    beyond = [
        name for name, (_, right) in layout["columns"].items() if right > layout["client"]
    ]
    assert beyond in ([], ["column-message_id_column"]), layout
