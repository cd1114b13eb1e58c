#!/usr/bin/env python3
"""Runs tests/a1111/a1111_client.py, an unmodified A1111 API client, against the real sdserve
binary on a loopback port (the bundled tiny model, CPU), and checks what it printed and saved:
images with the exact UTF-8 prompt and A1111's fields in A1111's order, progress with a preview,
and an interrupt that stops the caller's job.

    a1111_client_test.py SDSERVE_BINARY
Exit 77 (ctest: skipped) where python3-requests or python3-pil is missing; CI installs them.
"""
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

try:
    import requests  # noqa: F401  (the client needs it)
    from PIL import Image  # a PNG library reads the metadata back
except ImportError:
    print("skipped: needs python3-requests and python3-pil (Debian: apt-get install "
          "python3-requests python3-pil)")
    sys.exit(77)

binary = sys.argv[1]
here = os.path.dirname(os.path.abspath(__file__))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fail(message, output=""):
    print("FAIL:", message)
    if output:
        print("--- client output ---\n" + output)
    sys.exit(1)


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
        run = subprocess.run([sys.executable, os.path.join(here, "a1111_client.py")],
                             env=dict(os.environ, SDAPI_URL=url, OUT=out),
                             capture_output=True, text=True, timeout=600)
        text = run.stdout + run.stderr
        if run.returncode != 0:
            fail(f"the client exited {run.returncode}", text)
        print(text)
        if "Euler a" not in text or "DPM++ 2M" not in text:
            fail("samplers are not listed by their A1111 names", text)
        for k, seed in ((0, 1234), (1, 1235)):
            path = os.path.join(out, f"txt2img-{k}.png")
            if not os.path.exists(path) or open(path, "rb").read(8) != b"\x89PNG\r\n\x1a\n":
                fail(f"{path} is not a PNG", text)
            # The infotext as /png-info read it back: the exact UTF-8 prompt, then A1111's
            # fields in A1111's order.
            info = re.search(rf"txt2img-{k}\.png: '(.*)'$", text, re.M)
            if not info:
                fail(f"no png-info line for image {k}", text)
            want = (r"a lighthouse at dusk, café 東京\nNegative prompt: blurry\nSteps: 4, "
                    r"Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: " + str(seed)
                    + r", Size: 64x64, Model: tiny-sd15, Clip skip: 2, Version: sdserve")
            if info.group(1) != want:
                fail(f"image {k}'s infotext is\n  {info.group(1)}\nnot\n  {want}", text)
            # The same text as a PNG library reads it from the file (iTXt: UTF-8, exact).
            read = Image.open(path).info.get("parameters")
            if read != want.replace("\\n", "\n"):
                fail(f"PIL reads image {k}'s parameters as {read!r}", text)
        if not re.search(r"^progress 0\.\d+, eta [\d.]+ s, step \d+/150, preview \d+ bytes$", text, re.M):
            fail("no progress with a preview image while the long job ran", text)
        if "interrupted: True images: 0" not in text:
            fail("the interrupt did not stop the caller's job", text)
        # Fields that would change the image and are not implemented: refused by name.
        for body, field in (({"prompt": "x", "enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"},
                             "hr_upscaler"),
                            ({"prompt": "x", "cfg": 7}, "cfg"),
                            ({"prompt": "x", "cfg_scale": "seven"}, "cfg_scale"),
                            ({"prompt": "x", "sampler_name": "Euler b"}, "sampler_name"),
                            ({"prompt": "x", "scheduler": "Exponential"}, "scheduler"),
                            ({"prompt": "x", "subseed_strength": 0.5}, "subseed_strength"),
                            ({"prompt": "x", "alwayson_scripts": {"controlnet": {}}},
                             "alwayson_scripts"),
                            ({"prompt": "x", "override_settings": {"sd_model_checkpoint": "sdxl"}},
                             "override_settings.sd_model_checkpoint"),
                            ({"prompt": "x", "batch_size": 0}, "batch_size")):
            r = requests.post(f"{url}/sdapi/v1/txt2img", json=body)
            err = r.json().get("error", {})
            if r.status_code != 400 or err.get("field") != field:
                fail(f"{body} answered {r.status_code} {r.text}, not 400 naming {field}")
        # Harmless fields are accepted and ignored.
        r = requests.post(f"{url}/sdapi/v1/txt2img",
                          json={"prompt": "x", "steps": 1, "save_images": True, "tiling": False,
                                "hr_scale": 2, "denoising_strength": 0.7, "styles": []})
        if r.status_code != 200 or len(r.json()["images"]) != 1:
            fail(f"harmless fields refused: {r.status_code} {r.text[:300]}")
        print("a1111 client: OK")
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
