#!/usr/bin/env bash
# Set up LabTrend in .venv (idempotent) and run one job:
#   bash scripts/run.sh demo   - the product on MIMIC-IV demo data (or the synthetic cohort)
#   bash scripts/run.sh test   - the test suite
#   bash scripts/run.sh setup  - only set up
set -euo pipefail
cd "$(dirname "$0")/.."

job="${1:-demo}"
shift || true

find_python() {
  for p in python3.11 python3.12 python3.13 python3; do
    if command -v "$p" >/dev/null 2>&1 && "$p" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
      echo "$p"; return 0
    fi
  done
  echo "LabTrend needs Python >= 3.11" >&2
  return 1
}

setup() {
  local py
  py="$(find_python)"
  if [ ! -x .venv/bin/python ]; then
    "$py" -m venv .venv
  fi
  local stamp=.venv/.labtrend-setup
  if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
    return 0
  fi
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first, pinned to the CPU build where one is provided, so that the range in
  # pyproject.toml is already satisfied and pip does not fetch a multi-GB CUDA build.
  if ! .venv/bin/python -c 'import torch' >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q "torch==2.13.0" || .venv/bin/python -m pip install -q torch
  fi
  .venv/bin/python -m pip install -q -e ".[dev]"
  # test reference for the agreement statistics (tests/test_agreement.py); its release pins scipy 1.12 and
  # pandas < 3, which LabTrend cannot use, so it is installed without its dependencies (it runs on current ones)
  .venv/bin/python -m pip install -q --no-deps "irrCAC==0.4.4"
  touch "$stamp"
}

setup_browser() {
  # Debian's chromium for the end-to-end tests (Playwright drives it; it downloads no browser).
  if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "warning: could not install chromium; browser tests will be skipped" >&2
  fi
}

case "$job" in
  setup) setup ;;
  demo) setup; exec .venv/bin/labtrend demo "$@" ;;
  test)
    setup
    setup_browser
    exec .venv/bin/python -m pytest -n 2 -q "$@"
    ;;
  *) echo "usage: bash scripts/run.sh [demo|test|setup]" >&2; exit 2 ;;
esac
