"""The web page in a real headless Chromium (Debian's ``chromium``), over the
DevTools protocol: it lists sessions, opens one, and its xterm.js terminal runs
``echo $((6*7))`` typed as key events, showing 42; a window resize reaches
``stty size``; a dropped socket reconnects with ``after``; and a client written
from Blink's ``docs/PTY.md`` JavaScript example runs in the same browser.

``VHUB_SCREENSHOT=PATH`` also saves the page as PNG there (the README's)."""

from __future__ import annotations

import asyncio
import os
import re

import pytest

aiohttp = pytest.importorskip("aiohttp", reason="the HTTP API needs the http extra (aiohttp)")

from harness import run  # noqa: E402
from harness.browser import Browser, find_browser  # noqa: E402
from harness.http import HttpApi  # noqa: E402

pytestmark = pytest.mark.skipif(find_browser() is None, reason="needs Debian's chromium (apt-get install chromium)")
VENDOR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vhubd", "api", "static",
                      "vendor", "xterm.js")

SCREEN = """(() => { const b = window.vhub.term.buffer.active; const out = [];
  for (let i = 0; i < b.length; i++) out.push(b.getLine(i).translateToString(true));
  return out.join("\\n"); })()"""


@pytest.fixture
def web_daemon(make_daemon):
    if not os.path.exists(VENDOR):
        pytest.fail("xterm.js is missing from vhubd/api/static/vendor: run python tools/fetch_xterm.py (./dev does)")
    return make_daemon("--backend", "local", "--http", "127.0.0.1:0", "--heartbeat", "0")


def test_the_page_gives_a_terminal_that_follows_the_window(web_daemon, tmp_path):
    async def body():
        async with HttpApi(web_daemon) as api:
            await api.ok("POST", "/api/sessions", {"name": "listed"})
        b = await Browser(str(tmp_path), 1100, 700).start()
        try:
            await b.navigate(f"{api.base}/#token={api.token}")
            assert await b.eval("location.hash") == ""  # the token left the address bar
            await b.wait("[...document.querySelectorAll('#sessions li')].some(li => li.dataset.name == 'listed')",
                         what="the session list")
            await b.eval("document.getElementById('name').value = 'web';"
                         "document.getElementById('open').requestSubmit(); true")
            await b.wait("window.vhub.ws && window.vhub.ws.readyState === 1", 60, what="the terminal's socket")
            await b.wait("window.vhub.lastSeq > 0", 30, what="the shell's prompt")
            await b.eval("window.vhub.term.focus(); true")
            await b.type("echo $((6*7))\r")
            screen = await b.wait(f"(() => {{ const s = {SCREEN}; return /^42$/m.test(s) && s; }})()", 30,
                                  what="42 on the screen")
            assert "echo $((6*7))" in screen
            rows, cols = await b.eval("[window.vhub.term.rows, window.vhub.term.cols]")
            await b.type("stty size\r")
            await b.wait(f"(() => {SCREEN})().includes('{rows} {cols}')", 30, what=f"stty size {rows} {cols}")
            if os.environ.get("VHUB_SCREENSHOT"):
                await b.type("uname -s; ls / | head -5\r")
                await b.wait(f"(() => {SCREEN})().includes('Linux')", 30)
                await b.screenshot(os.environ["VHUB_SCREENSHOT"])
            await b.resize(800, 500)  # the window shrinks: xterm fits, the terminal follows
            await b.wait(f"window.vhub.term.cols < {cols} && window.vhub.term.rows < {rows}", 30,
                         what="xterm to fit the smaller window")
            loop = asyncio.get_running_loop()
            size, stable_since = None, loop.time()
            while size is None or loop.time() - stable_since < 1.0:  # the window settles (it may fit in steps)
                now = await b.eval("[window.vhub.term.rows, window.vhub.term.cols]")
                if now != size:
                    size, stable_since = now, loop.time()
                await asyncio.sleep(0.1)
            rows2, cols2 = size
            await b.eval("window.vhub.term.clear(); true")
            await b.type("stty size\r")
            try:
                await b.wait(f"(() => {SCREEN})().includes('{rows2} {cols2}')", 30,
                             what=f"stty size {rows2} {cols2} after the resize")
            except TimeoutError:
                raise AssertionError(await b.eval(SCREEN)) from None
            # the socket drops: the page reconnects from its last seq, and nothing repeats
            seq = await b.eval("window.vhub.lastSeq")
            await b.eval("window.vhub.ws.close(); true")
            await b.wait(f"window.vhub.ws && window.vhub.ws.readyState === 1 && "
                         f"window.vhub.ws.url.includes('after={seq}')", 30, what="the reconnection")
            await b.type("echo back-$((40+2))\r")
            screen = await b.wait(f"(() => {{ const s = {SCREEN}; return /^back-42$/m.test(s) && s; }})()", 30)
            assert len(re.findall(r"^back-42$", screen, re.M)) == 1
            # a reload: clicking the session goes back to its running terminal, history replayed
            exec_id = await b.eval("window.vhub.exec")
            await b.navigate(f"{api.base}/")  # the token is in sessionStorage now
            await b.wait("[...document.querySelectorAll('#sessions li')].some(li => li.dataset.name == 'web')",
                         what="the session list after the reload")
            await b.eval("[...document.querySelectorAll('#sessions li')].find(li => li.dataset.name == 'web')"
                         ".click(); true")
            await b.wait(f"window.vhub.exec === {exec_id!r} && window.vhub.ws && window.vhub.ws.readyState === 1",
                         30, what="the same execution, resumed")
            await b.wait(f"/^back-42$/m.test({SCREEN})", 30, what="its history, replayed")
            await b.eval("window.vhub.term.focus(); true")
            await b.type("echo still-$((41+1))\r")
            await b.wait(f"/^still-42$/m.test({SCREEN})", 30, what="the resumed shell answering")
            await b.screenshot(str(tmp_path / "page.png"))
            assert (tmp_path / "page.png").stat().st_size > 5000
        finally:
            await b.close()

    run(body(), timeout=180)


# Blink's docs/PTY.md "JavaScript Example", as written there, with two changes a
# V-Hub daemon asks for: the bearer token (a header on fetch, ?token= on the
# WebSocket) and a few keystrokes sent once open, so the shell has output and exits.
BLINK_EXAMPLE = """
(async () => {
const base = location.origin;
const token = TOKEN;
const out = [];
const { execution_id, attach_url } = await fetch(
  `${base}/api/sessions/my-agent/spawn`,
  {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', 'Authorization': `Bearer ${token}` },
    body: JSON.stringify({
      command: 'sh',
      args: ['-i'],
      tty: true,
      rows: 24,
      cols: 80,
    }),
  },
).then((r) => r.json());

const ws = new WebSocket(`ws://${location.host}${attach_url}?token=${token}`);
ws.binaryType = 'arraybuffer';
return await new Promise((resolve) => {
  ws.onmessage = (ev) => {
    if (typeof ev.data === 'string') {
      const msg = JSON.parse(ev.data);
      if (msg.type === 'exit') resolve({ execution_id, exit: msg.exit_code, text: out.join('') });
      return;
    }
    const buf = new Uint8Array(ev.data);
    const channel = buf[0];
    const text = new TextDecoder().decode(buf.subarray(1)); // legacy mode
    out.push(text);
  };

  ws.onopen = () => {
    ws.send(JSON.stringify({ type: 'resize', rows: 30, cols: 120 }));
    ws.send(new TextEncoder().encode('stty size; exit 3\\r'));
  };
});
})()
"""


def test_a_client_written_from_blinks_pty_md_example(web_daemon, tmp_path):
    async def body():
        async with HttpApi(web_daemon) as api:
            await api.ok("POST", "/api/sessions", {"name": "my-agent"})
        b = await Browser(str(tmp_path)).start()
        try:
            await b.navigate(f"{api.base}/")
            result = await b.eval(BLINK_EXAMPLE.replace("TOKEN", repr(api.token)), timeout=60)
            assert result["exit"] == 3 and "30 120" in result["text"], result
        finally:
            await b.close()

    run(body(), timeout=120)
