#!/bin/bash
# Inside a guest (started by scripts/vm/bench.sh): fio on /dev/ublkbN with protocol C between
# two network namespaces, on the same daemon with no peer, and on the raw backing file, in one
# run. Under TCG the figures only mean something as ratios.
#
#   guest-bench.sh REPO [RUNTIME_SECONDS_PER_JOB]
set -uo pipefail
REPO=$1 RUNTIME=${2:-10}
DISK_SIZE=768M
# shellcheck source=guest-lib.sh
. "$REPO/scripts/vm/guest-lib.sh"
RESULTS=$WORK/results.txt
: > "$RESULTS"

# run LABEL WORKLOAD RW BS QD TARGET-ARGS...: appends "LABEL|WORKLOAD|iops|MiB/s".
run() {
  local label=$1 workload=$2 rw=$3 bs=$4 qd=$5; shift 5
  fio --name=bench --rw="$rw" --bs="$bs" --iodepth="$qd" --runtime="$RUNTIME" --time_based --size=512M \
      --ioengine=io_uring --randrepeat=0 --output-format=json "$@" 2>/dev/null |
    jq -r --arg l "$label" --arg w "$workload" '.jobs[0].write | "\($l)|\($w)|\(.iops)|\(.bw_bytes / 1048576)"' >> "$RESULTS" ||
    die "fio failed: $label $workload"
}
workloads() {
  run "$1" "4k randwrite QD1" randwrite 4k 1 "${@:2}"
  run "$1" "4k randwrite QD32" randwrite 4k 32 "${@:2}"
  run "$1" "1M seq write" write 1M 4 "${@:2}"
}

echo "bench: kernel $(uname -r), $(nproc) CPUs, ${RUNTIME}s per job"
replicated_pair r5 || die "cannot set up the pair"
echo "  protocol C to beta across the veth pair, on $DEV"
workloads "protocol C" --filename="$DEV" --direct=1
# beta goes down rather than `disconnect`: a refused peer redials at once and would load the CPU.
bl beta down r5 >/dev/null && wait_for alpha r5 '.peers[0].connection != "Connected"' || die "beta did not go down"
echo "  alpha alone (no peer: writes only tracked in the bitmap)"
workloads "no peer" --filename="$DEV" --direct=1
bl alpha down r5 >/dev/null || die "alpha did not go down"
# The daemon writes its backing file through the page cache (and syncs on FLUSH): so does fio.
echo "  the raw backing file, through the page cache as the daemon writes it"
workloads "raw file" --filename="$WORK/r5.alpha.img" --direct=0

echo
jq -R -n -r '
  [inputs | split("|") | {label: .[0], workload: .[1], iops: (.[2] | tonumber), mibs: (.[3] | tonumber)}] as $rows
  | ($rows | map(.workload) | unique) as $workloads
  | def get($l; $w): $rows | map(select(.label == $l and .workload == $w))[0];
    def ratio($a; $b): if $b == 0 then "n/a" else (($a / $b * 100 | round) / 100 | tostring) end;
    "workload            protocol C            no peer               raw file              C/no-peer  C/raw  no-peer/raw",
    ($workloads[] as $w
     | [get("protocol C"; $w), get("no peer"; $w), get("raw file"; $w)] as [$c, $n, $r]
     | ($w + "                    ")[:20]
       + ([$c, $n, $r] | map(("\(.iops | round) IOPS \(.mibs * 10 | round / 10) MiB/s" + "                      ")[:22]) | join(""))
       + (ratio($c.iops; $n.iops) + "           ")[:11] + (ratio($c.iops; $r.iops) + "       ")[:7] + ratio($n.iops; $r.iops))' < "$RESULTS"
