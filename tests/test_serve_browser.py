"""The `serve` page in a real headless browser (Debian's `chromium`, as tests/test_teeth_search.py uses): type a
query, see the expected video with its thumbnail loaded, click it and see the video element seek to the
matched second. Chromium is driven over its DevTools protocol on a pipe (--remote-debugging-pipe: JSON
messages ending in a NUL byte on file descriptors 3 and 4), so no driver package is needed."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from retrieval.serve import create_app  # noqa: E402
from tests.search_fixtures import features, run  # noqa: E402,F401 (fixtures)
from tests.test_serve import Server  # noqa: E402
from workflows import search as W  # noqa: E402

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no `chromium` on PATH: the page must be driven by a real "
                                "browser (Debian/Ubuntu: apt-get install chromium; scripts/test.sh does it as root)")
QUERY = "a man cooks pasta"


class Chromium:
    """A headless Chromium and one page of it, spoken to with DevTools protocol commands."""

    def __init__(self, profile):
        to_r, self._to = os.pipe()
        self._from, from_w = os.pipe()
        # the child's ends above 10 first, so putting them on 3 and 4 cannot overwrite one with the other
        child_r, child_w = fcntl.fcntl(to_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_w, fcntl.F_DUPFD, 10)

        def on_3_and_4():
            os.dup2(child_r, 3)
            os.dup2(child_w, 4)
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--autoplay-policy=no-user-gesture-required", f"--user-data-dir={profile}", "about:blank"],
            preexec_fn=on_3_and_4, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for fd in (to_r, from_w, child_r, child_w):
            os.close(fd)
        self._buffer, self._id = b"", 0
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def send(self, method: str, session: str | None = None, **params) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._from, 1 << 16)
                assert chunk, "chromium closed its DevTools pipe"
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                assert "error" not in reply, reply
                return reply["result"]

    def page(self, method: str, **params) -> dict:
        return self.send(method, self.session, **params)

    def js(self, expression: str):
        result = self.page("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def wait(self, expression: str, timeout: float = 60.0):
        deadline = time.time() + timeout
        while time.time() < deadline:  # the page may still be loading: an error is "not yet"
            value = self.js(f"(() => {{ try {{ return ({expression}); }} catch (e) {{ return null; }} }})()")
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {expression}; page: {self.js('document.body.innerText')!r}")

    def close(self):
        self.proc.kill()
        self.proc.wait(10)
        os.close(self._to)
        os.close(self._from)


def test_type_query_see_thumbnail_play_from_second(features, run, tmp_path):
    searcher = W.open_searcher(features, run)
    expected = searcher.text(QUERY, top=24).hits[0]
    server = Server(create_app(searcher))
    browser = Chromium(tmp_path / "profile")
    try:
        browser.page("Page.navigate", url=server.url + "/")
        browser.wait("document.body.dataset.ready === '1'")
        browser.js("document.getElementById('q').focus()")
        browser.page("Input.insertText", text=QUERY)  # typed as a user types: input events, then the page searches
        browser.page("Input.dispatchKeyEvent", type="keyDown", key="Enter", code="Enter", windowsVirtualKeyCode=13)
        browser.page("Input.dispatchKeyEvent", type="keyUp", key="Enter", code="Enter", windowsVirtualKeyCode=13)
        browser.wait("document.querySelectorAll('.hit').length > 0")
        first = browser.js("(() => { const h = document.querySelector('.hit'); return {file: h.dataset.file, "
                           "second: Number(h.dataset.second), text: h.innerText}; })()")
        assert first["file"] == os.path.basename(expected.path) and first["file"] in first["text"]
        assert first["second"] == pytest.approx(expected.best_second, abs=1e-3)
        assert f"{expected.score:.4f}" in first["text"]
        # its thumbnail was fetched from the server and decoded
        assert browser.wait("(() => { const i = document.querySelector('.hit img'); "
                            "return i.complete && i.naturalWidth > 0; })()")
        browser.js("document.querySelector('.hit').click()")
        start = browser.wait("document.getElementById('video').dataset.start")
        assert float(start) == pytest.approx(expected.best_second, abs=0.05)  # playing from the matched second
        assert browser.js("document.getElementById('video').currentSrc").endswith(
            f"/media/{expected.video}#t={expected.best_second:.3f}")
        assert browser.js("document.getElementById('video').error") is None
    finally:
        browser.close()
        server.stop()
