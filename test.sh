#!/usr/bin/env bash
# Runs every Gatehouse test. Installs what the tests need first (a Python virtualenv for
# the black-box clients, npm packages, Debian's chromium when run as root), so it works on a
# fresh clone.
#
#   ./test.sh                 SQLite always
#   GATEHOUSE_TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test ./test.sh
#                             also PostgreSQL (each test creates its own database there)
#
# Extra arguments go to `cargo test` (e.g. ./test.sh -p gatehouse-events).
set -euo pipefail
cd "$(dirname "$0")"

# docs/events.md is generated from the event enums: a stale one fails the run.
python3 tools/event_catalogue.py --check

venv=.venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
export GATEHOUSE_TEST_PYTHON="$PWD/$venv/bin/python"
npm ci --prefix tests/oidc --no-audit --no-fund --loglevel=error
# The dashboard test drives Debian's Chromium with playwright-core (no browser download).
npm ci --prefix tests/browser --no-audit --no-fund --loglevel=error
if ! command -v "${GATEHOUSE_TEST_CHROMIUM:-/usr/bin/chromium}" >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "test.sh: installing Debian's chromium for the dashboard test"
    (apt-get install -y --no-install-recommends chromium || { apt-get update && apt-get install -y --no-install-recommends chromium; }) >/dev/null
  else
    echo "test.sh: Chromium is missing: install Debian's chromium (or set GATEHOUSE_TEST_CHROMIUM)" >&2
    exit 1
  fi
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked "$@" 2>&1 | tee "$log"
# One closing line for the whole run (cargo prints one summary per test binary).
awk '/^test result:/ { passed += $4; failed += $6 } END { printf "tests: %d passed, %d failed\n", passed, failed }' "$log"
