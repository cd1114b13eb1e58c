#!/usr/bin/env python3
"""The page at / in a real browser: headless Chromium, driven over the DevTools protocol,
submits a job through the form against the real sdserve binary and checks that step previews,
the progress bar and the final images appear; then cancels a long job with the Cancel button.

    page_test.py SDSERVE_BINARY
Exit 77 (ctest: skipped) where Chromium or python3-websocket is missing; CI installs both.
"""
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
try:
    import websocket
except ImportError:
    websocket = None
if not chromium or websocket is None:
    print("skipped: needs Chromium and python3-websocket "
          "(Debian: apt-get install chromium python3-websocket)")
    sys.exit(77)

binary = sys.argv[1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.read()
        except Exception:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


class Page:
    """One browser tab over the DevTools protocol: navigate and evaluate JavaScript."""

    def __init__(self, ws_url):
        self.ws = websocket.create_connection(ws_url, timeout=30)
        self.next_id = 0

    def call(self, method, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def eval(self, expression):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                      awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait(self, expression, what, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.eval(expression):
                return
            time.sleep(0.05)
        status = self.eval("document.getElementById('status').textContent")
        raise RuntimeError(f"timed out waiting for {what}; status: {status!r}")


def main():
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        port, devtools = free_port(), free_port()
        log = open(os.path.join(tmp, "serve.log"), "w")
        # sdserve refuses SDSERVE_* variables that are not its keys (CI exports SDSERVE_CMAKE_ARGS).
        env = {k: v for k, v in os.environ.items() if not k.startswith("SDSERVE_")}
        server = subprocess.Popen([binary, "serve", "--port", str(port)], stdout=log, stderr=log,
                                  env=env)
        browser = subprocess.Popen(
            [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", f"--remote-debugging-port={devtools}", f"--user-data-dir={tmp}/profile",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_http(f"http://127.0.0.1:{port}/readyz")
            targets = json.loads(wait_http(f"http://127.0.0.1:{devtools}/json/list"))
            page = Page(next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"])
            page.call("Page.enable")
            page.call("Page.navigate", url=f"http://127.0.0.1:{port}/")
            page.wait("document.readyState === 'complete' && $('sampler').options.length > 0",
                      "the page to load its model and samplers")
            size = page.eval("$('width').value")
            if size != "64":
                failures.append(f"width defaults to {size!r}, not the model's native 64")

            # Two images, 12 steps, a fixed seed: previews, progress, then the gallery.
            page.eval("$('prompt').value = 'a red fox in the snow'; $('steps').value = 12;"
                      "$('count').value = 2; $('seed').value = 42; $('sampler').value = 'euler_ancestral';"
                      "$('generate').click(); true")
            page.wait("document.querySelectorAll('#gallery figure.result img').length === 2 &&"
                      "[...document.querySelectorAll('#gallery figure.result img')]"
                      ".every(i => i.complete && i.naturalWidth === 64)",
                      "two 64x64 images in the gallery")
            checks = page.eval("""({
                preview: $('preview').src.startsWith('blob:') && $('preview').naturalWidth > 0,
                bar: $('bar').value, status: $('status').textContent,
                captions: [...document.querySelectorAll('#gallery figcaption')].map(c => c.textContent),
                downloads: [...document.querySelectorAll('#gallery figcaption a')].map(a => a.download),
                generate: $('generate').disabled, cancel: $('cancel').disabled})""")
            print("after the job:", json.dumps(checks, ensure_ascii=False))
            if not checks["preview"]:
                failures.append("no step preview was shown")
            if checks["bar"] != 1:
                failures.append(f"the progress bar ends at {checks['bar']}, not 1")
            if not checks["status"].startswith("Done") or "seed 42" not in checks["status"]:
                failures.append(f"status is {checks['status']!r}")
            if sorted(checks["downloads"]) != ["sdserve-42.png", "sdserve-43.png"]:
                failures.append(f"download links are {checks['downloads']}")
            if not all("a red fox in the snow" in c and "12 steps" in c for c in checks["captions"]):
                failures.append(f"captions lack the parameters: {checks['captions']}")
            if checks["generate"] or not checks["cancel"]:
                failures.append("buttons not reset after the job")

            # img2img: a picture given to the page (as a file input, drop or paste would), its
            # size taken, the job run from it.
            fixture = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures",
                                   "img2img-init-96x64.png")
            with open(fixture, "rb") as f:
                data_url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
            page.eval(f"setInitImage({json.dumps(data_url)}); true")
            page.wait("$('width').value === '96' && !$('initthumb').hidden", "the init image to load")
            page.eval("$('strength').value = 0.5; $('steps').value = 8; $('count').value = 1;"
                      "$('seed').value = 7; $('generate').click(); true")
            # The gallery keeps earlier results; the newest comes first.
            page.wait("document.querySelectorAll('#gallery figure.result img').length === 3 &&"
                      "(i => i.complete && i.naturalWidth === 96 && i.naturalHeight === 64)"
                      "(document.querySelector('#gallery figure.result img'))",
                      "a 96x64 image from the init image")
            status = page.eval("$('status').textContent")
            if not status.startswith("Done"):
                failures.append(f"img2img status is {status!r}")
            page.eval("$('initclear').click(); $('width').value = 64; $('height').value = 64; true")
            print("img2img: OK")

            # A long job, cancelled from the page once it runs.
            page.eval("$('steps').value = 150; $('count').value = 1; $('generate').click(); true")
            page.wait("$('status').textContent.startsWith('Step')", "the long job to start")
            page.eval("$('cancel').click(); true")
            page.wait("$('status').textContent === 'Cancelled.'", "the job to be cancelled")
            print("cancel: OK")
        except Exception as e:  # noqa: BLE001 (report any failure with the server's log)
            failures.append(str(e))
        finally:
            browser.terminate()
            server.terminate()
            for p in (browser, server):
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
        if failures:
            print("FAIL:\n  " + "\n  ".join(failures))
            print("--- server log (tail) ---\n" + open(os.path.join(tmp, "serve.log")).read()[-3000:])
            return 1
    print("browser page test: OK")
    return 0


sys.exit(main())
