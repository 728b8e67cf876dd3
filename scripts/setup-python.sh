#!/usr/bin/env bash
# Sets up the Python environments used by the test suite (idempotent; fast when already done).
#
#   .venv            Python 3.11 + tests/python/requirements.txt (pytest suite, run_autobahn.py),
#                    which includes tests/apps/django_channels/requirements.txt (Django, channels, daphne)
#   .venv-tools      Python 3 + virtualenv==20.21.1 (the last release that creates Python 2.7 envs)
#   .venv-autobahn   Python 2.7.18 (pyenv) + the pinned Autobahn|Testsuite set (wstest 25.10.1)
#
# Usage: scripts/setup-python.sh [all|tests|autobahn]     (default: all)
# Each venv carries a stamp file holding a hash of its inputs; a venv whose stamp matches is left
# alone, a venv whose stamp differs (or is missing) is rebuilt from scratch.
# Set WSGATE_SETUP_FORCE=1 to rebuild regardless.
set -euo pipefail

what="${1:-all}"
case "$what" in
  all|tests|autobahn) ;;
  *) echo "usage: $0 [all|tests|autobahn]" >&2; exit 2 ;;
esac

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
shared_dir="$(dirname "$repo_root")/shared"
cd "$repo_root"

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PYTHONDONTWRITEBYTECODE=1

log() { echo "setup-python: $*" >&2; }

hash_of() { cat "$@" | sha256sum | cut -d' ' -f1; }

# stamp_ok VENV HASH: the venv exists and was completed with inputs hashing to HASH
stamp_ok() {
  [[ "${WSGATE_SETUP_FORCE:-0}" != 1 && -x "$1/bin/python" && -f "$1/.wsgate-setup-stamp" ]] &&
    [[ "$(cat "$1/.wsgate-setup-stamp")" == "$2" ]]
}

find_python3() {
  local p
  if command -v pyenv >/dev/null 2>&1 && p="$(pyenv prefix 3.11.7 2>/dev/null)" && [[ -x "$p/bin/python" ]]; then
    echo "$p/bin/python"
  elif command -v python3.11 >/dev/null 2>&1; then
    command -v python3.11
  else
    command -v python3
  fi
}

find_python27() {
  local p
  if [[ -n "${WSGATE_PYTHON27:-}" ]]; then echo "$WSGATE_PYTHON27"; return; fi
  if command -v pyenv >/dev/null 2>&1 && p="$(pyenv prefix 2.7.18 2>/dev/null)" && [[ -x "$p/bin/python" ]]; then
    echo "$p/bin/python"; return
  fi
  command -v python2.7 || { log "no Python 2.7 found (pyenv 2.7.18 or python2.7; or set WSGATE_PYTHON27)"; return 1; }
}

setup_tests() {
  # tests/python/requirements.txt includes the Django Channels app's pins (-r): both are hashed.
  local req="tests/python/requirements.txt" app_req="tests/apps/django_channels/requirements.txt" py h start
  py="$(find_python3)"
  h="$(hash_of "$req" "$app_req" "$0" | cut -c1-16)-$("$py" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')"
  if stamp_ok .venv "$h"; then log ".venv up to date"; return; fi
  start=$SECONDS
  log "creating .venv with $py"
  rm -rf .venv
  "$py" -m venv .venv
  .venv/bin/python -m pip install -q -r "$req"
  .venv/bin/python -c 'import websockets, jwt, cryptography, pytest, socketio, aiohttp, django, channels, daphne'
  echo "$h" > .venv/.wsgate-setup-stamp
  log ".venv ready in $((SECONDS - start))s"
}

setup_autobahn() {
  # Prefer the in-repo copy so the repo is self-contained; fall back to shared/ beside the repo.
  local req="tests/conformance/autobahn-py27-requirements.txt" py3 py27 h ht start
  if [[ ! -f "$req" ]]; then req="$shared_dir/conformance/autobahn-py27-requirements.txt"; fi
  [[ -f "$req" ]] || { log "missing autobahn requirements ($req)"; exit 1; }
  py3="$(find_python3)"
  py27="$(find_python27)"

  ht="virtualenv==20.21.1-$("$py3" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')"
  if stamp_ok .venv-tools "$ht"; then
    log ".venv-tools up to date"
  else
    start=$SECONDS
    rm -rf .venv-tools
    "$py3" -m venv .venv-tools
    .venv-tools/bin/python -m pip install -q "virtualenv==20.21.1"
    echo "$ht" > .venv-tools/.wsgate-setup-stamp
    log ".venv-tools ready in $((SECONDS - start))s"
  fi

  h="$(hash_of "$req" "$0" | cut -c1-16)-$("$py27" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')"
  if stamp_ok .venv-autobahn "$h" && [[ -x .venv-autobahn/bin/wstest ]]; then
    log ".venv-autobahn up to date"; return
  fi
  start=$SECONDS
  log "creating .venv-autobahn with $py27 (takes a few minutes: Twisted and friends build from source)"
  rm -rf .venv-autobahn
  .venv-tools/bin/virtualenv -q -p "$py27" .venv-autobahn
  .venv-autobahn/bin/python -m pip install -q -r "$req"
  # Smoke test: wstest starts and knows its modes.
  # grep reads to the end (no -q): an early exit would break wstest's pipe under pipefail.
  .venv-autobahn/bin/wstest --help | grep fuzzingclient >/dev/null
  echo "$h" > .venv-autobahn/.wsgate-setup-stamp
  log ".venv-autobahn ready in $((SECONDS - start))s"
}

case "$what" in
  all) setup_tests; setup_autobahn ;;
  tests) setup_tests ;;
  autobahn) setup_autobahn ;;
esac
