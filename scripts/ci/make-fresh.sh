#!/usr/bin/env bash
# Puts this machine back into a state a fresh machine can be in, so that the entry points run
# after it prove they install what they need (scripts/setup.sh) instead of relying on what an
# earlier run left behind. .ci/run uses it; it changes the machine's packages, so it runs only
# under CI=true or with --yes.
#
#   scripts/ci/make-fresh.sh [--yes] missing      remove libclang-dev, qemu-system-x86, qemu-utils
#                                                 and the other packages the entry points install
#                                                 that fresh images lack
#   scripts/ci/make-fresh.sh [--yes] other-qemu   remove qemu-system-x86 and put in a qemu-utils of
#                                                 another upload than the apt sources' qemu-system-x86
#                                                 (bookworm-backports', as seen on fresh images)
#   scripts/ci/make-fresh.sh [--yes] interrupted  leave iperf3 as an image saved in the middle of
#                                                 its installation has it (seen on a CI machine):
#                                                 its library configured, iperf3 only unpacked, so
#                                                 that dpkg --audit reports it and the removals of
#                                                 `missing` must finish it first
#
# Nothing is removed that other installed packages depend on: apt's plan is checked first and a
# removal that would take anything else along is refused. Either way the blkrepl package is
# purged if installed.
set -euo pipefail
cd "$(dirname "$0")/../.."
yes=""
[ "${1:-}" != --yes ] || { yes=1; shift; }
[ $# = 1 ] || { sed -n 2,21p "$0" | sed 's/^# \{0,1\}//'; exit 2; }
if [ "${CI:-}" != true ] && [ -z "$yes" ]; then
  echo "make-fresh: this removes packages from the machine; run it under CI=true or with --yes" >&2
  exit 2
fi
export DEBIAN_FRONTEND=noninteractive

# shellcheck source=scripts/lib/dpkg-state.sh
. scripts/lib/dpkg-state.sh
# An image saved in the middle of an installation has packages only unpacked: finish it, so that
# what is removed below is what a machine would have, and apt plans over a consistent database.
dpkg_finish_interrupted make-fresh

# Purges the named packages that dpkg holds (in any state: one left unpacked by an interrupted
# installation is removed too), and nothing else.
remove() {
  local present=() p plan extra
  for p in "$@"; do dpkg_present "$p" && present+=("$p"); done
  [ ${#present[@]} -gt 0 ] || return 0
  plan=$(apt-get -s purge "${present[@]}" | awk '/^Purg /{print $2}')
  extra=$(comm -23 <(sort <<<"$plan") <(printf '%s\n' "${present[@]}" | sort))
  if [ -n "$extra" ]; then
    echo "make-fresh: removing ${present[*]} would also remove: ${extra//$'\n'/ }; refused" >&2
    exit 1
  fi
  echo "make-fresh: removing ${present[*]}"
  apt-get "${apt_wait[@]}" purge -y -q "${present[@]}" >/dev/null
}

# Runs a command whose chatter (maintainer scripts' notes) is shown only if it fails.
quietly() {
  local out
  out=$("$@" 2>&1) || { echo "$out" >&2; echo "make-fresh: $* failed" >&2; exit 1; }
}

QEMU_SYSTEM=(qemu-system-x86 qemu-system-gui qemu-system-common qemu-system-data qemu-block-extra)
LIBCLANG=(libclang-dev libclang-14-dev libclang-common-14-dev libclang1-14)

# blkrepl's own package (scripts/package-test.sh purges it, unless it was interrupted): a fresh
# machine has no blkrepl but the one built from the checkout.
remove blkrepl
case $1 in
  missing)
    remove "${QEMU_SYSTEM[@]}" qemu-utils "${LIBCLANG[@]}" busybox-static fio iperf3 libiperf0 sockperf linux-perf resource-agents libxml2-utils \
      pacemaker pacemaker-cli-utils pacemaker-resource-agents corosync libnbd-bin fuse3
    ;;
  other-qemu)
    remove "${QEMU_SYSTEM[@]}"
    # shellcheck source=scripts/lib/backports-apt.sh
    . scripts/lib/backports-apt.sh
    sources=$(apt-cache policy qemu-system-x86 | sed -n 's/^ *Candidate: //p')
    # bookworm-backports' (trixie-backports' needs trixie's libraries).
    other=$(backports_apt apt-cache madison qemu-utils | awk -F' *[|] *' '$3 ~ / bookworm-backports\// { print $2; exit }')
    if [ -z "$other" ] || [ "$other" = "$sources" ]; then
      echo "make-fresh: bookworm-backports has no qemu-utils of another version than $sources" >&2
      exit 1
    fi
    if [ "$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null)" != "$other" ]; then
      d=$(mktemp -d)
      (cd "$d" && backports_apt apt-get download -q "qemu-utils=$other" >/dev/null)
      apt-get "${apt_wait[@]}" update -q >/dev/null
      echo "make-fresh: installing qemu-utils $other from bookworm-backports (the sources' qemu-system-x86 is $sources)"
      apt-get "${apt_wait[@]}" install -y -q --no-install-recommends --allow-downgrades "$d"/qemu-utils_*.deb >/dev/null
      rm -rf "$d"
    fi
    ;;
  interrupted)
    # iperf3 installed first brings its dependencies (libsctp1, libssl3), so that only the
    # library's and iperf3's own configuration is left to dpkg.
    if ! apt-get "${apt_wait[@]}" install -y -q --no-install-recommends iperf3 >/dev/null 2>&1; then
      apt-get "${apt_wait[@]}" update -q >/dev/null
      apt-get "${apt_wait[@]}" install -y -q --no-install-recommends iperf3 >/dev/null
    fi
    d=$(mktemp -d)
    # apt downloads as _apt where it may.
    chown _apt "$d" 2>/dev/null || true
    (cd "$d" && apt-get download -q iperf3 libiperf0 >/dev/null)
    quietly dpkg --purge iperf3 libiperf0
    quietly dpkg --unpack "$d"/*.deb
    quietly dpkg --configure libiperf0
    rm -rf "$d"
    if [ "$(dpkg-query -W -f='${db:Status-Status}' iperf3)" != unpacked ] || [ -z "$(dpkg --audit)" ]; then
      echo "make-fresh: iperf3 is not left half installed: $(dpkg-query -W -f='${db:Status-Status}' iperf3)" >&2
      exit 1
    fi
    echo "make-fresh: iperf3 left unpacked and not configured, as an interrupted installation leaves it"
    ;;
  *) sed -n 2,21p "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
