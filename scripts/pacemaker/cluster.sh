#!/usr/bin/env bash
# A three-node Pacemaker 2.1 + Corosync 3 cluster on one machine, each node in its own network,
# mount, IPC, UTS and PID namespace, running blkrepl as a promotable clone. See README.md here.
#
#   cluster.sh up            bridge, namespaces, corosync + pacemaker on alpha, beta and tie,
#                            blkrepl witness on tie, resources configured, waits for a Primary
#   cluster.sh down          stops everything (processes, mounts, namespaces, bridge, PDU)
#   cluster.sh exec NODE CMD...   runs CMD inside NODE's namespaces
#   cluster.sh status        crm_mon once and blkrepl status of every node
#   cluster.sh cut NODE | heal NODE    takes NODE's switch port down / up (packets vanish)
#   cluster.sh boot NODE | kill NODE   powers a node on / off by hand (as the fence agent does)
#   cluster.sh primary       prints the node whose blkrepl is Primary
#
# Environment: BRPCM_WORK (work dir, default /tmp/brpcm), BLKREPL (the blkrepl binary; default:
# target/release/blkrepl, target/debug/blkrepl of the repo, else blkrepl on PATH),
# BRPCM_VIP=0 to leave the virtual IP out, BRPCM_NBD=vip to serve the Primary's NBD export on the
# virtual IP (clients then use nbd://10.77.0.100:10809/r0 whichever node is Primary) instead of
# on the Primary's own address, BRPCM_FS=1 (with BRPCM_NBD=vip) for ext4 mounted on the Primary
# at /run/mnt through nbdfuse and a loop device (group svc: vip, nbdfuse, fs).
set -euo pipefail

SELF=$(readlink -f "$0")
HERE=$(dirname "$SELF")
REPO=$(cd "$HERE/../.." && pwd)
W=${BRPCM_WORK:-/tmp/brpcm}
export BRPCM_WORK=$W
NODES=(alpha beta tie)
DATA_NODES=(alpha beta)
WITNESS=tie
BRIDGE=brpcm0
SUBNET=10.77.0
HOST_IP=$SUBNET.254
VIP=$SUBNET.100
NBD_PORT=10809
RES=r0

node_ip() { case $1 in alpha) echo "$SUBNET.1" ;; beta) echo "$SUBNET.2" ;; tie) echo "$SUBNET.3" ;; *) die "unknown node '$1'" ;; esac; }
node_id() { case $1 in alpha) echo 1 ;; beta) echo 2 ;; tie) echo 3 ;; esac; }
netns() { echo "brpcm-$1"; }
port() { echo "bp-$1"; } # the node's switch port (host side of its veth pair)

die() { echo "cluster.sh: $*" >&2; exit 1; }
log() { echo "[$(date +%T)] $*" >&2; }

find_blkrepl() {
	if [ -n "${BLKREPL:-}" ]; then echo "$BLKREPL"; return; fi
	for b in "$REPO/target/release/blkrepl" "$REPO/target/debug/blkrepl"; do
		[ -x "$b" ] && { echo "$b"; return; }
	done
	command -v blkrepl || true
}

check_tools() {
	local missing=() t
	# command -> Debian package
	for t in corosync:corosync corosync-keygen:corosync corosync-quorumtool:corosync \
		pacemakerd:pacemaker cibadmin:pacemaker-cli-utils crm_attribute:pacemaker-cli-utils \
		crm_resource:pacemaker-cli-utils crm_mon:pacemaker-cli-utils crm_node:pacemaker-cli-utils \
		jq:jq qemu-io:qemu-utils ip:iproute2 unshare:util-linux nsenter:util-linux; do
		command -v "${t%%:*}" >/dev/null || missing+=("${t#*:} (for ${t%%:*})")
	done
	if [ "${BRPCM_FS:-0}" = 1 ]; then
		for t in nbdfuse:libnbd-bin fusermount3:fuse3 mkfs.ext4:e2fsprogs losetup:mount; do
			command -v "${t%%:*}" >/dev/null || missing+=("${t#*:} (for ${t%%:*}, BRPCM_FS=1)")
		done
	fi
	[ -r /usr/lib/ocf/lib/heartbeat/ocf-shellfuncs ] && [ -x /usr/lib/ocf/resource.d/heartbeat/IPaddr2 ] \
		|| missing+=("resource-agents (for ocf-shellfuncs and ocf:heartbeat:IPaddr2)")
	if [ ${#missing[@]} -gt 0 ]; then
		printf 'cluster.sh: missing: %s\n' "${missing[@]}" >&2
		echo "  install: apt-get install -y --no-install-recommends pacemaker pacemaker-cli-utils corosync resource-agents jq qemu-utils iproute2 bc" >&2
		echo "  (and libnbd-bin fuse3 e2fsprogs for BRPCM_FS=1)" >&2
		exit 1
	fi
	[ "$(id -u)" = 0 ] || die "must run as root (namespaces, bridge)"
	local b; b=$(find_blkrepl)
	[ -n "$b" ] && [ -x "$b" ] || die "no blkrepl binary: build it (cargo build --release) or set BLKREPL=/path/to/blkrepl"
}

# The host PID of NODE's init (PID 1 of its PID namespace), or nothing when the node is off.
init_pid() {
	local f="$W/$1/unshare.pid" u c
	[ -r "$f" ] || return 0
	u=$(cat "$f")
	[ -d "/proc/$u" ] || return 0
	c=$(cat "/proc/$u/task/$u/children" 2>/dev/null | awk '{print $1}')
	[ -n "$c" ] && echo "$c"
	return 0
}

in_node() { # NODE CMD... : runs CMD in NODE's namespaces
	local n=$1 pid; shift
	pid=$(init_pid "$n")
	[ -n "$pid" ] || die "node $n is not running"
	nsenter --target "$pid" --mount --uts --ipc --net --pid --wd=/ -- \
		env PATH=/usr/sbin:/usr/bin:/sbin:/bin BLKREPL_CONFIG_DIR="$W/etc-blkrepl" "$@"
}

# ---------------------------------------------------------------- inside a node (PID 1)

# Runs as PID 1 of a node's PID namespace, in its fresh mount, UTS and IPC namespaces (already in
# its network namespace): private directories over the host's, then corosync and pacemakerd.
node_init() {
	local n=$1 d="$W/$1"
	hostname "$n"
	mount --make-rprivate /
	mount --bind "$d/etc-corosync" /etc/corosync
	mount --bind "$d/lib-corosync" /var/lib/corosync
	mount --bind "$d/lib-pacemaker" /var/lib/pacemaker
	mount --bind "$d/log" /var/log
	mount -t tmpfs -o mode=0755 tmpfs /run
	mkdir -p /run/lock /run/blkrepl /run/nbdf /run/mnt
	mount -t tmpfs -o mode=1777 tmpfs /dev/shm
	# The blkrepl agent and the fence agent, added to the directories Pacemaker looks in.
	mount -t overlay overlay -o "lowerdir=/usr/lib/ocf/resource.d,upperdir=$d/ocf-upper,workdir=$d/ocf-work" /usr/lib/ocf/resource.d
	mount -t overlay overlay -o "lowerdir=/usr/sbin,upperdir=$d/sbin-upper,workdir=$d/sbin-work" /usr/sbin
	# The resource file is shared (it names every node); each node is its host name.
	export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root BLKREPL_CONFIG_DIR="$W/etc-blkrepl"
	# With BRPCM_NBD=vip the Primary's export listens on the virtual IP, which IPaddr2 adds only
	# after the promotion: the bind must not need the address yet (a per-namespace sysctl).
	echo 1 >/proc/sys/net/ipv4/ip_nonlocal_bind
	echo "node $n: namespaces ready, starting corosync"
	corosync
	# pacemakerd stays in the foreground (as under systemd); this shell reaps what it leaves.
	pacemakerd </dev/null >>/var/log/pacemaker/pacemakerd.out 2>&1 &
	if [ "$n" = "$WITNESS" ]; then
		blkrepl up "$RES" && echo "node $n: blkrepl witness up"
	fi
	trap 'exit 0' TERM
	while :; do sleep 3600 & wait $! || true; done
}

# ---------------------------------------------------------------- host side

write_configs() {
	local n d b
	b=$(find_blkrepl)
	mkdir -p "$W/etc-blkrepl" "$W/pdu"
	{
		echo "name = \"$RES\""
		echo 'protocol = "C"'
		echo 'quorum = "majority"'
		echo 'secret = "brpcm test cluster secret"'
		for n in "${NODES[@]}"; do
			echo "[[node]]"
			echo "name = \"$n\""
			echo "address = \"$(node_ip "$n"):7789\""
			if [ "$n" = "$WITNESS" ]; then
				echo 'disk = "none"'
				echo "meta_disk = \"$W/$n/witness.meta\""
			else
				echo "disk = \"$W/$n/disk.img\""
				if [ "${BRPCM_NBD:-node}" = vip ]; then
					echo "nbd = \"$VIP:$NBD_PORT\""
				else
					echo "nbd = \"$(node_ip "$n"):$NBD_PORT\""
				fi
			fi
		done
	} >"$W/etc-blkrepl/$RES.toml"
	[ -e "$W/authkey" ] || corosync-keygen -l -k "$W/authkey" >/dev/null 2>&1 || corosync-keygen -k "$W/authkey" >/dev/null
	for n in "${NODES[@]}"; do
		d="$W/$n"
		mkdir -p "$d"/{etc-corosync,lib-corosync,lib-pacemaker,log/pacemaker,log/corosync,ocf-upper/blkrepl,ocf-work,sbin-upper,sbin-work}
		for s in cib pengine blackbox cores; do mkdir -p "$d/lib-pacemaker/$s"; done
		chown -R hacluster:haclient "$d/lib-pacemaker" "$d/log/pacemaker"
		chmod 0750 "$d/lib-pacemaker"/*
		chmod 0770 "$d/log/pacemaker"
		install -m 0400 "$W/authkey" "$d/etc-corosync/authkey"
		install -m 0755 "$REPO/scripts/ocf/blkrepl" "$d/ocf-upper/blkrepl/blkrepl"
		install -m 0755 "$HERE/fence_brpcm" "$d/sbin-upper/fence_brpcm"
		install -m 0755 "$b" "$d/sbin-upper/blkrepl"
		cat >"$d/etc-corosync/corosync.conf" <<EOF
totem {
	version: 2
	cluster_name: brpcm
	transport: knet
	crypto_cipher: aes256
	crypto_hash: sha256
	token: 1000
}
nodelist {
$(for m in "${NODES[@]}"; do printf '\tnode {\n\t\tring0_addr: %s\n\t\tname: %s\n\t\tnodeid: %s\n\t}\n' "$(node_ip "$m")" "$m" "$(node_id "$m")"; done)
}
quorum {
	provider: corosync_votequorum
}
logging {
	to_logfile: yes
	logfile: /var/log/corosync/corosync.log
	to_syslog: no
	to_stderr: no
	timestamp: hires
}
EOF
		if [ "$n" = "$WITNESS" ]; then
			[ -e "$d/witness.meta" ] || "$b" --config-dir "$W/etc-blkrepl" --node "$n" create-md "$RES" >/dev/null
		else
			[ -e "$d/disk.img" ] || { truncate -s 64M "$d/disk.img"; "$b" --config-dir "$W/etc-blkrepl" --node "$n" create-md "$RES" >/dev/null; }
		fi
	done
}

make_network() {
	local n
	ip link add "$BRIDGE" type bridge
	ip addr add "$HOST_IP/24" dev "$BRIDGE"
	ip link set "$BRIDGE" up
	for n in "${NODES[@]}"; do
		ip netns add "$(netns "$n")"
		ip link add "$(port "$n")" type veth peer name eth0 netns "$(netns "$n")"
		ip -n "$(netns "$n")" addr add "$(node_ip "$n")/24" dev eth0
		ip -n "$(netns "$n")" link set lo up
		ip -n "$(netns "$n")" link set eth0 up
		ip link set "$(port "$n")" master "$BRIDGE"
		ip link set "$(port "$n")" up
	done
}

boot_node() {
	local n=$1
	[ -z "$(init_pid "$n")" ] || { log "$n is already running"; return 0; }
	# A fresh corosync/pacemaker runtime state each boot (the CIB on disk is kept, as on a real node).
	ip netns exec "$(netns "$n")" unshare --mount --uts --ipc --pid --fork --mount-proc --propagation private \
		"$SELF" _init "$n" </dev/null >>"$W/$n/init.out" 2>&1 &
	echo $! >"$W/$n/unshare.pid"
	for _ in $(seq 50); do [ -n "$(init_pid "$n")" ] && break; sleep 0.1; done
	[ -n "$(init_pid "$n")" ] || die "node $n did not start: $(tail -5 "$W/$n/init.out")"
	log "$n booted (init pid $(init_pid "$n"))"
}

kill_node() {
	local n=$1 pid u
	pid=$(init_pid "$n")
	u=$(cat "$W/$n/unshare.pid" 2>/dev/null || true)
	if [ -n "$pid" ]; then
		# The daemons' logs live in the node's /run (a tmpfs, gone with it): kept beside the
		# node's other logs, one boot after another.
		local f
		for f in "/proc/$pid/root/run/blkrepl/"*.log; do
			[ -e "$f" ] || continue
			{ echo "=== $(basename "$f") until $(date +%T) (node killed or taken down)"; cat "$f"; } >>"$W/$n/log/blkrepl-$(basename "$f")" 2>/dev/null || true
		done
		# The kernel kills every process of the PID namespace with its init.
		kill -KILL "$pid" 2>/dev/null || true
	fi
	for _ in $(seq 100); do
		[ -n "$u" ] && [ -d "/proc/$u" ] || break
		sleep 0.1
	done
	rm -f "$W/$n/unshare.pid"
	# The network namespace outlives the node's processes: drop what a power cycle loses (the
	# virtual IP IPaddr2 added), or the node's probes find the address after its return and
	# Pacemaker restarts the service on the Primary (seen: "Restart vip ... due to ...").
	if ip netns list | grep -qw "$(netns "$n")"; then
		ip -n "$(netns "$n")" addr flush dev eth0 scope global 2>/dev/null || true
		ip -n "$(netns "$n")" addr add "$(node_ip "$n")/24" dev eth0 2>/dev/null || true
	fi
}

# The power switch: answers fence_brpcm's requests (see that file) until the PDU dir goes away.
pdu_loop() {
	local req id action target out
	touch "$W/pdu/alive"
	while [ -d "$W/pdu" ]; do
		for req in "$W"/pdu/*.req; do
			[ -e "$req" ] || continue
			id=${req%.req}
			read -r action target <"$req" || true
			rm -f "$req"
			case $action in
				off) kill_node "$target"; out=ok ;;
				on) boot_node "$target" >/dev/null 2>&1 && out=ok || out="boot failed" ;;
				reboot) kill_node "$target"; boot_node "$target" >/dev/null 2>&1 && out=ok || out="boot failed" ;;
				status) [ -n "$(init_pid "$target")" ] && out=on || out=off ;;
				list) out="${NODES[*]}" ;;
				*) out="unknown action $action" ;;
			esac
			echo "$(date +%T.%3N) $action $target -> $out (request ${id##*/})" >>"$W/pdu.log"
			echo "$out" >"$id.tmp" && mv "$id.tmp" "$id.res"
		done
		sleep 0.1
	done
}

cluster_ok() { # 3 nodes online, quorum, a DC
	local x
	x=$(in_node alpha crm_mon -1 --output-as=xml 2>/dev/null) || return 1
	grep -q 'with_quorum="true"' <<<"$x" || return 1
	[ "$(grep -c '<node name=[^>]*online="true"' <<<"$x")" = 3 ] || return 1
}

wait_for() { # SECONDS DESCRIPTION CMD...
	local t=$1 what=$2; shift 2
	for _ in $(seq $((t * 2))); do "$@" >/dev/null && return 0; sleep 0.5; done
	die "timed out after ${t}s waiting for $what"
}

blkrepl_json() { in_node "$1" blkrepl status --json "$RES" 2>/dev/null | jq -c '.resources[0]'; }

peers_connected() { # NODE: every peer of NODE connected
	blkrepl_json "$1" | jq -e '[.peers[] | .connection == "Connected"] | all' >/dev/null 2>&1
}

primary_node() { # prints the node whose blkrepl is Primary
	local n
	for n in "${DATA_NODES[@]}"; do
		[ -n "$(init_pid "$n")" ] || continue
		[ "$(blkrepl_json "$n" | jq -r .role 2>/dev/null)" = Primary ] && { echo "$n"; return 0; }
	done
	return 1
}

# One CIB update for the whole configuration, edited in a file first (CIB_file, as `pcs -f`
# does): applied piece by piece, the scheduler runs between the pieces, probes the clone on tie
# before the constraint that keeps it off tie (resource-discovery=never) exists, finds the
# witness daemon running there and stops it.
cfg() { in_node alpha env CIB_file="$W/cib.xml" "$@"; }

configure_resources() {
	local vip_cons=""
	in_node alpha cibadmin --query >"$W/cib.xml"
	cfg crm_attribute --type crm_config --name stonith-enabled --update true
	cfg crm_attribute --type crm_config --name stonith-action --update reboot
	cfg crm_attribute --type crm_config --name stonith-timeout --update 60s
	cfg crm_attribute --type crm_config --name no-quorum-policy --update stop
	cfg crm_attribute --type crm_config --name cluster-recheck-interval --update 1min
	cfg crm_attribute --type rsc_defaults --name resource-stickiness --update 100
	cfg cibadmin --create -o resources --xml-text "
<primitive id=\"fence-pdu\" class=\"stonith\" type=\"fence_brpcm\">
  <instance_attributes id=\"fence-pdu-ia\">
    <nvpair id=\"fence-pdu-dir\" name=\"pdu_dir\" value=\"$W/pdu\"/>
    <nvpair id=\"fence-pdu-hosts\" name=\"pcmk_host_list\" value=\"${NODES[*]}\"/>
    <nvpair id=\"fence-pdu-check\" name=\"pcmk_host_check\" value=\"static-list\"/>
  </instance_attributes>
  <operations><op id=\"fence-pdu-monitor\" name=\"monitor\" interval=\"60s\"/></operations>
</primitive>"
	cfg cibadmin --create -o resources --xml-text "
<clone id=\"$RES-clone\">
  <meta_attributes id=\"$RES-clone-meta\">
    <nvpair id=\"$RES-clone-promotable\" name=\"promotable\" value=\"true\"/>
    <nvpair id=\"$RES-clone-promoted-max\" name=\"promoted-max\" value=\"1\"/>
    <nvpair id=\"$RES-clone-promoted-node-max\" name=\"promoted-node-max\" value=\"1\"/>
    <nvpair id=\"$RES-clone-max\" name=\"clone-max\" value=\"2\"/>
    <nvpair id=\"$RES-clone-node-max\" name=\"clone-node-max\" value=\"1\"/>
    <nvpair id=\"$RES-clone-notify\" name=\"notify\" value=\"true\"/>
    <nvpair id=\"$RES-clone-migration-threshold\" name=\"migration-threshold\" value=\"1\"/>
    <nvpair id=\"$RES-clone-failure-timeout\" name=\"failure-timeout\" value=\"60s\"/>
  </meta_attributes>
  <primitive id=\"$RES\" class=\"ocf\" provider=\"blkrepl\" type=\"blkrepl\">
    <instance_attributes id=\"$RES-ia\">
      <nvpair id=\"$RES-resource\" name=\"resource\" value=\"$RES\"/>
      <nvpair id=\"$RES-config-dir\" name=\"config_dir\" value=\"$W/etc-blkrepl\"/>
    </instance_attributes>
    <operations>
      <op id=\"$RES-start\" name=\"start\" interval=\"0s\" timeout=\"90s\"/>
      <op id=\"$RES-stop\" name=\"stop\" interval=\"0s\" timeout=\"100s\"/>
      <op id=\"$RES-promote\" name=\"promote\" interval=\"0s\" timeout=\"90s\"/>
      <op id=\"$RES-demote\" name=\"demote\" interval=\"0s\" timeout=\"90s\"/>
      <op id=\"$RES-notify\" name=\"notify\" interval=\"0s\" timeout=\"90s\"/>
      <op id=\"$RES-mon-p\" name=\"monitor\" interval=\"2s\" role=\"Promoted\" timeout=\"20s\"/>
      <op id=\"$RES-mon-u\" name=\"monitor\" interval=\"3s\" role=\"Unpromoted\" timeout=\"20s\"/>
    </operations>
  </primitive>
</clone>"
	local svc=vip members=""
	if [ "${BRPCM_VIP:-1}" != 0 ]; then
		members="
  <primitive id=\"vip\" class=\"ocf\" provider=\"heartbeat\" type=\"IPaddr2\">
    <instance_attributes id=\"vip-ia\">
      <nvpair id=\"vip-ip\" name=\"ip\" value=\"$VIP\"/>
      <nvpair id=\"vip-mask\" name=\"cidr_netmask\" value=\"24\"/>
      <nvpair id=\"vip-nic\" name=\"nic\" value=\"eth0\"/>
    </instance_attributes>
    <operations><op id=\"vip-monitor\" name=\"monitor\" interval=\"5s\"/></operations>
  </primitive>"
	fi
	if [ "${BRPCM_FS:-0}" = 1 ]; then
		# The export as a file (nbdfuse, a FUSE mount) and ext4 on it through a loop device
		# (mount -o loop): the kernel has no nbd module.
		svc=svc
		members+="
  <primitive id=\"nbdfuse\" class=\"ocf\" provider=\"heartbeat\" type=\"anything\">
    <instance_attributes id=\"nbdfuse-ia\">
      <nvpair id=\"nbdfuse-bin\" name=\"binfile\" value=\"/usr/bin/nbdfuse\"/>
      <nvpair id=\"nbdfuse-args\" name=\"cmdline_options\" value=\"/run/nbdf nbd://$VIP:$NBD_PORT/$RES\"/>
    </instance_attributes>
    <operations><op id=\"nbdfuse-monitor\" name=\"monitor\" interval=\"5s\"/></operations>
  </primitive>
  <primitive id=\"fs\" class=\"ocf\" provider=\"heartbeat\" type=\"Filesystem\">
    <instance_attributes id=\"fs-ia\">
      <nvpair id=\"fs-device\" name=\"device\" value=\"/run/nbdf/nbd\"/>
      <nvpair id=\"fs-dir\" name=\"directory\" value=\"/run/mnt\"/>
      <nvpair id=\"fs-type\" name=\"fstype\" value=\"ext4\"/>
      <nvpair id=\"fs-options\" name=\"options\" value=\"loop\"/>
    </instance_attributes>
    <operations><op id=\"fs-monitor\" name=\"monitor\" interval=\"5s\"/></operations>
  </primitive>"
		members="<group id=\"svc\">$members
</group>"
	fi
	if [ -n "$members" ]; then
		cfg cibadmin --create -o resources --xml-text "$members"
		vip_cons="
  <rsc_colocation id=\"$svc-with-primary\" rsc=\"$svc\" with-rsc=\"$RES-clone\" with-rsc-role=\"Promoted\" score=\"INFINITY\"/>
  <rsc_order id=\"$svc-after-promote\" first=\"$RES-clone\" first-action=\"promote\" then=\"$svc\" then-action=\"start\" kind=\"Mandatory\"/>"
	fi
	cfg cibadmin --modify --allow-create -o constraints --xml-text "<constraints>
  <rsc_location id=\"$RES-not-on-$WITNESS\" rsc=\"$RES-clone\" node=\"$WITNESS\" score=\"-INFINITY\" resource-discovery=\"never\"/>
  <rsc_location id=\"$RES-promoted-prefers-alpha\" rsc=\"$RES-clone\" role=\"Promoted\" node=\"alpha\" score=\"5\"/>$vip_cons
</constraints>"
	in_node alpha cibadmin --replace --xml-file "$W/cib.xml"
}

cmd_up() {
	check_tools
	[ "${BRPCM_NBD:-node}" != vip ] || [ "${BRPCM_VIP:-1}" != 0 ] || die "BRPCM_NBD=vip needs the virtual IP"
	[ "${BRPCM_FS:-0}" != 1 ] || [ "${BRPCM_NBD:-node}" = vip ] || die "BRPCM_FS=1 needs BRPCM_NBD=vip"
	[ ! -e "$W/up" ] || die "$W/up exists: the cluster is up (or was not taken down): run '$0 down' first"
	ip link show "$BRIDGE" >/dev/null 2>&1 && die "bridge $BRIDGE exists: run '$0 down' first"
	# Every `up` is a fresh cluster: new disks, metadata, CIB and logs.
	if [ -d "$W" ]; then
		[ -e "$W/etc-blkrepl" ] || [ -z "$(ls -A "$W")" ] || die "$W exists and is not a work dir of this script: set BRPCM_WORK"
		rm -rf "$W"
	fi
	mkdir -p "$W"
	touch "$W/up"
	log "work dir $W, blkrepl $(find_blkrepl)"
	write_configs
	make_network
	setsid "$SELF" _pdu </dev/null >>"$W/pdu.out" 2>&1 &
	echo $! >"$W/pdu.pid"
	local n t0=$SECONDS
	for n in "${NODES[@]}"; do boot_node "$n"; done
	wait_for 90 "3 nodes online with quorum" cluster_ok
	log "cluster formed in $((SECONDS - t0)) s: 3 nodes online, quorum"
	# A first data generation on the two empty disks without the initial copy (nothing on them
	# is of value), then the daemons stop again and Pacemaker takes over.
	for n in "${DATA_NODES[@]}"; do in_node "$n" blkrepl up "$RES" >/dev/null; done
	wait_for 30 "alpha connected to beta and tie" peers_connected alpha
	if [ "$(blkrepl_json alpha | jq -r .disk)" != UpToDate ]; then
		in_node alpha blkrepl new-current-uuid --clear-bitmap "$RES"
	fi
	if [ "${BRPCM_FS:-0}" = 1 ]; then
		# ext4 on the replicated device, made once through the same path the cluster mounts it.
		in_node alpha blkrepl primary "$RES" >/dev/null
		in_node alpha sh -c "ip addr add $VIP/24 dev eth0 && (nbdfuse -P /run/nbdf.pid /run/nbdf nbd://$VIP:$NBD_PORT/$RES &) \
			&& for i in \$(seq 50); do [ -s /run/nbdf.pid ] && break; sleep 0.1; done \
			&& mkfs.ext4 -q -F /run/nbdf/nbd && fusermount3 -u /run/nbdf \
			&& for i in \$(seq 100); do kill -0 \$(cat /run/nbdf.pid) 2>/dev/null || break; sleep 0.1; done \
			&& ip addr del $VIP/24 dev eth0"
		# fusermount3 returns before nbdfuse has closed its NBD connections, so the address
		# goes only once nbdfuse has exited: taken away under an open connection, it would
		# leave the daemon a client that never says goodbye (one CI run met it: the daemon
		# lets such a client go only after its keepalive probes, about 25 s). And the daemon
		# refuses to demote while clients hold the export (another run met it): retried until
		# they are gone.
		wait_for 30 "nbdfuse's NBD clients to leave alpha's export" in_node alpha sh -c "blkrepl secondary $RES 2>/dev/null"
	fi
	# beta first: a node leaving while its peers stay up is Outdated until it reconnects, and the
	# first promotion should go to alpha.
	for n in beta alpha; do in_node "$n" blkrepl down "$RES" >/dev/null; done
	configure_resources
	wait_for 120 "a Primary" primary_node
	in_node alpha crm_resource --wait --timeout=120s || die "the cluster did not settle"
	log "blkrepl Primary on $(primary_node), cluster settled, after $((SECONDS - t0)) s"
	in_node alpha crm_mon -1 -r
}

cmd_down() {
	local n
	if [ -r "$W/pdu.pid" ]; then kill "$(cat "$W/pdu.pid")" 2>/dev/null || true; rm -f "$W/pdu.pid"; fi
	for n in "${NODES[@]}"; do kill_node "$n"; done
	for n in "${NODES[@]}"; do
		ip netns del "$(netns "$n")" 2>/dev/null || true
		ip link del "$(port "$n")" 2>/dev/null || true
	done
	ip link del "$BRIDGE" 2>/dev/null || true
	rm -f "$W/up"
	# Anything of ours still running means a process escaped its PID namespace.
	if pgrep -f "$SELF _(init|pdu)" >/dev/null; then
		die "processes left: $(pgrep -af "$SELF _(init|pdu)")"
	fi
	log "down (logs and disks kept in $W until the next up)"
}

cmd_status() {
	in_node alpha crm_mon -1 -r -A 2>/dev/null || in_node beta crm_mon -1 -r -A || true
	local n
	for n in "${NODES[@]}"; do
		echo "--- $n"
		[ -n "$(init_pid "$n")" ] && in_node "$n" blkrepl status "$RES" || echo "(node off)"
	done
}

case ${1:-} in
	up) cmd_up ;;
	down) cmd_down ;;
	exec) shift; [ $# -ge 2 ] || die "usage: $0 exec NODE CMD..."; in_node "$@" ;;
	status) cmd_status ;;
	cut) ip link set "$(port "${2:?node}")" down ;;
	heal) ip link set "$(port "${2:?node}")" up ;;
	boot) boot_node "${2:?node}" ;;
	kill) kill_node "${2:?node}" ;;
	primary) primary_node ;;
	_init) node_init "$2" ;;
	_pdu) pdu_loop ;;
	*) sed -n '2,21p' "$SELF" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
