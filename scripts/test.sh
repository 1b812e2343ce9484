#!/usr/bin/env bash
# The test suite: unit, property, codec and multi-process cluster tests (real daemons on
# 127.0.0.1, I/O through NBD with qemu-io). Needs qemu-utils (apt-get install qemu-utils).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v qemu-io >/dev/null || { echo "qemu-io missing: apt-get install qemu-utils" >&2; exit 1; }
cargo build --release --bins
# Cluster tests start several daemons each; two at a time keeps a 2-core machine responsive.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --release -- --test-threads 2 2>&1 | tee "$log" || status=$?
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit $status
