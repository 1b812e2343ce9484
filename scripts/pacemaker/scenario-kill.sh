#!/usr/bin/env bash
# Scenario on the cluster of cluster.sh (which must be up): data written through the Primary's
# NBD export, then a fault on the Primary; passes when the other data node is Primary and the data
# reads back through its export. Prints the time the service was unavailable (RTO: from the
# fault to the first successful read through the new Primary's export) and what Pacemaker did.
#
#   scenario-kill.sh [kill|cut|standby]
#     kill     (default) kill -9 of the Primary's blkrepl daemon
#     cut      the Primary's switch port taken down (network cut): the survivors must fence it
#              before promoting; the port is raised again at the end and the old Primary returns
#     standby  a clean switchover: the Primary's node put in standby (crm_standby), then back
#
# Every mode ends with the old Primary's return: it must come back as an UpToDate Secondary
# without taking the service back, having resynced only what changed (less than half the
# device), and the data must still read back.
#
# Environment: BRPCM_WORK as for cluster.sh; SCENARIO_TIMEOUT (seconds, default 120).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
C="$HERE/cluster.sh"
W=${BRPCM_WORK:-/tmp/brpcm}
RES=r0
MODE=${1:-kill}
TIMEOUT=${SCENARIO_TIMEOUT:-120}

fail() { echo "FAIL: $*" >&2; "$C" exec "$SURVIVOR" crm_mon -1 -r -f 2>&1 | tail -25 >&2 || true; exit 1; }
log() { echo "[$(date +%T.%3N)] $*"; }
now() { date +%s.%N; }
json() { "$C" exec "$1" blkrepl status --json "$RES" 2>/dev/null | jq -c '.resources[0]'; }
field() { json "$1" | jq -r "$2" 2>/dev/null; }

case $MODE in kill|cut|standby) ;; *) echo "usage: $0 [kill|cut|standby]" >&2; exit 2 ;; esac
for t in qemu-io jq bc; do command -v "$t" >/dev/null || { echo "scenario-kill.sh: $t is missing (packages qemu-utils, jq, bc)" >&2; exit 1; }; done
[ -e "$W/up" ] || { echo "the cluster is not up: run $C up" >&2; exit 1; }

# Settled first: no action pending (right after `cluster.sh up` the services may still start).
"$C" exec tie crm_resource --wait --timeout=120s >/dev/null 2>&1 || echo "note: the cluster did not settle within 120 s" >&2
VICTIM=$("$C" primary) || { echo "no Primary: is the cluster healthy? ($C status)" >&2; exit 1; }
case $VICTIM in alpha) SURVIVOR=beta ;; beta) SURVIVOR=alpha ;; esac
[ "$VICTIM" = alpha ] || log "note: the Primary is $VICTIM, not alpha"

# Healthy before the fault: the Primary reaches both peers and the survivor is UpToDate.
for _ in $(seq 60); do
	j=$(json "$VICTIM")
	if jq -e '([.peers[] | .connection == "Connected"] | all) and ([.peers[] | select(.witness | not) | .peer_disk == "UpToDate"] | all)' <<<"$j" >/dev/null; then
		break
	fi
	sleep 1
done
jq -e '[.peers[] | .connection == "Connected"] | all' <<<"$j" >/dev/null || fail "$VICTIM does not reach all its peers: $j"
URL=$(jq -r .device <<<"$j")
log "Primary $VICTIM, export $URL; survivor $SURVIVOR"

# A pattern of this run beside the fixed one, so stale data from an earlier run cannot pass.
P2=$(printf '0x%02x' $(( (RANDOM % 254) + 1 )))
# With the filesystem stack (cluster.sh up with BRPCM_FS=1) ext4 is mounted on the Primary:
# the data is a file in it (raw writes would corrupt the filesystem), read back on the survivor.
# Decided from the configuration, never from what is mounted at this instant: raw writes under a
# filesystem not mounted yet destroy it (seen: its superblock overwritten, every later mount failed).
FS=""
if "$C" exec "$VICTIM" cibadmin --query --scope resources 2>/dev/null | grep -q '<primitive id="fs"'; then
	FS=/run/mnt
	for _ in $(seq 60); do "$C" exec "$VICTIM" grep -q " $FS " /proc/mounts && break; sleep 1; done
	"$C" exec "$VICTIM" grep -q " $FS " /proc/mounts || fail "the filesystem is not mounted on $VICTIM"
fi
if [ -n "$FS" ]; then
	"$C" exec "$VICTIM" sh -c "head -c 1M /dev/zero | tr '\\0' '\\132' >$FS/pattern.tmp && head -c 1M /dev/urandom >>$FS/pattern.tmp && mv $FS/pattern.tmp $FS/pattern && sync -f $FS/pattern" \
		|| fail "write $FS/pattern on $VICTIM"
	SUM=$("$C" exec "$VICTIM" md5sum "$FS/pattern" | cut -d' ' -f1)
	log "wrote $FS/pattern on $VICTIM (1 MiB of 0x5a, 1 MiB random, md5 $SUM), synced"
else
	qemu-io -f raw -c "write -P 0x5a 0 1M" -c "write -P $P2 1M 1M" -c flush "$URL" >/dev/null \
		|| fail "write through $URL"
	qemu-io -f raw -r -c "read -P 0x5a 0 1M" -c "read -P $P2 1M 1M" "$URL" >/dev/null || fail "read back on $VICTIM"
	log "wrote 1 MiB of 0x5a at 0 and 1 MiB of $P2 at 1 MiB, flushed, read back through $URL"
fi
FENCES_BEFORE=0; [ ! -e "$W/pdu.log" ] || FENCES_BEFORE=$(wc -l <"$W/pdu.log")

case $MODE in
	kill)
		PID=$("$C" exec "$VICTIM" cat "/run/blkrepl/$RES.$VICTIM.lock" | tr -dc 0-9)
		[ -n "$PID" ] || fail "no daemon pid on $VICTIM"
		T0=$(now)
		"$C" exec "$VICTIM" kill -9 "$PID"
		log "kill -9 of blkrepl (pid $PID in $VICTIM's namespace)"
		;;
	cut)
		T0=$(now)
		"$C" cut "$VICTIM"
		log "$VICTIM's switch port is down"
		;;
	standby)
		T0=$(now)
		"$C" exec tie crm_standby -N "$VICTIM" -v on
		log "$VICTIM put in standby"
		;;
esac

# Unavailable until the survivor is Primary and the data reads back through its export.
T_PRIMARY=""
deadline=$(( $(date +%s) + TIMEOUT ))
while :; do
	[ "$(date +%s)" -lt "$deadline" ] || fail "no Primary with the data on $SURVIVOR within ${TIMEOUT}s"
	j=$(json "$SURVIVOR" || true)
	if [ "$(jq -r .role <<<"$j" 2>/dev/null)" = Primary ]; then
		[ -n "$T_PRIMARY" ] || { T_PRIMARY=$(now); log "$SURVIVOR is Primary"; }
		URL2=$(jq -r .device <<<"$j")
		if [ -n "$FS" ]; then
			if [ "$("$C" exec "$SURVIVOR" sh -c "grep -q ' $FS ' /proc/mounts && md5sum $FS/pattern" 2>/dev/null | cut -d' ' -f1)" = "$SUM" ]; then
				T1=$(now)
				URL2="$FS/pattern on $SURVIVOR (ext4 over nbdfuse over $URL2)"
				break
			fi
		elif qemu-io -f raw -r -c "read -P 0x5a 0 1M" -c "read -P $P2 1M 1M" "$URL2" >/dev/null 2>&1; then
			T1=$(now)
			break
		fi
	fi
	sleep 0.2
done
log "data read back through $URL2"
RTO=$(echo "$T1 - $T0" | bc -l)
printf 'time to Primary: %.1f s\n' "$(echo "$T_PRIMARY - $T0" | bc -l)"
printf 'RTO: %.1f s\n' "$RTO"

echo "--- fencing during the scenario (PDU log):"
tail -n +"$((FENCES_BEFORE + 1))" "$W/pdu.log" 2>/dev/null || true
echo "--- cluster:"
"$C" exec "$SURVIVOR" crm_mon -1 -r -f | sed -n '/Node List/,$p'

# The old Primary's return: after a cut, heal the network first; after a standby, end it.
case $MODE in
	cut) "$C" heal "$VICTIM"; log "$VICTIM's switch port is up again" ;;
	standby) "$C" exec tie crm_standby -N "$VICTIM" -v off; log "$VICTIM out of standby" ;;
esac
log "waiting for $VICTIM to return as Secondary, in sync"
T2=$(now)
for _ in $(seq "$TIMEOUT"); do
	if "$C" exec "$VICTIM" true 2>/dev/null; then
		j=$(json "$VICTIM" || true)
		if [ "$(jq -r .role <<<"$j" 2>/dev/null)" = Secondary ] && [ "$(jq -r .disk <<<"$j")" = UpToDate ] \
			&& jq -e '[.peers[] | .connection == "Connected"] | all' <<<"$j" >/dev/null 2>&1; then
			printf '%s back as Secondary, UpToDate, connected: %.1f s after the end of the outage\n' "$VICTIM" "$(echo "$(now) - $T2" | bc -l)"
			# Only what changed flows back: a crash resyncs the activity log's extents, never
			# the whole device.
			size=$(jq -r .size_bytes <<<"$j")
			got=$(jq -r --arg s "$SURVIVOR" '.peers[] | select(.name == $s) | .received_bytes' <<<"$j")
			if [ -z "$got" ] || [ "$got" = null ]; then fail "no received_bytes for $SURVIVOR in $VICTIM's status: $j"; fi
			echo "$VICTIM received $got bytes from $SURVIVOR since its return (device $size bytes)"
			[ "$got" -lt $((size / 2)) ] || fail "$VICTIM took $got of $size bytes: a full resync where only changes should flow"
			# The return must not move the service again (no failback, no restart on the Primary).
			"$C" exec tie crm_resource --wait --timeout=120s >/dev/null 2>&1 || true
			[ "$("$C" primary)" = "$SURVIVOR" ] || fail "the Primary moved back to $VICTIM after its return"
			if [ -n "$FS" ]; then
				[ "$("$C" exec "$SURVIVOR" md5sum "$FS/pattern" 2>/dev/null | cut -d' ' -f1)" = "$SUM" ] \
					|| fail "$FS/pattern no longer reads back on $SURVIVOR after $VICTIM's return"
			else
				URL2=$(field "$SURVIVOR" .device)
				qemu-io -f raw -r -c "read -P 0x5a 0 1M" -c "read -P $P2 1M 1M" "$URL2" >/dev/null \
					|| fail "the data no longer reads back through $URL2 after $VICTIM's return"
			fi
			echo "after the return: $SURVIVOR still Primary, the data still reads back"
			exit 0
		fi
	fi
	sleep 1
done
fail "$VICTIM did not return as an UpToDate, connected Secondary within ${TIMEOUT}s"
