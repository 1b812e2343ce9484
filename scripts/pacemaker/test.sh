#!/usr/bin/env bash
# The Pacemaker suite of the test command (scripts/test.sh): a fresh cluster of cluster.sh for
# each scenario, each printing its RTO; fails on the first scenario that fails, after tearing the
# cluster down (its logs stay in BRPCM_WORK, default /tmp/brpcm).
#   1. kill -9 of the Primary's daemon, the export on the node's own address;
#   2. the Primary's network cut (the survivors fence it), the export on the virtual IP and ext4
#      mounted on top through nbdfuse: the file written before the cut is read on the new Primary;
#   3. a clean switchover (the Primary's node in standby), ext4 over the virtual IP again.
# Each ends with the old Primary's return as an UpToDate Secondary that took only what changed.
# Needs root, network and PID namespaces, and the packages `scripts/setup.sh test` installs.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
W=${BRPCM_WORK:-/tmp/brpcm}

# The cluster's bridge, namespaces and subnet are machine-wide: one suite at a time per machine
# (two CI checkouts may share one). Holding the lock, a cluster still up can only be left by a run
# that was killed before its teardown: it is taken down, not reported as a failure of this run.
mkdir -p /run/lock
exec 9>/run/lock/blkrepl-pacemaker.lock
flock -w 1800 9 || { echo "FAIL: pacemaker: another suite has held /run/lock/blkrepl-pacemaker.lock for 30 minutes" >&2; exit 1; }
if [ -e "$W/up" ] || ip link show brpcm0 >/dev/null 2>&1; then
	echo "pacemaker: a cluster an interrupted run left up ($W): taking it down first"
	"$HERE/cluster.sh" down 9>&-
fi

run() { # name, environment for cluster.sh up, scenario
	local name=$1 env=$2 mode=$3 status=0
	echo "== pacemaker: $name"
	# shellcheck disable=SC2086 # $env is a list of assignments
	if ! env $env "$HERE/cluster.sh" up 9>&-; then
		echo "FAIL: pacemaker: $name: the cluster did not come up (logs in $W)" >&2
		status=1
	elif ! "$HERE/scenario-kill.sh" "$mode" 9>&-; then
		echo "FAIL: pacemaker: $name (logs in $W)" >&2
		status=1
	fi
	"$HERE/cluster.sh" down 9>&- || { echo "FAIL: pacemaker: $name: teardown" >&2; status=1; }
	return $status
}

run "kill -9 of the Primary's daemon" "" kill
run "network cut of the Primary, ext4 over the virtual IP" "BRPCM_NBD=vip BRPCM_FS=1" cut
run "switchover: the Primary's node in standby, ext4 over the virtual IP" "BRPCM_NBD=vip BRPCM_FS=1" standby
echo "pacemaker: every scenario passed"
