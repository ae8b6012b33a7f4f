"""The browser chat page in headless Chromium (Debian's), driven over the DevTools protocol on a pipe: it sends a
message, streams the answer, shows the reasoning in a collapsible block, and renders model HTML as text."""

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from serve_helpers import make_tokenizer, scripted_server

CHROMIUM = "/usr/bin/chromium"
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium (apt install chromium)")]

EVIL = '<img src=x onerror="document.title=\'pwned\'"><b>bold</b>'
SCRIPT = f"<think> The user asks for 2 + 2. Adding gives 4. </think> <answer> The answer is 4. {EVIL} </answer>"


class DevTools:
    """Chromium with --remote-debugging-pipe: JSON messages, each ended by a NUL byte, on fds 3 (in) and 4 (out)."""

    def __init__(self):
        self.profile = tempfile.mkdtemp(prefix="nanor1-chromium-")
        to_chrome_r, self.to_chrome = os.pipe()
        self.from_chrome, from_chrome_w = os.pipe()

        def wire_fds():  # runs in the child before exec
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)

        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--remote-debugging-pipe", f"--user-data-dir={self.profile}",
                 "--window-size=1000,700", "about:blank"]
        self.proc = subprocess.Popen([CHROMIUM, *flags], preexec_fn=wire_fds, close_fds=False,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self.next_id, self.buf, self.session = 0, b"", None

    def send(self, method: str, timeout: float = 15, **params) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            msg["sessionId"] = self.session
        os.write(self.to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            while b"\0" in self.buf:
                raw, self.buf = self.buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self.next_id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
            left = deadline - time.time()
            if left <= 0 or not select.select([self.from_chrome], [], [], left)[0]:
                raise TimeoutError(f"no reply to {method}")
            chunk = os.read(self.from_chrome, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium exited")
            self.buf += chunk

    def open(self, url: str) -> None:
        page = next(t for t in self.send("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.send("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
        self.send("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete' && !!document.getElementById('send')")

    def eval(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20) -> None:
        deadline = time.time() + timeout
        while not self.eval(expression):
            if time.time() > deadline:
                raise TimeoutError(expression)
            time.sleep(0.02)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        for fd in (self.to_chrome, self.from_chrome):
            os.close(fd)
        shutil.rmtree(self.profile, ignore_errors=True)


STATE = """(() => {
  const a = [...document.querySelectorAll('.assistant')].pop();
  if (!a) return null;
  return {reasoning: a.querySelector('.reasoning').textContent, content: a.querySelector('.content').textContent,
          thinkHidden: a.querySelector('.think').hidden, thinkOpen: a.querySelector('.think').open,
          state: a.dataset.state, meta: a.querySelector('.meta').textContent,
          injected: document.querySelectorAll('#log img, #log b').length, title: document.title};
})()"""


def test_chat_page_streams_an_answer_with_thinking(tmp_path):
    tok = make_tokenizer()
    server, backend, _ = scripted_server(tok, text=SCRIPT, delay=0.015)
    browser = None
    with server:
        try:
            browser = DevTools()
            browser.open(server.url + "/")
            browser.wait_for("document.getElementById('model').textContent === 'scripted'")
            browser.eval(f"document.getElementById('input').value = {json.dumps('what is 2 + 2? ' + EVIL)};"
                         "document.getElementById('form').requestSubmit(); true")
            seen = []
            deadline = time.time() + 30
            while time.time() < deadline:
                state = browser.eval(STATE)
                if state:
                    seen.append(state)
                    if state["state"] == "done":
                        break
                time.sleep(0.01)
            final = seen[-1]
            assert final["state"] == "done"
            assert final["reasoning"] == "The user asks for 2 + 2. Adding gives 4."
            assert final["content"] == f"The answer is 4. {EVIL}"  # the markup is shown as text
            assert final["injected"] == 0 and final["title"] != "pwned"
            assert not final["thinkHidden"] and not final["thinkOpen"]  # collapsed once the answer began
            assert "thinking" in final["meta"]  # usage line
            # streamed: the page showed partial reasoning and a partial answer before the end
            assert any(0 < len(s["reasoning"]) < len(final["reasoning"]) for s in seen)
            assert any(0 < len(s["content"]) < len(final["content"]) for s in seen)
            user_html = browser.eval("document.querySelector('.user').innerHTML")
            assert "&lt;img" in user_html  # the user's own text is escaped too
            shot = base64.b64decode(browser.send("Page.captureScreenshot", format="png")["data"])
            (tmp_path / "chat.png").write_bytes(shot)
            if os.environ.get("NANOR1_SCREENSHOT"):
                Path(os.environ["NANOR1_SCREENSHOT"]).write_bytes(shot)
            assert shot[:8] == b"\x89PNG\r\n\x1a\n"
        finally:
            if browser is not None:
                browser.close()
