#!/usr/bin/env bash
# The test suite: unit, property, codec and multi-process cluster tests (real daemons on
# 127.0.0.1, I/O through NBD with qemu-io), then the guest suite: the ublk frontend on real
# kernels in qemu guests (scripts/vm/test.sh: /dev/ublkbN with ext4, kill -9, failover).
# Needs qemu-utils; the guest suite also qemu-system-x86 busybox-static cpio kmod xz-utils fio
# e2fsprogs iproute2 jq (`.ci/run` installs them all). Without qemu-system-x86_64 the guest suite
# is skipped with a message, except in CI (CI=true), where that is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v qemu-io >/dev/null || { echo "qemu-io missing: apt-get install qemu-utils" >&2; exit 1; }
cargo build --release --bins
# Cluster tests start several daemons each; two at a time keeps a 2-core machine responsive.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --release --workspace -- --test-threads 2 2>&1 | tee "$log" || status=$?
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"

if command -v qemu-system-x86_64 >/dev/null || [ "${CI:-}" = true ]; then
  scripts/vm/test.sh || status=1
else
  echo "guest suite SKIPPED: qemu-system-x86_64 is missing, so the ublk frontend was not tested on a real kernel" >&2
  echo "  (apt-get install -y qemu-system-x86 busybox-static cpio kmod xz-utils fio e2fsprogs iproute2 jq; CI never skips)" >&2
fi
exit $status
