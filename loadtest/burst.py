#!/usr/bin/env python3
"""Submit a burst of jobs to a running sdserve and report latency and throughput.

    loadtest/burst.py --url http://127.0.0.1:8080 --jobs 16 --steps 30 --size 512

Standard library only. Waits for /readyz, submits every job at once through POST /v1/jobs,
polls GET /v1/jobs/{id} until each is final, then prints images/s and latency percentiles.
"""
import argparse
import json
import time
import urllib.error
import urllib.request


def call(url, body=None, timeout=30):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.status, json.loads(resp.read() or b"null")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--jobs", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--sampler", default="euler")
    ap.add_argument("--ready-timeout", type=float, default=300)
    a = ap.parse_args()

    deadline = time.time() + a.ready_timeout
    while True:
        try:
            if call(a.url + "/readyz")[0] == 200:
                break
        except (urllib.error.URLError, ConnectionError):
            pass
        if time.time() > deadline:
            raise SystemExit("service not ready in time")
        time.sleep(0.5)

    start = time.time()
    submitted = {}
    for i in range(a.jobs):
        body = {"prompt": f"a photograph of a lighthouse, variation {i}", "steps": a.steps,
                "width": a.size, "height": a.size, "sampler": a.sampler, "seed": i}
        status, job = call(a.url + "/v1/jobs", body)
        submitted[job["id"]] = time.time()
    done = {}
    while len(done) < len(submitted):
        for job_id in submitted:
            if job_id in done:
                continue
            _, job = call(f"{a.url}/v1/jobs/{job_id}")
            if job["status"] not in ("queued", "running"):
                done[job_id] = (time.time(), job["status"])
        time.sleep(0.05)
    wall = max(t for t, _ in done.values()) - start
    lat = sorted(done[j][0] - submitted[j] for j in submitted)
    ok = sum(1 for _, s in done.values() if s == "succeeded")
    pct = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))]
    print(f"{ok}/{a.jobs} succeeded in {wall:.2f} s: {ok / wall:.2f} images/s; latency "
          f"p50 {pct(0.5):.2f} s, p90 {pct(0.9):.2f} s, max {lat[-1]:.2f} s "
          f"({a.size}x{a.size}, {a.steps} steps, {a.sampler})")


if __name__ == "__main__":
    main()
