#!/usr/bin/env python3
"""The page at / in a real browser: headless Chromium, driven over the DevTools protocol,
submits a job through the form against the real sdserve binary and checks that step previews,
the progress bar and the final images appear; runs image to image from a picture, then
inpainting from a WebP with a mask painted by mouse strokes on the brush canvas; then cancels a
long job with the Cancel button.

    page_test.py SDSERVE_BINARY
Exit 77 (ctest: skipped) where Chromium, python3-websocket or python3-pil is missing; CI
installs them.
"""
import base64
import io
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
    from PIL import Image  # reads the mask the page sends and the inpainted result
except ImportError:
    websocket = None
if not chromium or websocket is None:
    print("skipped: needs Chromium, python3-websocket and python3-pil "
          "(Debian: apt-get install chromium python3-websocket python3-pil)")
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


def image_of(data):
    return Image.open(io.BytesIO(data)).convert("RGB")


def mask_sent(page):
    """The mask PNG the page would send now, as a PIL image."""
    url = page.eval("maskDataUrl()")
    if not url.startswith("data:image/png;base64,"):
        raise RuntimeError(f"the mask is not a PNG data URL: {url[:40]!r}")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def inpaint(page, port, fixture, failures):
    """Inpainting from the page, the picture a lossless WebP of the img2img fixture (the same
    pixels): a stroke painted with the mouse over the picture's right part (real pointer events
    on the brush canvas), the mask checked as the server would get it, then a job whose
    unpainted part comes back as the picture itself (paste back, the page's default) and whose
    painted part is redrawn."""
    failed_before = len(failures)
    with open(fixture.replace(".png", "-lossless.webp"), "rb") as f:
        data_url = "data:image/webp;base64," + base64.b64encode(f.read()).decode()
    page.eval(f"setInitImage({json.dumps(data_url)}); true")
    page.wait("$('width').value === '96' && $('maskcanvas').width === 96 && !$('maskbox').hidden",
              "the picture and its mask canvas")
    if page.eval("$('strength').value") != "0.6":
        failures.append("strength is not img2img's 0.6 before a mask is painted")
    # Brush 16 px of the picture; the stroke runs along y = 32 from x = 56 to x = 88.
    page.eval("$('brushsize').value = 16; $('maskcanvas').scrollIntoView({block: 'center'}); true")
    box = page.eval("(b => [b.left, b.top, b.width, b.height])"
                    "($('maskcanvas').getBoundingClientRect())")
    at = lambda x, y: {"x": box[0] + x * box[2] / 96, "y": box[1] + y * box[3] / 64}  # noqa: E731
    page.call("Input.dispatchMouseEvent", type="mousePressed", button="left", buttons=1,
              clickCount=1, **at(56, 32))
    for x in range(60, 89, 4):
        page.call("Input.dispatchMouseEvent", type="mouseMoved", button="left", buttons=1,
                  **at(x, 32))
    page.call("Input.dispatchMouseEvent", type="mouseReleased", button="left", buttons=0,
              clickCount=1, **at(88, 32))
    page.wait("maskPainted()", "the stroke on the mask canvas")

    mask = mask_sent(page)
    px = mask.convert("L").load()
    if mask.size != (96, 64):
        failures.append(f"the mask is {mask.size}, not the picture's 96x64")
    values = set(mask.convert("L").getdata())
    if values != {0, 255}:
        failures.append(f"the mask is not white on black: values {sorted(values)[:8]}")
    if px[72, 32] != 255 or px[50, 32] != 255 or px[72, 26] != 255:
        failures.append("the stroke is not white in the mask")
    if px[10, 10] != 0 or px[72, 10] != 0 or px[40, 32] != 0 or px[72, 50] != 0:
        failures.append("outside the stroke the mask is not black")
    if page.eval("$('strength').value") != "1":
        failures.append("strength did not become 1 once a mask was painted")
    page.eval("$('maskinvert').click(); true")
    inv = mask_sent(page).convert("L").load()
    if inv[10, 10] != 255 or inv[72, 32] != 0:
        failures.append("Invert mask did not swap painted and unpainted")
    page.eval("$('maskinvert').click(); true")

    page.eval("$('steps').value = 8; $('count').value = 1; $('seed').value = 11;"
              "$('generate').click(); true")
    page.wait("document.querySelectorAll('#gallery figure.result img').length === 4 &&"
              "(i => i.complete && i.naturalWidth === 96 && i.naturalHeight === 64)"
              "(document.querySelector('#gallery figure.result img'))",
              "the inpainted 96x64 image")
    status = page.eval("$('status').textContent")
    if not status.startswith("Done"):
        failures.append(f"inpainting status is {status!r}")
    job_id = page.eval("document.querySelector('#gallery figure.result').dataset.job")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/jobs/{job_id}", timeout=10) as r:
        job = json.loads(r.read())
    req = job["request"]
    print("inpainting job request:", json.dumps({k: req.get(k) for k in (
        "mask", "strength", "mask_blur_x", "inpaint_full_res", "inpaint_paste_back")}))
    if req.get("mask") != {"width": 96, "height": 64}:
        failures.append(f"the job's mask is {req.get('mask')}, not 96x64")
    if req.get("strength") != 1 or req.get("mask_blur_x") != 4 or not req.get("inpaint_paste_back"):
        failures.append(f"the job's inpainting fields are not the page's: {req}")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{job['images'][0]}", timeout=10) as r:
        result = image_of(r.read())
    picture = Image.open(fixture).convert("RGB")
    # Left of the stroke, beyond the 4 px blur's reach, the picture itself; in it, redrawn.
    far = [(x, y) for x in range(0, 34) for y in range(64)]
    kept = sum(result.getpixel(p) == picture.getpixel(p) for p in far)
    hole = [(x, y) for x in range(60, 92) for y in range(28, 37)]
    same = sum(result.getpixel(p) == picture.getpixel(p) for p in hole)
    if kept != len(far):
        failures.append(f"only {kept} of {len(far)} unpainted pixels kept the picture's values")
    if same > len(hole) // 2:
        failures.append(f"{same} of {len(hole)} painted pixels are the picture's: not redrawn")

    page.eval("$('maskclear').click(); true")
    if page.eval("maskPainted() || $('strength').value !== '0.6'"):
        failures.append("Clear mask did not empty it and give img2img's strength back")
    print("inpainting:", "OK" if len(failures) == failed_before else "FAILED")


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
             "--no-first-run", "--window-size=1200,1600", f"--remote-debugging-port={devtools}",
             f"--user-data-dir={tmp}/profile",
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
            page.wait("$('width').value === '96' && !$('maskwrap').hidden",
                      "the init image to load")
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
            if page.eval("'mask' in request()"):
                failures.append("img2img without a painted mask sends a mask")
            page.eval("$('initclear').click(); $('width').value = 64; $('height').value = 64; true")
            print("img2img: OK")

            inpaint(page, port, fixture, failures)
            page.eval("$('initclear').click(); $('width').value = 64; $('height').value = 64; true")

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
