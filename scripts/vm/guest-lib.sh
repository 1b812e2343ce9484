# Sourced by the guest scripts (guest-suite.sh, guest-bench.sh) inside a run-guest.sh guest:
# loads the modules, prepares $WORK, and gives helpers to drive blkrepl daemons through the CLI.
# Needs REPO (this checkout, seen read-only through the guest's 9p root).
BIN=$REPO/target/release/blkrepl
WORK=/var/tmp/blkrepl-guest
export BLKREPL_CONFIG_DIR=$WORK/etc BLKREPL_RUN_DIR=$WORK/run

modprobe ublk_drv || { echo "FAIL setup: no ublk_drv in $(uname -r)"; exit 1; }
modprobe veth
ip link set lo up
# As systemd does: mounts propagate into the mount namespaces `ip netns exec` creates, so a
# daemon there sees (in /proc/self/mountinfo) the filesystems mounted on its device.
mount --make-rshared /
rm -rf "$WORK"; mkdir -p "$WORK/etc" "$WORK/run"

# Ends the caller (a subtest runs in a subshell) with its reason.
die() { echo "  error: $*" >&2; exit 1; }
bl() { local node=$1; shift; "$BIN" --node "$node" "$@"; }
status() { bl "$1" status --json "$2" | jq -c '.resources[0]'; }
field() { status "$1" "$2" | jq -r "$3"; }
# wait_for NODE RES JQ-CONDITION [TRIES]: poll the status until the condition holds.
wait_for() {
  local i
  for i in $(seq 1 "${4:-600}"); do
    [ "$(status "$1" "$2" | jq -r "$3")" = true ] && return 0
    sleep 0.2
  done
  die "$1: timed out waiting for $3; status: $(status "$1" "$2")"
}
daemon_pid() { cat "$WORK/run/$2.$1.lock"; }
# The pid is gone (or a zombie: its files, and so its locks and devices, are closed).
wait_dead() {
  local i
  for i in $(seq 1 300); do
    [ -d /proc/$1 ] && ! grep -q '^State:.*Z' /proc/$1/status 2>/dev/null || return 0
    sleep 0.1
  done
  die "process $1 did not die"
}
# resource NAME "NODE ADDRESS ..." : protocol C, quorum off, ublk; disks of $DISK_SIZE (256M).
resource() {
  local name=$1 nodes=($2) i
  {
    printf 'name = "%s"\nprotocol = "C"\nquorum = "off"\nfrontend = "ublk"\nsecret = "guest-suite-shared-secret"\n' "$name"
    for ((i = 0; i < ${#nodes[@]}; i += 2)); do
      truncate -s "${DISK_SIZE:-256M}" "$WORK/$name.${nodes[i]}.img"
      printf '[[node]]\nname = "%s"\naddress = "%s"\ndisk = "%s"\n' "${nodes[i]}" "${nodes[i+1]}" "$WORK/$name.${nodes[i]}.img"
    done
  } > "$WORK/etc/$name.toml"
}
# The veth pair between namespaces nsA (10.99.0.1) and nsB (10.99.0.2), created once.
netns_pair() {
  ip netns list | grep -q '^nsA' && return 0
  ip netns add nsA && ip netns add nsB &&
  ip link add vA type veth peer name vB &&
  ip link set vA netns nsA && ip link set vB netns nsB &&
  ip -n nsA addr add 10.99.0.1/24 dev vA && ip -n nsB addr add 10.99.0.2/24 dev vB &&
  ip -n nsA link set vA up && ip -n nsB link set vB up &&
  ip -n nsA link set lo up && ip -n nsB link set lo up
}
# Resource RES on alpha (nsA) and beta (nsB), connected, alpha Primary with its device in $DEV,
# beta UpToDate.
replicated_pair() {
  local r=$1
  netns_pair || die "cannot create the network namespaces"
  resource "$r" "alpha 10.99.0.1:7789 beta 10.99.0.2:7789"
  bl alpha create-md "$r" >/dev/null && bl beta create-md "$r" >/dev/null || die "create-md failed for $r"
  ip netns exec nsA "$BIN" --node alpha up "$r" >/dev/null && ip netns exec nsB "$BIN" --node beta up "$r" >/dev/null ||
    die "up failed for $r"
  wait_for alpha "$r" '.peers[0].connection == "Connected"'
  # Two fresh disks: declared in sync without copying them.
  bl alpha new-current-uuid --clear-bitmap "$r" >/dev/null || die "new-current-uuid failed"
  wait_for beta "$r" '.disk == "UpToDate"' && wait_for alpha "$r" '.disk == "UpToDate"'
  bl alpha primary "$r" >/dev/null || die "alpha refused promotion: $(status alpha "$r")"
  DEV=$(field alpha "$r" .device)
  [ -b "$DEV" ] || die "alpha's device $DEV is not a block device"
}
