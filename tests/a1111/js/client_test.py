#!/usr/bin/env python3
"""Runs tests/a1111/js/client.js, which calls sdserve through the npm A1111 client
a1111-webui-api (the version package-lock.json pins, its code unchanged), against the real
sdserve binary on a loopback port (the bundled tiny model, CPU). Checks what the client got:
txt2img, img2img and inpainting images of the right size with A1111's PNG parameters, and an
inpainting result that kept the picture away from the mask and redrew it inside.

    client_test.py SDSERVE_BINARY
Exit 77 (ctest: skipped) where node, the node modules (tools/test.sh installs them with
`npm ci --ignore-scripts` here) or python3-pil are missing; CI has all three.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

here = os.path.dirname(os.path.abspath(__file__))
fixtures = os.path.join(here, "..", "..", "fixtures")
node = shutil.which("node") or shutil.which("nodejs")
try:
    from PIL import Image, ImageFilter  # reads back, on its own, what the client received
except ImportError:
    Image = None
if not node or Image is None:
    print("skipped: needs node and python3-pil (Debian: apt-get install nodejs npm python3-pil)")
    sys.exit(77)
if not os.path.isdir(os.path.join(here, "node_modules", "a1111-webui-api")):
    print(f"skipped: the client is not installed: cd {here} && npm ci --ignore-scripts "
          "(tools/test.sh runs it)")
    sys.exit(77)

binary = sys.argv[1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fail(message, output=""):
    print("FAIL:", message)
    if output:
        print("--- client output ---\n" + output)
    sys.exit(1)


def check_images(call, count, size, text):
    if len(call["images"]) != count:
        fail(f"{call['call']}: {len(call['images'])} images, not {count}", text)
    for image in call["images"]:
        # As the client's sharp image saw it, and as PIL reads the bytes the server sent.
        if (image["format"], image["width"], image["height"]) != ("png", *size):
            fail(f"{call['call']}: the client got {image}, not a {size[0]}x{size[1]} PNG", text)
        if Image.open(image["file"]).size != size:
            fail(f"{image['file']} is not {size[0]}x{size[1]}", text)


def parameters(image):
    return Image.open(image["file"]).info.get("parameters", "")


with tempfile.TemporaryDirectory() as out:
    port = free_port()
    log = open(os.path.join(out, "serve.log"), "w")
    # sdserve refuses SDSERVE_* variables that are not its keys (CI exports SDSERVE_CMAKE_ARGS).
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDSERVE_")}
    server = subprocess.Popen([binary, "serve", "--port", str(port)], stdout=log, stderr=log,
                              env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if urllib.request.urlopen(url + "/readyz", timeout=2).status == 200:
                    break
            except Exception:
                pass
            if server.poll() is not None:
                fail("sdserve exited: " + open(os.path.join(out, "serve.log")).read())
            time.sleep(0.1)
        run = subprocess.run([node, os.path.join(here, "client.js")],
                             env=dict(os.environ, SDAPI_URL=url, OUT=out, FIXTURES=fixtures),
                             capture_output=True, text=True, timeout=600)
        text = run.stdout + run.stderr
        if run.returncode != 0:
            fail(f"the client exited {run.returncode}", text)
        print(text)
        lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
        listing = lines[0]
        calls = {c["call"]: c for c in lines[1:]}
        if "Euler a" not in listing["samplers"] or not listing["models"]:
            fail("samplers or models are not listed as A1111 lists them", text)

        t = calls["txt2img"]
        check_images(t, 2, (64, 64), text)
        if t["seeds"] != [1234, 1235]:
            fail(f"txt2img seeds are {t['seeds']}", text)
        for k, image in enumerate(t["images"]):
            want = ("a lighthouse at dusk\nNegative prompt: blurry\nSteps: 4, Sampler: Euler a, "
                    f"Schedule type: Automatic, CFG scale: 7, Seed: {1234 + k}, Size: 64x64, "
                    "Model: tiny-sd15, Version: sdserve")
            if parameters(image) != want or t["infotexts"][k] != want:
                fail(f"txt2img image {k}'s parameters are {parameters(image)!r}, not {want!r}",
                     text)

        i = calls["img2img"]
        check_images(i, 1, (96, 64), text)
        p = parameters(i["images"][0])
        if "Denoising strength: 0.6" not in p or "Mask blur" in p or "Seed: 99," not in p:
            fail(f"img2img parameters are {p!r}", text)

        m = calls["inpaint"]
        # Only masked (the client's default): the 64x64 pass is pasted back into the picture.
        check_images(m, 1, (96, 64), text)
        p = parameters(m["images"][0])
        if "Denoising strength: 0.75, Mask blur: 4" not in p:
            fail(f"inpainting parameters are {p!r}", text)
        if m["parameters"].get("inpaint_full_res") is not True:
            fail(f"the answer's parameters: {m['parameters']}", text)
        picture = Image.open(os.path.join(fixtures, "img2img-init-96x64.png")).convert("RGB")
        mask = Image.open(os.path.join(fixtures, "inpaint-mask-96x64.png")).convert("L")
        result = Image.open(m["images"][0]["file"]).convert("RGB")
        painted = [(x, y) for x in range(96) for y in range(64) if mask.getpixel((x, y)) == 255]
        # The blur (4 px) reaches 10 px: beyond 11 px of the mask the picture must be the
        # original's to the byte; inside the mask it must be redrawn.
        near = mask.filter(ImageFilter.MaxFilter(23))  # 11 px either side
        far = [(x, y) for x in range(96) for y in range(64) if near.getpixel((x, y)) == 0]
        kept = sum(result.getpixel(q) == picture.getpixel(q) for q in far)
        same = sum(result.getpixel(q) == picture.getpixel(q) for q in painted)
        if len(far) < 100 or kept != len(far):
            fail(f"{kept} of {len(far)} pixels far from the mask kept the picture's values", text)
        if same > len(painted) // 2:
            fail(f"{same} of {len(painted)} pixels in the mask are the picture's: not redrawn",
                 text)
        print("a1111-webui-api client: OK")
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
