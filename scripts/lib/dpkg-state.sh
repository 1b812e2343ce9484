# Sourced, not run: dpkg and apt on a machine whose image may have been saved in the
# middle of an installation (seen on a CI machine: libraries configured, the packages that use
# them only unpacked). scripts/setup.sh and scripts/ci/make-fresh.sh use it.
#
#   dpkg_present PACKAGE           true when dpkg holds any of the package's files: installed, or
#                                  left unpacked, half-configured or half-installed
#   dpkg_finish_interrupted WHO    runs dpkg --configure -a when an earlier installation was
#                                  interrupted (apt refuses to work until it is); WHO prefixes
#                                  the messages. Needs root.
#   apt-get "${apt_wait[@]}" ...   apt waits for another apt (a second checkout's CI, unattended
#                                  upgrades on a machine just booted) rather than fail

# shellcheck disable=SC2034 # used by the scripts that source this
apt_wait=(-o DPkg::Lock::Timeout=900)

dpkg_present() {
  case $(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null) in
    ''|not-installed|config-files) return 1 ;;
    *) return 0 ;;
  esac
}

dpkg_finish_interrupted() {
  # Half done while another apt or dpkg runs is that one's work in progress: apt waits for it.
  if [ -n "$(dpkg --audit 2>/dev/null)" ] && ! pgrep -x 'apt(-get)?|dpkg' >/dev/null; then
    echo "$1: an earlier package installation was interrupted: dpkg --configure -a"
    dpkg --configure -a >/dev/null 2>&1 || echo "$1: dpkg --configure -a failed; run it by hand" >&2
  fi
}
