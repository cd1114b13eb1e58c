#!/usr/bin/env python3
"""An A1111 API client as people write them, from the web UI's documented API (the wiki's
"API" page and /docs): nothing in it knows it talks to sdserve. Lists samplers and models,
generates with txt2img (saving each base64 PNG with its infotext), reads the PNG info back,
follows /progress while a longer job runs and stops it with /interrupt.

    SDAPI_URL=http://127.0.0.1:7860 OUT=/tmp/out python3 a1111_client.py
"""
import base64
import json
import os
import threading
import time

import requests

url = os.environ.get("SDAPI_URL", "http://127.0.0.1:7860")
out = os.environ.get("OUT", ".")

samplers = [s["name"] for s in requests.get(f"{url}/sdapi/v1/samplers").json()]
print("samplers:", ", ".join(samplers))
models = requests.get(f"{url}/sdapi/v1/sd-models").json()
print("models:", [m["title"] for m in models])
opts = requests.get(f"{url}/sdapi/v1/options").json()
print("checkpoint:", opts["sd_model_checkpoint"])

payload = {
    "prompt": "a lighthouse at dusk, café 東京",
    "negative_prompt": "blurry",
    "steps": 4,
    "cfg_scale": 7,
    "sampler_name": "Euler a",
    "scheduler": "Automatic",
    "seed": 1234,
    "batch_size": 2,
    "n_iter": 1,
    "restore_faces": False,
    "tiling": False,
    "do_not_save_samples": True,
    "override_settings": {"CLIP_stop_at_last_layers": 2,
                          "sd_model_checkpoint": opts["sd_model_checkpoint"]},
    "override_settings_restore_afterwards": True,
}
response = requests.post(url=f"{url}/sdapi/v1/txt2img", json=payload)
response.raise_for_status()
r = response.json()
info = json.loads(r["info"])
print("seeds:", info["all_seeds"])
for i, image_b64 in enumerate(r["images"]):
    data = base64.b64decode(image_b64.split(",", 1)[0])
    path = os.path.join(out, f"txt2img-{i}.png")
    with open(path, "wb") as f:
        f.write(data)
    png_payload = {"image": "data:image/png;base64," + image_b64}
    response2 = requests.post(url=f"{url}/sdapi/v1/png-info", json=png_payload)
    response2.raise_for_status()
    print(f"{path}: {response2.json().get('info')!r}")

# A longer job in the background: watch its progress, then interrupt it.
long_payload = {"prompt": "a slow one", "steps": 150, "seed": 7}
result = {}
worker = threading.Thread(
    target=lambda: result.update(
        requests.post(url=f"{url}/sdapi/v1/txt2img", json=long_payload).json()))
worker.start()
seen_progress = 0.0
for _ in range(600):
    p = requests.get(f"{url}/sdapi/v1/progress").json()
    seen_progress = max(seen_progress, p["progress"])
    if p["progress"] > 0.02 and p.get("current_image"):
        print(f"progress {p['progress']:.2f}, eta {p['eta_relative']:.1f} s,"
              f" step {p['state']['sampling_step']}/{p['state']['sampling_steps']}, preview"
              f" {len(base64.b64decode(p['current_image']))} bytes")
        break
    time.sleep(0.05)
requests.post(f"{url}/sdapi/v1/interrupt")
worker.join(timeout=120)
print("interrupted:", json.loads(result["info"]).get("interrupted"), "images:", len(result["images"]))
