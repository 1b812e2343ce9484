#!/usr/bin/env bash
# Write-path benchmark, all in one run so the figures compare: 4 KiB random writes at queue depth
# 1 to 64 and 1 MiB sequential writes through the NBD export (fio's nbd engine) for protocols C,
# B and A and the same daemon with no peer (local-only), against qemu-nbd and the limits: the
# raw backing file (fio on the file), raw TCP loopback bandwidth (iperf3) and round trip
# (sockperf's ping-pong of 4 KiB: what a write that waits for its peer adds). The table and a
# plot of IOPS against queue depth (SVG) are written to BENCH_OUT (default target/bench).
#
# Quorum is set on purpose: local-only is the two-node resource with its peer absent and quorum
# "off" (a lone node may write); the replicated runs add a diskless witness under quorum
# "majority", the setup the README recommends.
#
#   scripts/bench.sh [--short]       RUNTIME=10 (s per job)  BENCH_DIR=/dev/shm/blkrepl-bench
#                                    BENCH_OUT=target/bench
# --short runs every job for 1 s (CI runs it so the script cannot rot; its figures mean nothing).
# Then system calls per replicated write (perf stat, or strace), CPU time per 4 KiB write on each daemon and in
# fio (local-only and protocol C: what bounds the ratio of the two on this machine) and each
# daemon's resident memory, also for a 1 TiB device with two peers. Installs what it needs first (scripts/setup.sh bench: fio,
# iperf3, sockperf, qemu-utils, linux-perf, strace).
set -euo pipefail
cd "$(dirname "$0")/.."
case ${1:-} in
  --short) RUNTIME=1 ;;
  "") ;;
  *) sed -n 2,17p "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
scripts/setup.sh bench
cargo build --release --bins -q
BIN=${CARGO_TARGET_DIR:-$PWD/target}/release/blkrepl
RUNTIME=${RUNTIME:-10}
DIR=${BENCH_DIR:-/dev/shm/blkrepl-bench}
SIZE=${SIZE:-1G}
rm -rf "$DIR"; mkdir -p "$DIR/etc" "$DIR/run"
export BLKREPL_CONFIG_DIR=$DIR/etc BLKREPL_RUN_DIR=$DIR/run BLKREPL_LOG=warn
OUT=${BENCH_OUT:-$PWD/target/bench}
mkdir -p "$OUT"
RESULTS=$OUT/results.txt; : > "$RESULTS"

stop_all() {
  for lock in "$DIR"/run/*.lock; do [ -f "$lock" ] && kill -9 "$(cat "$lock")" 2>/dev/null || true; done
  sleep 0.3; rm -f "$DIR"/run/*
}
# The servers of the raw TCP figures, while they run (stopped by their PID, not their name).
servers=()
trap 'stop_all; [ ${#servers[@]} = 0 ] || kill "${servers[@]}" 2>/dev/null || true' EXIT

# fio job: name, target args... ; records "name iops mibps"
run_fio() {
  local label=$1 rw=$2 bs=$3 qd=$4; shift 4
  local json
  json=$(fio --name=job --rw="$rw" --bs="$bs" --iodepth="$qd" --runtime="$RUNTIME" --time_based \
             --size=512M --numjobs=1 --group_reporting --output-format=json "$@" 2>/dev/null)
  python3 - "$label" "$json" >> "$RESULTS" <<'PY'
import json, sys
# fio's nbd engine prints a line of its own before the JSON.
label, text = sys.argv[1], sys.argv[2]
data = json.loads(text[text.index("{"):])
w = data["jobs"][0]["write"]
print(f"{label} {w['iops']:.0f} {w['bw_bytes']/1048576:.1f}")
PY
}

QUEUE_DEPTHS="1 2 4 8 16 32 64"

# The jobs against one target: 4 KiB random writes at every queue depth, then 1 MiB sequential.
run_jobs() {
  local prefix=$1 qd; shift
  for qd in $QUEUE_DEPTHS; do run_fio "$prefix.rand4k.qd$qd" randwrite 4k "$qd" "$@"; done
  run_fio "$prefix.seq1m" write 1M 4 "$@"
}

# protocol, quorum ("off": alpha and beta; "majority": and the witness tie), auth ("secret":
# TLS, the default; "mac": the secret with transport = "plain", frames MACed; "plain": a
# trusted network), disk size, data nodes (3: gamma instead of the witness, 4 KiB per bitmap bit)
config() {
  local size=${4:-$SIZE} data=${5:-2}
  {
    echo "name = \"r0\""; echo "protocol = \"$1\""; echo "quorum = \"$2\""
    case ${3:-secret} in
      plain) echo "trusted_network = true" ;;
      mac) echo "secret = \"the benchmark's shared secret\""; echo "transport = \"plain\"" ;;
      *) echo "secret = \"the benchmark's shared secret\"" ;;
    esac
    [ "$data" = 3 ] && echo "bitmap_block_size = 4096"
    echo "[[node]]"; echo "name = \"alpha\""; echo "address = \"127.0.0.1:17789\""
    echo "disk = \"$DIR/alpha.img\""; echo "nbd = \"127.0.0.1:20809\""
    echo "[[node]]"; echo "name = \"beta\""; echo "address = \"127.0.0.1:17790\""
    echo "disk = \"$DIR/beta.img\""; echo "nbd = \"127.0.0.1:20810\""
    if [ "$data" = 3 ]; then
      echo "[[node]]"; echo "name = \"gamma\""; echo "address = \"127.0.0.1:17791\""
      echo "disk = \"$DIR/gamma.img\""; echo "nbd = \"127.0.0.1:20811\""
    elif [ "$2" = majority ]; then
      echo "[[node]]"; echo "name = \"tie\""; echo "address = \"127.0.0.1:17791\""; echo "disk = \"none\""
      # As a witness should be set up (without it every command warns about it).
      echo "meta_disk = \"$DIR/tie.meta\""
    fi
  } > "$DIR/etc/r0.toml"
  rm -f "$DIR"/*.img "$DIR/tie.meta"; truncate -s "$size" "$DIR/alpha.img" "$DIR/beta.img"
  [ "$data" != 3 ] || truncate -s "$size" "$DIR/gamma.img"
}

# Resident memory of each node's daemon: records "label.rss.node KiB".
rss() {
  local label=$1 n; shift
  for n in "$@"; do
    echo "$label.rss.$n 0 $(awk '/^VmRSS:/ {print $2}' "/proc/$(cat "$DIR/run/r0.$n.lock")/status")" >> "$RESULTS"
  done
}

# System calls per replicated 4 KiB write at QD32 on each node, over a fixed number of writes:
# records "label.syscalls.node calls-per-write futex-per-write" and "label.syscalls.perf 1 0"
# (0 where strace counted). Counted by the kernel's tracepoints (perf stat), which leave the
# daemons' timing alone; by strace where perf may not read them (not root). strace stops a
# daemon at every call, so its threads batch less and wake each other more: on 2026-12-05 the
# primary made 4.55 calls per write under strace against 2.1 under perf.
count_syscalls() {
  local label=$1 n writes=20000 pids=() perf=1
  perf stat -e raw_syscalls:sys_enter -- true >/dev/null 2>&1 || perf=0
  for n in alpha beta; do
    if [ $perf = 1 ]; then
      perf stat -x, -o "$DIR/$n.perf" -e raw_syscalls:sys_enter,syscalls:sys_enter_futex -p "$(cat "$DIR/run/r0.$n.lock")" & pids+=($!)
    else
      strace -c -f -o "$DIR/$n.strace" -p "$(cat "$DIR/run/r0.$n.lock")" 2>/dev/null & pids+=($!)
    fi
  done
  sleep 1
  fio --name=job --rw=randwrite --bs=4k --iodepth=32 --number_ios=$writes --size=512M "${NBD[@]}" >/dev/null 2>&1
  sleep 0.5; kill -INT "${pids[@]}"; wait "${pids[@]}" || true
  for n in alpha beta; do
    if [ $perf = 1 ]; then
      awk -F, -v label="$label.syscalls.$n" -v w=$writes '$3 == "syscalls:sys_enter_futex" {f = $1} $3 == "raw_syscalls:sys_enter" {t = $1} END {printf "%s %.2f %.2f\n", label, t / w, f / w}' "$DIR/$n.perf" >> "$RESULTS"
    else
      awk -v label="$label.syscalls.$n" -v w=$writes '$NF == "futex" {f = $4} $NF == "total" {t = $4} END {printf "%s %.2f %.2f\n", label, t / w, f / w}' "$DIR/$n.strace" >> "$RESULTS"
    fi
  done
  echo "$label.syscalls.perf $perf 0" >> "$RESULTS"
}

# CPU time per 4 KiB write at QD32 in each daemon named and in fio, over every block of a
# 512 MiB range written once (the daemons' from /proc/PID/stat, fio's from its own report):
# records "label.cpu.node microseconds-per-write 0" and "label.cpu.fio ...".
proc_cpu() { awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$(cat "$DIR/run/r0.$1.lock")/stat"; }
cpu_per_write() {
  local label=$1 n json used=(); shift
  for n in "$@"; do used+=("$n" "$(proc_cpu "$n")"); done
  json=$(fio --name=job --rw=randwrite --bs=4k --iodepth=32 --size=512M --output-format=json "${NBD[@]}" 2>/dev/null)
  for ((n = 1; n < ${#used[@]}; n += 2)); do used[n]=$(python3 -c "print($(proc_cpu "${used[n - 1]}") - ${used[n]})"); done
  python3 - "$label" "$json" "${used[@]}" >> "$RESULTS" <<'PY'
import json, sys
label, text, used = sys.argv[1], sys.argv[2], sys.argv[3:]
job = json.loads(text[text.index("{"):])["jobs"][0]
writes = job["write"]["total_ios"]
for node, seconds in zip(used[::2], used[1::2]):
    print(f"{label}.cpu.{node} {float(seconds) * 1e6 / writes:.2f} 0")
fio = job["job_runtime"] / 1000 * (job["usr_cpu"] + job["sys_cpu"]) / 100
print(f"{label}.cpu.fio {fio * 1e6 / writes:.2f} 0")
PY
}

wait_json() { local node=$1 needle=$2; for _ in $(seq 1 200); do "$BIN" --node "$node" status --json r0 | grep -qF "$needle" && return 0; sleep 0.1; done; echo "timeout: $needle" >&2; exit 1; }

echo "== limits: raw backing file ($DIR, tmpfs if /dev/shm) and raw TCP loopback"
truncate -s "$SIZE" "$DIR/raw.img"
run_jobs raw --ioengine=libaio --filename="$DIR/raw.img"
rm -f "$DIR/raw.img"
iperf3 -s -p 15201 >/dev/null 2>&1 & servers=($!); sleep 0.5
tcp=$(iperf3 -c 127.0.0.1 -p 15201 -t "$RUNTIME" -J | python3 -c 'import json,sys; bps = json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]; print(round(bps / 8 / 1048576, 1))')
echo "tcp.loopback 0 $tcp" >> "$RESULTS"
# sockperf prints half the round trip ("Latency is X usec"); recorded as "tcp.rtt microseconds 0".
sockperf sr --tcp -i 127.0.0.1 -p 15301 >/dev/null 2>&1 & servers+=($!)
sleep 0.5
half=$(sockperf pp --tcp -i 127.0.0.1 -p 15301 -m 4096 -t "$RUNTIME" 2>&1 | sed -n 's/.*Summary: Latency is \([0-9.]*\) usec.*/\1/p')
[ -n "$half" ] || { echo "bench: sockperf printed no latency" >&2; exit 1; }
echo "tcp.rtt $(python3 -c "print(2 * $half)") 0" >> "$RESULTS"
kill "${servers[@]}" 2>/dev/null || true; wait "${servers[@]}" 2>/dev/null || true; servers=()

NBD=(--ioengine=nbd --uri=nbd://127.0.0.1:20809/r0)

echo "== reference NBD server: qemu-nbd serving a file of the same size (what local-only should match)"
truncate -s "$SIZE" "$DIR/qemu.img"
qemu-nbd -f raw -x r0 -p 20811 -b 127.0.0.1 -t --cache=writeback "$DIR/qemu.img" & QEMU_NBD=$!
sleep 0.5
run_jobs qemunbd --ioengine=nbd --uri=nbd://127.0.0.1:20811/r0
kill $QEMU_NBD; wait $QEMU_NBD 2>/dev/null || true; rm -f "$DIR/qemu.img"

echo "== local-only: one daemon, its peer absent, quorum off"
config C off secret; "$BIN" --node alpha create-md r0 >/dev/null; "$BIN" --node alpha up r0 >/dev/null
"$BIN" --node alpha primary --force r0
run_jobs local "${NBD[@]}"
cpu_per_write local alpha
stop_all

# protoC, protoB and protoA run over TLS (a secret, as a daemon requires by default: every frame
# encrypted); protoCmac has the secret with transport = "plain" (every frame MACed);
# protoCplain runs on a trusted network (`trusted_network = true`): what TLS and MACs cost.
for run in "C secret" "C mac" "C plain" "B secret" "A secret"; do
  read -r proto auth <<< "$run"
  name=proto$proto; [ "$auth" != secret ] && name=$name$auth
  echo "== protocol $proto ($auth): two daemons in sync and a witness, quorum majority"
  config "$proto" majority "$auth"
  for n in alpha beta tie; do "$BIN" --node $n create-md r0 >/dev/null; "$BIN" --node $n up r0 >/dev/null; done
  wait_json alpha '"quorum_votes":3'
  "$BIN" --node alpha new-current-uuid --clear-bitmap r0
  wait_json beta '"disk":"UpToDate"'
  "$BIN" --node alpha primary r0
  run_jobs "$name" "${NBD[@]}"
  if [ "$name" = protoC ]; then count_syscalls "$name"; cpu_per_write "$name" alpha beta; fi
  rss "$name" alpha beta
  "$BIN" --node alpha status r0 | sed 's/^/   /'
  stop_all
done

echo "== memory: three data nodes (two peers each) of a 1 TiB sparse device, 4 KiB per bitmap bit"
config C majority secret 1T 3
for n in alpha beta gamma; do "$BIN" --node $n create-md r0 >/dev/null; "$BIN" --node $n up r0 >/dev/null; done
wait_json alpha '"quorum_votes":3'
"$BIN" --node alpha new-current-uuid --clear-bitmap r0
wait_json beta '"disk":"UpToDate"'; wait_json gamma '"disk":"UpToDate"'
"$BIN" --node alpha primary r0
run_fio tib.rand4k.qd32 randwrite 4k 32 "${NBD[@]}" --number_ios=20000
rss tib alpha beta gamma
stop_all

python3 - "$RESULTS" "$QUEUE_DEPTHS" "$OUT/iops-vs-qd.svg" <<'PY' | tee "$OUT/table.txt"
import sys
r = {}
for line in open(sys.argv[1]):
    k, iops, mib = line.split(); r[k] = (float(iops), float(mib))
depths = [int(d) for d in sys.argv[2].split()]
targets = ["raw", "qemunbd", "local", "protoC", "protoCmac", "protoCplain", "protoB", "protoA"]
print()
print(f"{'target':<12} {'4k QD1 IOPS':>12} {'4k QD32 IOPS':>13} {'1M seq MiB/s':>13}")
for t in targets:
    print(f"{t:<12} {r[t+'.rand4k.qd1'][0]:>12.0f} {r[t+'.rand4k.qd32'][0]:>13.0f} {r[t+'.seq1m'][1]:>13.1f}")
print()
print("4k random write IOPS by queue depth")
print(f"{'target':<12}" + "".join(f"{'QD' + str(d):>9}" for d in depths))
for t in targets:
    print(f"{t:<12}" + "".join(f"{r[f'{t}.rand4k.qd{d}'][0]:>9.0f}" for d in depths))

# The plot: IOPS against queue depth (log scale), one line per target but the raw file, whose
# IOPS dwarf the others' (it is in the table).
plotted = [t for t in targets if t != "raw"]
colors = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d"]
W, H, L, R, T, B = 760, 460, 70, 150, 30, 50
top = max(r[f"{t}.rand4k.qd{d}"][0] for t in plotted for d in depths) * 1.05 or 1
x = lambda i: L + (W - L - R) * i / (len(depths) - 1)
y = lambda v: H - B - (H - T - B) * v / top
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
       f'<rect width="{W}" height="{H}" fill="white"/>',
       f'<text x="{W / 2}" y="18" text-anchor="middle">4 KiB random writes through NBD: IOPS by queue depth</text>',
       f'<line x1="{L}" y1="{H - B}" x2="{W - R}" y2="{H - B}" stroke="black"/>',
       f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - B}" stroke="black"/>',
       f'<text x="{(L + W - R) / 2}" y="{H - 12}" text-anchor="middle">queue depth</text>']
for i, d in enumerate(depths):
    svg.append(f'<text x="{x(i):.0f}" y="{H - B + 16}" text-anchor="middle">{d}</text>')
for k in range(6):
    v = top * k / 5
    svg.append(f'<line x1="{L}" y1="{y(v):.0f}" x2="{W - R}" y2="{y(v):.0f}" stroke="#ddd"/>')
    svg.append(f'<text x="{L - 6}" y="{y(v) + 4:.0f}" text-anchor="end">{v / 1000:.0f}k</text>')
for n, t in enumerate(plotted):
    c = colors[n % len(colors)]
    points = " ".join(f"{x(i):.1f},{y(r[f'{t}.rand4k.qd{d}'][0]):.1f}" for i, d in enumerate(depths))
    svg.append(f'<polyline points="{points}" fill="none" stroke="{c}" stroke-width="2"/>')
    svg.append(f'<text x="{W - R + 10}" y="{T + 16 * n + 10}" fill="{c}">{t}</text>')
svg.append("</svg>")
open(sys.argv[3], "w").write("\n".join(svg) + "\n")
print(f"{'tcp':<10} {'':>12} {'':>13} {r['tcp.loopback'][1]:>13.1f}")
print(f"TCP round trip of 4 KiB over loopback (sockperf ping-pong): {r['tcp.rtt'][0]:.1f} µs")
limit = min(r['raw.seq1m'][1], r['tcp.loopback'][1])
print()
print(f"protocol C / local-only, 4k QD32 IOPS: {r['protoC.rand4k.qd32'][0]/r['local.rand4k.qd32'][0]:.2f} (target >= 0.90)")
print(f"protocol C / local-only, 4k QD1 IOPS:  {r['protoC.rand4k.qd1'][0]/r['local.rand4k.qd1'][0]:.2f} (target >= 0.80)")
# A write that waits for its peer takes a local-only write's time and a round trip to the peer.
local_us = 1e6 / r['local.rand4k.qd1'][0]
print(f"  local-only takes {local_us:.1f} µs per write at QD1: the target leaves protocols B and C {local_us / 4:.1f} µs "
      f"more for the round trip to their peer (sockperf's alone: {r['tcp.rtt'][0]:.1f} µs; protocol C took "
      f"{1e6 / r['protoC.rand4k.qd1'][0] - local_us:.1f} µs more)")
print(f"protocol C seq / min(raw file, TCP):   {r['protoC.seq1m'][1]/limit:.2f} (target >= 0.85)")
print(f"protocol B / local-only, 4k QD32 IOPS: {r['protoB.rand4k.qd32'][0]/r['local.rand4k.qd32'][0]:.2f}")
print(f"protocol A / local-only, 4k QD32 IOPS: {r['protoA.rand4k.qd32'][0]/r['local.rand4k.qd32'][0]:.2f}")
print(f"protocol C over TLS / plain, 4k QD32 IOPS:  {r['protoC.rand4k.qd32'][0]/r['protoCplain.rand4k.qd32'][0]:.2f} (target >= 0.90)")
print(f"protocol C over TLS / plain, 1M seq MiB/s:   {r['protoC.seq1m'][1]/r['protoCplain.seq1m'][1]:.2f}")
print(f"protocol C with MACs / plain, 4k QD32 IOPS: {r['protoCmac.rand4k.qd32'][0]/r['protoCplain.rand4k.qd32'][0]:.2f}")
print(f"protocol C with MACs / plain, 1M seq MiB/s: {r['protoCmac.seq1m'][1]/r['protoCplain.seq1m'][1]:.2f}")
print(f"local-only seq / raw file seq:         {r['local.seq1m'][1]/r['raw.seq1m'][1]:.2f}")
print(f"local-only / qemu-nbd, 4k QD32 IOPS:   {r['local.rand4k.qd32'][0]/r['qemunbd.rand4k.qd32'][0]:.2f}")
print(f"local-only / qemu-nbd, 1M seq MiB/s:   {r['local.seq1m'][1]/r['qemunbd.seq1m'][1]:.2f}")
print()
counter = "perf" if r["protoC.syscalls.perf"][0] else "strace, which inflates it"
for n in ["alpha", "beta"]:
    calls, futex = r[f"protoC.syscalls.{n}"]
    print(f"system calls per replicated 4k write at QD32, {n}: {calls:.2f} ({futex:.2f} of them futex; counted by {counter}; target <= 2)")
cpu = lambda k: r[k][0]
local_cpu = cpu("local.cpu.alpha") + cpu("local.cpu.fio")
c_cpu = cpu("protoC.cpu.alpha") + cpu("protoC.cpu.beta") + cpu("protoC.cpu.fio")
print(f"CPU per 4k write at QD32 (µs): local-only daemon {cpu('local.cpu.alpha'):.2f} + fio {cpu('local.cpu.fio'):.2f} = {local_cpu:.2f}; "
      f"protocol C primary {cpu('protoC.cpu.alpha'):.2f} + secondary {cpu('protoC.cpu.beta'):.2f} + fio {cpu('protoC.cpu.fio'):.2f} = {c_cpu:.2f}")
print(f"  on cores shared by all three, protocol C / local-only is at most {local_cpu / c_cpu:.2f} at this CPU cost, and "
      f"{local_cpu / (local_cpu + cpu('protoC.cpu.beta')):.2f} were replication free on the primary (the secondary's cost alone)")
for label, what in [("protoC", "protocol C runs above, 1 GiB, one peer and a witness"), ("tib", "1 TiB sparse, two peers, 4 KiB per bit")]:
    rss = ", ".join(f"{k.split('.')[-1]} {v[1] / 1024:.0f} MiB" for k, v in r.items() if k.startswith(label + ".rss."))
    print(f"daemon RSS, {what}: {rss}" + (" (target <= 80 MiB)" if label == "tib" else ""))
print()
print(f"written to {sys.argv[3].rsplit('/', 1)[0]}: table.txt, results.txt, iops-vs-qd.svg")
PY
