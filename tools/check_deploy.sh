#!/usr/bin/env bash
# Checks deploy/ (CI runs it after the build; ~10 s once promtool is installed):
#   - shell syntax of the deploy and set-up scripts;
#   - promtool: the Prometheus config, the alert rules, the alert rules' unit tests
#     (deploy/prometheus/alerts_test.yml), and every dashboard query parsed as PromQL;
#   - tools/check_deploy.py: compose, Grafana provisioning and dashboard, alerts, systemd unit and
#     env file, Dockerfiles: structure, settings sdserve knows, and every metric name one the
#     service exports (server/*.cpp);
#   - with --live (needs build/ built): `cmake --install` into a temporary prefix, the installed
#     sdserve started on the bundled tiny model on a free loopback port, /readyz awaited, one
#     64x64 2-step job through POST /v1/generate, /metrics linted by `promtool check metrics` and
#     compared with the names read from the sources, then a SIGTERM that must exit 0.
# Installs promtool (Debian's prometheus package) and PyYAML (python3-yaml) when missing.
#   tools/check_deploy.sh [--live] [--build-dir DIR] [--binary PATH]
# --binary runs that executable for --live instead of installing the build (install not checked).
set -euo pipefail
cd "$(dirname "$0")/.."

live=0
build_dir=build
binary=""
while [ $# -gt 0 ]; do
  case "$1" in
    --live) live=1 ;;
    --build-dir) build_dir=$2; shift ;;
    --binary) binary=$2; shift ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "check_deploy: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

say() { echo "check_deploy: $*"; }
failures=()
fail() { failures+=("$1"); echo "check_deploy: FAILED: $1" >&2; }

can_install() { command -v apt-get >/dev/null && { [ "$(id -u)" -eq 0 ] || command -v sudo >/dev/null; }; }

if ! command -v promtool >/dev/null; then
  can_install || { echo "check_deploy: promtool not found (Debian: apt-get install prometheus)" >&2; exit 1; }
  tools/install_packages.sh check_deploy prometheus
fi
PY=""
for candidate in python3 /usr/bin/python3; do
  if command -v "$candidate" >/dev/null && "$candidate" -c 'import yaml' 2>/dev/null; then
    PY=$candidate
    break
  fi
done
if [ -z "$PY" ]; then
  can_install || { echo "check_deploy: python3 with PyYAML not found (apt-get install python3-yaml)" >&2; exit 1; }
  tools/install_packages.sh check_deploy python3 python3-yaml
  PY=/usr/bin/python3
fi
say "$(promtool --version 2>&1 | head -1); $("$PY" --version) with PyYAML"

work=$(mktemp -d)
server_pid=""
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -KILL "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# --- shell scripts --------------------------------------------------------------------------------
for f in deploy/docker/build.sh deploy/docker/bundle_libs.sh tools/setup.sh tools/check_deploy.sh; do
  bash -n "$f" || fail "bash -n $f"
done
say "bash -n: deploy/docker/build.sh deploy/docker/bundle_libs.sh tools/setup.sh tools/check_deploy.sh"

# --- Prometheus config and rules ------------------------------------------------------------------
promtool check config deploy/prometheus/prometheus.yml || fail "promtool check config"
promtool check rules deploy/prometheus/alerts.yml || fail "promtool check rules alerts.yml"

# --- structure and metric names (writes the dashboard queries for promtool) ----------------------
"$PY" tools/check_deploy.py static --rules-dir "$work/rules" \
  || fail "tools/check_deploy.py static (problems listed above)"
# As an operator runs them: the real rules and tests, annotations included.
promtool test rules deploy/prometheus/alerts_test.yml || fail "promtool test rules (alerts_test.yml)"
if [ -f "$work/rules/dashboard_rules.yml" ]; then
  say "dashboard queries as PromQL:"
  promtool check rules "$work/rules/dashboard_rules.yml" || fail "dashboard queries are not valid PromQL"
fi

# --- live: install, serve the tiny model, one job, lint /metrics -----------------------------------
if [ "$live" -eq 1 ]; then
  if [ -z "$binary" ]; then
    [ -x "$build_dir/sdserve" ] || { fail "--live: $build_dir/sdserve is not built"; binary=none; }
  fi
  if [ -z "$binary" ]; then
    prefix=$work/prefix
    if cmake --install "$build_dir" --prefix "$prefix" > "$work/install.log" \
      && cmake --install "$build_dir" --prefix "$prefix" --component systemd >> "$work/install.log"; then
      for f in bin/sdserve share/sdserve/models/tiny-sd15/model_index.json \
               share/sdserve/models/tiny-sd15/tokenizer lib/systemd/system/sdserve.service; do
        [ -e "$prefix/$f" ] || fail "cmake --install: no $f (a build dir configured before the install rules? re-run cmake)"
      done
      say "cmake --install $build_dir: $(grep -c Installing "$work/install.log") paths into a temporary prefix"
    else
      cat "$work/install.log" >&2
      fail "cmake --install $build_dir"
    fi
    binary=$prefix/bin/sdserve
    models_dir=$prefix/share/sdserve/models
  else
    models_dir=$PWD/models
  fi
  if [ -x "$binary" ]; then
    log=$work/server.log
    # A clean environment for the server: sdserve refuses SDSERVE_ variables that are not
    # settings, such as CI's SDSERVE_CMAKE_ARGS.
    (
      for v in $(compgen -e | grep '^SDSERVE_' || true); do unset "$v"; done
      export SDSERVE_MODELS_DIR=$models_dir
      exec "$binary" serve --host 127.0.0.1 --port 0 --max-batch 2 --batch-buckets 1,2
    ) > "$log" 2>&1 &
    server_pid=$!
    port=""
    for _ in $(seq 1 300); do
      port=$(sed -n 's|.*listening on http://127\.0\.0\.1:\([0-9]*\).*|\1|p' "$log" | head -1)
      [ -n "$port" ] || ! kill -0 "$server_pid" 2>/dev/null && break
      sleep 0.1
    done
    if [ -z "$port" ]; then
      cat "$log" >&2
      fail "--live: sdserve did not start listening"
    else
      say "$binary serving the tiny model on 127.0.0.1:$port"
      grep -q "tiny model at $models_dir/tiny-sd15" "$log" \
        || fail "--live: sdserve did not use the installed models ($models_dir)"
      if "$PY" tools/check_deploy.py smoke "http://127.0.0.1:$port" "$work/metrics.txt" --timeout 120; then
        if promtool check metrics < "$work/metrics.txt"; then
          say "promtool check metrics: $(grep -c '^# TYPE' "$work/metrics.txt") metric families, no problems"
        else
          fail "promtool check metrics (the live /metrics)"
        fi
        "$PY" tools/check_deploy.py scrape "$work/metrics.txt" || fail "live /metrics against the sources"
      else
        tail -20 "$log" >&2
        fail "--live: the tiny model did not serve a job"
      fi
      kill -TERM "$server_pid"
      rc=0
      wait "$server_pid" || rc=$?
      server_pid=""
      [ "$rc" -eq 0 ] || { tail -20 "$log" >&2; fail "--live: sdserve exited $rc on SIGTERM (expected 0)"; }
      say "SIGTERM: sdserve drained and exited $rc"
    fi
  fi
fi

if [ ${#failures[@]} -gt 0 ]; then
  echo "check_deploy: ${#failures[@]} check(s) failed:" >&2
  printf '  - %s\n' "${failures[@]}" >&2
  exit 1
fi
say "all checks passed"
