#!/bin/bash
# Inside one of the two guests of scripts/vm/pair-bench.sh (one vCPU each, linked by a qemu UDP
# socket netdev): DRBD 8.4 protocol C, then blkrepl protocol C (then, unless told not to, blkrepl
# protocol C with a shared secret, i.e. TLS) between node 1 (10.99.0.1, DRBD's node1 and blkrepl's
# alpha, Primary, runs fio) and node 2 (10.99.0.2, node2 and beta, Secondary). Each system
# replicates a file of 640 MiB in tmpfs (behind a loop device for DRBD); node 1 runs the same
# fio jobs on /dev/drbd0 and on alpha's /dev/ublkbN and writes "SYSTEM|WORKLOAD|IOPS|MiB/s" lines
# to /shared/results.txt. Node 1 also measures the bounds: first the link alone (raw TCP to node 2
# with iperf3, and the ping's round trip) and the jobs on a bare loop device, last the jobs on
# blkrepl with its peer absent: the link, no replication at all, blkrepl's replication at no cost.
# Under TCG the figures only mean something as ratios.
#
#   guest-pair-bench.sh NODE(1|2) REPO RUNTIME_SECONDS_PER_JOB [TLS_ROW(1|0, default 1)]
#
# The two guests move through the phases together with one-line messages sent with busybox nc
# to the peer's TCP port 9000 (the sender retries until the peer listens); node 2 leaves only
# after node 1 has taken each system down and needs nothing more from it. On a failure a node
# sends "abort" to its peer (the peer fails at once if it is listening, else at its next wait's
# timeout) and exits 1.
set -uo pipefail
usage() { sed -n 2,19p "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 3 ] || usage; [ $# -le 4 ] || usage
N=$1 REPO=$2 RUNTIME=$3 TLS_ROW=${4:-1}
case $N in 1|2) ;; *) usage ;; esac
[[ $RUNTIME =~ ^[1-9][0-9]*$ ]] || usage
case $TLS_ROW in 0|1) ;; *) usage ;; esac
PEER=$((3 - N)) PEER_IP=10.99.0.$((3 - N)) PORT=9000
BIN=$REPO/target/release/blkrepl
DISK_SIZE=640M            # > fio's --size=512M once DRBD's and blkrepl's metadata are taken off
BACK=/mnt/back            # a tmpfs holding the backing file of the system being measured
WORK=/run/pair-bench
export BLKREPL_CONFIG_DIR=$WORK/etc BLKREPL_RUN_DIR=$WORK/run
RESULTS=/shared/results.txt NOTES=/shared/notes.txt
# How long node 2 waits for node 1 to finish a system (setup, three fio jobs, teardown).
PHASE_WAIT=$((300 + 6 * RUNTIME))

log() { echo "N${N}[$(cut -d' ' -f1 /proc/uptime)] $*"; }
note() { log "$*"; echo "node $N: $*" >> "$NOTES"; }
# signal MSG [TRIES]: deliver one line to the peer's listener, retrying every 0.5 s until it listens.
signal() {
  local i
  for i in $(seq 1 "${2:-600}"); do
    echo "$1" | timeout 10 busybox nc "$PEER_IP" $PORT >/dev/null 2>&1 && return 0
    [ $((i % 60)) != 0 ] || log "still waiting for node $PEER to take '$1'"
    sleep 0.5
  done
  return 1
}
die() {
  log "FAIL: $*"
  [ -z "${ABORTING:-}" ] || exit 1
  ABORTING=1
  [ ! -d "$WORK/run" ] || for f in "$WORK"/run/*.log; do [ -f "$f" ] && { log "last lines of $f:"; tail -20 "$f"; }; done
  grep -q drbd /proc/modules 2>/dev/null && { cat /proc/drbd; dmesg | grep -i drbd | tail -20; }
  signal "abort from node $N: $*" 20 || log "could not tell node $PEER"
  exit 1
}
# await MSG SECONDS: listen until the peer sends MSG (an earlier message seen again is a
# duplicate from a retry and is skipped); "abort ..." fails this node too.
await() {
  local deadline=$((SECONDS + $2)) msg
  while [ $SECONDS -lt $deadline ]; do
    msg=$(timeout $((deadline - SECONDS)) busybox nc -l -p $PORT </dev/null 2>/dev/null)
    case $msg in
      "$1") log "node $PEER: $1"; return 0 ;;
      abort*) ABORTING=1; die "node $PEER said: $msg" ;;
      "") ;;
      *) log "skipping message '$msg' (waiting for '$1')" ;;
    esac
  done
  die "no '$1' from node $PEER within $2 s"
}
# cpu_mark: this vCPU's ticks so far: all, idle (iowait counts as idle), user (with nice), system,
# interrupts (hard and soft). cpu_busy MARK: "B % busy (user U, system S, interrupts I)" since
# MARK, in percent of all ticks: which node a system is bound by with one vCPU each, and whether
# by its own code, the kernel's system calls or the network stack's softirqs.
cpu_mark() { awk '$1 == "cpu" { print $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9, $5 + $6, $2 + $3, $4, $7 + $8 }' /proc/stat; }
cpu_busy() {
  local a0 i0 u0 s0 q0 a1 i1 u1 s1 q1 all
  read -r a0 i0 u0 s0 q0 <<<"$1"; read -r a1 i1 u1 s1 q1 <<<"$(cpu_mark)"
  all=$((a1 > a0 ? a1 - a0 : 1))
  echo "$((100 - 100 * (i1 - i0) / all)) % busy (user $((100 * (u1 - u0) / all)), system $((100 * (s1 - s0) / all)), interrupts $((100 * (q1 - q0) / all)))"
}
retrans() { awk '$1 == "Tcp:" { if (!h) { for (i = 1; i <= NF; i++) c[$i] = i; h = 1 } else print $c["RetransSegs"] }' /proc/net/snmp; }

# daemon_mark: the user and system ticks of blkrepl's daemon (pid $DAEMON) so far, if one runs,
# and then of each of its threads with its context switches ("tid:name:user:system:switches").
daemon_mark() {
  [ -n "${DAEMON:-}" ] || return 0
  awk '{ print $14, $15 }' "/proc/$DAEMON/stat" 2>/dev/null
  for t in /proc/"$DAEMON"/task/*; do
    awk -v tid="${t##*/}" '{ sub(/^.*\) /, ""); print tid ":" name ":" $12 ":" $13 ":" switches }' name="$(cat "$t/comm" 2>/dev/null)" \
      switches="$(awk '/ctxt_switches/ { n += $2 } END { print n + 0 }' "$t/status" 2>/dev/null)" "$t/stat" 2>/dev/null
  done | tr '\n' ' '
}
# daemon_cpu MARK IOS: the daemon's CPU since MARK per I/O, and its three busiest threads' with
# their context switches, as "; the daemon U + S us per write (thread U + S us C switches, ...)".
daemon_cpu() {
  local u0 s0 u1 s1 hz now
  [ -n "$1" ] && [ "$2" -gt 0 ] && now=$(daemon_mark) && read -r u1 s1 <<<"$(head -1 <<<"$now")" && [ -n "$u1" ] || return 0
  read -r u0 s0 <<<"$(head -1 <<<"$1")"; hz=$(getconf CLK_TCK)
  echo -n "; the daemon $((1000000 * (u1 - u0) / hz / $2)) us user + $((1000000 * (s1 - s0) / hz / $2)) us system per write ("
  # Threads by their ticks since MARK (a thread started since counts from zero).
  awk -v before="$(sed -n 2p <<<"$1")" -v hz="$hz" -v n="$2" 'BEGIN {
        k = split(before, b, " "); for (i = 1; i <= k; i++) { split(b[i], f, ":"); u[f[1]] = f[3]; s[f[1]] = f[4]; c[f[1]] = f[5] } }
      { for (i = 1; i <= NF; i++) { split($i, f, ":"); du = f[3] - u[f[1]]; ds = f[4] - s[f[1]]
          if (du + ds > 0) printf "%d %s %d + %d us %.1f switches\n", du + ds, f[2], 1000000 * du / hz / n, 1000000 * ds / hz / n, (f[5] - c[f[1]]) / n } }' \
    <<<"$(sed -n 2p <<<"$now")" | sort -rn | head -3 | cut -d' ' -f2- | paste -sd, | sed 's/,/, /g' | tr -d '\n'
  echo ")"
}
# fio_job SYSTEM WORKLOAD RW BS QD DEVICE: appends "SYSTEM|WORKLOAD|IOPS|MiB/s" to the results.
fio_job() {
  local out line mark dmark
  mark=$(cpu_mark) dmark=$(daemon_mark)
  out=$(fio --name=pair --filename="$6" --rw="$3" --bs="$4" --iodepth="$5" --ioengine=io_uring --direct=1 \
            --time_based --runtime="$RUNTIME" --size=512M --output-format=json 2>&1) ||
    die "fio $2 on $6 failed: $(echo "$out" | tail -5)"
  line=$(echo "$out" | sed -n '/^{/,$p' | jq -r --arg s "$1" --arg w "$2" \
           '.jobs[0].write | "\($s)|\($w)|\(.iops)|\(.bw_bytes / 1048576)"') || die "cannot read fio's output for $2"
  echo "$line" >> "$RESULTS"
  log "fio $1 $2: $(echo "$line" | awk -F'|' '{ printf "%.0f IOPS, %.1f MiB/s", $3, $4 }')"
  note "$1, $2: CPU $(cpu_busy "$mark")$(daemon_cpu "$dmark" "$(echo "$out" | sed -n '/^{/,$p' | jq '.jobs[0].write.total_ios')")"
}
workloads() { # SYSTEM DEVICE
  local r0
  r0=$(retrans)
  fio_job "$1" "4k randwrite QD1" randwrite 4k 1 "$2"
  fio_job "$1" "4k randwrite QD32" randwrite 4k 32 "$2"
  fio_job "$1" "1M write QD4" write 1M 4 "$2"
  note "$1: $(( $(retrans) - r0 )) TCP segments retransmitted during the fio jobs"
}

# --- network: the virtio interface on the UDP link, and the peer's answer -----------------------
hostname "node$N"
: > "$NOTES"; [ "$N" != 1 ] || : > "$RESULTS"
modprobe virtio_net || die "no virtio_net"
IF=""
for _ in $(seq 1 50); do
  for d in /sys/class/net/*; do [ "${d##*/}" = lo ] || { IF=${d##*/}; break; }; done
  [ -z "$IF" ] || break; sleep 0.2
done
[ -n "$IF" ] || die "no network interface"
{ ip link set lo up && ip link set "$IF" up && ip addr add "10.99.0.$N/24" dev "$IF"; } || die "cannot configure $IF"
log "kernel $(uname -r), $(nproc) CPU, $IF 10.99.0.$N/24, ${RUNTIME}s per fio job"
for i in $(seq 1 300); do busybox ping -c1 -W1 "$PEER_IP" >/dev/null 2>&1 && break; [ "$i" != 300 ] || die "node $PEER does not answer pings"; done
note "node $PEER answers pings: $(busybox ping -c20 -i 0.2 "$PEER_IP" 2>&1 | tail -1)"
{ modprobe drbd && modprobe loop && modprobe ublk_drv; } || die "cannot load drbd, loop and ublk_drv"
{ mkdir -p $BACK "$WORK/etc" "$WORK/run" && mount -t tmpfs -o size=800M tmpfs $BACK; } || die "cannot mount the tmpfs"
R_START=$(retrans)

# --- phase 0: the link alone: raw TCP from node 1 to node 2 (iperf3) ------------------------------
# What a process that does nothing but send memory over the link reaches, as each replicated byte
# crosses it once (as the ping's round trip above is part of what a protocol C write at QD1 waits
# for): copied from user memory, as blkrepl sends, and sent from the page cache (-Z: sendfile, no
# copy from user memory, closer to how DRBD sends its pages from the kernel; on the UDP link the
# NIC has no scatter-gather, so the kernel still copies both into its buffers). Node 2's server
# takes one test and leaves, twice, before node 2 goes on (so that nothing else runs there
# meanwhile); node 1 retries until it listens.
iperf_row() { # SYSTEM [IPERF3_FLAGS...]
  local sys=$1 out i mib mark; shift
  # (iperf3 3.12 exits 0 with -J when it cannot connect: its "error" field says so)
  for i in $(seq 1 120); do
    mark=$(cpu_mark)
    out=$(iperf3 -c "$PEER_IP" -p 5201 -t "$RUNTIME" -J "$@" 2>&1)
    mib=$(echo "$out" | jq -er 'select(.error == null) | .end.sum_received.bits_per_second / 8 / 1048576') && break
    [ "$i" != 120 ] || die "$sys: $(echo "$out" | jq -r '.error // empty' 2>/dev/null || echo "$out" | tail -3)"
    sleep 0.5
  done
  echo "$sys|1M write QD4|0|$mib" >> "$RESULTS"
  log "$sys: $mib MiB/s"
  # The vCPU's share counts what the kernel does for the send outside iperf3's own time too
  # (softirqs); iperf3's own figures are its processes'.
  note "$sys: CPU $(cpu_busy "$mark"); iperf3's own CPU $(echo "$out" | jq -r '.end.cpu_utilization_percent |
    "\(.host_total | floor) % on node 1 (sending), \(.remote_total | floor) % on node 2 (receiving)"')"
}
if [ "$N" = 2 ]; then
  for _ in 1 2; do
    timeout $PHASE_WAIT iperf3 -s -1 -p 5201 >/dev/null || die "iperf3's server failed or was not reached"
  done
else
  iperf_row "raw TCP (iperf3)"
  iperf_row "raw TCP, sendfile (iperf3 -Z)" -Z
fi

# --- phase 0b: a loop device alone on node 1 (no replication, all in the kernel) ---------------
# What neither system can pass. On a file of its own, gone before DRBD's is made, so that DRBD
# writes into a fresh file as blkrepl does. Node 2 meanwhile waits for DRBD's connection (that
# wait allows for these jobs and the link's).
if [ "$N" = 1 ]; then
  { truncate -s $DISK_SIZE $BACK/loop.img && L=$(losetup -f --show $BACK/loop.img); } || die "cannot set up the bare loop device"
  workloads "loop device" "$L"
  { losetup -d "$L" && rm -f $BACK/loop.img; } || die "cannot free the bare loop device"
fi

# --- phase 1: DRBD 8.4 protocol C on a loop device over a tmpfs file ----------------------------
{ truncate -s $DISK_SIZE $BACK/drbd.img && LOOP=$(losetup -f --show $BACK/drbd.img); } || die "cannot set up the loop device"
cat > /etc/drbd.conf <<EOF
global { usage-count no; }
resource r0 {
  protocol C;
  net { max-buffers 8000; sndbuf-size 0; }
  disk { al-extents 3389; }
  on node1 { device /dev/drbd0; disk $LOOP; address 10.99.0.1:7789; meta-disk internal; }
  on node2 { device /dev/drbd0; disk $LOOP; address 10.99.0.2:7789; meta-disk internal; }
}
EOF
log "DRBD $(sed -n 's/^version: \([^ ]*\).*/\1/p' /proc/drbd) on $LOOP"
# `yes` is killed by SIGPIPE once drbdadm has read its answers: not a failure (no /dev/fd here
# for a process substitution).
out=$(set +o pipefail; yes yes | drbdadm create-md --force r0 2>&1) || die "drbdadm create-md failed: $out"
drbdadm up r0 || die "drbdadm up failed"
tries=$((240 + 12 * RUNTIME))
for i in $(seq 1 $tries); do grep -q 'cs:Connected' /proc/drbd && break; [ "$i" != $tries ] || die "DRBD did not connect"; sleep 0.5; done
log "DRBD connected"
if [ "$N" = 1 ]; then
  drbdadm new-current-uuid --clear-bitmap r0 || die "drbdadm new-current-uuid --clear-bitmap failed"
  drbdadm primary r0 || die "drbdadm primary failed"
  for i in $(seq 1 240); do grep -q 'ds:UpToDate/UpToDate' /proc/drbd && break; [ "$i" != 240 ] || die "DRBD disks not UpToDate/UpToDate"; sleep 0.5; done
  { size=$(blockdev --getsize64 /dev/drbd0) && [ "$size" -ge $((512 << 20)) ]; } || die "/dev/drbd0 is ${size:-?} bytes, under fio's 512M"
  log "$(grep cs: /proc/drbd | sed 's/^ *//')"
  workloads "DRBD 8.4 C" /dev/drbd0
  grep -q 'cs:Connected ro:Primary/Secondary ds:UpToDate/UpToDate' /proc/drbd ||
    note "DRBD 8.4 C: not Connected Primary/Secondary UpToDate/UpToDate after fio: $(grep cs: /proc/drbd)"
  { drbdadm secondary r0 && drbdadm down r0; } || die "DRBD did not go down"
  signal drbd-done || die "node 2 did not take drbd-done"
  await drbd-down 120
else
  mark=$(cpu_mark)
  await drbd-done $PHASE_WAIT
  note "DRBD 8.4 C: CPU $(cpu_busy "$mark") while node 1 set up and ran its jobs"
  drbdadm down r0 || die "DRBD did not go down"
fi
{ losetup -d "$LOOP" && rm -f $BACK/drbd.img; } || die "cannot free the loop device"
[ "$N" = 1 ] || signal drbd-down || die "node 1 did not take drbd-down"
log "DRBD down"

# --- phase 2 (and 3): blkrepl protocol C on a file in tmpfs of the same size -------------------
bl() { "$BIN" --node "$ME" "$@"; }
status() { bl status --json r0 | jq -c '.resources[0]'; }
wait_for() { # JQ-CONDITION: poll alpha's or beta's status for up to 120 s
  local i
  for i in $(seq 1 600); do
    [ "$(status | jq -r "$1")" = true ] && return 0
    sleep 0.2
  done
  die "$ME: timed out waiting for $1; status: $(status)"
}
# setup_node AUTH_LINE: the resource's configuration on this node, a fresh backing file, up.
setup_node() {
  {
    printf 'name = "r0"\nprotocol = "C"\nquorum = "off"\nfrontend = "ublk"\n%s\n' "$1"
    printf '[[node]]\nname = "alpha"\naddress = "10.99.0.1:7789"\ndisk = "%s/alpha.img"\n' $BACK
    printf '[[node]]\nname = "beta"\naddress = "10.99.0.2:7789"\ndisk = "%s/beta.img"\n' $BACK
  } > "$WORK/etc/r0.toml"
  rm -f $BACK/*.img "$WORK"/run/*
  truncate -s $DISK_SIZE "$BACK/$ME.img" || die "cannot create $BACK/$ME.img"
  # (their warning that quorum is off is expected here: shown only on a failure)
  out=$(bl create-md r0 2>&1) || die "$ME: create-md failed: $out"
  out=$(bl up r0 2>&1) || die "$ME: up failed: $out"
}
# alpha_device: DEV becomes alpha's /dev/ublkbN, checked to be a block device fio's jobs fit in.
alpha_device() {
  local size
  DEV=$(status | jq -r .device) size=$(status | jq -r .size_bytes)
  [ -b "$DEV" ] || die "alpha's device '$DEV' is not a block device"
  [ "$size" -ge $((512 << 20)) ] || die "alpha's device is $size bytes, under fio's 512M"
  DAEMON=$(cat "$WORK/run/r0.alpha.lock")
}
# blkrepl_phase SYSTEM TAG AUTH_LINE
blkrepl_phase() {
  setup_node "$3"
  wait_for '.peers[0].connection == "Connected"'
  log "$1: $ME connected"
  if [ "$N" = 1 ]; then
    bl new-current-uuid --clear-bitmap r0 >/dev/null || die "new-current-uuid --clear-bitmap failed"
    wait_for '.disk == "UpToDate" and .peers[0].peer_disk == "UpToDate"'
    bl primary r0 >/dev/null || die "alpha refused promotion: $(status)"
    alpha_device
    log "$1: alpha Primary on $DEV ($(status | jq -r '(.ublk_features // [] | join(",")) + ", " + .peers[0].replication'))"
    workloads "$1" "$DEV"
    status | jq -e '.peers[0].connection == "Connected" and .peers[0].peer_disk == "UpToDate"' >/dev/null ||
      note "$1: after fio alpha's status is $(status)"
    bl down r0 >/dev/null || die "alpha did not go down: $(status)"
    signal "$2-done" || die "node 2 did not take $2-done"
    await "$2-down" 120
  else
    wait_for '.disk == "UpToDate"'
    mark=$(cpu_mark)
    await "$2-done" $PHASE_WAIT
    note "$1: CPU $(cpu_busy "$mark") while node 1 set up and ran its jobs"
    bl down r0 >/dev/null || die "beta did not go down: $(status)"
    signal "$2-down" || die "node 1 did not take $2-down"
  fi
  cp "$WORK/run/r0.$ME.log" "/shared/$2.r0.$ME.log" 2>/dev/null
  log "$1: $ME down"
}
ME=alpha; [ "$N" = 1 ] || ME=beta
blkrepl_phase "blkrepl C" plain "trusted_network = true"
[ "$TLS_ROW" = 0 ] || blkrepl_phase "blkrepl C TLS" tls 'secret = "pair-bench shared secret, thirty-two bytes or more"'

# --- last phase: blkrepl with no peer on node 1 (its peer absent, quorum off) ------------------
# The same daemon and ublk path with replication at no cost: no protocol C figure can pass it.
if [ "$N" = 1 ]; then
  setup_node "trusted_network = true"
  bl primary --force r0 >/dev/null || die "alpha refused a forced promotion alone: $(status)"
  alpha_device
  workloads "blkrepl local-only" "$DEV"
  bl down r0 >/dev/null || die "alpha did not go down: $(status)"
  cp "$WORK/run/r0.$ME.log" "/shared/local.r0.$ME.log" 2>/dev/null
  signal local-done || die "node 2 did not take local-done"
else
  await local-done $PHASE_WAIT
fi
note "$(( $(retrans) - R_START )) TCP segments retransmitted in all; $IF: $(cat /sys/class/net/"$IF"/statistics/rx_dropped) rx dropped, $(cat /sys/class/net/"$IF"/statistics/tx_dropped) tx dropped"
log "ok"
