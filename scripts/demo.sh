#!/usr/bin/env bash
# The main job, end to end on one machine: a replicated cluster of two data nodes on file-backed
# disks and a diskless witness (quorum "majority": the survivor of a failure may take over,
# a partitioned node may not), data written through the primary's device, the primary killed
# (kill -9), the other node promoted, the data read back and checked, the old primary rejoining.
# Status at each step. The device is /dev/ublkbN when the kernel has ublk (/dev/ublk-control;
# `modprobe ublk_drv`), an NBD export otherwise.
#
#   scripts/demo.sh            (as root; installs what it needs first: scripts/setup.sh demo)
#   DEMO_DIR=/some/dir scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh demo
echo "== building"
cargo build --release --bins -q
BIN=$PWD/target/release/blkrepl

DIR=${DEMO_DIR:-/tmp/blkrepl-demo}
rm -rf "$DIR"; mkdir -p "$DIR/etc" "$DIR/run"
export BLKREPL_CONFIG_DIR=$DIR/etc BLKREPL_RUN_DIR=$DIR/run
SIZE_MIB=256
truncate -s ${SIZE_MIB}M "$DIR/alpha.img" "$DIR/beta.img"
if [ -e /dev/ublk-control ]; then
  FRONTEND=ublk; EXPORTS=("" "")
else
  FRONTEND=nbd; EXPORTS=('nbd = "127.0.0.1:10809"' 'nbd = "127.0.0.1:10810"')
fi
cat > "$DIR/etc/r0.toml" <<TOML
name = "r0"
protocol = "C"
quorum = "majority"
frontend = "$FRONTEND"
secret = "demo-secret-$(od -An -N8 -tx8 /dev/urandom | tr -d ' ')"

[[node]]
name = "alpha"
address = "127.0.0.1:7789"
disk = "$DIR/alpha.img"
${EXPORTS[0]}

[[node]]
name = "beta"
address = "127.0.0.1:7790"
disk = "$DIR/beta.img"
${EXPORTS[1]}

[[node]]
name = "tie"
address = "127.0.0.1:7791"
disk = "none"
meta_disk = "$DIR/tie.meta"
TOML

cleanup() {
  for n in alpha beta tie; do
    [ -f "$DIR/run/r0.$n.lock" ] && kill -9 "$(cat "$DIR/run/r0.$n.lock")" 2>/dev/null || true
  done
}
trap cleanup EXIT

br() { local node=$1; shift; echo "\$ blkrepl --node $node $*"; "$BIN" --node "$node" "$@"; }
status() { br "$1" status r0; echo; }
wait_for() { # node, then fields that must all appear in its JSON status (one peer here)
  local node=$1 i json needle missing; shift
  for i in $(seq 1 300); do
    json=$("$BIN" --node "$node" status --json r0); missing=0
    for needle in "$@"; do grep -qF "$needle" <<<"$json" || missing=1; done
    [ $missing = 0 ] && return 0
    sleep 0.2
  done
  echo "timed out waiting for $* on $node" >&2; echo "$json" >&2; exit 1
}

# Where a node's device is while it is primary: /dev/ublkbN or nbd://ADDR/r0.
device() { "$BIN" --node "$1" status --json r0 | sed -n 's/.*"device":"\([^"]*\)".*/\1/p'; }
if [ $FRONTEND = ublk ]; then
  echo "== this kernel has ublk: the primary's device is /dev/ublkbN"
else
  echo "== this kernel has no ublk_drv (modprobe ublk_drv to get /dev/ublkbN): the device is exported over NBD"
fi

echo "== 1. metadata and daemons"
br alpha create-md r0
br beta create-md r0
br tie create-md r0
br alpha up r0
br beta up r0
br tie up r0
wait_for alpha '"quorum_votes":3'
status alpha

echo "== 2. alpha becomes primary; the initial sync copies its disk to beta"
br alpha primary --force r0
wait_for alpha '"peer_disk":"UpToDate"'
status alpha

DEV_ALPHA=$(device alpha)
echo "== 3. writing data through alpha's device $DEV_ALPHA (qemu-io)"
PATTERNS=()
for i in $(seq 1 16); do
  off=$(( (i * 13 % SIZE_MIB) * 1048576 )); pat=$(printf '0x%02x' $((i * 7 + 1)))
  PATTERNS+=("$off $pat")
done
args=()
for p in "${PATTERNS[@]}"; do set -- $p; args+=(-c "write -P $2 $1 1M"); done
qemu-io -f raw -t writeback "$DEV_ALPHA" "${args[@]}" -c flush | grep -c wrote | sed 's/^/   writes: /'
qemu-img convert -f raw -O raw "$DEV_ALPHA" "$DIR/before.raw"
BEFORE=$(md5sum < "$DIR/before.raw" | cut -d' ' -f1)
echo "   device checksum on alpha: $BEFORE"
status alpha

echo "== 4. kill -9 the primary"
[ $FRONTEND = nbd ] || echo "   (its $DEV_ALPHA stays, quiesced: I/O on it waits for a daemon to re-attach)"
kill -9 "$(cat "$DIR/run/r0.alpha.lock")"
wait_for beta '"connection":"Connecting"'
status beta

echo "== 5. beta (UpToDate) is promoted and serves every acknowledged byte"
br beta primary r0
DEV_BETA=$(device beta)
echo "   beta's device: $DEV_BETA"
args=()
for p in "${PATTERNS[@]}"; do set -- $p; args+=(-c "read -P $2 $1 1M"); done
if qemu-io -f raw "$DEV_BETA" "${args[@]}" | grep -q "Pattern verification failed"; then
  echo "DATA MISMATCH on beta" >&2; exit 1
fi
qemu-img convert -f raw -O raw "$DEV_BETA" "$DIR/after.raw"
AFTER=$(md5sum < "$DIR/after.raw" | cut -d' ' -f1)
echo "   device checksum on beta:  $AFTER"
[ "$BEFORE" = "$AFTER" ] || { echo "CHECKSUMS DIFFER" >&2; exit 1; }
echo "   all 16 patterns verified, checksums match"
status beta

echo "== 6. alpha comes back and resyncs only what changed while it was away"
qemu-io -f raw -t writeback "$DEV_BETA" -c "write -P 0xee 100M 4M" -c flush >/dev/null
br alpha up r0
wait_for beta '"replication":"Established"' '"peer_role":"Secondary"' '"peer_disk":"UpToDate"'
status beta
if [ $FRONTEND = ublk ]; then
  # beta is primary now: alpha re-attached its old device only to fail its I/O (never stale data).
  wait_for alpha '"device_io":"failing'
  status alpha
fi
br beta down r0
br alpha down r0
br tie down r0
echo "== demo finished: no acknowledged write was lost"
