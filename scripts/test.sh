#!/usr/bin/env bash
# Runs every test of wsgate, installing what the tests need first (idempotent).
#
#   scripts/test.sh            format and lint checks, Rust tests, Python client tests,
#                              Autobahn|Testsuite conformance
#
# Needs: cargo (Rust 1.85+), pyenv Pythons 3.11 and 2.7.18 (for Autobahn), git.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*"; }

step "Debian packages (prometheus, promtool)"
bash scripts/setup-system.sh

step "Python environments (tests, Autobahn)"
bash scripts/setup-python.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo test"
cargo test --locked

step "Python tests (websockets client, PyJWT, Prometheus, Chromium, deployment kit)"
cargo build --locked --quiet
bin="${CARGO_TARGET_DIR:-target}/debug/wsgate"
WSGATE_BIN="$bin" .venv/bin/python -m pytest -q tests/python

step "Autobahn|Testsuite (fuzzing client, cases 1-7, 9.1, 10)"
.venv/bin/python tests/conformance/run_autobahn.py --wsgate "$bin" --out target/autobahn

step "all tests passed"
