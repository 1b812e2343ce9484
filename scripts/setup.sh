#!/usr/bin/env bash
# The one place that installs what blkrepl's entry points need on a Debian machine. Every entry
# point calls it first (scripts/demo.sh, scripts/test.sh, scripts/bench.sh, scripts/vm/*.sh,
# scripts/package-deb.sh, .ci/run), so a fresh machine needs nothing but the Rust toolchain.
#
#   scripts/setup.sh [--plan] PURPOSE...      PURPOSE: build demo test vm bench package fuzz drbd
#
# It is idempotent and quiet when everything is present (dpkg's status only, no network). What is
# missing is installed with one `apt-get install`, said before it runs. Packages built from one
# source package must come from one upload: qemu-system-x86 cannot join a qemu-utils of another
# version (qemu-utils 10.x from a backport breaks qemu-system-common 7.x), so an installed sibling
# of a package being installed is moved to the version of that package's upload (up or down).
# --plan prints the apt-get command instead of running it. When it cannot install, it exits 1
# naming the packages and the command to run by hand.
set -euo pipefail
# shellcheck source=scripts/lib/dpkg-state.sh
. "$(dirname "$0")/lib/dpkg-state.sh"

usage() { sed -n 2,14p "$0" | sed 's/^# \{0,1\}//'; exit 2; }

# What each purpose needs, as Debian packages. An entry "pkg:cmd" is satisfied by the command
# alone too (python3 from pyenv serves the benchmark as well as Debian's).
needs_of() {
  case $1 in
    # bindgen generates the ublk crate's bindings at build time and needs libclang.
    build) echo libclang-dev ;;
    # The demo drives the NBD export (or /dev/ublkbN) with qemu-io and qemu-img.
    demo) needs_of build; echo qemu-utils ;;
    # The guest suite and benchmark: qemu boots Debian kernels (run-guest.sh builds an initramfs
    # with a static busybox, cpio, kmod's depmod/modprobe, xz/zstd for the modules); the guest runs
    # the host's own fio, mkfs/e2fsck, ip and jq.
    vm) needs_of build
        echo qemu-system-x86 qemu-utils busybox-static cpio kmod xz-utils zstd fio e2fsprogs iproute2 jq ;;
    # Host tests: real daemons driven by qemu-io, network namespaces with ip, the Pacemaker
    # agent under ocf-tester (resource-agents; xmllint checks its meta-data), the manual page
    # rendered by man, the Debian package built, installed and its unit checked by
    # systemd-analyze (scripts/package-test.sh), a real Pacemaker + Corosync cluster in
    # namespaces (scripts/pacemaker: ext4 on top through nbdfuse, bc for the RTO), curl scraping
    # the metrics endpoint (tests/metrics.rs), python3 for the module-cycle check
    # (scripts/check-module-cycles.py); then the guest suite.
    test) needs_of vm; needs_of package
          echo resource-agents libxml2-utils pacemaker pacemaker-cli-utils corosync libnbd-bin fuse3 bc curl \
            man-db:man systemd:systemd-analyze python3:python3 ;;
    # fio's nbd engine against the export and qemu-nbd, iperf3 for raw TCP bandwidth, sockperf
    # for its round trip, perf to count the daemons' system calls without stopping them (strace
    # where perf may not), python3 for the table.
    bench) needs_of build; echo fio iperf3 sockperf qemu-utils linux-perf:perf strace python3:python3 ;;
    # The Debian package (scripts/package-deb.sh): dpkg-shlibdeps computes its Depends.
    package) needs_of build; echo dpkg-dev ;;
    # The fuzz targets (scripts/fuzz.sh): libfuzzer-sys compiles libFuzzer, which is C++.
    fuzz) needs_of build; echo g++:g++ ;;
    # DRBD 8.4 as the baseline of the two-guest benchmark (scripts/vm/pair-bench.sh): the guests
    # run the host's drbdadm against the drbd.ko of the Debian kernel, and iperf3 for the link's
    # bound. Not part of any other purpose.
    drbd) needs_of vm; echo drbd-utils iperf3 ;;
  esac
}

installed_version() { # package -> its installed version, or nothing
  dpkg-query -W -f='${db:Status-Status} ${Version}' "$1" 2>/dev/null | sed -n 's/^installed //p'
}

plan=""
purposes=()
for a in "$@"; do
  case $a in --plan) plan=1 ;; -h|--help) usage ;; -*) usage ;; *) purposes+=("$a") ;; esac
done
[ ${#purposes[@]} -gt 0 ] || usage
for p in "${purposes[@]}"; do
  case $p in
    build|demo|test|vm|bench|package|fuzz|drbd) ;;
    *) echo "setup: unknown purpose '$p' (build demo test vm bench package fuzz drbd)" >&2; exit 2 ;;
  esac
done

if ! command -v cargo >/dev/null; then
  echo "setup: cargo is missing: install the Rust toolchain first (https://rustup.rs), then run this again" >&2
  exit 1
fi

missing=()
for p in "${purposes[@]}"; do
  for entry in $(needs_of "$p"); do
    pkg=${entry%%:*}; cmd=${entry#*:}
    [ "$cmd" != "$entry" ] && command -v "$cmd" >/dev/null && continue
    [ -n "$(installed_version "$pkg")" ] && continue
    case " ${missing[*]-} " in *" $pkg "*) ;; *) missing+=("$pkg") ;; esac
  done
done
[ ${#missing[@]} -gt 0 ] || exit 0

if [ "$(id -u)" != 0 ] && [ -z "$plan" ]; then
  echo "setup: missing packages: ${missing[*]}" >&2
  echo "  run as root, or by hand: apt-get install -y --no-install-recommends ${missing[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
verb=installing; [ -z "$plan" ] || verb="would install"
echo "setup: $verb for ${purposes[*]}: ${missing[*]}"
if [ "$(id -u)" = 0 ]; then
  # An earlier install that was interrupted leaves dpkg half done, and apt refuses to go on.
  [ -n "$plan" ] || dpkg_finish_interrupted setup
  apt-get "${apt_wait[@]}" update -q >/dev/null || echo "setup: apt-get update failed; trying the package lists already here" >&2
fi

candidate() { apt-cache policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: //p'; }
source_of() { # package version -> "source source-version" of that binary version
  apt-cache show "$1=$2" 2>/dev/null | awk -v p="$1" -v v="$2" '
    /^Source:/ { s = $2; sv = ($3 != "") ? $3 : v; gsub(/[()]/, "", sv) }
    /^$/ { exit }
    END { if (s == "") { s = p; sv = v } print s, sv }'
}

# Installed siblings (same source package, another upload) of what is about to be installed.
installed=$(dpkg-query -W -f='${Package} ${Version} ${source:Package} ${source:Version} ${db:Status-Status}\n' |
            awk '$5 == "installed" { print $1, $2, $3, $4 }')
args=()
downgrade=()
for pkg in "${missing[@]}"; do
  ver=$(candidate "$pkg")
  if [ -z "$ver" ] || [ "$ver" = "(none)" ]; then
    echo "setup: package $pkg is not available from the configured apt sources" >&2
    echo "  check /etc/apt/sources.list*, then: apt-get update && apt-get install -y $pkg" >&2
    exit 1
  fi
  args+=("$pkg=$ver")
  read -r src srcver < <(source_of "$pkg" "$ver")
  while read -r sib sibver sibsrc sibsrcver; do
    if [ -z "$sib" ] || [ "$sibsrc" != "$src" ] || [ "$sibsrcver" = "$srcver" ]; then continue; fi
    case " ${missing[*]} " in *" $sib "*) continue ;; esac
    # The sibling's binary version from the same upload (binNMUs differ per package: +bN).
    want=""
    for v in $(apt-cache madison "$sib" | awk -F'|' '{gsub(/ /, "", $2); print $2}'); do
      read -r _ vsrcver < <(source_of "$sib" "$v")
      [ "$vsrcver" = "$srcver" ] && { want=$v; break; }
    done
    if [ -z "$want" ]; then
      echo "setup: $pkg $ver cannot join the installed $sib $sibver (another $src upload), and the" >&2
      echo "  apt sources have no $sib of $src $srcver; remove it first: apt-get remove $sib" >&2
      exit 1
    fi
    echo "setup: $sib $sibver goes to $want, the version of $src that $pkg $ver comes from"
    args+=("$sib=$want"); downgrade=(--allow-downgrades)
  done <<<"$installed"
done

cmd=(apt-get "${apt_wait[@]}" install -y -q --no-install-recommends "${downgrade[@]}" "${args[@]}")
if [ -n "$plan" ]; then echo "${cmd[*]}"; exit 0; fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! "${cmd[@]}" >"$log" 2>&1; then
  tail -20 "$log" >&2
  echo "setup: installing ${missing[*]} failed (apt's last lines above); by hand: ${cmd[*]}" >&2
  exit 1
fi
still=()
for pkg in "${missing[@]}"; do [ -n "$(installed_version "$pkg")" ] || still+=("$pkg"); done
if [ ${#still[@]} -gt 0 ]; then
  echo "setup: still missing after apt-get: ${still[*]}; by hand: apt-get install -y ${still[*]}" >&2
  exit 1
fi
echo "setup: installed $(sed -n 's/^Setting up \([^ :]*\).*/\1/p' "$log" | sort -u | wc -l) packages: ${missing[*]} and what they depend on"
