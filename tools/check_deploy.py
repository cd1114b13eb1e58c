#!/usr/bin/env python3
"""Checks deploy/ against the service's sources; tools/check_deploy.sh runs it (and promtool).

  check_deploy.py static --rules-dir DIR
      deploy/compose.yaml, the Grafana provisioning files and dashboard, the Prometheus config and
      alert rules, the systemd unit and env file, the Dockerfiles' ENV lines: their structure,
      and that every metric name that a dashboard query, an alert or an alert test uses is one
      the service exports. Writes into DIR dashboard_rules.yml (each dashboard query as a
      recording rule, for `promtool check rules`: they must parse as PromQL). The alert tests
      run as an operator runs them: `promtool test rules deploy/prometheus/alerts_test.yml`.
  check_deploy.py smoke URL METRICS_OUT [--timeout S]
      waits for URL/readyz to answer 200, runs one small job through POST /v1/generate and
      writes URL/metrics to METRICS_OUT.
  check_deploy.py scrape METRICS_FILE
      every metric in a scrape of the real service must be in the exported set (so that set,
      read from the sources, is complete).

The exported set: every name in `.Name("sdserve_...")` in server/*.cpp, and every "sdserve_..."
(or "process_...", the process families)
literal passed first to a call (a helper such as histogram("sdserve_...", help, bounds) that calls
.Name(name)), each also with the suffixes _bucket, _sum and _count (histograms); counters already
end in _total. Prometheus's own `up` series is allowed too. `smoke` + `scrape` (check_deploy.sh
--live) check that set against what the real service exports. Exit status 1 names every problem.
"""

import argparse
import glob
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request

try:
    import yaml
except ImportError:  # tools/check_deploy.sh installs python3-yaml first
    sys.exit("check_deploy.py: needs PyYAML (Debian: apt-get install python3-yaml)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy")

# Series that Prometheus itself makes for every target.
PROMETHEUS_SERIES = {"up"}

# What the dashboard must show (issue #10); a name counts with or without a histogram suffix.
REQUIRED_DASHBOARD_METRICS = [
    "sdserve_gpu_utilization_ratio", "sdserve_gpu_memory_used_bytes",
    "sdserve_gpu_memory_total_bytes", "sdserve_images_per_second",
    "sdserve_iterations_per_second", "sdserve_queue_depth", "sdserve_job_queue_wait_seconds",
    "sdserve_job_first_step_seconds", "sdserve_job_latency_seconds", "sdserve_unet_batch_images",
    "sdserve_embedding_cache_lookups_total",
    "sdserve_jobs_rejected_total", "sdserve_jobs_finished_total",
    "sdserve_http_request_duration_seconds", "sdserve_redis_up",
]
REQUIRED_ALERTS = [
    "SdserveQueueSaturated", "SdserveRejectingJobs", "SdserveJobErrorRate",
    "SdserveLatencyP99High", "SdserveGpuIdleWhileQueued", "SdserveWorkerNotReady",
    "SdserveNotReady",
]
REQUIRED_SERVICES = ["sdserve", "redis", "prometheus", "grafana"]
SEVERITIES = {"critical", "warning", "info"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

problems = []


def problem(msg):
    if msg not in problems:
        problems.append(msg)


def rel(path):
    return os.path.relpath(path, ROOT)


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def load_yaml(path):
    try:
        return yaml.safe_load(read(path))
    except (OSError, yaml.YAMLError) as e:
        problem(f"{rel(path)}: cannot be read as YAML: {e}")
        return None


# ------------------------------------------------------------------------------------------------
# What the service exports and accepts, read from its sources


def exported_metrics():
    names = set()
    for path in sorted(glob.glob(os.path.join(ROOT, "server", "*.cpp"))):
        names.update(re.findall(r'(?:\.Name|\b[A-Za-z_]\w*)\(\s*"((?:sdserve|process)_[a-z0-9_]+)"',
                                read(path)))
    if not names:
        sys.exit("check_deploy.py: no metric names (\"sdserve_...\") found in server/*.cpp")
    full = set(names)
    for n in names:
        full.update(n + s for s in HISTOGRAM_SUFFIXES)
    return names, full


def known_env_vars():
    src = "".join(read(p) for p in sorted(glob.glob(os.path.join(ROOT, "config", "*.cpp"))))
    keys = {"SDSERVE_" + k.upper() for k in re.findall(r'\bkey\(\s*"([a-z0-9_]+)"', src)}
    if not keys:
        sys.exit("check_deploy.py: no configuration keys found in config/*.cpp")
    # Variables with the prefix that are not keys but are read (SDSERVE_CONFIG, SDSERVE_MODELS_DIR).
    keys.update(re.findall(r'"(SDSERVE_[A-Z0-9_]+)"', src))
    return keys


# ------------------------------------------------------------------------------------------------
# Metric names in PromQL

KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
            "group_right", "bool", "offset", "inf", "nan", "atan2"}


def promql_metric_names(expr):
    """The metric names an expression selects (strings, label matchers, ranges, grouping
    labels, numbers, functions and Grafana variables removed)."""
    s = expr
    # Grafana's label_values(METRIC, LABEL): only METRIC is a metric.
    s = re.sub(r"\blabel_values\(\s*([^,)]*)(,[^)]*)?\)", r" \1 ", s)
    s = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', " ", s)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\$\{[^}]*\}|\$\w+", " ", s)
    s = re.sub(r"(?<![\w:.])\d[\w.]*", " ", s)
    names = []
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        word = m.group(0)
        if s[m.end():].lstrip().startswith("("):
            continue  # a function or an aggregation
        if word.lower() in KEYWORDS:
            continue
        names.append(word)
    return names


def check_names(where, expr, allowed, used):
    for name in promql_metric_names(expr):
        used.add(name)
        if name not in allowed:
            problem(f"{where}: unknown metric {name!r} (not exported by server/*.cpp) in: "
                    f"{' '.join(expr.split())}")


def covers(used, name):
    return name in used or any(name + s in used for s in HISTOGRAM_SUFFIXES)


# ------------------------------------------------------------------------------------------------
# Grafana dashboard


def iter_panels(panels):
    for p in panels or []:
        yield p
        yield from iter_panels(p.get("panels"))


def uses_datasource_variable(ds):
    return isinstance(ds, dict) and ds.get("uid") in ("${datasource}", "$datasource")


def grafana_expr_for_promtool(expr):
    s = re.sub(r"\$__(rate_interval|interval|range)\b|\$\{__(rate_interval|interval|range)\}",
               "5m", expr)
    return re.sub(r"\$\{[^}]*\}|\$\w+", ".+", s)


def check_dashboard(path, allowed, used):
    try:
        d = json.loads(read(path))
    except (OSError, ValueError) as e:
        problem(f"{rel(path)}: not valid JSON: {e}")
        return []
    where = rel(path)
    if not isinstance(d.get("schemaVersion"), int) or d["schemaVersion"] < 36:
        problem(f"{where}: schemaVersion should be a number >= 36 (Grafana 9+)")
    for key in ("uid", "title"):
        if not d.get(key):
            problem(f"{where}: no {key}")
    variables = d.get("templating", {}).get("list", [])
    if not any(v.get("type") == "datasource" and v.get("query") == "prometheus"
               and v.get("name") == "datasource" for v in variables):
        problem(f"{where}: no Prometheus data source variable named 'datasource'")
    for v in variables:
        if v.get("type") == "query":
            q = v.get("query")
            q = q.get("query", "") if isinstance(q, dict) else (q or "")
            check_names(f"{where}: variable {v.get('name')}", q, allowed, used)

    exprs, ids = [], set()
    panels = list(iter_panels(d.get("panels")))
    if not panels:
        problem(f"{where}: no panels")
    for p in panels:
        pid = p.get("id")
        title = p.get("title", "?")
        pw = f"{where}: panel {pid} {title!r}"
        if not isinstance(pid, int) or pid in ids:
            problem(f"{pw}: id missing or not unique")
        ids.add(pid)
        g = p.get("gridPos", {})
        if not all(isinstance(g.get(k), int) for k in "hwxy") or g["x"] + g["w"] > 24:
            problem(f"{pw}: gridPos must have integer h, w, x, y with x + w <= 24")
        if p.get("type") == "row":
            continue
        if not uses_datasource_variable(p.get("datasource")):
            problem(f"{pw}: datasource should be the ${{datasource}} variable")
        targets = p.get("targets") or []
        if not targets:
            problem(f"{pw}: no queries")
        refs = set()
        for t in targets:
            ref = t.get("refId")
            if not ref or ref in refs:
                problem(f"{pw}: query refId missing or repeated")
            refs.add(ref)
            if "datasource" in t and not uses_datasource_variable(t["datasource"]):
                problem(f"{pw}: query {ref} should use the ${{datasource}} variable")
            expr = t.get("expr", "")
            if not expr.strip():
                problem(f"{pw}: query {ref} has no expr")
                continue
            check_names(f"{pw} query {ref}", expr, allowed, used)
            exprs.append((f"panel_{pid}_{ref}", expr))
    dash_used = set()
    for _, e in exprs:
        dash_used.update(promql_metric_names(e))
    for m in REQUIRED_DASHBOARD_METRICS:
        if not covers(dash_used, m):
            problem(f"{where}: no panel shows {m}")
    print(f"  dashboard: {len(panels)} panels, {len(exprs)} queries, "
          f"{len(dash_used)} metric names")
    return exprs


# ------------------------------------------------------------------------------------------------
# Prometheus rules, config, and the rule tests


def check_alerts(path, allowed, used):
    data = load_yaml(path)
    if not isinstance(data, dict):
        return None, set()
    where = rel(path)
    names = set()
    count = 0
    for group in data.get("groups") or []:
        for rule in group.get("rules") or []:
            count += 1
            name = rule.get("alert") or rule.get("record") or "?"
            rw = f"{where}: {name}"
            check_names(rw, str(rule.get("expr", "")), allowed, used)
            if "alert" not in rule:
                continue
            names.add(name)
            if not rule.get("for"):
                problem(f"{rw}: no `for:` (an alert should hold for a while before firing)")
            if rule.get("labels", {}).get("severity") not in SEVERITIES:
                problem(f"{rw}: labels.severity should be one of {sorted(SEVERITIES)}")
            ann = rule.get("annotations", {})
            for key in ("summary", "description"):
                if not ann.get(key):
                    problem(f"{rw}: no {key} annotation")
    for a in REQUIRED_ALERTS:
        if a not in names:
            problem(f"{where}: no alert {a}")
    print(f"  alerts: {count} rules in {len(data.get('groups') or [])} groups")
    return data, names


def check_alert_tests(path, alert_names, allowed, used):
    data = load_yaml(path)
    if not isinstance(data, dict):
        return None
    where = rel(path)
    tested = set()
    for test in data.get("tests") or []:
        for s in test.get("input_series") or []:
            name = str(s.get("series", "")).split("{")[0].strip()
            used.add(name)
            if name not in allowed:
                problem(f"{where}: input series of unknown metric {name!r}")
        for t in test.get("alert_rule_test") or []:
            tested.add(t.get("alertname"))
        for t in test.get("promql_expr_test") or []:
            check_names(where, t.get("expr", ""), allowed, used)
    for a in sorted(alert_names - tested):
        problem(f"{where}: alert {a} has no test")
    for a in sorted(tested - alert_names):
        problem(f"{where}: tests an alert that alerts.yml does not have: {a}")
    print(f"  alert tests: {len(data.get('tests') or [])} test groups over "
          f"{len(tested & alert_names)} alerts")
    return data


def write_promtool_inputs(rules_dir, dashboard_exprs):
    os.makedirs(rules_dir, exist_ok=True)
    rules = [{"record": f"dashboard:{name}", "expr": grafana_expr_for_promtool(e)}
             for name, e in dashboard_exprs]
    with open(os.path.join(rules_dir, "dashboard_rules.yml"), "w") as f:
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, f, sort_keys=False)


def check_prometheus_config(path):
    cfg = load_yaml(path)
    if not isinstance(cfg, dict):
        return
    where = rel(path)
    if "alerts.yml" not in (cfg.get("rule_files") or []):
        problem(f"{where}: rule_files should list alerts.yml")
    targets = [t for job in cfg.get("scrape_configs") or []
               for sc in job.get("static_configs") or [] for t in sc.get("targets") or []]
    if "sdserve:8080" not in targets:
        problem(f"{where}: no scrape target sdserve:8080 (the compose service and port)")
    for job in cfg.get("scrape_configs") or []:
        interval = job.get("scrape_interval") or cfg.get("global", {}).get("scrape_interval")
        m = re.fullmatch(r"(\d+)s", str(interval))
        if job.get("job_name") == "sdserve" and not (m and 5 <= int(m.group(1)) <= 15):
            problem(f"{where}: scrape sdserve every 5-15 s (now {interval})")


# ------------------------------------------------------------------------------------------------
# compose, Grafana provisioning, environment


def env_of(service):
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, "") for e in env)
    return {str(k): str(v) for k, v in env.items()}


def default_of(value):
    """`${VAR:-default}` -> default, anything else unchanged."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value))


def volumes_of(service):
    out = []
    for v in service.get("volumes") or []:
        if isinstance(v, dict):
            out.append((str(v.get("source", "")), str(v.get("target", "")),
                        bool(v.get("read_only"))))
        else:
            parts = default_of(v).split(":")
            src, tgt = parts[0], parts[1] if len(parts) > 1 else parts[0]
            out.append((src, tgt, len(parts) > 2 and "ro" in parts[2].split(",")))
    return out


def check_env_names(where, names, known):
    for n in names:
        if n.startswith("SDSERVE_") and n not in known:
            problem(f"{where}: {n} is not an sdserve setting (sdserve would exit 2)")


def check_compose(path, known_env):
    c = load_yaml(path)
    if not isinstance(c, dict):
        return None
    where = rel(path)
    services = c.get("services") or {}
    for s in REQUIRED_SERVICES:
        if s not in services:
            problem(f"{where}: no service {s}")
    base = os.path.dirname(path)
    sd = services.get("sdserve") or {}
    build = sd.get("build") or {}
    dockerfile = os.path.join(base, default_of(build.get("context", ".")),
                              default_of(build.get("dockerfile", "Dockerfile")))
    if not os.path.isfile(dockerfile):
        problem(f"{where}: sdserve's Dockerfile {rel(dockerfile)} does not exist")
    devices = (((sd.get("deploy") or {}).get("resources") or {}).get("reservations") or {}) \
        .get("devices") or []
    if not any("gpu" in (d.get("capabilities") or []) for d in devices):
        problem(f"{where}: sdserve reserves no GPU (deploy.resources.reservations.devices)")
    env = env_of(sd)
    if env.get("SDSERVE_REDIS_URL") != "redis://redis:6379/0":
        problem(f"{where}: sdserve's SDSERVE_REDIS_URL should be redis://redis:6379/0")
    model = default_of(env.get("SDSERVE_MODEL", ""))
    vols = volumes_of(sd)
    model_mounts = [(s, t) for s, t, ro in vols if ro and model.startswith(t.rstrip("/") + "/")]
    if not model_mounts:
        problem(f"{where}: SDSERVE_MODEL ({model or 'unset'}) is not in a read-only volume")
    else:
        src = os.path.join(base, default_of(model_mounts[0][0]))
        tail = model[len(model_mounts[0][1].rstrip("/")) + 1:]
        if not os.path.exists(os.path.join(src, tail)):
            problem(f"{where}: the default model {rel(os.path.join(src, tail))} does not exist")
    check_env_names(f"{where}: sdserve", env, known_env)

    def mounted(service, source, target):
        return any(os.path.normpath(os.path.join(base, s)) == os.path.join(DEPLOY, source)
                   and t == target for s, t, _ in volumes_of(services.get(service) or {}))

    if not mounted("prometheus", "prometheus", "/etc/prometheus"):
        problem(f"{where}: prometheus should mount ./prometheus at /etc/prometheus")
    if not mounted("grafana", "grafana/provisioning", "/etc/grafana/provisioning"):
        problem(f"{where}: grafana should mount ./grafana/provisioning at "
                "/etc/grafana/provisioning")
    dash_targets = [t for s, t, _ in volumes_of(services.get("grafana") or {})
                    if os.path.normpath(os.path.join(base, s))
                    == os.path.join(DEPLOY, "grafana", "sdserve.json")]
    if not dash_targets:
        problem(f"{where}: grafana should mount ./grafana/sdserve.json")
    # Published on loopback unless the operator says otherwise, and no default password.
    for name, svc in services.items():
        for port in (svc or {}).get("ports") or []:
            if not str(port).startswith("${BIND_ADDRESS:-127.0.0.1}:"):
                problem(f"{where}: {name} publishes {port!r} on every interface; use "
                        "\"${BIND_ADDRESS:-127.0.0.1}:HOST:CONTAINER\"")
    password = str(env_of(services.get("grafana") or {}).get("GF_SECURITY_ADMIN_PASSWORD", ""))
    if not password.startswith("${GRAFANA_ADMIN_PASSWORD:?"):
        problem(f"{where}: grafana's admin password must be required "
                "(${GRAFANA_ADMIN_PASSWORD:?...}), not defaulted")
    print(f"  compose: services {', '.join(services)}")
    return dash_targets[0] if dash_targets else None


def check_grafana_provisioning(dash_target):
    ds_path = os.path.join(DEPLOY, "grafana", "provisioning", "datasources", "prometheus.yml")
    ds = load_yaml(ds_path)
    if isinstance(ds, dict):
        if not any(d.get("type") == "prometheus" and d.get("url") == "http://prometheus:9090"
                   for d in ds.get("datasources") or []):
            problem(f"{rel(ds_path)}: no prometheus data source at http://prometheus:9090")
    db_path = os.path.join(DEPLOY, "grafana", "provisioning", "dashboards", "sdserve.yml")
    db = load_yaml(db_path)
    if isinstance(db, dict):
        paths = [(p.get("options") or {}).get("path") for p in db.get("providers") or []
                 if p.get("type") == "file"]
        if not paths:
            problem(f"{rel(db_path)}: no file provider")
        elif dash_target and os.path.dirname(dash_target) not in paths:
            problem(f"{rel(db_path)}: provider path {paths} is not where compose mounts the "
                    f"dashboard ({os.path.dirname(dash_target)})")
    print("  grafana provisioning: data source and dashboard provider")


def check_env_files(known_env):
    env_path = os.path.join(DEPLOY, "systemd", "sdserve.env")
    names = re.findall(r"^\s*#?\s*(SDSERVE_[A-Z0-9_]+)=", read(env_path), re.M)
    check_env_names(rel(env_path), names, known_env)
    for df in sorted(glob.glob(os.path.join(DEPLOY, "docker", "Dockerfile*"))):
        text = read(df).replace("\\\n", " ")
        env_lines = [line for line in text.splitlines() if line.strip().startswith("ENV ")]
        names = [n for line in env_lines for n in re.findall(r"\b(SDSERVE_[A-Z0-9_]+)=", line)]
        check_env_names(rel(df), names, known_env)
        if "SDSERVE_HOST=0.0.0.0" not in " ".join(env_lines):
            problem(f"{rel(df)}: should set ENV SDSERVE_HOST=0.0.0.0")
        for needle in ("HEALTHCHECK", "/readyz", "USER ", "EXPOSE 8080"):
            if needle not in text:
                problem(f"{rel(df)}: no {needle.strip()}")
        if "deploy/docker/build.sh" not in text and "tools/setup.sh" not in text:
            problem(f"{rel(df)}: should build with deploy/docker/build.sh (directly or "
                    "through tools/setup.sh)")
    unit_path = os.path.join(DEPLOY, "systemd", "sdserve.service")
    unit = {}
    for line in read(unit_path).splitlines():
        m = re.match(r"^([A-Za-z]+)=(.*)$", line.strip())
        if m:
            unit.setdefault(m.group(1), []).append(m.group(2))
    expect = {"Type": "simple", "EnvironmentFile": "/etc/sdserve/sdserve.env",
              "ExecStart": "/usr/local/bin/sdserve serve", "Restart": "on-failure"}
    for k, v in expect.items():
        if unit.get(k) != [v]:
            problem(f"{rel(unit_path)}: {k} should be {v}")
    if unit.get("User", ["root"])[0] in ("root", "0"):
        problem(f"{rel(unit_path)}: should run as a dedicated user")
    for k in ("PrivateDevices", "MemoryDenyWriteExecute"):
        if unit.get(k, ["no"])[0] in ("yes", "true", "1"):
            problem(f"{rel(unit_path)}: {k}=yes breaks CUDA")
    print("  systemd unit and env file, Dockerfiles' ENV: settings known to sdserve")


# ------------------------------------------------------------------------------------------------


def cmd_static(args):
    base_names, allowed_sd = exported_metrics()
    allowed = allowed_sd | PROMETHEUS_SERIES
    known_env = known_env_vars()
    print(f"check_deploy.py: {len(base_names)} metrics exported by server/*.cpp, "
          f"{len(known_env)} SDSERVE_ variables known to config/*.cpp")
    used = set()
    dash_target = check_compose(os.path.join(DEPLOY, "compose.yaml"), known_env)
    check_grafana_provisioning(dash_target)
    exprs = check_dashboard(os.path.join(DEPLOY, "grafana", "sdserve.json"), allowed, used)
    check_prometheus_config(os.path.join(DEPLOY, "prometheus", "prometheus.yml"))
    _, alert_names = check_alerts(os.path.join(DEPLOY, "prometheus", "alerts.yml"), allowed, used)
    check_alert_tests(os.path.join(DEPLOY, "prometheus", "alerts_test.yml"), alert_names, allowed,
                      used)
    check_env_files(known_env)
    write_promtool_inputs(args.rules_dir, exprs)
    print(f"  metric names used by the dashboard, alerts and tests ({len(used)}): "
          f"{' '.join(sorted(used))}")
    return report()


def report():
    if problems:
        print(f"\ncheck_deploy.py: {len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        unknown = sorted({m.group(1) for p in problems
                          for m in [re.search(r"unknown metric '([^']+)'", p)] if m})
        if unknown:
            print(f"check_deploy.py: unknown metric names: {' '.join(unknown)}", file=sys.stderr)
        return 1
    print("check_deploy.py: OK")
    return 0


def http(url, data=None, timeout=10):
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


def cmd_smoke(args):
    url = args.url.rstrip("/")
    deadline = time.monotonic() + args.timeout
    status = None
    while time.monotonic() < deadline:
        try:
            status, _, body = http(url + "/readyz", timeout=5)
            if status == 200:
                break
        except OSError:
            pass
        time.sleep(0.5)
    if status != 200:
        print(f"check_deploy.py: {url}/readyz not 200 after {args.timeout} s (last: {status})",
              file=sys.stderr)
        return 1
    print(f"  /readyz 200: {body.decode(errors='replace').strip()}")
    status, _, _ = http(url + "/healthz")
    if status != 200:
        print(f"check_deploy.py: /healthz answered {status}", file=sys.stderr)
        return 1
    job = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 2, "seed": 7}
    t0 = time.monotonic()
    status, ctype, body = http(url + "/v1/generate", json.dumps(job).encode(), timeout=120)
    if status != 200 or not body.startswith(b"\x89PNG"):
        print(f"check_deploy.py: POST /v1/generate answered {status} {ctype}: {body[:200]!r}",
              file=sys.stderr)
        return 1
    print(f"  POST /v1/generate 64x64, 2 steps: 200 {ctype}, {len(body)} bytes in "
          f"{time.monotonic() - t0:.2f} s")
    status, ctype, body = http(url + "/metrics")
    if status != 200:
        print(f"check_deploy.py: /metrics answered {status}", file=sys.stderr)
        return 1
    with open(args.metrics_out, "wb") as f:
        f.write(body)
    print(f"  /metrics: {len(body)} bytes ({ctype})")
    return 0


def cmd_scrape(args):
    _, allowed = exported_metrics()
    seen = set()
    for line in read(args.metrics_file).splitlines():
        if line and not line.startswith("#"):
            seen.add(re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", line).group(0))
    for name in sorted(seen - allowed):
        problem(f"the service exports {name!r}, which check_deploy.py does not find in "
                "server/*.cpp: the exported set it checks names against is incomplete")
    print(f"  scrape: {len(seen)} series names, all in the exported set"
          if not problems else f"  scrape: {len(seen)} series names")
    return report()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("static")
    s.add_argument("--rules-dir", required=True)
    s.set_defaults(fn=cmd_static)
    s = sub.add_parser("smoke")
    s.add_argument("url")
    s.add_argument("metrics_out")
    s.add_argument("--timeout", type=float, default=120)
    s.set_defaults(fn=cmd_smoke)
    s = sub.add_parser("scrape")
    s.add_argument("metrics_file")
    s.set_defaults(fn=cmd_scrape)
    args = ap.parse_args()
    sys.exit(args.fn(args))


if __name__ == "__main__":
    main()
