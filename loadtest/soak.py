#!/usr/bin/env python3
"""Soak one sdserve process under mixed valid and hostile traffic.

    loadtest/soak.py                                  # starts build/sdserve, 10 minutes
    loadtest/soak.py --duration 60 --warmup 15 --skip-probes deep_json,long_word
    loadtest/soak.py --url http://127.0.0.1:8080 --pid 1234 --stop
    loadtest/soak.py --csv soak.csv -- --max-queue 128   # flags after -- go to `sdserve serve`

The standard library and websocket-client (Debian: python3-websocket). Worker threads loop over
a weighted mix of valid traffic (jobs followed over their WebSocket, /v1/generate, status reads,
cancels, /v1/events multi-subscribe) and hostile probes (--list-probes). Every --sample seconds
the server's RSS and thread count and the job and probe counters go to the CSV. It passes (exit
0) when the server is alive at the end, every valid job succeeded (or was cancelled by the soak
itself), every valid request got the right answer, every probe got a well-formed answer and none
hung, RSS at the end grew at most --rss-tolerance over RSS just after warm-up, and the server
exits 0 within 60 s of SIGTERM. Exit 1 when it fails, 2 when it could not start. Nothing here
waits without a timeout.
"""
import argparse
import base64
import collections
import csv
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

try:
    import websocket  # websocket-client: Debian's python3-websocket
except ImportError:
    sys.exit("soak.py: needs websocket-client (Debian: apt-get install python3-websocket)")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINAL = ("succeeded", "failed", "cancelled", "expired", "timed_out")
SAMPLERS = ["euler", "euler_ancestral", "heun", "dpmpp_2m", "lms", "ddim", "pndm", "uni_pc",
            "DPM++ 2M Karras", "Euler a"]
PROMPTS = ["a lighthouse at dusk", "a cat on a windowsill", "a red bicycle in the rain",
           "portrait of an old sailor, oil painting", "a bowl of ramen, studio light",
           "snowy mountains under a violet sky", "ünïcödé prompt: 猫と月 🌙"]

# name: (weight, kind); valid ones always expect success, hostile ones a clean refusal.
VALID = collections.OrderedDict([
    ("job_ws", 30), ("generate", 12), ("status", 10), ("cancel", 5), ("multi", 5)])
HOSTILE = collections.OrderedDict([
    ("malformed_json", 3), ("deep_json", 1), ("too_large", 1), ("bad_fields", 4),
    ("bad_utf8_body", 2), ("bad_utf8_url", 2), ("chunked_trailer", 1), ("slowloris", 1),
    ("ws_vanish", 2), ("ws_noread", 0.5), ("long_word", 0.5), ("big_prompt", 0.7),
    ("many_subscribes", 0.4), ("random_ids", 3)])
PROBE_HELP = {
    "job_ws": "POST /v1/jobs, follow /v1/jobs/{id}/events to the final event and the close",
    "generate": "POST /v1/generate: one PNG, or JSON with base64 images for num_images 2",
    "status": "GET a recent job, one of its images, /healthz, /readyz, /metrics, /v1/models...",
    "cancel": "POST a 40-step job, DELETE it once running, expect cancelled (or succeeded)",
    "multi": "/v1/events: submit 3 jobs, subscribe to each, read to their final events",
    "malformed_json": "truncated / trailing-garbage / NaN JSON bodies: 400",
    "deep_json": "a prompt that is a 100000-deep array (200 KB): 4xx",
    "too_large": "a body of max_body_bytes + 1 (Content-Length or chunked): 413",
    "bad_fields": "unknown fields, wrong types, out-of-range values, 1e400, null: 400",
    "bad_utf8_body": "invalid UTF-8 (and a lone \\ud800 escape) inside the JSON prompt: 4xx",
    "bad_utf8_url": "raw and %-encoded invalid UTF-8 in the path, plain and WebSocket: 4xx",
    "chunked_trailer": "a chunked POST whose trailer is 100 KB: 4xx or 202",
    "slowloris": "headers sent byte by byte, then the client vanishes (close or RST)",
    "ws_vanish": "WebSocket clients that reset mid-handshake, mid-stream or mid-frame",
    "ws_noread": "/v1/events: 16 MB of subscribes with long garbage ids, never reading; parked",
    "long_word": "a valid job whose prompt is one 128 KB word: 4xx, or final within 15 s",
    "big_prompt": "a valid job with a 900 KB prompt: 4xx, or final within 15 s",
    "many_subscribes": "5000 subscribes to one finished job on one /v1/events socket",
    "random_ids": "GET/DELETE/images/events for random and odd job ids: 404",
}
BAD_OUTCOMES = ("hung", "malformed", "dropped", "server_error", "slow", "error")


class Hung(Exception):
    """No answer before the deadline."""


class Malformed(Exception):
    """An answer that is not well-formed HTTP / WebSocket."""


class Closed(Exception):
    """The peer closed (or reset) the connection before answering."""


class Refused(Exception):
    """Nothing listens: the server is gone."""


class Fail(Exception):
    """A valid request got a wrong answer."""


# ------------------------------------------------------------------------------------------------
# HTTP/1.1 over plain sockets (hostile requests are bytes no HTTP library would send) and
# WebSockets through websocket-client: every read bounded by a deadline

HARD_STOP = [float("inf")]  # when the soak ends, every socket gives up by this time


class Conn:
    def __init__(self, host, port, deadline, stop_aware=True):
        self.deadline = deadline
        self.stop_aware = stop_aware
        self.buf = b""
        left = min(deadline, HARD_STOP[0] if stop_aware else deadline) - time.time()
        if left <= 0:
            raise Hung("deadline passed before connecting")
        try:
            self.sock = socket.create_connection((host, port), timeout=min(left, 10))
        except ConnectionRefusedError as e:
            raise Refused(str(e))
        except socket.timeout:
            raise Hung("connect timed out")
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _arm(self):
        # Short slices, so that the end of the soak (HARD_STOP) interrupts a blocked call too.
        left = min(self.deadline, HARD_STOP[0] if self.stop_aware else self.deadline) - \
            time.time()
        if left <= 0:
            raise Hung("timed out")
        self.sock.settimeout(min(left, 0.5))

    def send(self, data):
        view = memoryview(data)
        while view:
            try:
                self._arm()
            except Hung:
                raise Hung("send timed out (the server stopped reading)")
            try:
                view = view[self.sock.send(view[:1 << 18]):]
            except socket.timeout:
                continue
            except (BrokenPipeError, ConnectionResetError) as e:
                raise Closed(f"send: {e}")

    def fill(self):
        while True:
            try:
                self._arm()
            except Hung:
                raise Hung("no answer in time")
            try:
                chunk = self.sock.recv(65536)
                break
            except socket.timeout:
                continue
            except ConnectionResetError:
                raise Closed("connection reset")
        if not chunk:
            raise Closed("connection closed")
        self.buf += chunk

    def read_line(self, limit=65536):
        while b"\r\n" not in self.buf:
            if len(self.buf) > limit:
                raise Malformed("line too long")
            self.fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def read_exact(self, n):
        while len(self.buf) < n:
            self.fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def read_to_eof(self, limit=64 << 20):
        while len(self.buf) < limit:
            try:
                self.fill()
            except Closed:
                break
        data, self.buf = self.buf, b""
        return data

    def abort(self):
        """Vanish: close with a reset instead of a FIN."""
        reset(self.sock)
        self.close()

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def reset(sock):
    """Makes the socket's close send a reset instead of a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


class Response:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        try:
            return json.loads(self.body)
        except ValueError:
            raise Malformed(f"{self.status} body is not JSON: {self.body[:80]!r}")

    def is_json_error(self):
        if not self.headers.get("content-type", "").startswith("application/json"):
            return False
        try:
            err = json.loads(self.body).get("error")
        except (ValueError, AttributeError):
            return False
        return isinstance(err, dict) and isinstance(err.get("type"), str) and \
            isinstance(err.get("message"), str)

    def describe(self):
        if self.is_json_error():
            err = json.loads(self.body)["error"]
            return f"{self.status} {err['type']}"
        return f"{self.status} {self.headers.get('content-type', '-')} {len(self.body)} B"


def read_response(conn, method="GET"):
    while True:
        line = conn.read_line()
        m = re.match(rb"HTTP/1\.[01] (\d{3})(?: .*)?$", line)
        if not m:
            raise Malformed(f"bad status line {line[:80]!r}")
        status = int(m.group(1))
        headers = {}
        while True:
            h = conn.read_line()
            if not h:
                break
            if b":" not in h:
                raise Malformed(f"bad header line {h[:80]!r}")
            k, v = h.split(b":", 1)
            headers[k.strip().lower().decode("latin-1")] = v.strip().decode("latin-1")
            if len(headers) > 200:
                raise Malformed("too many headers")
        if 100 <= status < 200 and status != 101:
            continue  # 100 Continue: the real answer follows
        break
    if method == "HEAD" or status in (101, 204, 304):
        return Response(status, headers, b"")
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = b""
        while True:
            size_line = conn.read_line().split(b";")[0].strip()
            try:
                size = int(size_line, 16)
            except ValueError:
                raise Malformed(f"bad chunk size {size_line[:40]!r}")
            if size == 0:
                while conn.read_line():
                    pass
                break
            body += conn.read_exact(size)
            if conn.read_exact(2) != b"\r\n":
                raise Malformed("chunk not followed by CRLF")
        return Response(status, headers, body)
    if "content-length" in headers:
        try:
            n = int(headers["content-length"])
        except ValueError:
            raise Malformed("bad Content-Length")
        return Response(status, headers, conn.read_exact(n))
    return Response(status, headers, conn.read_to_eof())


class Client:
    def __init__(self, host, port, stop_aware=True):
        self.host, self.port, self.stop_aware = host, port, stop_aware

    def raw(self, data, deadline, method="GET", early_answer=False):
        """Sends raw bytes and reads one answer. With early_answer, a send that fails because
        the server already answered and closed still reads that answer."""
        conn = Conn(self.host, self.port, deadline, self.stop_aware)
        try:
            try:
                conn.send(data)
            except Closed:
                if not early_answer:
                    raise
            return read_response(conn, method)
        finally:
            conn.close()

    def request(self, method, path, body=None, deadline=None, headers=None, raw_body=None):
        if isinstance(path, str):
            path = path.encode()
        if body is not None:
            raw_body = json.dumps(body).encode()
        head = {"Host": f"{self.host}:{self.port}", "Connection": "close"}
        if raw_body is not None:
            head.update({"Content-Type": "application/json", "Content-Length": len(raw_body)})
        head.update(headers or {})  # replaces a default of the same name (Connection: Upgrade)
        data = method.encode() + b" " + path + b" HTTP/1.1\r\n" + \
            "".join(f"{k}: {v}\r\n" for k, v in head.items()).encode() + b"\r\n" + \
            (raw_body or b"")
        return self.raw(data, deadline, method, early_answer=raw_body is not None)


class WebSocket:
    """A WebSocket client (websocket-client, Debian's python3-websocket) whose every read is
    bounded by a deadline and by the end of the soak (HARD_STOP). A handshake the server refuses
    leaves `accepted` false and `refusal` saying why; probes that need the refusal's body send
    the upgrade as a plain request instead (Soak.upgrade)."""

    def __init__(self, host, port, path, deadline):
        self.deadline = deadline
        self.closed = False
        self.refusal = None
        self.ws = None
        conn = Conn(host, port, deadline)  # connect errors as Refused / Hung, like HTTP
        try:
            conn.sock.settimeout(max(0.1, min(deadline, HARD_STOP[0]) - time.time()))
            # No Origin: a script is not a web page (the service refuses foreign origins).
            self.ws = websocket.create_connection(
                f"ws://{host}:{port}{path}", socket=conn.sock, suppress_origin=True,
                skip_utf8_validation=True)  # checked in recv(), in C rather than in Python
        except websocket.WebSocketBadStatusException as e:
            conn.close()
            self.refusal = f"{e.status_code} (handshake refused)"
        except Exception as e:
            conn.close()
            raise _mapped(e, "handshake")

    @property
    def accepted(self):
        return self.ws is not None

    def set_deadline(self, deadline):
        self.deadline = deadline

    def _left(self, what):
        left = min(self.deadline, HARD_STOP[0]) - time.time()
        if left <= 0:
            raise Hung(what)
        return left

    def _read(self, fn):
        # Short slices, so that the end of the soak interrupts a blocked read too; the library
        # keeps a partly read frame across timeouts.
        while True:
            self.ws.settimeout(min(self._left("no WebSocket message in time"), 0.5))
            try:
                return fn()
            except websocket.WebSocketTimeoutException:
                continue
            except Exception as e:
                raise _mapped(e, "recv")

    def send_text(self, text):
        # One timeout for the whole message: a send cut short would leave half a frame.
        self.ws.settimeout(self._left("send timed out (the server stopped reading)"))
        try:
            self.ws.send(text)
        except Exception as e:
            raise _mapped(e, "send")

    def recv(self):
        """Returns ("text", str), ("binary", bytes) or ("close", code). The library answers
        pings and the server's close frame, and joins fragments."""
        op, frame = self._read(self.ws.recv_data_frame)
        if frame.mask:
            raise Malformed("the server masked a frame")
        if op == websocket.ABNF.OPCODE_CLOSE:
            self.closed = True
            return "close", struct.unpack(">H", frame.data[:2])[0] if len(frame.data) >= 2 else 1005
        if op == websocket.ABNF.OPCODE_TEXT:
            try:
                return "text", frame.data.decode("utf-8")
            except UnicodeDecodeError:
                raise Malformed("text frame is not UTF-8")
        return "binary", frame.data

    def recv_json(self):
        kind, data = self.recv()
        if kind != "text":
            return kind, data
        try:
            return "json", json.loads(data)
        except ValueError:
            raise Malformed(f"text frame is not JSON: {data[:80]!r}")

    def close(self, code=1000, wait=5.0):
        """Clean close: our close frame, then the server's, then the socket. True when clean."""
        self.deadline = min(self.deadline, time.time() + wait)
        try:
            if not self.closed:
                self.closed = True
                self.ws.settimeout(self._left("close timed out"))
                try:
                    self.ws.send_close(code)
                except Exception as e:
                    raise _mapped(e, "close")
            while self._read(self.ws.recv_frame).opcode != websocket.ABNF.OPCODE_CLOSE:
                pass  # raw frames: recv_data_frame would answer the close a second time
            return True
        except Closed:
            return True  # the server closed first (after its own close frame)
        except (Hung, Malformed):
            return False
        finally:
            self.ws.shutdown()

    def send_partial_frame(self):
        """The first 16 bytes of a 100-byte text frame, the rest never sent."""
        frame = websocket.ABNF.create_frame("x" * 100, websocket.ABNF.OPCODE_TEXT).format()
        self.ws.sock.sendall(frame[:16])

    def abort(self):
        """Vanish: close with a reset."""
        if self.ws.sock:
            reset(self.ws.sock)
        self.ws.shutdown()


def _mapped(e, op):
    """The library's and the socket's errors as this tool's outcomes."""
    if isinstance(e, (Hung, Closed, Malformed, Refused)):
        return e
    if isinstance(e, (websocket.WebSocketTimeoutException, socket.timeout)):
        return Hung(f"{op} timed out" + (" (the server stopped reading)" if op == "send" else ""))
    if isinstance(e, (websocket.WebSocketConnectionClosedException, ConnectionError)):
        return Closed(f"{op}: {e}")
    if isinstance(e, websocket.WebSocketException):
        return Malformed(f"{op}: {type(e).__name__}: {e}")
    return e


# ------------------------------------------------------------------------------------------------
# Server process

class Server:
    def __init__(self, args):
        self.args = args
        self.proc = None
        self.pid = args.pid
        self.log_path = None
        self.exit_code = None

    def start(self, deadline):
        a = self.args
        binary = a.binary if os.path.isabs(a.binary) else os.path.join(REPO, a.binary)
        if not os.access(binary, os.X_OK):
            raise SystemExit(f"no executable at {binary} (build first, or pass --binary)")
        extra = list(a.server_args)
        argv = [binary, "serve", "--host", "127.0.0.1", "--port", str(a.port)]
        if "--model" not in extra:
            argv += ["--model", os.path.join(REPO, "models", "tiny-sd15")]
        if "--device" not in extra:
            argv += ["--device", "cpu"]
        if not any(x.startswith("--result-ttl-s") for x in extra):
            # Images are kept result_ttl_s (an hour by default): a short one lets what the
            # server retains by design reach its steady state during the warm-up.
            argv += ["--result-ttl-s", "30"]
        argv += extra
        self.log_path = a.server_log or os.path.join(
            tempfile.mkdtemp(prefix="soak-"), "server.log")
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=REPO)
        self.pid = self.proc.pid
        while time.time() < deadline:
            with open(self.log_path, "rb") as f:
                m = re.search(rb"listening on http://([^\s:]+):(\d+)", f.read())
            if m:
                return m.group(1).decode(), int(m.group(2))
            if self.proc.poll() is not None:
                raise SystemExit(f"sdserve exited with {self.proc.returncode} at start-up:\n" +
                                 self.log_tail())
            time.sleep(0.1)
        self.proc.kill()
        raise SystemExit("sdserve did not log 'listening on' in time:\n" + self.log_tail())

    def alive(self):
        if self.proc is not None:
            return self.proc.poll() is None
        try:
            with open(f"/proc/{self.pid}/status") as f:
                return not re.search(r"^State:\s+Z", f.read(), re.M)
        except OSError:
            return False

    def proc_status(self):
        """(rss_mb, threads) from /proc/PID/status, or (None, None) when it is gone."""
        try:
            with open(f"/proc/{self.pid}/status") as f:
                text = f.read()
            rss = int(re.search(r"^VmRSS:\s+(\d+) kB", text, re.M).group(1)) / 1024.0
            threads = int(re.search(r"^Threads:\s+(\d+)", text, re.M).group(1))
            return rss, threads
        except (OSError, AttributeError):
            return None, None

    def stop(self, wait):
        """SIGTERM, then wait; returns (exited, exit code or None, seconds)."""
        t0 = time.time()
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        if self.proc is not None:
            try:
                self.exit_code = self.proc.wait(timeout=max(0.1, wait))
                return True, self.exit_code, time.time() - t0
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                return False, None, time.time() - t0
        while time.time() - t0 < wait:
            if not self.alive():
                return True, None, time.time() - t0
            time.sleep(0.2)
        return False, None, time.time() - t0

    def log_tail(self, n=15):
        if not self.log_path:
            return ""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.log_path) - 65536))
                lines = f.read().decode("utf-8", "replace").splitlines()
            return "\n".join("    " + l[:300] for l in lines[-n:])
        except OSError:
            return ""


# ------------------------------------------------------------------------------------------------
# Shared state

class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.valid_submitted = 0
        self.valid_completed = 0
        self.valid_cancelled = 0  # cancelled by the soak itself: fine
        self.valid_failed = 0
        self.fail_reasons = collections.Counter()
        self.fail_examples = []
        self.latencies = []
        self.valid_ops = collections.Counter()
        self.valid_errors = collections.Counter()
        self.valid_error_examples = []
        self.hostile_sent = 0
        self.probes = collections.defaultdict(collections.Counter)
        self.probe_examples = {}
        self.probe_notes = collections.defaultdict(list)
        self.recent_done = collections.deque(maxlen=200)  # succeeded job ids
        self.in_flight = {}
        self.history = collections.deque(maxlen=40)

    def job_submitted(self):
        with self.lock:
            self.valid_submitted += 1

    def job_done(self, job_id, status, latency=None, reason=None, cancelled_by_us=False):
        with self.lock:
            if status == "succeeded":
                self.valid_completed += 1
                if latency is not None:
                    self.latencies.append(latency)
                if job_id:
                    self.recent_done.append((job_id, time.time()))
            elif status == "cancelled" and cancelled_by_us:
                self.valid_cancelled += 1
            else:
                self.valid_failed += 1
                key = reason or status
                self.fail_reasons[key.split(":")[0]] += 1
                if len(self.fail_examples) < 10:
                    self.fail_examples.append(f"{job_id or '-'}: {key}"[:600])

    def valid_error(self, op, what):
        with self.lock:
            self.valid_errors[op] += 1
            if len(self.valid_error_examples) < 10:
                self.valid_error_examples.append(f"{op}: {what}")

    def probe(self, name, outcome, detail=""):
        with self.lock:
            self.probes[name][outcome] += 1
            key = (name, outcome)
            if key not in self.probe_examples and detail:
                self.probe_examples[key] = detail

    def note(self, name, text):
        with self.lock:
            if len(self.probe_notes[name]) < 400:
                self.probe_notes[name].append(text)

    def a_done_job(self, rng, max_age=None):
        """A job this soak saw succeed (within max_age seconds), or None."""
        with self.lock:
            ids = [j for j, t in self.recent_done if max_age is None or time.time() - t < max_age]
        return rng.choice(ids) if ids else None

    def snapshot(self):
        with self.lock:
            return (self.valid_submitted, self.valid_completed, self.valid_failed,
                    self.hostile_sent)


class Soak:
    def __init__(self, args, host, port, server, stats):
        self.a, self.host, self.port = args, host, port
        self.http = Client(host, port)
        self.server = server
        self.stats = stats
        self.stop = threading.Event()
        self.hard_stop = float("inf")  # set when the traffic phase ends: in-flight ops get a grace
        self.parked = collections.deque()
        self.parked_lock = threading.Lock()
        self.t0 = time.time()

    def deadline(self, seconds):
        return min(time.time() + seconds, self.hard_stop)

    def body(self, rng, **over):
        b = {"prompt": f"{rng.choice(PROMPTS)}, variation {rng.randrange(10**6)}",
             "width": 64, "height": 64, "steps": rng.randint(2, 4),
             "sampler": rng.choice(SAMPLERS), "seed": rng.randrange(2**32),
             "guidance_scale": rng.choice([1.0, 7.5])}
        if rng.random() < 0.3:
            b["preview"] = {"every": 1, "format": rng.choice(["jpeg", "png"])}
        if rng.random() < 0.2:
            b["negative_prompt"] = "blurry"
        b.update(over)
        return b

    # -- valid traffic ---------------------------------------------------------------------------

    def submit(self, rng, body=None):
        """POST /v1/jobs for a valid job; returns its id or None (counted as failed)."""
        self.stats.job_submitted()
        try:
            res = self.http.request("POST", "/v1/jobs", body or self.body(rng),
                                    self.deadline(self.a.timeout))
        except (Hung, Closed, Malformed, Refused) as e:
            self.stats.job_done(None, "error", reason=f"submit {type(e).__name__}: {e}")
            if isinstance(e, Refused):
                time.sleep(0.2)
            return None
        if res.status != 202:
            self.stats.job_done(None, "error", reason=f"submit refused: {res.describe()}")
            return None
        try:
            job = res.json()
        except Malformed:
            job = {}
        if not isinstance(job, dict) or not isinstance(job.get("id"), str) or \
                job.get("status") not in ("queued", "running"):
            self.stats.job_done(None, "error", reason=f"submit answer without id: {res.body[:80]}")
            return None
        return job["id"]

    def job_status(self, job_id, seconds=None):
        res = self.http.request("GET", f"/v1/jobs/{job_id}", None,
                                self.deadline(seconds or self.a.timeout))
        if res.status != 200:
            raise Fail(f"GET /v1/jobs/{job_id}: {res.describe()}")
        return res.json()

    def wait_final(self, job_id, until):
        """Polls GET /v1/jobs/{id} until final or until the deadline; returns the status."""
        status = None
        while time.time() < min(until, self.hard_stop):
            status = self.job_status(job_id)["status"]
            if status in FINAL:
                return status
            time.sleep(0.1)
        return status

    def v_job_ws(self, rng):
        t_submit = time.time()
        job_id = self.submit(rng)
        if not job_id:
            return
        until = t_submit + self.a.job_timeout
        final, clean, expect_binary = None, False, False
        try:
            ws = WebSocket(self.host, self.port, f"/v1/jobs/{job_id}/events", self.deadline(
                self.a.job_timeout))
            if not ws.accepted:
                raise Fail(f"events WebSocket refused: {ws.refusal}")
            ws.set_deadline(min(until, self.hard_stop))
            seen = []
            while True:
                kind, msg = ws.recv_json()
                if kind == "close":
                    break
                if kind == "binary":
                    if not expect_binary:
                        raise Fail("binary frame without a preview before it")
                    expect_binary = False
                    continue
                if kind != "json" or not isinstance(msg, dict) or "type" not in msg:
                    raise Fail(f"event is not a JSON object with a type: {str(msg)[:80]}")
                if expect_binary:
                    raise Fail("preview JSON not followed by its image")
                seen.append(msg["type"])
                expect_binary = msg["type"] == "preview"
                if msg["type"] in FINAL:
                    final = msg["type"]
                    clean = ws.close(wait=5)  # the server closes after the final event
                    break
            if final is None:
                raise Fail(f"WebSocket closed without a final event (saw {seen[-5:]})")
            if not clean:
                self.stats.valid_error("job_ws", "no clean close after the final event")
        except Hung:
            try:
                status = self.job_status(job_id, 2)["status"]
            except Exception as e:  # noqa: BLE001 - only for the message
                status = f"unknown ({type(e).__name__})"
            self.stats.job_done(job_id, "timeout", reason=f"timeout: no final event "
                                f"{time.time() - t_submit:.0f} s after submit (status {status})")
            return
        except (Fail, Malformed, Closed, Refused) as e:
            # The job may still be fine: the WebSocket is what broke.
            self.stats.valid_error("job_ws", f"{type(e).__name__}: {e}")
            try:
                final = self.wait_final(job_id, until)
            except Exception as e2:  # noqa: BLE001 - counted below
                final = f"unknown ({e2})"
        self.stats.job_done(job_id, final if final in FINAL else "unfinished",
                            time.time() - t_submit,
                            reason=None if final in FINAL else f"unfinished: {final}")
        if final == "succeeded" and rng.random() < 0.3:
            res = self.http.request("GET", f"/v1/jobs/{job_id}/images/0", None,
                                    self.deadline(self.a.timeout))
            if res.status != 200 or not res.body.startswith(b"\x89PNG\r\n\x1a\n"):
                raise Fail(f"image of a succeeded job: {res.describe()}")

    def v_generate(self, rng):
        n = 2 if rng.random() < 0.2 else 1
        body = self.body(rng, num_images=n)
        body.pop("preview", None)
        t0 = time.time()
        self.stats.job_submitted()
        try:
            res = self.http.request("POST", "/v1/generate", body, self.deadline(self.a.job_timeout))
        except Hung:
            self.stats.job_done(None, "timeout",
                                reason=f"timeout: /v1/generate no answer in {time.time() - t0:.0f} s"
                                f"{self.generate_diagnosis()}")
            return
        except (Closed, Malformed, Refused) as e:
            self.stats.job_done(None, "error", reason=f"generate {type(e).__name__}: {e}")
            if isinstance(e, Refused):
                time.sleep(0.2)
            return
        job_id = res.headers.get("x-job-id")
        if res.status != 200:
            self.stats.job_done(job_id, "error", reason=f"generate: {res.describe()}")
        elif n == 1 and not res.body.startswith(b"\x89PNG\r\n\x1a\n"):
            self.stats.job_done(job_id, "error", reason="generate: 200 without a PNG")
        elif n > 1 and len(res.json().get("images", [])) != n:
            self.stats.job_done(job_id, "error", reason="generate: JSON without its images")
        else:
            self.stats.job_done(job_id, "succeeded", time.time() - t0)

    def generate_diagnosis(self):
        """The job behind a /v1/generate that never answered: the server logs it as 499 once
        we hang up; say what GET /v1/jobs/{id} tells about it."""
        if not self.server.log_path:
            return ""
        time.sleep(0.5)
        try:
            with open(self.server.log_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.server.log_path) - (4 << 20)))
                ids = re.findall(rb"POST /v1/generate 499 .*job=([0-9a-f]+)", f.read())
            out = []
            for job_id in ids[-3:]:
                job = Client(self.host, self.port, stop_aware=False).request(
                    "GET", f"/v1/jobs/{job_id.decode()}", None, time.time() + 5).json()
                t = job.get("timings", {})
                out.append(f"{job_id.decode()} {job.get('status')} step {job.get('step')}/"
                           f"{job.get('steps')} x{job.get('num_images')} {t}")
            return f" (the server's 499 jobs: {'; '.join(out)})" if out else ""
        except Exception as e:  # noqa: BLE001 - a diagnosis only
            return f" (no diagnosis: {e})"

    def v_status(self, rng):
        job_id = self.stats.a_done_job(rng, 5)  # its images are still kept (result_ttl_s)
        choice = rng.random()
        if job_id and choice < 0.5:
            job = self.job_status(job_id)
            if job.get("status") != "succeeded" or job.get("id") != job_id:
                raise Fail(f"GET of a succeeded job says {str(job)[:120]}")
            return
        if job_id and choice < 0.65:
            res = self.http.request("GET", f"/v1/jobs/{job_id}/images/0", None,
                                    self.deadline(self.a.timeout))
            if res.status != 200 or not res.body.startswith(b"\x89PNG"):
                raise Fail(f"image of a succeeded job: {res.describe()}")
            return
        path = rng.choice(["/healthz", "/readyz", "/metrics", "/v1/models", "/v1/samplers"])
        res = self.http.request("GET", path, None, self.deadline(self.a.timeout))
        if res.status != 200:
            raise Fail(f"GET {path}: {res.describe()}")

    def v_cancel(self, rng):
        t0 = time.time()
        job_id = self.submit(rng, self.body(rng, steps=40, sampler="euler"))
        if not job_id:
            return
        until = t0 + self.a.job_timeout
        try:
            while time.time() < min(until, self.hard_stop):
                if self.job_status(job_id)["status"] != "queued":
                    break
                time.sleep(0.05)
            res = self.http.request("DELETE", f"/v1/jobs/{job_id}", None,
                                    self.deadline(self.a.timeout))
            if res.status not in (200, 409):
                self.stats.valid_error("cancel", f"DELETE: {res.describe()}")
            final = self.wait_final(job_id, until)
        except (Hung, Fail, Malformed, Closed, Refused) as e:
            self.stats.job_done(job_id, "error", reason=f"cancel {type(e).__name__}: {e}")
            raise
        if final not in FINAL:
            self.stats.job_done(job_id, "timeout",
                                reason=f"timeout: cancelled job still {final}")
        elif final == "cancelled" and res.status == 200:
            self.stats.job_done(job_id, "cancelled", cancelled_by_us=True)
        else:
            self.stats.job_done(job_id, final, time.time() - t0,
                                reason=f"{final} after DELETE answered {res.status}")

    def v_multi(self, rng):
        ws = WebSocket(self.host, self.port, "/v1/events", self.deadline(self.a.timeout))
        if not ws.accepted:
            raise Fail(f"/v1/events refused: {ws.refusal}")
        t0 = time.time()
        ids = [i for i in (self.submit(rng) for _ in range(3)) if i]
        pending = set(ids)
        acked = set()
        try:
            ws.set_deadline(self.deadline(self.a.job_timeout))
            for i in ids:
                ws.send_text(json.dumps({"subscribe": i}))
            if ids and rng.random() < 0.3:  # an unsubscribe and a re-subscribe on the way
                ws.send_text(json.dumps({"unsubscribe": ids[0]}))
                ws.send_text(json.dumps({"subscribe": ids[0]}))
            while pending:
                kind, msg = ws.recv_json()
                if kind == "close":
                    raise Fail(f"/v1/events closed by the server ({msg})")
                if kind != "json":
                    continue  # preview images
                t, j = msg.get("type"), msg.get("job_id")
                if t == "subscribed":
                    acked.add(j)
                elif t == "error":
                    raise Fail(f"/v1/events error: {str(msg)[:160]}")
                elif t in FINAL and j in pending:
                    pending.discard(j)
                    self.stats.job_done(j, t, time.time() - t0)
            if acked != set(ids):
                raise Fail(f"subscribe not acknowledged for {set(ids) - acked}")
            if not ws.close(wait=5):
                raise Fail("no clean close of /v1/events")
        except Hung:
            for j in pending:
                self.stats.job_done(j, "timeout", reason="timeout: no final event on /v1/events")
            pending.clear()
            ws.abort()
        except (Fail, Malformed, Closed, Refused) as e:
            ws.abort()
            for j in pending:
                try:
                    final = self.wait_final(j, t0 + self.a.job_timeout)
                except Exception:  # noqa: BLE001
                    final = None
                self.stats.job_done(j, final if final in FINAL else "unfinished",
                                    time.time() - t0)
            raise

    # -- hostile probes: each returns (outcome, detail) --------------------------------------------

    def expect_refusal(self, res, allowed=range(400, 500)):
        if res.status in allowed and res.is_json_error():
            return "ok", res.describe()
        if res.status >= 500:
            return "server_error", res.describe() + f" {res.body[:120]!r}"
        if 400 <= res.status < 500:
            return "malformed", "4xx without a JSON error body: " + res.describe()
        return "unexpected", res.describe()

    def upgrade(self, path):
        """A WebSocket handshake sent as a plain request, for probes that expect a refusal: the
        answer's body is read (websocket-client keeps only its status), and a path may hold
        bytes that are not UTF-8. The connection closes after the answer, even a 101."""
        return self.http.request("GET", path, None, self.deadline(self.a.timeout), headers={
            "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": 13,
            "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode()})

    def post_raw(self, raw_body, path="/v1/jobs", seconds=None):
        return self.http.request("POST", path, raw_body=raw_body,
                                 deadline=self.deadline(seconds or self.a.timeout))

    def accepted_job(self, res, name, limit):
        """A hostile but valid job got 202: it must be final within `limit` seconds."""
        job_id = res.json().get("id")
        t0 = time.time()
        final = self.wait_final(job_id, t0 + limit)
        took = time.time() - t0
        self.stats.note(name, f"202 -> {final} in {took:.1f} s")
        if final not in FINAL:
            return "slow", f"202, job {job_id} still {final} after {limit:.0f} s"
        return "ok", f"202, {final} in {took:.1f} s"

    def h_malformed_json(self, rng):
        raw = rng.choice([b'{"prompt": "a cat",', b'{"prompt": "a cat"} trailing', b"",
                          b'{"prompt": NaN}', b"{'prompt': 'a cat'}", b'{"prompt": "a\x00cat"}',
                          b'{"prompt" "a cat"}', b"\xef\xbb\xbf{", b"[" * 50])
        return self.expect_refusal(self.post_raw(raw, rng.choice(["/v1/jobs", "/v1/generate"])))

    def h_deep_json(self, rng):
        depth = 100000
        raw = b'{"prompt": ' + b"[" * depth + b"]" * depth + b', "width": 64, "steps": 2}'
        return self.expect_refusal(self.post_raw(raw, rng.choice(["/v1/jobs", "/v1/generate"])))

    def h_too_large(self, rng):
        n = self.a.max_body_bytes + 1
        body = b'{"prompt": "' + b"a" * (n - 14) + b'"}'
        assert len(body) == n
        if rng.random() < 0.5:
            res = self.post_raw(body)
        else:
            head = (f"POST /v1/jobs HTTP/1.1\r\nHost: {self.host}\r\nConnection: close\r\n"
                    "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
            chunks = b"".join(b"%x\r\n" % len(body[i:i + 65536]) + body[i:i + 65536] + b"\r\n"
                              for i in range(0, len(body), 65536)) + b"0\r\n\r\n"
            res = self.http.raw(head + chunks, self.deadline(self.a.timeout), "POST",
                                early_answer=True)
        return self.expect_refusal(res, (413,))

    def h_bad_fields(self, rng):
        base = '"prompt": "a cat", "width": 64, "height": 64, "steps": 2'
        variants = [
            '{%s, "bogus": 1}' % base, '{"prompt": 5, "width": 64, "steps": 2}',
            '{"prompt": null, "width": 64, "steps": 2}', '{"width": 64, "steps": 2}',
            '{%s, "steps": "4"}' % base, '{%s, "width": 65}' % base, '{%s, "width": 4096}' % base,
            '{%s, "steps": 0}' % base, '{%s, "steps": 1000}' % base, '{%s, "steps": -1}' % base,
            '{%s, "steps": 1e400}' % base, '{%s, "steps": 2.5}' % base,
            '{%s, "guidance_scale": 1e400}' % base, '{%s, "guidance_scale": -1e400}' % base,
            '{%s, "guidance_scale": 31}' % base, '{%s, "seed": 1e400}' % base,
            '{%s, "seed": 18446744073709551616}' % base, '{%s, "seed": -2}' % base,
            '{%s, "num_images": 17}' % base, '{%s, "num_images": 0}' % base,
            '{%s, "sampler": "nope"}' % base, '{%s, "sampler": "%s"}' % (base, "x" * 5000),
            '{%s, "scheduler": 7}' % base, '{%s, "clip_skip": 99}' % base,
            '{%s, "preview": {"every": 0}}' % base, '{%s, "preview": {"format": "gif"}}' % base,
            '{%s, "preview": []}' % base, '{%s, "priority": "urgent"}' % base,
            '{%s, "timeout_s": -1}' % base, '{%s, "timeout_s": 1e400}' % base,
            '{%s, "timeout_s": 999999}' % base, '{%s, "cancel_on_disconnect": "yes"}' % base,
            '{%s, "%s": 1}' % (base, "k" * 100000), '[]', '"a cat"', '42', 'null',
            '{%s, "negative_prompt": ["x"]}' % base, '{%s, "height": null}' % base]
        raw = rng.choice(variants).encode()
        res = self.post_raw(raw, rng.choice(["/v1/jobs", "/v1/generate"]))
        out = self.expect_refusal(res, (400,))
        if out[0] == "ok" and "field" not in json.loads(res.body)["error"]:
            return "unexpected", "400 without error.field: " + raw[:60].decode()
        return out[0], out[1] + " for " + raw[:60].decode()

    def h_bad_utf8_body(self, rng):
        bad = rng.choice([b"\xff\xfe", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\x80" * 10,
                          b"\xf8\x88\x80\x80\x80", b"a\xf4\x90\x80\x80b"])
        raw = b'{"prompt": "a ' + bad + b' cat", "width": 64, "height": 64, "steps": 2}'
        if rng.random() < 0.25:  # valid JSON text, invalid Unicode: refused, or a job that ends
            raw = b'{"prompt": "a \\ud800 cat", "width": 64, "height": 64, "steps": 2}'
            res = self.post_raw(raw)
            if res.status == 202:
                return self.accepted_job(res, "bad_utf8_body", 15)
            return self.expect_refusal(res)
        return self.expect_refusal(self.post_raw(raw, rng.choice(["/v1/jobs", "/v1/generate"])))

    def h_bad_utf8_url(self, rng):
        bad = rng.choice([b"\xff\xfe\x80", b"%ff%fe", b"\xc3", b"%c0%af", b"%00", b"\xed\xa0\x80"])
        path = rng.choice([b"/v1/jobs/" + bad, b"/v1/jobs/" + bad + b"/images/0",
                           b"/v1/" + bad, b"/v1/jobs/" + bad + b"/events"])
        if path.endswith(b"/events") and rng.random() < 0.5:
            res = self.upgrade(path)
            if res.status == 101:
                return "unexpected", "101 for a WebSocket on a bad job id"
            return self.expect_refusal(res)
        method = rng.choice(["GET", "DELETE", "POST"])
        return self.expect_refusal(self.http.request(method, path, None,
                                                     self.deadline(self.a.timeout)))

    def h_chunked_trailer(self, rng):
        body = json.dumps(self.body(rng)).encode()
        if rng.random() < 0.5:
            trailer = b"".join(b"X-Pad-%03d: %s\r\n" % (i, b"t" * 1000) for i in range(100))
        else:
            trailer = b"X-Pad: " + b"t" * 102400 + b"\r\n"
        data = (f"POST /v1/jobs HTTP/1.1\r\nHost: {self.host}\r\nConnection: close\r\n"
                "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
                "Trailer: X-Pad\r\n\r\n").encode() + \
            b"%x\r\n" % len(body) + body + b"\r\n0\r\n" + trailer + b"\r\n"
        res = self.http.raw(data, self.deadline(self.a.timeout), "POST", early_answer=True)
        if res.status == 202:
            return self.accepted_job(res, "chunked_trailer", self.a.job_timeout)
        return self.expect_refusal(res)

    def h_slowloris(self, rng):
        conn = Conn(self.host, self.port, self.deadline(self.a.timeout))
        head = (f"POST /v1/jobs HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                "Content-Length: 200\r\nX-Slow: ").encode() + b"z" * rng.randint(10, 60)
        if rng.random() < 0.3:
            head += b"\r\n\r\n" + b'{"prompt": "a'  # headers done, the body never comes
        n = rng.randint(len(head) // 2, len(head))
        early = ""
        try:
            for i in range(n):
                conn.send(head[i:i + 1])
                time.sleep(0.02)
                if self.stop.is_set() and time.time() > self.hard_stop - 1:
                    break
        except Closed:
            early = " (the server closed first)"
        if rng.random() < 0.5:
            conn.abort()
            return "ok", f"{n} bytes, then reset{early}"
        conn.close()
        return "ok", f"{n} bytes, then closed{early}"

    def h_ws_vanish(self, rng):
        mode = rng.choice(["mid_handshake", "mid_stream", "mid_frame"])
        if mode == "mid_handshake":
            conn = Conn(self.host, self.port, self.deadline(self.a.timeout))
            key = base64.b64encode(os.urandom(16))
            conn.send(b"GET /v1/events HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                      b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key +
                      b"\r\nSec-WebSocket-Version: 13\r\n" + (b"\r\n" if rng.random() < .5 else b""))
            time.sleep(0.05)
            conn.abort()
            return "ok", mode
        body = self.body(rng, steps=rng.randint(4, 10), preview={"every": 1},
                         cancel_on_disconnect=rng.random() < 0.5)
        res = self.http.request("POST", "/v1/jobs", body, self.deadline(self.a.timeout))
        if res.status != 202:
            return self.expect_refusal(res, (429,))
        job_id = res.json()["id"]
        path = f"/v1/jobs/{job_id}/events" if mode == "mid_stream" else "/v1/events"
        ws = WebSocket(self.host, self.port, path, self.deadline(self.a.timeout))
        if not ws.accepted:
            return "unexpected", f"WebSocket refused: {ws.refusal}"
        if mode == "mid_frame":
            ws.send_text(json.dumps({"subscribe": job_id}))
            ws.send_partial_frame()
        ws.recv()
        ws.abort()
        return "ok", mode

    def h_ws_noread(self, rng):
        ws = WebSocket(self.host, self.port, "/v1/events", self.deadline(self.a.timeout))
        if not ws.accepted:
            return "unexpected", f"/v1/events refused: {ws.refusal}"
        rss0 = self.server.proc_status()[0]
        sent, t0, closed = 0, time.time(), ""
        ws.set_deadline(self.deadline(6))
        try:
            while sent < self.a.noread_mb << 20 and time.time() - t0 < 5:
                gid = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789-_")
                              for _ in range(64)) * rng.randint(200, 900)
                ws.send_text(json.dumps({"subscribe": gid}))
                sent += len(gid) + 16
        except Closed:
            closed = ", then the server closed the connection"
        except Hung:
            closed = ", then the server stopped reading"
        time.sleep(1)
        rss1 = self.server.proc_status()[0]
        delta = (rss1 - rss0) if rss0 and rss1 else float("nan")
        self.stats.note("ws_noread", f"{sent / 1e6:.1f} MB sent in {time.time() - t0:.1f} s"
                        f"{closed}; server RSS {delta:+.0f} MB")
        if closed:
            ws.abort()
        else:
            with self.parked_lock:  # keep it open, never reading, up to --park of them
                self.parked.append(ws)
                old = self.parked.popleft() if len(self.parked) > self.a.park else None
            if old:
                old.abort()
        return "ok", f"{sent / 1e6:.1f} MB of subscribes{closed}, RSS {delta:+.0f} MB"

    def h_long_word(self, rng):
        body = self.body(rng, prompt="".join(rng.choice("abcdefghij") for _ in range(64)) * 2048,
                         steps=2)
        body.pop("preview", None)
        res = self.http.request("POST", "/v1/jobs", body, self.deadline(self.a.timeout))
        if res.status == 202:
            return self.accepted_job(res, "long_word", 15)
        return self.expect_refusal(res)

    def h_big_prompt(self, rng):
        words = ["a", "lighthouse", "at", "dusk", "with", "waves", "and", "gulls", "oil", "painting"]
        prompt = " ".join(rng.choice(words) for _ in range(900 * 1024 // 6))[:900 * 1024]
        body = self.body(rng, prompt=prompt, steps=2)
        body.pop("preview", None)
        res = self.http.request("POST", "/v1/jobs", body, self.deadline(self.a.timeout))
        if res.status == 202:
            return self.accepted_job(res, "big_prompt", 15)
        return self.expect_refusal(res)

    def h_many_subscribes(self, rng):
        job_id = self.stats.a_done_job(rng)
        if not job_id:
            return "skipped", "no finished job yet"
        ws = WebSocket(self.host, self.port, "/v1/events", self.deadline(self.a.timeout))
        if not ws.accepted:
            return "unexpected", f"/v1/events refused: {ws.refusal}"
        ws.set_deadline(self.deadline(30))
        total, acks, errors, finals, t0 = 5000, 0, 0, 0, time.time()
        kinds = collections.Counter()
        cmd = json.dumps({"subscribe": job_id})
        sent = 0
        while acks + errors < total:
            while sent < total and sent - (acks + errors) < 200:
                ws.send_text(cmd)
                sent += 1
            kind, msg = ws.recv_json()
            if kind == "close":
                return "malformed", f"server closed after {acks} acks ({msg})"
            if kind != "json":
                continue
            t = msg.get("type")
            if t == "subscribed":
                acks += 1
            elif t == "error":
                errors += 1
                kinds[str((msg.get("error") or {}).get("type"))] += 1
            elif t in FINAL:
                finals += 1
        clean = ws.close(wait=5)
        took = time.time() - t0
        self.stats.note("many_subscribes", f"{acks} acks, {errors} errors {dict(kinds)}, "
                        f"{finals} final events "
                        f"in {took:.1f} s, clean close {clean}")
        if not clean:
            return "malformed", "no clean close after 5000 subscribes"
        return "ok", f"{acks} acks + {errors} errors, {finals} finals in {took:.1f} s"

    def h_random_ids(self, rng):
        rid = rng.choice(["%032x" % rng.getrandbits(128), "%016x" % rng.getrandbits(64),
                          "..%2f..%2fetc%2fpasswd", "a" * 2000, "0", "%20", "-1",
                          "".join(rng.choice("0123456789abcdef") for _ in range(36))])
        what = rng.choice(["get", "delete", "image", "image_big", "events", "subscribe"])
        dl = self.deadline(self.a.timeout)
        if what == "events":
            res = self.upgrade(f"/v1/jobs/{rid}/events")
            if res.status == 101:
                return "unexpected", "101 for the events of a random job id"
            return self.expect_refusal(res, (404,))
        if what == "subscribe":
            ws = WebSocket(self.host, self.port, "/v1/events", dl)
            if not ws.accepted:
                return "unexpected", f"/v1/events refused: {ws.refusal}"
            ws.send_text(json.dumps({"subscribe": rid}))
            kind, msg = ws.recv_json()
            clean = ws.close(wait=5)
            if kind == "json" and msg.get("type") == "error" and clean:
                return "ok", "error event for a random id"
            return "malformed", f"subscribe to a random id: {kind} {str(msg)[:80]}, clean {clean}"
        path = {"get": f"/v1/jobs/{rid}", "delete": f"/v1/jobs/{rid}",
                "image": f"/v1/jobs/{rid}/images/0",
                "image_big": f"/v1/jobs/{rid}/images/99999999999999999999"}[what]
        return self.expect_refusal(self.http.request("DELETE" if what == "delete" else "GET",
                                                     path, None, dl), (404, 400))

    # -- the loop ------------------------------------------------------------------------------

    def worker(self, idx, names, weights):
        rng = random.Random(self.a.seed * 1000 + idx)
        while not self.stop.is_set():
            name = rng.choices(names, weights)[0]
            start = time.time()
            with self.stats.lock:
                self.stats.in_flight[idx] = (name, start)
            try:
                if name in VALID:
                    with self.stats.lock:
                        self.stats.valid_ops[name] += 1
                    try:
                        getattr(self, "v_" + name)(rng)
                    except Hung as e:
                        self.stats.valid_error(name, f"hung: {e}")
                    except (Fail, Malformed, Closed, Refused) as e:
                        self.stats.valid_error(name, f"{type(e).__name__}: {e}")
                        if isinstance(e, Refused):
                            time.sleep(0.2)  # nothing listens: do not spin
                else:
                    with self.stats.lock:
                        self.stats.hostile_sent += 1
                    try:
                        outcome, detail = getattr(self, "h_" + name)(rng)
                    except Hung as e:
                        outcome, detail = "hung", str(e)
                    except Malformed as e:
                        outcome, detail = "malformed", str(e)
                    except Closed as e:
                        outcome, detail = "dropped", str(e)
                    except Refused as e:
                        outcome, detail = "refused", str(e)
                        time.sleep(0.2)  # nothing listens: do not spin
                    except Fail as e:
                        outcome, detail = "error", str(e)
                    if outcome == "hung" and time.time() >= self.hard_stop:
                        outcome = "cut"  # the soak ended under it: not the server's fault
                    self.stats.probe(name, outcome, f"{detail} (t={start - self.t0:.0f} s)")
            except Exception as e:  # noqa: BLE001 - a bug in this tool must not stop the soak
                self.stats.valid_error("tool", f"{name}: {type(e).__name__}: {e}")
            with self.stats.lock:
                self.stats.in_flight.pop(idx, None)
                self.stats.history.append((round(start - self.t0, 1), idx, name,
                                           round(time.time() - start, 2)))

    def unpark(self):
        with self.parked_lock:
            while self.parked:
                self.parked.popleft().abort()


# ------------------------------------------------------------------------------------------------

def wait_ready(client, deadline):
    while time.time() < deadline:
        try:
            if client.request("GET", "/readyz", None, min(deadline, time.time() + 2)).status == 200:
                return True
        except (Hung, Closed, Malformed, Refused):
            pass
        time.sleep(0.2)
    return False


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else None


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")


def main():
    argv = sys.argv[1:]
    server_args = []
    if "--" in argv:
        i = argv.index("--")
        argv, server_args = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Flags after -- go to `sdserve serve`.")
    ap.add_argument("--binary", default="build/sdserve")
    ap.add_argument("--port", type=int, default=0, help="port for the started server")
    ap.add_argument("--url", help="attach to a running server instead of starting one")
    ap.add_argument("--pid", type=int, help="its process id (for RSS, threads, liveness)")
    ap.add_argument("--stop", action="store_true",
                    help="with --url: SIGTERM the attached server at the end")
    ap.add_argument("--duration", type=float, default=600, help="seconds of traffic")
    ap.add_argument("--warmup", type=float, default=60, help="seconds before the RSS baseline")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--sample", type=float, default=5, help="seconds between samples")
    ap.add_argument("--csv", default="soak.csv")
    ap.add_argument("--server-log", help="where the started server logs (default: a temp dir)")
    ap.add_argument("--probes", help="hostile probes to run, comma-separated (default: all)")
    ap.add_argument("--valid", help="valid operations to run, comma-separated (default: all)")
    ap.add_argument("--skip-probes", default="", help="probes or valid operations to leave out")
    ap.add_argument("--weights", default="",
                    help="override mix weights, e.g. deep_json=10,job_ws=5 (see --list-probes)")
    ap.add_argument("--list-probes", action="store_true")
    ap.add_argument("--rss-tolerance", type=float, default=0.10)
    ap.add_argument("--timeout", type=float, default=10, help="seconds for one plain request")
    ap.add_argument("--job-timeout", type=float, default=30,
                    help="seconds a valid job may take from submit to final")
    ap.add_argument("--max-body-bytes", type=int, default=None,
                    help="the server's max_body_bytes (default: from the server args, or 48 MiB)")
    ap.add_argument("--noread-mb", type=int, default=16, help="MB a ws_noread client sends")
    ap.add_argument("--park", type=int, default=4, help="never-reading sockets kept open")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args(argv)
    a.server_args = server_args

    for item in filter(None, a.weights.split(",")):
        name, _, w = item.partition("=")
        table = VALID if name in VALID else HOSTILE if name in HOSTILE else None
        if table is None:
            ap.error(f"--weights: unknown probe {name} (see --list-probes)")
        table[name] = float(w)
    if a.list_probes:
        for n in list(VALID) + list(HOSTILE):
            w = VALID.get(n, HOSTILE.get(n))
            print(f"{'valid  ' if n in VALID else 'hostile'} {n:16} {w:4g}  {PROBE_HELP[n]}")
        return 0
    skip = set(filter(None, a.skip_probes.split(",")))
    hostile = list(HOSTILE) if a.probes is None else list(filter(None, a.probes.split(",")))
    valid = list(VALID) if a.valid is None else list(filter(None, a.valid.split(",")))
    unknown = (set(hostile) - set(HOSTILE)) | (set(valid) - set(VALID)) | \
        (skip - set(HOSTILE) - set(VALID))
    if unknown:
        ap.error(f"unknown probe(s) {', '.join(sorted(unknown))} (see --list-probes)")
    hostile = [n for n in hostile if n not in skip]
    valid = [n for n in valid if n not in skip]
    if not hostile and not valid:
        ap.error("nothing to run")
    if a.max_body_bytes is None:
        a.max_body_bytes = 48 << 20
        for i, x in enumerate(server_args):
            if x == "--max-body-bytes" and i + 1 < len(server_args):
                a.max_body_bytes = int(server_args[i + 1])
            elif x.startswith("--max-body-bytes="):
                a.max_body_bytes = int(x.split("=", 1)[1])
    if a.warmup >= a.duration:
        ap.error("--warmup must be shorter than --duration")

    t_start = time.time()
    budget_end = t_start + a.duration + 88  # the whole run stays within duration + 90 s
    server = Server(a)
    if a.url:
        if not a.pid:
            ap.error("--url needs --pid (for RSS, threads and liveness)")
        try:
            with open(f"/proc/{a.pid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            ap.error(f"no process {a.pid}")
        if "sdserve" not in comm:
            print(f"soak: warning: pid {a.pid} is '{comm}', not sdserve: RSS and liveness are "
                  "that process's", flush=True)
        u = urllib.parse.urlsplit(a.url)
        host, port = u.hostname, u.port or 80
    else:
        host, port = server.start(t_start + 20)
    stats = Stats()
    client = Client(host, port)
    if not wait_ready(client, t_start + 20):
        print(f"soak: the server at {host}:{port} was not ready within 20 s")
        if server.proc:
            print(server.log_tail())
            server.stop(10)
        return 2
    soak = Soak(a, host, port, server, stats)
    print(f"soak: server pid {server.pid} at http://{host}:{port}"
          f"{', log ' + server.log_path if server.log_path else ''}; {a.duration:.0f} s "
          f"(warm-up {a.warmup:.0f} s), {a.workers} workers, sample every {a.sample:g} s", flush=True)
    print(f"soak: valid {','.join(valid) or '-'}; hostile {','.join(hostile) or '-'}", flush=True)

    names = valid + hostile
    weights = [VALID[n] if n in VALID else HOSTILE[n] for n in names]
    soak.t0 = time.time()
    t_end = soak.t0 + a.duration
    threads = [threading.Thread(target=soak.worker, args=(i, names, weights), daemon=True)
               for i in range(a.workers)]
    for t in threads:
        t.start()

    rows = []
    died = None
    csv_file = open(a.csv, "w", newline="")
    out = csv.writer(csv_file)
    out.writerow(["t_s", "rss_mb", "threads", "valid_submitted", "valid_completed",
                  "valid_failed", "hostile_sent"])

    def sample():
        rss, thr = server.proc_status()
        row = [round(time.time() - soak.t0, 1), round(rss, 1) if rss else "",
               thr or ""] + list(stats.snapshot())
        rows.append(row)
        out.writerow(row)
        csv_file.flush()
        return row

    sample()
    next_sample = soak.t0 + a.sample
    last_print = soak.t0
    while time.time() < t_end:
        time.sleep(max(0.0, min(next_sample, t_end, time.time() + 0.2) - time.time()))
        if time.time() >= next_sample:
            next_sample += a.sample
            row = sample()
            if time.time() - last_print >= 30:
                last_print = time.time()
                print(f"  t={row[0]:5.0f} s  rss {row[1]} MB  threads {row[2]}  valid "
                      f"{row[4]}/{row[3]} ok, {row[5]} failed  hostile {row[6]}", flush=True)
        if not server.alive():
            died = time.time() - soak.t0
            with stats.lock:
                flying = sorted((round(s - soak.t0, 1), n) for n, s in stats.in_flight.values())
                recent = list(stats.history)[-8:]
            print(f"soak: THE SERVER DIED at t={died:.1f} s "
                  f"(exit {server.proc.returncode if server.proc else '?'}); in flight: {flying}; "
                  f"last finished (t, worker, op, s): {recent}")
            print(server.log_tail())
            break

    # Stop: in-flight operations get a short grace, then every socket gives up.
    soak.hard_stop = HARD_STOP[0] = min(time.time() + 8, budget_end - 61)
    soak.stop.set()
    for t in threads:
        t.join(timeout=max(0.1, soak.hard_stop + 2 - time.time()))
    stuck = [t for t in threads if t.is_alive()]
    soak.unpark()
    final_row = sample()
    alive = server.alive()

    # RSS: median of the three samples from the end of warm-up vs of the last three.
    warm = [r for r in rows if r[0] >= a.warmup and r[1] != ""]
    base = median([r[1] for r in warm[:3]]) if warm else None
    end = median([r[1] for r in rows[-3:] if r[1] != ""]) if rows else None
    peak = max((r[1] for r in rows if r[1] != ""), default=None)

    stopped = None
    if server.proc is not None or a.stop:
        if alive:
            wait = max(1.0, min(60.0, budget_end - time.time()))
            exited, code, took = server.stop(wait)
            stopped = (exited, code, took, wait)
    csv_file.close()

    # ---- summary
    s = stats
    print()
    print(f"soak: {final_row[0]:.0f} s of traffic against pid {server.pid}, {a.workers} workers; "
          f"CSV {a.csv}")
    lat = s.latencies
    print(f"valid jobs: {s.valid_submitted} submitted, {s.valid_completed} succeeded, "
          f"{s.valid_cancelled} cancelled by the soak, {s.valid_failed} failed"
          + (f" ({dict(s.fail_reasons)})" if s.fail_reasons else "")
          + (f"; latency p50 {pct(lat, .5):.2f} s, p99 {pct(lat, .99):.2f} s, max {max(lat):.2f} s"
             if lat else ""))
    for ex in s.fail_examples[:5]:
        print(f"    {ex}")
    print(f"valid operations: {dict(s.valid_ops)}; wrong answers: "
          f"{dict(s.valid_errors) if s.valid_errors else 'none'}")
    for ex in s.valid_error_examples[:5]:
        print(f"    {ex}")
    print(f"hostile probes: {s.hostile_sent} sent")
    bad_probes = collections.Counter()
    for name in hostile:
        c = s.probes.get(name, collections.Counter())
        print(f"  {name:16} {sum(c.values()):5}  " +
              ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
        for k in c:
            if k in BAD_OUTCOMES:
                bad_probes[f"{name}:{k}"] += c[k]
                print(f"      {k}: {s.probe_examples.get((name, k), '')[:200]}")
        notes = s.probe_notes.get(name)
        if notes:
            print(f"      e.g. {'; '.join(notes[:3])[:300]}")
    if base is not None and end is not None:
        growth = (end - base) / base
        print(f"RSS: {base:.1f} MB after warm-up, {end:.1f} MB at the end ({growth:+.1%}, "
              f"tolerance {a.rss_tolerance:.0%}), peak {peak:.1f} MB; threads "
              f"{warm[0][2] if warm else '?'} -> {final_row[2] or '?'}")
    else:
        growth = None
        print("RSS: not enough samples after warm-up")
    if stopped:
        exited, code, took, wait = stopped
        print(f"stop: SIGTERM -> " + (f"exited {code if code is not None else '(code unknown)'} "
                                      f"in {took:.1f} s" if exited else
                                      f"still running after {wait:.0f} s (killed)"))
    if server.log_path:
        print(f"server log: {server.log_path}")

    reasons = []
    if died is not None or not alive:
        reasons.append(f"the server died (t={died:.1f} s)" if died is not None else
                       "the server is not alive at the end")
    if s.valid_failed:
        reasons.append(f"{s.valid_failed} valid jobs did not succeed")
    unresolved = s.valid_submitted - s.valid_completed - s.valid_cancelled - s.valid_failed
    if unresolved > 0:
        reasons.append(f"{unresolved} valid jobs unresolved when the soak ended")
    if s.valid_errors:
        reasons.append(f"{sum(s.valid_errors.values())} valid requests got a wrong answer")
    if bad_probes:
        reasons.append("probes misbehaved: " + ", ".join(f"{k} x{v}" for k, v in
                                                        sorted(bad_probes.items())))
    if stuck:
        with s.lock:
            flying = sorted((round(st - soak.t0, 1), n) for n, st in s.in_flight.values())
        reasons.append(f"{len(stuck)} workers stuck past the grace (in {flying})")
    if growth is None:
        reasons.append("no RSS baseline")
    elif growth > a.rss_tolerance:
        reasons.append(f"RSS grew {growth:+.1%} (> {a.rss_tolerance:.0%})")
    if stopped:
        exited, code, _, wait = stopped
        if not exited:
            reasons.append(f"no exit within {wait:.0f} s of SIGTERM")
        elif server.proc is not None and code != 0:
            reasons.append(f"exit code {code} after SIGTERM")
    print(f"total {time.time() - t_start:.0f} s")
    if reasons:
        print("FAIL: " + "; ".join(reasons))
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
