#!/bin/bash
# run-guest.sh - boot a Debian kernel that has ublk_drv under qemu and run a script inside it.
#
#   run-guest.sh [options] GUEST_SCRIPT [ARGS...]
#     -k KVER     kernel version, or a series (6.12, 7) for its newest Debian backport kernel
#                 (default: $KVER, else 6.12: bookworm-backports). 7.x kernels (trixie-backports,
#                 e.g. 7.3.4+deb13-amd64) add ublk zero copy, AUTO_BUF_REG, PER_IO_DAEMON, QUIESCE
#     -p          print the kernel version -k resolves to, and exit
#     -s DIR      shared dir (read-write, /shared in the guest; default: a fresh dir under the cache)
#     -t SECS     timeout for the whole VM (default 600)
#     -m MEM      guest memory (default 2G);  -c CPUS  guest cpus (default 2)
#   env: VM_CACHE (default ~/.cache/blkrepl-vm): kernels, initramfs, private apt lists
#        QEMU_EXTRA="..." extra qemu args (networking between guests, see README.md)
#        VMNAME=name   KAPPEND="extra kernel cmdline"
#
# The guest sees the host's whole root read-only (9p) under a tmpfs overlay: host-built binaries,
# cargo test executables, fio, mkfs and so on run inside it unchanged; every write in the guest is
# thrown away at poweroff except under /shared. Modules of KVER are at /lib/modules/KVER.
# The exit code of GUEST_SCRIPT becomes this script's exit code (125: the VM died or timed out).
#
# Host packages: installed first if missing (scripts/setup.sh vm).
# KVM on these machines is PVM and cannot run a stock kernel, so qemu runs under TCG (software
# emulation): boot to the guest script takes about 8 s; I/O figures inside are only relative.
set -euo pipefail
CACHE=${VM_CACHE:-$HOME/.cache/blkrepl-vm}
KVER=${KVER:-}
TIMEOUT=600 MEM=2G CPUS=2 SHARED="" PRINT=""
while getopts "k:s:t:m:c:p" o; do case $o in
  k) KVER=$OPTARG;; s) SHARED=$OPTARG;; t) TIMEOUT=$OPTARG;; m) MEM=$OPTARG;; c) CPUS=$OPTARG;; p) PRINT=1;;
  *) sed -n 2,26p "$0"; exit 2;; esac; done
shift $((OPTIND-1))
[ $# -ge 1 ] || [ -n "$PRINT" ] || { sed -n 2,26p "$0"; exit 2; }
"$(dirname "$0")/../setup.sh" vm >&2

. "$(dirname "$0")/../lib/backports-apt.sh"

# Guests started together (scripts/vm/pair-bench.sh starts two) share the cache: one at a time
# fetches the apt lists and the kernel and builds the initramfs, the others wait and find them
# ready (on a fresh machine two fetches into one directory failed both guests).
mkdir -p "$CACHE"
exec 9>"$CACHE/prepare.lock"
flock 9
# A series (6.12, 7) stands for its newest kernel: 6.x kernels are packaged as
# linux-image-KVER-unsigned, 7.x ones as linux-binary-KVER.
case ${KVER:-6.12} in
  *-amd64) ;;
  *) series=${KVER:-6.12}
     KVER=$(backports_apt apt-cache search --names-only "^linux-(image|binary)-${series//./\\.}\\.[0-9.]+\\+deb[0-9]+-amd64(-unsigned)?\$" |
            awk '{print $1}' | sed -E 's/^linux-(image|binary)-//; s/-unsigned$//' | sort -V | tail -1)
     [ -n "$KVER" ] || { echo "run-guest: no $series kernel found in bookworm/trixie-backports" >&2; exit 2; };;
esac
[ -z "$PRINT" ] || { echo "$KVER"; exit 0; }
GUEST_SCRIPT=$(readlink -f "$1"); shift

KDIR=$CACHE/kernels/$KVER
fetch_kernel() {
  local pk=() d f
  if backports_apt apt-cache show linux-image-$KVER-unsigned >/dev/null 2>&1; then
    pk=(linux-image-$KVER-unsigned)                                   # 6.x packaging
  else
    pk=(linux-binary-$KVER linux-modules-$KVER linux-base-$KVER)       # 7.x packaging
  fi
  rm -rf $KDIR.tmp; mkdir -p $KDIR.tmp
  d=$(mktemp -d $CACHE/dl.XXXX)
  (cd $d && backports_apt apt-get download "${pk[@]}" >&2)
  for f in $d/*.deb; do dpkg-deb -x $f $KDIR.tmp; done
  rm -rf $d
  mv $KDIR.tmp $KDIR
}
[ -d $KDIR ] || fetch_kernel
if [ -d $KDIR/lib/modules/$KVER ] && [ ! -L $KDIR/lib/modules ]; then MODDIR=$KDIR/lib/modules
else MODDIR=$KDIR/usr/lib/modules; mkdir -p $KDIR/lib; ln -sfn ../usr/lib/modules $KDIR/lib/modules; fi
VMLINUZ=$KDIR/boot/vmlinuz-$KVER; [ -f $VMLINUZ ] || VMLINUZ=$MODDIR/$KVER/vmlinuz
[ -f $MODDIR/$KVER/modules.dep ] || depmod -b $KDIR $KVER

# initramfs: static busybox + the 9p and overlay modules; init mounts the host root and switches to it.
INITRD=$KDIR/initramfs.cpio.gz
if [ ! -f $INITRD ] || [ $INITRD -ot "$0" ]; then
  R=$(mktemp -d $CACHE/initramfs.XXXX)
  mkdir -p $R/{bin,modules,proc,sys,dev,host,newroot,rw}
  cp "$(command -v busybox)" $R/bin/busybox
  modprobe -a -d $KDIR -S $KVER --show-depends 9pnet_virtio 9p overlay | awk '$1=="insmod"{print $2}' |
    awk '!seen[$0]++' | while read -r ko; do
      n=$(basename $ko); n=${n%.xz}; n=${n%.zst}; n=${n%.gz}
      case $ko in *.xz) xz -dc $ko;; *.zst) zstd -dc $ko;; *.gz) gzip -dc $ko;; *) cat $ko;; esac > $R/modules/$n
      echo $n >> $R/modules/order
    done
  cat > $R/init <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /modules/order); do insmod /modules/$m || echo "INIT: insmod $m failed"; done
MO="trans=virtio,version=9p2000.L,msize=512000"
mount -t 9p -o ro,$MO,cache=loose hostroot /host || { echo "INIT: 9p root mount failed"; poweroff -f; }
mount -t tmpfs -o size=75% tmpfs /rw; mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work /newroot ||
  { echo "INIT: overlay failed"; poweroff -f; }
mkdir -p /newroot/lib/modules /newroot/shared
mount -t 9p -o ro,$MO modules /newroot/lib/modules
mount -t 9p -o $MO shared /newroot/shared
mount -t proc proc /newroot/proc; mount -t sysfs sys /newroot/sys; mount -t devtmpfs dev /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts; mount -t tmpfs tmpfs /newroot/dev/shm; mount -t tmpfs tmpfs /newroot/run
exec switch_root /newroot /usr/bin/env -i HOME=/root TERM=dumb \
  PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin /bin/bash /shared/.stage2
EOF
  chmod +x $R/init
  (cd $R && find . | cpio -o -H newc 2>/dev/null | gzip -1) > $INITRD.tmp && mv $INITRD.tmp $INITRD
  rm -rf $R
fi
flock -u 9
exec 9>&-

[ -n "$SHARED" ] || { mkdir -p $CACHE/runs; SHARED=$(mktemp -d $CACHE/runs/run.XXXX); }
mkdir -p $SHARED; rm -f $SHARED/rc
cp "$GUEST_SCRIPT" $SHARED/guest-script
{ printf 'set -- '; printf '%q ' "$@"; echo; } > $SHARED/args
cat > $SHARED/.stage2 <<'EOF'
cd /shared; . /shared/args; mkdir -p /run/lock
echo "GUEST: start at uptime $(cut -d' ' -f1 /proc/uptime)s kernel $(uname -r)"
/bin/bash /shared/guest-script "$@"; rc=$?
echo $rc > /shared/rc; echo "GUEST_EXIT_CODE=$rc"; cd /; sync
umount /shared 2>/dev/null; echo o > /proc/sysrq-trigger; sleep 30
EOF

LOG=$SHARED/console.log
echo "run-guest: kernel $KVER, shared $SHARED, log $LOG" >&2
# A kernel that dies before the guest script starts ran none of our code (seen once in five CI
# runs: 7.3 oopsing in hrtimer code while patching static keys under TCG, 1.3 s into boot): it
# boots once more, saying so, its first console log kept beside. A VM that dies later is a failure.
for attempt in 1 2; do
  T0=$(date +%s)
  set +e
  timeout -k 5 $TIMEOUT qemu-system-x86_64 -accel tcg,thread=multi -cpu max -m $MEM -smp $CPUS \
    -nographic -no-reboot -name "${VMNAME:-blkrepl-guest}" -kernel $VMLINUZ -initrd $INITRD \
    -append "console=ttyS0 panic=-1 loglevel=4 ${KAPPEND:-}" \
    -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
    -virtfs local,path=$(readlink -f $MODDIR),mount_tag=modules,security_model=none,readonly=on \
    -virtfs local,path=$SHARED,mount_tag=shared,security_model=none \
    -nic none ${QEMU_EXTRA:-} < /dev/null 2>&1 | tee $LOG | sed -u 's/\x1b\[[0-9;?]*[a-zA-Z]//g; s/\x1bc//g'
  qrc=${PIPESTATUS[0]}
  set -e
  echo "run-guest: qemu exit $qrc, wall $(( $(date +%s) - T0 ))s" >&2
  [ -f $SHARED/rc ] && exit $(cat $SHARED/rc)
  # (not anchored: the console's terminal resets precede it on its line)
  if grep -aq 'GUEST: start' $LOG || [ $attempt = 2 ]; then break; fi
  mv $LOG $LOG.boot-failure
  echo "run-guest: the kernel died before the guest script started (a boot failure, log in $LOG.boot-failure): booting again" >&2
done
echo "run-guest: no rc file (the VM crashed or timed out)" >&2; exit 125
