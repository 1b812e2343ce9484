#!/bin/bash
# Inside a guest with ublk_drv (started by scripts/vm/test.sh through run-guest.sh): the ublk
# frontend on a real kernel, with a filesystem on /dev/ublkbN.
#
#   guest-suite.sh REPO CRATE_TEST_BINARY [SUBTEST...]      (default: every subtest)
#
#   crate      the blkrepl-ublk crate's own kernel tests (RAM disk: user copy and the buffered
#              fallback, FLUSH/FUA/discard/write-zeroes, holders, fixed ids)
#   one-node   one node: mkfs.ext4, files survive umount/mount, fio crc32c verify (4k random, 1M)
#   restart    two nodes: kill -9 and restart the primary's daemon under a mounted filesystem
#              while writers run; the writers see no error and the data verifies (user recovery)
#   failover   two nodes: kill -9 the primary mid-write, promote the other; e2fsck clean, synced
#              files intact, fio verifies every acknowledged write; the old primary's device,
#              re-attached failing, stays failing when its daemon is killed and restarted again
#              (nobody primary then), and is unmounted and removed
#   demote     demotion and `down` refused while mounted (the message names the mount); after
#              umount the device is gone
#   partition  two data nodes and a witness under quorum, each in its own namespace on a bridge:
#              the primary (ext4 mounted, a writer running) is cut off silently, the other is
#              promoted; at the heal the old primary steps down by itself: its mounted device
#              fails I/O, goes once unmounted (no `secondary`), and it resyncs as a secondary
#
# Prints "PASS <subtest>: ..." or "FAIL <subtest>: <reason>" per subtest; exits 1 on any failure.
# Every wait is a bounded poll for a state, never a fixed sleep standing in for one.
set -uo pipefail
REPO=$1 CRATE_TESTS=$2; shift 2
SUBTESTS=("$@"); [ ${#SUBTESTS[@]} -gt 0 ] || SUBTESTS=(crate one-node restart failover demote partition)
# shellcheck source=guest-lib.sh
. "$REPO/scripts/vm/guest-lib.sh"
echo "suite: kernel $(uname -r), $(nproc) CPUs"

result() { echo "RESULT: $*"; }
# Files of random data with their checksums appended to SUMS.
write_files() {
  local dir=$1 count=$2 sums=$3 i
  mkdir -p "$dir"
  for i in $(seq 1 "$count"); do
    head -c $(( (i % 7 + 1) * 37 * 1024 )) /dev/urandom > "$dir/f$i" || return 1
    sha256sum "$dir/f$i" >> "$sums"
  done
}
show_logs() {
  local log
  for log in "$WORK"/run/*.log; do echo "  --- tail of $log"; tail -n 25 "$log" | sed 's/^/  | /'; done
}
FIO_COMMON=(--ioengine=libaio --direct=1 --verify=crc32c --randrepeat=1 --output-format=terse --terse-version=3)
# fio's terse v3 output: field 5 is the job's error code.
fio_ok() { local out; out=$(fio "$@" 2>&1) || { echo "$out" | tail -5 >&2; return 1; }; [ "$(echo "$out" | tail -1 | cut -d';' -f5)" = 0 ]; }
# beta was promoted after alpha failed: beta's device (in $BDEV) gets alpha's journal replayed
# (as a mount would), passes e2fsck -fn, is mounted on MOUNTB, and holds every file of SUMS
# (checksums of files alpha had synced under MOUNT).
promoted_beta_fs() {
  local r=$1 mnt=$2 mntb=$3 sums=$4
  bl beta primary "$r" >/dev/null || die "beta refused promotion: $(status beta "$r")"
  BDEV=$(field beta "$r" .device)
  [ -b "$BDEV" ] || die "beta's device $BDEV did not appear"
  e2fsck -y -E journal_only "$BDEV" >/dev/null 2>&1
  e2fsck -fn "$BDEV" > "$WORK/$r.e2fsck.out" 2>&1 || { tail -20 "$WORK/$r.e2fsck.out" >&2; die "e2fsck -fn found errors on beta"; }
  mkdir -p "$mntb" && mount "$BDEV" "$mntb" || die "cannot mount beta's device"
  sed "s# $mnt/# $mntb/#" "$sums" | sha256sum --quiet -c - || die "a file synced before the failure differs on beta"
}
# A connected pair (alpha Primary) with a filesystem on alpha's device $DEV mounted on MOUNT.
pair_with_filesystem() {
  replicated_pair "$1" || return 1
  mkfs.ext4 -q -F "$DEV" && mkdir -p "$2" && mount "$DEV" "$2"
}

# --- subtests ------------------------------------------------------------------------------
t_crate() {
  local out
  out=$("$CRATE_TESTS" --ignored --test-threads 1 2>&1) || { echo "$out" | tail -30 >&2; die "crate kernel tests failed"; }
  echo "$out" | grep '^test ' | sed 's/^/  /'
  result "$(echo "$out" | grep -o '[0-9]* passed; [0-9]* failed' | tail -1)"
}

t_one_node() {
  local r=r1 mnt=/mnt/r1
  resource $r "alpha 127.0.0.1:7801 beta 127.0.0.1:7802"
  bl alpha create-md $r >/dev/null && bl alpha up $r >/dev/null || return 1
  bl alpha primary --force $r >/dev/null || return 1
  local st; st=$(status alpha $r)
  DEV=$(jq -r .device <<<"$st")
  [ -b "$DEV" ] || die "no block device at $DEV"
  [ "$(jq -r .device_io <<<"$st")" = serving ] || die "device_io: $st"
  echo "  device $DEV, ublk features in use: $(jq -r '.ublk_features | join(" ")' <<<"$st")"
  grep -h "ublk device added" "$WORK/run/$r.alpha.log" | sed 's/.*offered=/  features offered by the kernel: /'
  mkfs.ext4 -q -F "$DEV" && mkdir -p $mnt && mount "$DEV" $mnt || die "mkfs/mount failed"
  : > "$WORK/r1.sums"
  write_files $mnt/data 24 "$WORK/r1.sums" && sync || die "writing files failed"
  umount $mnt && mount "$DEV" $mnt || die "umount/mount failed"
  sha256sum --quiet -c "$WORK/r1.sums" || die "files differ after umount and mount"
  umount $mnt || return 1
  # On the raw device: 4 KiB random writes deep in flight, then 1 MiB writes split over tags.
  fio_ok --name=rand4k --filename="$DEV" --rw=randwrite --bs=4k --size=48M --iodepth=32 --do_verify=1 "${FIO_COMMON[@]}" ||
    die "fio 4k randwrite verify failed"
  fio_ok --name=seq1m --filename="$DEV" --rw=write --bs=1M --size=96M --iodepth=4 --offset=128M --do_verify=1 "${FIO_COMMON[@]}" ||
    die "fio 1M write verify failed"
  bl alpha down $r >/dev/null || die "down failed"
  [ ! -e "$DEV" ] || die "$DEV still exists after down"
  result "ext4 files survive umount/mount; fio crc32c verify of 4k random and 1M writes passed on $DEV"
}

t_restart() {
  local r=r2 mnt=/mnt/r2a
  pair_with_filesystem $r $mnt || return 1
  local before=$DEV
  : > "$WORK/r2.before.sums"
  write_files $mnt/before 8 "$WORK/r2.before.sums" && sync || return 1
  # Writers: fio (writes then verifies what it wrote) and files fsync'ed one by one.
  fio --name=restart --filename=$mnt/restart.dat --rw=randwrite --bs=4k --size=24M --iodepth=8 --do_verify=1 --verify_state_save=0 \
      --verify_fatal=1 "${FIO_COMMON[@]}" > "$WORK/restart.fio" 2>&1 &
  local fio_pid=$!
  ( mkdir -p $mnt/during; for i in $(seq 1 30); do
      head -c 96K /dev/urandom > $mnt/during/f$i && sync $mnt/during/f$i && sha256sum $mnt/during/f$i >> "$WORK/r2.during.sums" ||
        { echo "writer failed at file $i" >&2; exit 1; }
    done ) &
  local writer_pid=$!
  local sent; sent=$(field alpha $r '.peers[0].sent_bytes')
  wait_for alpha $r ".peers[0].sent_bytes > $sent + 2097152" || return 1
  local pid; pid=$(daemon_pid alpha $r)
  kill -9 "$pid" && wait_dead "$pid" || return 1
  echo "  killed alpha's daemon (pid $pid) with writers running; restarting it"
  ip netns exec nsA "$BIN" --node alpha up $r >/dev/null || die "restart failed"
  wait_for alpha $r '.role == "Primary" and .device_io == "serving"' || return 1
  [ "$(field alpha $r .device)" = "$before" ] || die "device changed from $before to $(field alpha $r .device)"
  grep -q "re-attached to the ublk device" "$WORK/run/$r.alpha.log" || die "no re-attach in alpha's log"
  wait "$fio_pid" || { tail -5 "$WORK/restart.fio" >&2; die "fio saw an error across the restart"; }
  [ "$(tail -1 "$WORK/restart.fio" | cut -d';' -f5)" = 0 ] || die "fio reported an error: $(tail -1 "$WORK/restart.fio")"
  wait "$writer_pid" || die "the file writer saw an error across the restart"
  sha256sum --quiet -c "$WORK/r2.before.sums" "$WORK/r2.during.sums" || die "file checksums differ after the restart"
  # The restarted node resyncs its activity-log extents to beta; wait for that before the
  # failover subtest kills it again.
  wait_for alpha $r '.peers[0].replication == "Established" and .peers[0].peer_disk == "UpToDate"' || return 1
  result "$before stayed; fio (write+verify) and 30 fsync'ed files saw no error; checksums match"
}

t_failover() {
  local r=r2 mnt=/mnt/r2a mntb=/mnt/r2b
  # Continues on the restart subtest's pair; alone, it makes its own.
  if [ -f "$WORK/etc/$r.toml" ]; then
    [ "$(field alpha $r .role)" = Primary ] || die "alpha is not primary after the restart subtest: $(status alpha $r)"
  else
    pair_with_filesystem $r $mnt || return 1
  fi
  local adev; adev=$(field alpha $r .device)
  : > "$WORK/r2.synced.sums"
  write_files $mnt/synced 10 "$WORK/r2.synced.sums" && sync || return 1
  # fio writes a file that was written in full (and synced) first, in place: what it
  # acknowledged needs no metadata to be found again. Its verify state says what completed.
  fio --name=pre --filename=$mnt/acked.dat --rw=write --bs=1M --size=32M --ioengine=psync --end_fsync=1 >/dev/null || return 1
  mkdir -p "$WORK/fiostate" && cd "$WORK/fiostate" || return 1
  local job=(--name=acked --filename=$mnt/acked.dat --rw=randwrite --bs=4k --size=32M --iodepth=8 --do_verify=0
             --verify_state_save=1 "${FIO_COMMON[@]}")
  fio "${job[@]}" > "$WORK/acked.fio" 2>&1 &
  local fio_pid=$!
  ( mkdir -p $mnt/during; for i in $(seq 1 1000); do
      head -c 64K /dev/urandom > $mnt/during/g$i && sync $mnt/during/g$i && sha256sum $mnt/during/g$i >> "$WORK/r2.synced.sums" || exit 0
    done ) &
  local writer_pid=$!
  local sent; sent=$(field alpha $r '.peers[0].sent_bytes')
  wait_for alpha $r ".peers[0].sent_bytes > $sent + 4194304" || return 1
  local pid; pid=$(daemon_pid alpha $r)
  kill -9 "$pid" && wait_dead "$pid" || return 1
  echo "  killed alpha's daemon (pid $pid) mid-write; promoting beta"
  wait_for beta $r '.peers[0].connection != "Connected"' || return 1
  promoted_beta_fs $r $mnt $mntb "$WORK/r2.synced.sums" || return 1
  local synced; synced=$(wc -l < "$WORK/r2.synced.sums")

  # alpha restarts: beta is primary now, so alpha's device, held since the kill, is attached
  # failing every request. fio gets its errors, saves its verify state and ends.
  ip netns exec nsA "$BIN" --node alpha up $r >/dev/null || die "alpha did not restart"
  wait_for alpha $r '(.device_io // "") | startswith("failing")' || return 1
  echo "  alpha: $(field alpha $r .device_io)"
  timeout 120 tail --pid="$fio_pid" -f /dev/null || die "fio did not end after alpha's device failed"
  wait "$writer_pid"
  ls "$WORK"/fiostate/*verify.state >/dev/null 2>&1 || die "fio saved no verify state"
  local verify
  # One read at a time: fio 3.33 decides which writes were in flight from its count of
  # completed reads, which runs behind the issued ones by the read queue depth.
  verify=$(fio "${job[@]/#--filename=*/--filename=$mntb/acked.dat}" --do_verify=1 --verify_only --verify_state_load=1 \
               --ioengine=psync --iodepth=1 2>&1) ||
    { echo "$verify" | tail -5 >&2; die "fio verify of the acknowledged writes failed on beta"; }
  local err read_kb
  err=$(echo "$verify" | tail -1 | cut -d';' -f5); read_kb=$(echo "$verify" | tail -1 | cut -d';' -f6)
  [ "$err" = 0 ] && [ "${read_kb:-0}" -gt 0 ] || die "fio verify: error $err after reading ${read_kb} KiB"
  cd / || return 1

  # Once alpha holds beta's data and nobody is primary, a daemon of alpha's killed and
  # restarted keeps the still mounted device failing (its record says so): it must not take it
  # for a device left behind as primary and serve beta's data to alpha's stale filesystem.
  wait_for alpha $r '.disk == "UpToDate" and .peers[0].replication == "Established"' || return 1
  umount $mntb && bl beta secondary $r >/dev/null || die "cannot demote beta"
  pid=$(daemon_pid alpha $r)
  kill -9 "$pid" && wait_dead "$pid" || return 1
  ip netns exec nsA "$BIN" --node alpha up $r >/dev/null || die "alpha did not restart a second time"
  wait_for alpha $r '(.device_io // "") | startswith("failing")' || return 1
  [ "$(field alpha $r .role)" = Secondary ] || die "alpha's second daemon promoted it: $(status alpha $r)"
  if dd if="$adev" of=/dev/null bs=4k count=1 iflag=direct 2>/dev/null; then die "alpha's stale $adev served a read"; fi

  # The old primary's stale device: unmounted (its I/O fails), then demotion removes it.
  umount $mnt || umount -l $mnt || die "cannot unmount alpha's failing device"
  local out; out=$(bl alpha secondary $r 2>&1) || die "alpha's demotion failed: $out"
  [ "$(field alpha $r .device)" = null ] || die "alpha's status still shows a device"
  [ ! -e "$adev" ] || die "$adev still exists after alpha's demotion"
  result "e2fsck -fn clean; $synced synced files intact; fio verified ${read_kb} KiB it had acknowledged; alpha's stale $adev failed I/O (across a second restart too), then went away"
}

t_demote() {
  local r=r4 mnt=/mnt/r4
  resource $r "alpha 127.0.0.1:7811 beta 127.0.0.1:7812"
  bl alpha create-md $r >/dev/null && bl alpha up $r >/dev/null && bl alpha primary --force $r >/dev/null || return 1
  DEV=$(field alpha $r .device)
  mkfs.ext4 -q -F "$DEV" && mkdir -p $mnt && mount "$DEV" $mnt || return 1
  local out rc
  out=$(bl alpha secondary $r 2>&1); rc=$?
  [ $rc = 12 ] || die "secondary while mounted: exit $rc ($out)"
  grep -q "a mount on $mnt" <<<"$out" || die "the refusal does not name the mount: $out"
  echo "  refused: $out"
  out=$(bl alpha down $r 2>&1); rc=$?
  [ $rc = 12 ] && grep -q "a mount on $mnt" <<<"$out" || die "down while mounted: exit $rc ($out)"
  [ "$(field alpha $r .role)" = Primary ] && [ -b "$DEV" ] || die "the refused demotion changed something"
  umount $mnt || return 1
  bl alpha secondary $r >/dev/null || die "secondary after umount failed"
  [ ! -e "$DEV" ] || die "$DEV still exists after demotion"
  [ "$(field alpha $r .device)" = null ] || die "status still shows a device"
  bl alpha down $r >/dev/null || return 1
  result "secondary and down refused with exit 12 naming $mnt; after umount $DEV is gone"
}

t_partition() {
  local r=r5 mnt=/mnt/r5a mntb=/mnt/r5b
  modprobe bridge || die "no bridge module"
  ip link add brP type bridge && ip link set brP up || die "cannot create the bridge"
  local n i=1
  for n in alpha beta tie; do
    ip netns add "p$n" && ip link add "e$n" type veth peer name "b$n" && ip link set "e$n" netns "p$n" &&
      ip link set "b$n" master brP && ip link set "b$n" up &&
      ip -n "p$n" addr add "10.98.0.$i/24" dev "e$n" && ip -n "p$n" link set "e$n" up && ip -n "p$n" link set lo up ||
      die "cannot create the namespace of $n"
    i=$((i + 1))
  done
  truncate -s 256M "$WORK/$r.alpha.img" "$WORK/$r.beta.img"
  printf 'name = "%s"\nprotocol = "C"\nquorum = "majority"\nfrontend = "ublk"\nsecret = "guest-suite-shared-secret"\n' $r > "$WORK/etc/$r.toml"
  printf '[[node]]\nname = "%s"\naddress = "%s"\ndisk = "%s"\n' alpha 10.98.0.1:7789 "$WORK/$r.alpha.img" \
    beta 10.98.0.2:7789 "$WORK/$r.beta.img" tie 10.98.0.3:7789 none >> "$WORK/etc/$r.toml"
  for n in alpha beta tie; do
    bl $n create-md $r >/dev/null && ip netns exec "p$n" "$BIN" --node $n up $r >/dev/null || die "up failed for $n"
  done
  wait_for alpha $r '.quorum_votes == 3' || return 1
  bl alpha new-current-uuid --clear-bitmap $r >/dev/null || die "new-current-uuid failed"
  wait_for beta $r '.disk == "UpToDate"' && wait_for alpha $r '.disk == "UpToDate"' || return 1
  bl alpha primary $r >/dev/null || die "alpha refused promotion: $(status alpha $r)"
  local adev; adev=$(field alpha $r .device)
  mkfs.ext4 -q -F "$adev" && mkdir -p $mnt && mount "$adev" $mnt || die "mkfs/mount on $adev failed"
  : > "$WORK/r5.synced.sums"
  write_files $mnt/synced 10 "$WORK/r5.synced.sums" && sync || return 1
  # A writer that keeps going until its filesystem fails it.
  ( mkdir -p $mnt/during; for i in $(seq 1 100000); do
      head -c 64K /dev/urandom > $mnt/during/g$i && sync $mnt/during/g$i || exit 0
    done ) &
  local writer_pid=$!

  ip link set balpha down || die "cannot cut alpha off"
  echo "  alpha cut off (its bridge port down); waiting for beta to be allowed to promote"
  wait_for alpha $r '.quorum == false' || return 1
  wait_for beta $r '.may_promote == true' || return 1
  promoted_beta_fs $r $mnt $mntb "$WORK/r5.synced.sums" || return 1
  [ "$(field alpha $r .role)" = Primary ] || die "alpha gave up before it heard of beta: $(status alpha $r)"

  ip link set balpha up || die "cannot heal"
  echo "  healed; alpha must step down by itself"
  wait_for alpha $r '.role == "Secondary" and (.stepped_down // "" | contains("beta"))' || return 1
  wait_for alpha $r '(.device_io // "") | startswith("failing")' || return 1
  echo "  alpha: $(field alpha $r .stepped_down); device: $(field alpha $r .device_io)"
  timeout 120 tail --pid="$writer_pid" -f /dev/null || die "the writer on alpha's filesystem did not fail"
  wait_for alpha $r '.disk == "UpToDate"' || return 1
  wait_for beta $r '[.peers[] | select(.name == "alpha")][0] | .replication == "Established" and .peer_disk == "UpToDate"' || return 1
  [ "$(field beta $r .role)" = Primary ] || die "beta is no longer primary"
  grep -q "split brain" "$WORK"/run/$r.*.log && die "a split brain was logged"
  # Resynced, alpha may be primary again, but never on the device its filesystem still holds:
  # what that filesystem cached is not what the disk holds since beta wrote.
  umount $mntb && bl beta secondary $r >/dev/null || die "beta's demotion failed"
  local refused; refused=$(bl alpha primary $r 2>&1) && die "alpha was promoted with its failing $adev still mounted"
  echo "$refused" | grep -q "never serves again" || die "alpha's promotion was refused for another reason: $refused"
  umount $mnt || umount -l $mnt || die "cannot unmount alpha's failing device"
  local k
  for k in $(seq 1 100); do [ -e "$adev" ] || break; sleep 0.2; done
  [ ! -e "$adev" ] || die "$adev still exists 20 s after it was unmounted"
  [ "$(field alpha $r .device)" = null ] || die "alpha's status still shows a device"
  # Unmounted and gone, it is promoted with a device exported afresh, holding beta's data.
  bl alpha primary $r >/dev/null || die "alpha refused promotion after its failing device went: $(status alpha $r)"
  adev=$(field alpha $r .device)
  mount -o ro "$adev" $mnt || die "cannot mount alpha's new $adev"
  sha256sum --quiet -c "$WORK/r5.synced.sums" || die "a file synced before the partition differs on alpha's new device"
  umount $mnt || return 1
  bl alpha secondary $r >/dev/null || die "alpha's demotion failed"
  result "alpha stepped down by itself; its mounted $adev failed I/O, refused to serve again while mounted, and went once unmounted; it resynced from beta and was promoted on a fresh device; no split brain"
}

# --- runner --------------------------------------------------------------------------------
FAILED=0
for t in "${SUBTESTS[@]}"; do
  echo "== $t"
  ( "t_${t//-/_}" ) 2>&1 | tee "$WORK/$t.out"
  if [ "${PIPESTATUS[0]}" = 0 ]; then
    echo "PASS $t: $(grep -a '^RESULT: ' "$WORK/$t.out" | tail -1 | cut -c9-)"
  else
    show_logs
    echo "FAIL $t: $(grep -a 'error:' "$WORK/$t.out" | tail -1 | sed 's/^ *error: //')"
    FAILED=1
  fi
done
exit $FAILED
