#!/usr/bin/env bash
# The ublk write-path benchmark in a qemu guest (see guest-bench.sh): fio 4 KiB random writes at
# queue depth 1 and 32 and 1 MiB sequential writes on /dev/ublkbN with protocol C between two
# network namespaces, on the same daemon with no peer, and on the raw backing file, printed with
# their ratios. The guest runs under TCG (no KVM here): only the ratios are meaningful.
#
#   scripts/vm/bench.sh [-k KVER|SERIES] [RUNTIME_SECONDS_PER_JOB]      (default 6.12, 10 s)
set -euo pipefail
cd "$(dirname "$0")/../.."
kernel=6.12
while getopts "k:" o; do case $o in k) kernel=$OPTARG;; *) sed -n 2,8p "$0"; exit 2;; esac; done
shift $((OPTIND - 1))
scripts/setup.sh vm
cargo build --release --bins
scripts/vm/run-guest.sh -k "$kernel" -m 3G -t 1200 scripts/vm/guest-bench.sh "$PWD" "${1:-10}"
