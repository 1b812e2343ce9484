#!/usr/bin/env bash
# The test suite: unit, property, codec, simulator and multi-process cluster tests (real daemons
# on 127.0.0.1, I/O through NBD with qemu-io), the Debian package installed and checked
# (scripts/package-test.sh), short runs of the fuzz targets (scripts/fuzz.sh), a real Pacemaker
# cluster in namespaces (scripts/pacemaker/test.sh: failover with fencing, RTO printed), then the
# guest suite: the ublk frontend on real kernels in qemu guests (scripts/vm/test.sh:
# /dev/ublkbN with ext4, kill -9, failover).
# Installs what it needs first (scripts/setup.sh test). BLKREPL_SKIP_GUEST=1 leaves the guest
# suite out, with a message saying so; in CI (CI=true) it is never left out.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
cargo build --release --bins
# Cluster tests start several daemons each; two at a time keeps a 2-core machine responsive.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
# No two modules that name each other (a self-test first shows the check finds one).
{ scripts/check-module-cycles.py --self-test && for tree in src ublk/src tests benches; do scripts/check-module-cycles.py "$tree" || exit 1; done; } 2>&1 | tee "$log" || status=1
sim=real_replicas_under_partitions_and_power_losses
cargo test --release --workspace --no-fail-fast -- --test-threads 2 --skip "$sim" 2>&1 | tee -a "$log" || status=$?
# The simulator sweeps 10,000 seeds here (about 5 minutes on 2 cores; `cargo test` alone sweeps 200)
# and prints what the runs exercised; then each of its checkers is shown to fire when a rule is
# weakened.
BLKREPL_SIM_SEEDS="${BLKREPL_SIM_SEEDS:-10000}" cargo test --release --test replica_sim -- --nocapture 2>&1 | tee -a "$log" || status=$?
cargo test --release --features weakened-rules --test replica_sim_weakened -- --nocapture 2>&1 | tee -a "$log" || status=$?
# The Debian package: built, installed, its binary, unit, manual page and agent checked (the
# agent's tests run against the installed copy), purged.
scripts/package-test.sh 2>&1 | tee -a "$log" || status=$?
# The fuzz targets (fuzz/): each for 20,000 inputs from its corpus, failing on any crash with
# the reproducer's path (scripts/fuzz.sh; longer campaigns: scripts/fuzz.sh --time SECONDS).
scripts/fuzz.sh 2>&1 | tee -a "$log" || status=$?
# A real Pacemaker + Corosync cluster of three namespaced nodes: failover under the OCF agent,
# with fencing, each scenario printing its RTO.
scripts/pacemaker/test.sh 2>&1 | tee -a "$log" || status=$?
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"

if [ "${BLKREPL_SKIP_GUEST:-}" = 1 ] && [ "${CI:-}" != true ]; then
  echo "guest suite SKIPPED (BLKREPL_SKIP_GUEST=1): the ublk frontend was not tested on a real kernel" >&2
else
  scripts/vm/test.sh || status=1
fi
exit $status
