"""Check a `noiserefine report` page in a real browser: headless Chromium opens DIR/index.html,
saves a full-page screenshot, and the check fails on a broken image (an <img> that did not load,
naturalWidth 0), a console error or failed load (a missing file, a script error), or an empty
section (an item whose section holds no text beyond its heading).

    python scripts/check_report.py runs/report [--screenshot runs/report/screenshot.png]

Chromium comes from the distribution's packages (`apt-get install chromium`, run by this script
when no Chromium is on the PATH; it needs root). The script speaks the DevTools protocol over
--remote-debugging-pipe (JSON messages ending in NUL on file descriptors 3 and 4), so it needs no
package beyond Python's standard library. Exit status 0: the page passed; 1: it failed (each
problem printed); 2: the check could not run.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
PACKAGES = ("chromium", "chromium-browser")  # Debian names it chromium, older Ubuntu chromium-browser
WIDTH = 1280
TIMEOUT_S = 60.0

INSPECT = """(() => {
  const images = Array.from(document.images).map(i => ({src: i.getAttribute('src'), complete: i.complete,
                                                          width: i.naturalWidth}));
  const sections = Array.from(document.querySelectorAll('section')).map(s => {
    const heading = s.querySelector('h2');
    const text = s.innerText.replace(heading ? heading.innerText : '', '').trim();
    return {id: s.id, heading: heading ? heading.innerText.trim() : '', text: text.length,
            verdict: (s.querySelector('.verdict .badge') || {innerText: ''}).innerText.trim()};
  });
  return {images, sections, title: document.title};
})()"""


def find_browser() -> str:
    """A Chromium on the PATH, installed from the distribution's packages if there is none."""
    for name in BROWSERS:
        if shutil.which(name):
            return shutil.which(name)
    print("no Chromium found: installing it with apt-get", file=sys.stderr)
    subprocess.run(["apt-get", "update", "-qq"], check=False)
    for package in PACKAGES:
        done = subprocess.run(["apt-get", "install", "-y", "-qq", package], env={**os.environ,
                              "DEBIAN_FRONTEND": "noninteractive"}, check=False)
        if done.returncode == 0:
            for name in BROWSERS:
                if shutil.which(name):
                    return shutil.which(name)
    raise SystemExit("error: could not install Chromium (apt-get install chromium / chromium-browser failed)")


class DevTools:
    """A DevTools-protocol session with a headless Chromium over --remote-debugging-pipe."""

    def __init__(self, browser: str, profile: Path) -> None:
        browser_reads, self._write = os.pipe()
        self._read, browser_writes = os.pipe()
        # copies numbered >= 10, so that moving them onto 3 and 4 in the child never overwrites one another
        to_browser, from_browser = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (browser_reads, browser_writes))
        os.close(browser_reads)
        os.close(browser_writes)
        args = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-extensions", "--disable-sync", "--no-first-run", "--no-default-browser-check",
                "--hide-scrollbars", "--mute-audio", f"--user-data-dir={profile}", "--remote-debugging-pipe",
                f"--window-size={WIDTH},900", "about:blank"]

        def attach_pipes() -> None:  # the browser reads commands on fd 3 and answers on fd 4
            os.dup2(to_browser, 3)
            os.dup2(from_browser, 4)

        self.process = subprocess.Popen(args, preexec_fn=attach_pipes, pass_fds=(3, 4), stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self._buffer, self._next, self.events = b"", 0, []

    def _message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._read, 1 << 16)
            if not chunk:
                raise ConnectionError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        """Send a command and wait for its answer (events that arrive meanwhile are kept)."""
        self._next += 1
        message = {"id": self._next, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            reply = self._message(deadline)
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str) -> None:
        """Wait for an event (or find it among those already kept)."""
        deadline = time.monotonic() + TIMEOUT_S
        while not any(e.get("method") == method for e in self.events):
            self.events.append(self._message(deadline))

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


def console_errors(events: list[dict[str, Any]]) -> list[str]:
    """Console errors, uncaught exceptions and failed loads among the session's events."""
    errors = []
    for e in events:
        p = e.get("params", {})
        if e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            errors.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p["args"]))
        elif e.get("method") == "Runtime.exceptionThrown":
            errors.append("exception: " + p["exceptionDetails"].get("text", ""))
        elif e.get("method") == "Log.entryAdded" and p["entry"].get("level") == "error":
            errors.append(f"log: {p['entry'].get('text', '')} {p['entry'].get('url', '')}".strip())
        elif e.get("method") == "Network.loadingFailed":
            errors.append(f"load failed: {p.get('errorText', '')}")
    return errors


def inspect_page(page: Path, screenshot: Path, browser: str) -> tuple[dict[str, Any], list[str]]:
    """Open the page, save a full-page screenshot; the page's images and sections, and its errors."""
    with tempfile.TemporaryDirectory() as profile:
        tools = DevTools(browser, Path(profile))
        try:
            target = tools.call("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = tools.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime", "Log", "Network"):
                tools.call(f"{domain}.enable", session=session)
            tools.call("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
            tools.wait_for("Page.loadEventFired")
            found = tools.call("Runtime.evaluate", {"expression": INSPECT, "returnByValue": True},
                               session=session)["result"]["value"]
            size = tools.call("Page.getLayoutMetrics", session=session)["cssContentSize"]
            tools.call("Emulation.setDeviceMetricsOverride", {"width": WIDTH, "height": int(size["height"]),
                                                              "deviceScaleFactor": 1, "mobile": False}, session=session)
            shot = tools.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True},
                              session=session)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
            return found, console_errors(tools.events)
        finally:
            tools.close()


def problems(found: dict[str, Any], errors: list[str], expected_items: int | None) -> list[str]:
    """What is wrong with the page: broken images, console errors, empty or missing sections."""
    out = [f"broken image: {i['src']}" for i in found["images"] if not i["complete"] or i["width"] == 0]
    out += errors
    out += [f"empty section: #{s['id']} ({s['heading']!r})" for s in found["sections"] if s["text"] == 0]
    out += [f"section without a verdict: #{s['id']}" for s in found["sections"] if not s["verdict"]]
    if expected_items is not None and len(found["sections"]) != expected_items:
        out.append(f"{len(found['sections'])} sections on the page, {expected_items} items in report.json")
    if not found["sections"]:
        out.append("the page has no sections")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, help="a report folder (index.html inside) or the page itself")
    parser.add_argument("--screenshot", type=Path, default=None, help="where the full-page PNG goes "
                        "(default: screenshot.png in the report folder)")
    args = parser.parse_args()
    page = args.report / "index.html" if args.report.is_dir() else args.report
    if not page.is_file():
        print(f"error: no report page at {page}", file=sys.stderr)
        return 2
    screenshot = args.screenshot or page.parent / "screenshot.png"
    report_json = page.parent / "report.json"
    expected = len(json.loads(report_json.read_text())["items"]) if report_json.is_file() else None
    found, errors = inspect_page(page, screenshot, find_browser())
    bad = problems(found, errors, expected)
    print(f"{page}: {len(found['sections'])} sections, {len(found['images'])} images; screenshot {screenshot}")
    for line in bad:
        print(f"FAIL {line}")
    print("page check passed" if not bad else f"page check failed: {len(bad)} problem(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
