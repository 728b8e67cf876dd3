#!/usr/bin/env bash
# Runs every test of wsgate, installing what the tests need first (idempotent).
#
#   scripts/test.sh            format and lint checks, dependency audit, Rust tests,
#                              Python client tests, Autobahn|Testsuite conformance
#
# Needs: cargo (Rust 1.88+), pyenv Pythons 3.11 and 2.7.18 (for Autobahn), git, and the
# RustSec advisory database snapshot in ../shared/advisory-db (beside the repository).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*"; }

# A clean build never reuses incremental caches; they only cost disk (several GB).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

step "Debian packages (prometheus, chromium, redis, haproxy, pebble, nodejs when missing)"
bash scripts/setup-system.sh

step "Python environments (tests, Autobahn)"
bash scripts/setup-python.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo audit (RustSec advisories; unmaintained, unsound, yanked crates)"
# Pinned: a new cargo-audit release (a newer MSRV, another database format) must not be
# able to break CI by itself. The first install builds it from source (about 4-5 minutes).
audit_version=0.22.2
if [[ "$(cargo audit --version 2>/dev/null)" != *" $audit_version" ]]; then
    cargo install --locked --version "$audit_version" cargo-audit
fi
# No network. The advisory database is the snapshot beside the repository, a plain
# directory (no .git): with --no-fetch cargo-audit reads its crates/ folder as it is, and
# never checks its age, so --stale changes nothing there and only documents the intent.
# Yanked crates are looked up in cargo's local crates.io index cache, which the cargo
# steps above have filled for every crate of Cargo.lock (--no-fetch: no index update, so
# a yank is seen as of cargo's last index look-up of that crate on this machine).
# A crate missing from that cache is printed as "couldn't check if the package is yanked"
# without changing cargo-audit's exit code, so that line fails the step here.
# Accepted exceptions go in .cargo/audit.toml. A finding prints the advisory id and the
# dependency path from the crate up to wsgate, and exits 1.
mkdir -p target
cargo audit --db "$(pwd)/../shared/advisory-db" --no-fetch --stale --deny warnings 2>&1 |
    tee target/cargo-audit.log
if grep -q "couldn't check if the package is yanked" target/cargo-audit.log; then
    echo "cargo audit: the yanked check missed crates absent from cargo's index cache" \
        "(cargo fetch --locked fills it)" >&2
    exit 1
fi

step "Node OpenID provider for tests/oidc.rs (tests/oidc: npm ci, pinned by package-lock.json)"
command -v node >/dev/null || { echo "node (18+) is needed by tests/oidc.rs (scripts/setup-system.sh installs Debian's)" >&2; exit 1; }
(cd tests/oidc && npm ci --no-audit --no-fund --loglevel=error)

step "cargo test"
cargo test --locked

step "Node packages for the Socket.IO tests (tests/node: npm ci, pinned by package-lock.json)"
command -v node >/dev/null || { echo "node (18+) is needed by tests/python/test_socketio.py (scripts/setup-system.sh installs Debian's)" >&2; exit 1; }
# npm ci installs exactly the lock file and leaves it untouched; it is fast when the cache has the tarballs.
(cd tests/node && npm ci --no-audit --no-fund --loglevel=error)

step "Python tests (websockets client, PyJWT, Prometheus, Chromium, deployment kit, Socket.IO)"
cargo build --locked --quiet
bin="${CARGO_TARGET_DIR:-target}/debug/wsgate"
WSGATE_BIN="$bin" .venv/bin/python -m pytest -q tests/python

# 12.x and 13.x (permessage-deflate, 216 cases) take most of the run: about 26 minutes on a
# busy 2-core machine, bound by wstest itself (Python 2.7) rather than the gateway; cases
# 1-10 take under 3. The default timeout (--timeout, 2900 s) covers both.
step "Autobahn|Testsuite (fuzzing client, cases 1-7, 9.1, 10, and compression: 12, 13)"
.venv/bin/python tests/conformance/run_autobahn.py --wsgate "$bin" --out target/autobahn

step "all tests passed"
