#!/usr/bin/env bash
# The guest suite: the ublk frontend on real kernels, each booted in a qemu guest (see
# run-guest.sh), running scripts/vm/guest-suite.sh with this checkout's release binaries.
#
#   scripts/vm/test.sh [-k KVER|SERIES]... [SUBTEST...]
#
# Default kernels: the newest 6.12 of bookworm-backports and the newest 7.x of trixie-backports
# (zero copy and the other 7.x features are probed and reported). Subtests: see guest-suite.sh.
# Installs the host packages it needs first (scripts/setup.sh vm).
# Exits 1 if any subtest failed on any kernel.
set -euo pipefail
cd "$(dirname "$0")/../.."
kernels=()
while getopts "k:" o; do case $o in k) kernels+=("$OPTARG");; *) sed -n 2,11p "$0"; exit 2;; esac; done
shift $((OPTIND - 1))
[ ${#kernels[@]} -gt 0 ] || kernels=(6.12 7)
scripts/setup.sh vm

cargo build --release --bins
crate_tests=$(cargo test --release -p blkrepl-ublk --test kernel --no-run --message-format=json 2>/dev/null |
  jq -r 'select(.executable != null and .target.name == "kernel") | .executable')
[ -x "$crate_tests" ] || { echo "cannot find the blkrepl-ublk kernel test binary" >&2; exit 1; }

log=$(mktemp)
summary=$(mktemp)
trap 'rm -f "$log" "$summary"' EXIT
status=0
for k in "${kernels[@]}"; do
  kver=$(scripts/vm/run-guest.sh -p -k "$k")
  echo "=== guest suite on $kver"
  rc=0
  scripts/vm/run-guest.sh -k "$kver" -m 3G -t 1800 scripts/vm/guest-suite.sh "$PWD" "$crate_tests" "$@" | tee "$log" || rc=$?
  grep -a -E '^(PASS|FAIL) ' "$log" | tr -d '\r' | sed "s/^/[$kver] /" >> "$summary" || true
  [ $rc = 0 ] || status=1
  # A guest that died before reporting (rc 125) leaves no FAIL line: say so.
  [ $rc != 125 ] || echo "[$kver] FAIL guest: the VM crashed or timed out" >> "$summary"
done
echo "=== guest suite summary"
cat "$summary"
[ $status = 0 ] && ! grep -q ' FAIL ' "$summary"
