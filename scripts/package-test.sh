#!/usr/bin/env bash
# Tests the Debian package as an administrator meets it: builds it (scripts/package-deb.sh),
# installs it with dpkg -i, checks the installed binary's version against Cargo.toml, the unit
# with systemd-analyze verify, the manual page with man -l, the completions, and runs ocf-tester
# and the agent's other tests against the INSTALLED agent (tests/ocf_agent.rs with
# BLKREPL_OCF_AGENT), then purges the package and checks that nothing it brought is left.
#
#   scripts/package-test.sh         as root (dpkg -i); scripts/test.sh runs it
#
# It leaves the machine as it found it: it refuses to run over an installed blkrepl package or
# over files of the package's that are already there (a /usr/sbin/blkrepl copied by hand), and
# purges what it installed even when a check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "package-test: $*"; }
die() { echo "package-test: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "installing the package needs root (dpkg -i): run it as root (the suite, scripts/test.sh, does)"
for cmd in systemd-analyze man ocf-tester; do
  command -v "$cmd" >/dev/null || die "$cmd is missing: scripts/setup.sh test installs it"
done
# One run at a time per machine (two CI checkouts may share it): the package is machine-wide.
mkdir -p /run/lock
exec 9>/run/lock/blkrepl-package-test.lock
flock -w 1800 9 || die "another package test has held /run/lock/blkrepl-package-test.lock for 30 minutes"
# A run killed between install and purge (SIGKILL skips the trap) leaves its package behind and
# this marker, which says the package is the test's and not an administrator's.
marker=/var/lib/blkrepl-package-test.installed
state=$(dpkg-query -W -f='${db:Status-Status}' blkrepl 2>/dev/null || true)
if [ -e "$marker" ] && [ -n "$state" ] && [ "$state" != not-installed ]; then
  say "the package an interrupted run installed ($(cat "$marker")) is still here: purging it"
  dpkg --purge blkrepl >/dev/null
  state=$(dpkg-query -W -f='${db:Status-Status}' blkrepl 2>/dev/null || true)
fi
rm -f "$marker"
if [ -n "$state" ] && [ "$state" != not-installed ]; then
  die "a blkrepl package is on this machine ($state): remove it first (dpkg --purge blkrepl)"
fi

deb=$(scripts/package-deb.sh)
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
say "built $deb"

# What the package holds, and which of those paths the machine already had (directories such as
# /usr/share/man/man8): after the purge only those may remain.
mapfile -t paths < <(dpkg-deb --fsys-tarfile "$deb" | tar -t | sed 's|^\./|/|; s|/$||' | grep -v '^/*$')
existed=()
for p in "${paths[@]}"; do
  [ -e "$p" ] || continue
  [ -d "$p" ] || die "$p is already here (not from a package): move it away first, the purge would remove it"
  existed+=("$p")
done

trap 'dpkg --purge blkrepl >/dev/null 2>&1 && rm -f "$marker" || true' EXIT
echo "$deb" >"$marker"
dpkg -i "$deb" >/dev/null
say "installed: $(dpkg-query -W -f='${Package} ${Version} ${Architecture}, Depends: ${Depends}' blkrepl)"

got=$(/usr/sbin/blkrepl -V)
[ "$got" = "blkrepl $version" ] || die "/usr/sbin/blkrepl -V says '$got', Cargo.toml says $version"
long=$(/usr/sbin/blkrepl --version)
case "$long" in "blkrepl $version (peer protocol "*", metadata format "*")") ;; *) die "/usr/sbin/blkrepl --version says '$long'" ;; esac
say "/usr/sbin/blkrepl --version: $long"

for f in /usr/lib/ocf/resource.d/blkrepl/blkrepl /usr/lib/systemd/system/blkrepl@.service \
  /usr/lib/systemd/system/blkrepl-promoter.service \
  /usr/share/bash-completion/completions/blkrepl /usr/share/zsh/vendor-completions/_blkrepl \
  /usr/share/fish/vendor_completions.d/blkrepl.fish /usr/share/man/man8/blkrepl.8.gz \
  /usr/share/doc/blkrepl/README.md /usr/share/doc/blkrepl/OPERATIONS.md /usr/share/doc/blkrepl/copyright; do
  [ -s "$f" ] || die "$f is missing or empty"
done
[ -x /usr/lib/ocf/resource.d/blkrepl/blkrepl ] || die "the OCF agent is not executable"
[ -d /etc/blkrepl ] || die "/etc/blkrepl was not created"
grep -q 'blkrepl,create-md)' /usr/share/bash-completion/completions/blkrepl || die "the bash completion does not offer create-md"
say "agent, unit, completions, manual page, docs and /etc/blkrepl are in place"

warnings=$(MANWIDTH=100 man --warnings -l /usr/share/man/man8/blkrepl.8.gz 2>&1 >/dev/null) \
  || die "man -l /usr/share/man/man8/blkrepl.8.gz failed: $warnings"
[ -z "$warnings" ] || die "man -l warns about blkrepl.8.gz: $warnings"
MANWIDTH=100 man -l /usr/share/man/man8/blkrepl.8.gz 2>/dev/null | grep -q 'blkrepl create-md' \
  || die "the installed manual page does not describe blkrepl create-md"
say "man -l /usr/share/man/man8/blkrepl.8.gz renders without warnings"

# The template unit verifies as an instance; the check covers ExecStart's binary and the manual
# page named in Documentation= too.
for unit in blkrepl@.service blkrepl-promoter.service; do
  systemd-analyze verify "/usr/lib/systemd/system/$unit" || die "systemd-analyze verify $unit failed (above)"
  say "systemd-analyze verify $unit: clean"
done

say "the agent's tests (ocf-tester among them) against /usr/lib/ocf/resource.d/blkrepl/blkrepl"
BLKREPL_OCF_AGENT=/usr/lib/ocf/resource.d/blkrepl/blkrepl cargo test --release --test ocf_agent -- --test-threads 2

dpkg --purge blkrepl >/dev/null
rm -f "$marker"
trap - EXIT
state=$(dpkg-query -W -f='${db:Status-Status}' blkrepl 2>/dev/null || true)
[ -z "$state" ] || [ "$state" = not-installed ] || die "after dpkg --purge the package is still $state"
left=()
for p in "${paths[@]}"; do
  [ -e "$p" ] || continue
  case " ${existed[*]-} " in *" $p "*) ;; *) left+=("$p") ;; esac
done
[ ${#left[@]} = 0 ] || die "left behind by dpkg --purge: ${left[*]}"
say "purged; nothing left behind (${#paths[@]} paths checked)"
say "passed"
