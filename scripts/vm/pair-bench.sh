#!/usr/bin/env bash
# DRBD 8.4 protocol C against blkrepl protocol C on two hosts: two qemu guests (one vCPU each,
# run-guest.sh) linked by a qemu UDP socket netdev (or a tap bridge: -L), in one run: fio 4 KiB
# random writes at queue depth 1 and 32 and 1 MiB sequential writes at depth 4, on /dev/drbd0 and
# then on blkrepl's /dev/ublkbN (scripts/vm/guest-pair-bench.sh), each over a file in tmpfs; then
# blkrepl with a shared secret (TLS) as an extra row; node 1 also measures the link alone first
# (iperf3: raw TCP, shown in the 1 MiB column), runs the jobs on a bare loop device and, last, on
# blkrepl with no peer (the bounds: the link, no replication at all, replication at no cost).
# Prints one row per system and each one's ratio to DRBD, then each node's notes: the ping's round
# trip, how busy each vCPU was during each job (node 1) or system (node 2) and during iperf3, TCP
# retransmissions.
# The guests run under TCG (no KVM here) and share the host's cores: only the ratios mean
# something, and only between systems measured in the same run.
#
#   scripts/vm/pair-bench.sh [-k KVER|SERIES] [-T] [-L udp|tap] [RUNTIME_SECONDS_PER_JOB]
#     -T   no TLS row (blkrepl with trusted_network only)      (default: 6.12, udp, 10 s)
#     -L   the link: udp (qemu UDP sockets; NICs without offloads: every send is copied) or tap
#          (a host bridge and two taps with virtio's header; NICs with checksum offload,
#          scatter-gather and TSO, as real ones; needs root and /dev/net/tun)
#
# Installs what it needs (scripts/setup.sh drbd: the vm packages, drbd-utils, iperf3), builds blkrepl.
# The guests' console logs and results stay under the run directory it prints. Exits non-zero
# if either guest fails (each has run-guest.sh's timeout).
set -euo pipefail
usage() { sed -n 2,19p "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
cd "$(dirname "$0")/../.."
kernel=6.12 tls=1 link=udp
while getopts "k:TL:h" o; do case $o in k) kernel=$OPTARG;; T) tls=0;; L) link=$OPTARG;; *) usage;; esac; done
case $link in udp|tap) ;; *) usage ;; esac
tag=pb$$   # the tap link's interfaces: pbPIDbr, pbPIDt1, pbPIDt2
shift $((OPTIND - 1))
[ $# -le 1 ] || usage
runtime=${1:-10}
[[ $runtime =~ ^[1-9][0-9]*$ ]] || usage

scripts/setup.sh drbd
cargo build --release --bins

# Two free UDP ports on loopback for the link (guest 1 sends to guest 2's and receives on its own).
in_use=$(ss -Hlun 2>/dev/null | awk '{ n = split($4, a, ":"); print a[n] }')
for _ in $(seq 1 50); do
  p1=$((20000 + RANDOM % 20000)) p2=$((p1 + 1))
  grep -qxE "$p1|$p2" <<<"$in_use" || break
done
run=$(mkdir -p "${VM_CACHE:-$HOME/.cache/blkrepl-vm}/runs" && mktemp -d "${VM_CACHE:-$HOME/.cache/blkrepl-vm}/runs/pair.XXXX")
# Boot (~8 s each, longer as two guests share two cores), DRBD and up to three blkrepl setups, and
# nine fio jobs on node 1.
timeout=$((900 + 12 * runtime))
desc="UDP link 127.0.0.1:$p1 <-> 127.0.0.1:$p2"
[ "$link" != tap ] || desc="tap link (bridge ${tag}br)"
echo "pair-bench: kernel series $kernel, ${runtime}s per fio job, $desc," \
     "run directory $run, guest timeout ${timeout}s"

declare -A pid=() rc=()
stop_guests() {
  local g
  for g in "${!pid[@]}"; do
    [ -n "${rc[$g]:-}" ] || kill -- "-${pid[$g]}" 2>/dev/null || true
  done
}
# The tap link: a bridge on the host and a tap per guest with virtio's header, so the guests'
# NICs offer checksum offload, scatter-gather and TSO as real ones do (the UDP link has none).
stop_link() { [ "$link" != tap ] || { ip link del "${tag}t1"; ip link del "${tag}t2"; ip link del "${tag}br"; } 2>/dev/null || true; }
trap 'stop_guests; stop_link' EXIT
make_tap_link() {
  local g
  { ip link add "${tag}br" type bridge && ip link set "${tag}br" up; } || return 1
  for g in 1 2; do
    { ip tuntap add dev "${tag}t$g" mode tap vnet_hdr && ip link set "${tag}t$g" master "${tag}br" up; } || return 1
  done
}
if [ "$link" = tap ] && ! make_tap_link; then
  echo "pair-bench: cannot make the tap link (root and /dev/net/tun needed; -L udp does without)" >&2
  exit 1
fi
trap 'exit 130' INT TERM
# start G MY_PORT PEER_PORT: guest G in its own session (so that its process group, qemu and
# run-guest's timeout included, can be stopped as one), its output prefixed and kept in gG.out.
start() {
  mkdir -p "$run/g$1"
  local netdev="socket,id=n0,udp=127.0.0.1:$3,localaddr=127.0.0.1:$2"
  [ "$link" != tap ] || netdev="tap,id=n0,ifname=${tag}t$1,script=no,downscript=no,vnet_hdr=on"
  QEMU_EXTRA="-netdev $netdev -device virtio-net-pci,netdev=n0,mac=52:54:00:00:00:0$1" \
  VMNAME=pair-bench-$1 setsid scripts/vm/run-guest.sh -k "$kernel" -c 1 -m 2G -t "$timeout" -s "$run/g$1" \
    scripts/vm/guest-pair-bench.sh "$1" "$PWD" "$runtime" "$tls" \
    > >(sed -u "s/^/g$1| /" | tee "$run/g$1.out") 2>&1 < /dev/null &
  pid[$1]=$!
}
t0=$(date +%s)
start 2 "$p2" "$p1"
sleep 1
start 1 "$p1" "$p2"

# Wait for both. Once one has ended, the other gets a grace period to finish (it has its own
# bounded waits on its peer), then it is stopped.
ended_at=""
while [ -z "${rc[1]:-}" ] || [ -z "${rc[2]:-}" ]; do
  sleep 2
  for g in 1 2; do
    if [ -z "${rc[$g]:-}" ] && ! kill -0 "${pid[$g]}" 2>/dev/null; then
      rc[$g]=0; wait "${pid[$g]}" || rc[$g]=$?
      echo "pair-bench: guest $g ended with $( [ "${rc[$g]}" = 0 ] && echo success || echo "code ${rc[$g]}") after $(( $(date +%s) - t0 ))s"
      ended_at=${ended_at:-$(date +%s)}
    fi
  done
  if [ -n "$ended_at" ] && [ $(( $(date +%s) - ended_at )) -gt 150 ]; then
    for g in 1 2; do
      [ -n "${rc[$g]:-}" ] && continue
      echo "pair-bench: guest $g still runs 150 s after its peer ended: stopping it" >&2
      kill -- "-${pid[$g]}" 2>/dev/null || true
      wait "${pid[$g]}" || true
      rc[$g]=124
    done
  fi
done
wall=$(( $(date +%s) - t0 ))
sleep 0.5   # the prefixing sed of each guest flushes its last lines

echo
echo "pair-bench: two guests (1 vCPU each, TCG) on a qemu $link link, fio io_uring direct, ${runtime}s per job, wall ${wall}s"
results=$run/g1/results.txt
if [ -s "$results" ]; then
  awk -F'|' '
    { v[$1, $2] = ($2 ~ /^1M/) ? $4 : $3; if (!($1 in seen)) { seen[$1] = 1; sys[++n] = $1 } }
    function cell(s, w) { return ((s, w) in v) ? sprintf(w ~ /^1M/ ? "%.1f" : "%.0f", v[s, w]) : "-" }
    # One line each: mawk (a fresh Debian machine'"'"'s awk) takes no line break after "?".
    function ratio(s, w) { if (!((s, w) in v && ("DRBD 8.4 C", w) in v && v["DRBD 8.4 C", w] > 0)) return "-"
                           return sprintf("%.2f", v[s, w] / v["DRBD 8.4 C", w]) }
    END {
      split("4k randwrite QD1|4k randwrite QD32|1M write QD4", w, "|")
      printf "%-44s %14s %14s %14s\n", "system", "4k QD1 IOPS", "4k QD32 IOPS", "1M QD4 MiB/s"
      for (i = 1; i <= n; i++) printf "%-44s %14s %14s %14s\n", sys[i], cell(sys[i], w[1]), cell(sys[i], w[2]), cell(sys[i], w[3])
      for (i = 1; i <= n; i++) if (sys[i] != "DRBD 8.4 C")
        printf "%-44s %14s %14s %14s\n", sys[i] " / DRBD 8.4 C", ratio(sys[i], w[1]), ratio(sys[i], w[2]), ratio(sys[i], w[3])
    }' "$results"
  echo "(TCG: absolute figures are not those of real hardware; compare the ratios only)"
else
  echo "no results: guest 1 wrote nothing to $results"
fi
cat "$run/g1/notes.txt" "$run/g2/notes.txt" 2>/dev/null || true
echo "console logs: $run/g1/console.log $run/g2/console.log"
failed=""
for g in 1 2; do [ "${rc[$g]}" = 0 ] || failed+=" guest $g (code ${rc[$g]}, last lines in $run/g$g.out)"; done
[ -z "$failed" ] || { echo "pair-bench: FAILED:$failed" >&2; exit 1; }
