"""Headless Chromium driven over its DevTools protocol (aiohttp's websocket client; no driver
package): start, open a URL, evaluate JavaScript, take a screenshot. Used by the web page test and
by the README's screenshot (`python tests/integration/chromium.py URL OUT.png`)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--remote-debugging-address=127.0.0.1",
         "--remote-debugging-port=0"]


START_S = 120.0
"""How long a start may take before the browser counts as broken (a wait, not a timing check)."""


def binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class Chromium:
    """`async with Chromium(size=(w, h)) as c: await c.open(url); await c.evaluate("...")`."""

    def __init__(self, size: tuple[int, int] = (1400, 1000)) -> None:
        self.size = size
        self.profile = tempfile.TemporaryDirectory(prefix="cnc-chromium-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.session: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.ids = itertools.count(1)
        self.log = Path(self.profile.name) / "chromium.log"

    async def __aenter__(self) -> Chromium:
        exe = binary()
        assert exe, "no chromium binary"
        self.proc = subprocess.Popen(
            [exe, *FLAGS, f"--user-data-dir={self.profile.name}/profile", f"--window-size={self.size[0]},{self.size[1]}",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=open(self.log, "wb"))  # noqa: SIM115
        active = Path(self.profile.name) / "profile" / "DevToolsActivePort"
        # a cold first start (fonts, profile, on a busy 2-core CI machine) has taken over 30 s
        deadline = time.monotonic() + START_S
        while not (active.exists() and active.read_text().count("\n") >= 1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = self.log.read_text()[-2000:]
                await self.__aexit__()  # no browser left behind
                raise RuntimeError(f"chromium did not start within {START_S:.0f} s: {log}")
            await asyncio.sleep(0.1)
        port = int(active.read_text().splitlines()[0])
        self.session = aiohttp.ClientSession()
        async with self.session.get(f"http://127.0.0.1:{port}/json/list") as r:
            pages = [t for t in await r.json() if t["type"] == "page"]
        self.ws = await self.session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
        await self.send("Page.enable")
        await self.send("Runtime.enable")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.session is not None:
            await self.session.close()
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(OSError):
            self.profile.cleanup()

    async def send(self, method: str, **params: object) -> dict:
        assert self.ws is not None
        mid = next(self.ids)
        await self.ws.send_str(json.dumps({"id": mid, "method": method, "params": params}))
        while True:
            msg = json.loads((await self.ws.receive(timeout=30)).data)
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def open(self, url: str) -> None:
        await self.send("Page.navigate", url=url)

    async def evaluate(self, expression: str) -> object:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def until(self, expression: str, timeout: float = 20.0, what: str = "") -> object:
        """Evaluate `expression` until it is truthy (an exception counts as not yet: the page may still
        be loading); its value."""
        deadline = time.monotonic() + timeout
        error = None
        while True:
            try:
                value = await self.evaluate(expression)
            except RuntimeError as exc:
                value, error = None, exc
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"{what or expression} not true within {timeout} s (last error: {error})")
            await asyncio.sleep(0.2)

    async def screenshot(self, path: Path) -> Path:
        data = (await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True))["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path


async def _shoot(url: str, out: Path, wait_for: str) -> None:
    async with Chromium() as c:
        await c.open(url)
        await c.until(wait_for, 30)
        await asyncio.sleep(1.5)
        await c.screenshot(out)


if __name__ == "__main__":
    import sys

    asyncio.run(_shoot(sys.argv[1], Path(sys.argv[2]),
                       sys.argv[3] if len(sys.argv) > 3 else "document.querySelectorAll('#map g.site').length > 0"))
    print(sys.argv[2])
