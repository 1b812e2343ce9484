# Sourced, not run: a private apt configuration over the host's own Debian mirror, for
# bookworm-backports and trixie-backports, that leaves the host's /etc/apt untouched. The guest
# suite takes its Debian backport kernels from it (scripts/vm/run-guest.sh), and the fresh-machine
# check another upload of qemu-utils than the host's sources carry (scripts/ci/make-fresh.sh).
#
#   backports_apt apt-get|apt-cache ARGS...    lists are fetched on first use, under
#                                              ${VM_CACHE:-~/.cache/blkrepl-vm}/apt

BACKPORTS_APT_DIR=${VM_CACHE:-$HOME/.cache/blkrepl-vm}/apt

backports_apt() {
  local tool=$1; shift
  local d=$BACKPORTS_APT_DIR
  local opts=(-o "Dir::Etc::SourceList=$d/etc/sources.list" -o Dir::Etc::SourceParts=/nonexistent
              -o "Dir::State::Lists=$d/lists" -o "Dir::Cache=$d/cache" -o "Dir::State::status=$d/status"
              -o APT::Sandbox::User=root)
  if [ -z "$(ls "$d"/lists/*Packages* 2>/dev/null)" ]; then
    local mirror
    mirror=$(grep -h -m1 -oE '^URIs: *[^ ]+/debian$' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1 | awk '{print $2}')
    [ -n "$mirror" ] || mirror=$(grep -h -m1 -oE '^deb +[^ ]+/debian ' /etc/apt/sources.list 2>/dev/null | head -1 | awk '{print $2}')
    [ -n "$mirror" ] || { echo "backports-apt: cannot find the Debian mirror in /etc/apt" >&2; return 2; }
    mkdir -p "$d"/lists/partial "$d"/cache/archives/partial "$d"/etc
    touch "$d"/status
    printf 'deb %s %s main\n' "$mirror" bookworm-backports "$mirror" trixie-backports > "$d"/etc/sources.list
    apt-get "${opts[@]}" update -q >&2 || return 2
  fi
  "$tool" "${opts[@]}" "$@"
}
