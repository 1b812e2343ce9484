//! A local cluster of real `blkrepl` daemons on 127.0.0.1 with file-backed disks, driven through
//! the CLI exactly as an operator (or a cluster manager) would, and real NBD clients (qemu-io).

#![allow(dead_code)]

pub mod nbd_client;
pub mod netns;
pub mod pki;
pub mod promoter;

use serde_json::Value;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_blkrepl");

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<String>,
    pub nbd_ports: Vec<u16>,
    /// Each node's `metrics_address`, when [`Options::metrics`] is set.
    pub metrics_addresses: Vec<String>,
    pub resource: String,
    /// Set when the nodes live in network namespaces (see [`netns::Net`]).
    pub net: Option<netns::Net>,
}

/// The shared secret of a test cluster (see [`Cluster::new`]): one per cluster, so that a
/// daemon of another cluster (another test running beside it, or one that outlived its test)
/// that dials a port this cluster now uses is refused instead of taken for a node of it.
fn test_secret() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("secret = \"the shared secret of test cluster {}-{}\"", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// `n` ports to give the daemons, below the kernel's ephemeral range (32768 and up by
/// default). A port the kernel handed out for port 0 is free only until someone else asks: a
/// daemon dialing its peers took one as its source port before another daemon bound its NBD
/// export there ("Address already in use"). Ports here are handed out once per test process
/// (from a start that depends on its pid) and checked bindable.
pub fn free_ports(n: usize) -> Vec<u16> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    let start = (std::process::id() % 1_000) * 10;
    let mut ports = Vec::with_capacity(n);
    for _ in 0..SPAN {
        if ports.len() == n {
            return ports;
        }
        let port = (FIRST + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            ports.push(port);
        }
    }
    assert_eq!(ports.len(), n, "fewer than {n} free ports in {FIRST}..{}", FIRST + SPAN);
    ports
}

pub struct Options {
    pub protocol: &'static str,
    pub disk_mib: u64,
    /// The `quorum` setting; "off" unless a test is about quorum.
    pub quorum: &'static str,
    /// Nodes that are diskless witnesses.
    pub witnesses: &'static [&'static str],
    /// Each node in its own network namespace (root only), so partitions can be made.
    pub netns: bool,
    /// Each node serves Prometheus scrapes on a `metrics_address` of its own.
    pub metrics: bool,
    pub extra: &'static str,
}

impl Default for Options {
    fn default() -> Self {
        Options { protocol: "C", disk_mib: 64, quorum: "off", witnesses: &[], netns: false, metrics: false, extra: "" }
    }
}

impl Cluster {
    pub fn new(nodes: &[&str], options: Options) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let net = options.netns.then(|| netns::Net::create(nodes.len()));
        // In namespaces every node has its own address and the standard ports.
        let ports: Vec<u16> = if net.is_some() { [7789, 10809].repeat(nodes.len()) } else { free_ports(nodes.len() * 2) };
        let host = |i: usize| if net.is_some() { netns::Net::address(i) } else { "127.0.0.1".to_owned() };
        let metrics_addresses: Vec<String> = match (options.metrics, net.is_some()) {
            (false, _) => Vec::new(),
            (true, true) => (0..nodes.len()).map(|i| format!("{}:9942", host(i))).collect(),
            (true, false) => free_ports(nodes.len()).into_iter().map(|port| format!("127.0.0.1:{port}")).collect(),
        };
        let metrics_key = |i: usize| metrics_addresses.get(i).map_or(String::new(), |a| format!("metrics_address = \"{a}\"\n"));
        // Peers authenticate, as a daemon requires, unless a test sets its own terms.
        let auth = ["secret", "trusted_network", "tls_ca"].iter().any(|key| options.extra.contains(key));
        let auth = if auth { String::new() } else { test_secret() };
        let mut text = format!(
            "name = \"r0\"\nprotocol = \"{}\"\nquorum = \"{}\"\n{auth}\n{}\n",
            options.protocol, options.quorum, options.extra
        );
        for (i, name) in nodes.iter().enumerate() {
            if options.witnesses.contains(name) {
                // As a witness should run: what it learns is kept in its metadata file.
                let meta = dir.path().join(format!("{name}.meta"));
                text += &format!(
                    "[[node]]\nname = \"{name}\"\naddress = \"{}:{}\"\ndisk = \"none\"\nmeta_disk = \"{}\"\n{}",
                    host(i),
                    ports[2 * i],
                    meta.display(),
                    metrics_key(i)
                );
                continue;
            }
            let disk = dir.path().join(format!("{name}.img"));
            std::fs::File::create(&disk).unwrap().set_len(options.disk_mib << 20).unwrap();
            text += &format!(
                "[[node]]\nname = \"{name}\"\naddress = \"{}:{}\"\ndisk = \"{}\"\nnbd = \"{}:{}\"\n{}",
                host(i),
                ports[2 * i],
                disk.display(),
                host(i),
                ports[2 * i + 1],
                metrics_key(i)
            );
        }
        std::fs::create_dir_all(dir.path().join("etc")).unwrap();
        std::fs::write(dir.path().join("etc/r0.toml"), text).unwrap();
        Cluster {
            nbd_ports: (0..nodes.len()).map(|i| ports[2 * i + 1]).collect(),
            nodes: nodes.iter().map(|n| n.to_string()).collect(),
            metrics_addresses,
            dir,
            resource: "r0".into(),
            net,
        }
    }

    pub fn config_dir(&self) -> PathBuf {
        self.dir.path().join("etc")
    }

    pub fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    pub fn disk(&self, node: &str) -> PathBuf {
        self.dir.path().join(format!("{node}.img"))
    }

    pub fn nbd_url(&self, node: &str) -> String {
        let i = self.index(node);
        let host = if self.net.is_some() { netns::Net::address(i) } else { "127.0.0.1".to_owned() };
        format!("nbd://{host}:{}/{}", self.nbd_ports[i], self.resource)
    }

    /// The address of the node's NBD export.
    pub fn nbd_address(&self, node: &str) -> std::net::SocketAddr {
        self.nbd_url(node).trim_start_matches("nbd://").split('/').next().unwrap().parse().unwrap()
    }

    fn index(&self, node: &str) -> usize {
        self.nodes.iter().position(|n| n == node).unwrap()
    }

    /// The node's network namespace, when the cluster has them.
    pub fn ns(&self, node: &str) -> Option<String> {
        self.net.as_ref().map(|net| net.ns(self.index(node)))
    }

    /// A command run in the node's namespace (or directly without namespaces).
    fn command_for(&self, node: &str, program: &str) -> Command {
        match self.ns(node) {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", &ns, program]);
                cmd
            }
            None => Command::new(program),
        }
    }

    /// `curl` on `node`'s metrics endpoint (from inside its namespace): `path` with `args`
    /// (`-X POST`, say); curl's output and exit status.
    pub fn curl_metrics(&self, node: &str, path: &str, args: &[&str]) -> Output {
        let address = self.metrics_addresses.get(self.index(node)).expect("a cluster with Options::metrics");
        self.command_for(node, "curl")
            .args(["--silent", "--show-error", "--max-time", "20"])
            .args(args)
            .arg(format!("http://{address}{path}"))
            .output()
            .unwrap_or_else(|e| panic!("curl not runnable ({e}): scripts/setup.sh test installs it"))
    }

    /// Cuts `node` off from every other node.
    pub fn isolate(&self, node: &str) {
        self.net.as_ref().expect("a netns cluster").isolate(self.index(node));
    }

    pub fn heal(&self, node: &str) {
        self.net.as_ref().expect("a netns cluster").heal(self.index(node));
    }

    /// Cuts the link between `a` and `b` alone; both keep their other links.
    pub fn cut(&self, a: &str, b: &str) {
        self.net.as_ref().expect("a netns cluster").cut(self.index(a), self.index(b));
    }

    pub fn mend(&self, a: &str, b: &str) {
        self.net.as_ref().expect("a netns cluster").mend(self.index(a), self.index(b));
    }

    /// qemu-io on `node`'s export, from inside its namespace.
    pub fn qemu_io(&self, node: &str, commands: &[String]) -> (bool, String) {
        run_qemu_io(self.command_for(node, "qemu-io"), &self.nbd_url(node), commands)
    }

    /// Writes the patterns through `node`'s export and flushes.
    pub fn write(&self, node: &str, patterns: &[(u64, u64, u8)]) {
        let (ok, out) = self.qemu_io(node, &pattern_writes(patterns));
        assert!(ok, "qemu-io write on {node} failed: {out}");
    }

    /// Reads the patterns back through `node`'s export.
    pub fn check(&self, node: &str, patterns: &[(u64, u64, u8)]) -> (bool, String) {
        self.qemu_io(node, &pattern_reads(patterns))
    }

    /// Runs `blkrepl --node NODE ARGS...` and returns its output.
    pub fn cli(&self, node: &str, args: &[&str]) -> Output {
        self.blkrepl(node).args(args).output().unwrap()
    }

    /// `blkrepl` for `node` (in its namespace when the cluster has them), pointed at this
    /// cluster's config and run directories, logging at debug level.
    pub fn blkrepl(&self, node: &str) -> Command {
        let mut command = self.command_for(node, BIN);
        command
            .arg("--config-dir")
            .arg(self.config_dir())
            .arg("--run-dir")
            .arg(self.run_dir())
            .arg("--node")
            .arg(node)
            .env("BLKREPL_LOG", "debug");
        command
    }

    /// Runs a command that must succeed.
    pub fn ok(&self, node: &str, args: &[&str]) -> String {
        let out = self.cli(node, args);
        assert!(out.status.success(), "blkrepl {args:?} on {node} failed: {}\n{}", text(&out.stderr), self.logs());
        text(&out.stdout)
    }

    pub fn create_md_and_up(&self) {
        for node in &self.nodes {
            self.ok(node, &["create-md", "r0"]);
            self.ok(node, &["up", "r0"]);
        }
    }

    pub fn status(&self, node: &str) -> Value {
        let out = self.ok(node, &["status", "--json", "r0"]);
        let v: Value = serde_json::from_str(&out).unwrap();
        v["resources"][0].clone()
    }

    pub fn peer<'a>(status: &'a Value, name: &str) -> &'a Value {
        status["peers"].as_array().unwrap().iter().find(|p| p["name"] == name).unwrap()
    }

    /// Waits until `cond` holds for the node's status; panics with the last status and the logs.
    pub fn wait_for(&self, node: &str, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let status = self.status(node);
            if cond(&status) {
                return status;
            }
            if Instant::now() > deadline {
                panic!("timed out waiting on {node} for {what}; last status {status:#}\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until `node` sees `peer` connected with the given replication state and peer disk.
    pub fn wait_peer(&self, node: &str, peer: &str, replication: &str, peer_disk: &str) -> Value {
        self.wait_for(node, &format!("{peer} {replication}/{peer_disk}"), |s| {
            let p = Cluster::peer(s, peer);
            p["replication"] == replication && p["peer_disk"] == peer_disk
        })
    }

    /// Waits until each of `nodes` shows every other Established and UpToDate, then checks
    /// that none holds a bit for another: a copy shown UpToDate holds what this node holds.
    pub fn wait_all_in_sync(&self, nodes: &[&str]) {
        for node in nodes {
            for peer in nodes.iter().filter(|p| *p != node) {
                self.wait_peer(node, peer, "Established", "UpToDate");
            }
        }
        for node in nodes {
            let status = self.status(node);
            for peer in nodes.iter().filter(|p| *p != node) {
                assert_eq!(Cluster::peer(&status, peer)["out_of_sync_bytes"], 0, "{node} holds bits for {peer}: {status}\n{}", self.logs());
            }
        }
    }

    pub fn pid(&self, node: &str) -> i32 {
        let lock = self.run_dir().join(format!("r0.{node}.lock"));
        std::fs::read_to_string(lock).unwrap().trim().parse().unwrap()
    }

    /// Sends `signal` (STOP, CONT, ...) to the node's daemon.
    pub fn signal(&self, node: &str, signal: &str) {
        let pid = self.pid(node);
        assert!(Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]).status().unwrap().success());
    }

    /// kill -9 the node's daemon and wait until it is gone.
    pub fn kill(&self, node: &str) {
        let pid = self.pid(node);
        Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        // Not ours to reap (it has a process group of its own): gone, or a zombie whose
        // threads have all closed its files, and with them its run-dir lock.
        while !blkrepl::control::process_gone(pid as u32) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Flips every bit of one byte of the node's backing file behind the daemon's back: a disk
    /// that silently corrupted a block.
    pub fn corrupt_byte(&self, node: &str, offset: u64) {
        use std::io::{Read, Seek, SeekFrom, Write};
        let mut file = std::fs::OpenOptions::new().read(true).write(true).open(self.disk(node)).unwrap();
        let mut byte = [0u8];
        file.seek(SeekFrom::Start(offset)).unwrap();
        file.read_exact(&mut byte).unwrap();
        file.seek(SeekFrom::Start(offset)).unwrap();
        file.write_all(&[!byte[0]]).unwrap();
    }

    /// Bytes the node has received from `peer` (data, resync data and digests).
    pub fn received(&self, node: &str, peer: &str) -> u64 {
        Cluster::peer(&self.status(node), peer)["received_bytes"].as_u64().unwrap()
    }

    /// Data nodes alpha and beta and the witness `tie` under quorum "majority" (plus `options`),
    /// up, with alpha Primary and beta UpToDate after the initial sync.
    pub fn witness_trio(options: Options) -> Cluster {
        let c = Cluster::new(&["alpha", "beta", "tie"], Options { quorum: "majority", witnesses: &["tie"], ..options });
        c.create_md_and_up();
        c.wait_for("alpha", "peers", |s| {
            Cluster::peer(s, "beta")["connection"] == "Connected" && Cluster::peer(s, "tie")["connection"] == "Connected"
        });
        c.ok("alpha", &["primary", "--force", "r0"]);
        c.wait_peer("alpha", "beta", "Established", "UpToDate");
        c.wait_for("beta", "UpToDate", |s| s["disk"] == "UpToDate");
        c
    }

    /// alpha and beta with fresh disks declared in sync (`new-current-uuid --clear-bitmap`), a
    /// witness `tie`, quorum majority, all Secondary and connected.
    pub fn fresh_witness_trio() -> Cluster {
        let c = Cluster::new(&["alpha", "beta", "tie"], Options { quorum: "majority", witnesses: &["tie"], ..Options::default() });
        c.create_md_and_up();
        c.wait_connected("alpha", &["beta", "tie"]);
        c.ok("alpha", &["new-current-uuid", "--clear-bitmap", "r0"]);
        c.wait_for("beta", "UpToDate", |s| s["disk"] == "UpToDate");
        c.wait_for("alpha", "UpToDate", |s| s["disk"] == "UpToDate");
        c
    }

    /// Waits until `node` is connected to each of `peers` and has heard their State (their
    /// role is known): what `new-current-uuid --clear-bitmap` checks, for one.
    pub fn wait_connected(&self, node: &str, peers: &[&str]) -> Value {
        let known = |s: &Value, peer: &str| {
            Cluster::peer(s, peer)["connection"] == "Connected" && Cluster::peer(s, peer)["peer_role"] != "Unknown"
        };
        self.wait_for(node, "peers connected", |s| peers.iter().all(|p| known(s, p)))
    }

    /// Replaces `from` with `to` in the resource file (for `adjust`).
    pub fn edit_config(&self, from: &str, to: &str) {
        let path = self.config_dir().join("r0.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(from), "{from} not in the resource file");
        std::fs::write(&path, text.replace(from, to)).unwrap();
    }

    /// The data area of a node's disk (metadata at its end excluded).
    pub fn data_of(&self, node: &str, size_bytes: u64) -> Vec<u8> {
        let mut data = std::fs::read(self.disk(node)).unwrap();
        data.truncate(size_bytes as usize);
        data
    }

    /// Panics unless the data areas of `others` equal `reference`'s byte for byte, naming the
    /// first byte that differs. `when` says which moment of the test is checked.
    #[track_caller]
    pub fn assert_data_equal(&self, reference: &str, others: &[&str], when: &str) {
        let size = self.status(reference)["size_bytes"].as_u64().unwrap();
        let expected = self.data_of(reference, size);
        for node in others.iter().filter(|n| **n != reference) {
            let data = self.data_of(node, size);
            assert_eq!(data.len(), expected.len(), "{when}: {node}'s disk is shorter than {reference}'s data area");
            if let Some(at) = data.iter().zip(&expected).position(|(a, b)| a != b) {
                let block = at / 4096 * 4096;
                let show = |d: &[u8]| format!("{:?}", &d[block..(block + 16).min(d.len())]);
                panic!("{when}: {node}'s data differs from {reference}'s, first at byte {at}: {node} {} {reference} {}\n{}", show(&data), show(&expected), self.logs());
            }
        }
    }

    /// The node's daemon log so far (empty before its first `up`).
    pub fn log_of(&self, node: &str) -> String {
        std::fs::read_to_string(self.run_dir().join(format!("r0.{node}.log"))).unwrap_or_default()
    }

    /// How far each of `nodes`' logs goes now: the marks for [`Cluster::assert_logs_lack_since`].
    pub fn log_marks(&self, nodes: &[&str]) -> Vec<usize> {
        nodes.iter().map(|node| self.log_of(node).len()).collect()
    }

    /// Fails, naming the lines and with the logs, if a line any of `nodes` logged since `marks`
    /// contains one of `unwanted`.
    #[track_caller]
    pub fn assert_logs_lack_since(&self, nodes: &[&str], marks: &[usize], unwanted: &[&str], when: &str) {
        for (node, from) in nodes.iter().zip(marks) {
            let log = self.log_of(node);
            let found: Vec<&str> = log[*from..].lines().filter(|l| unwanted.iter().any(|u| l.contains(u))).collect();
            assert!(found.is_empty(), "{when}: {node} logged\n{}\n{}", found.join("\n"), self.logs());
        }
    }

    pub fn logs(&self) -> String {
        let mut out = String::new();
        for node in &self.nodes {
            let text = self.log_of(node);
            // The harness polls status: those lines would hide everything else.
            let tail: Vec<&str> = text.lines().rev().filter(|l| !l.contains("control request")).take(40).collect();
            out += &format!("--- log of {node} (last 40 lines) ---\n");
            for line in tail.into_iter().rev() {
                out += line;
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &self.nodes {
            let lock = self.run_dir().join(format!("r0.{node}.lock"));
            if let Ok(pid) = std::fs::read_to_string(lock) {
                let _ = Command::new("kill").args(["-9", pid.trim()]).stderr(std::process::Stdio::null()).status();
            }
        }
    }
}

/// A connected pair with alpha Primary and beta UpToDate after the initial full sync.
pub fn synced_pair(options: Options) -> Cluster {
    let c = Cluster::new(&["alpha", "beta"], options);
    c.create_md_and_up();
    c.wait_for("alpha", "connection", |s| Cluster::peer(s, "beta")["connection"] == "Connected");
    c.ok("alpha", &["primary", "--force", "r0"]);
    c.wait_peer("alpha", "beta", "Established", "UpToDate");
    c.wait_for("beta", "UpToDate", |s| s["disk"] == "UpToDate");
    c
}

/// Two nodes (quorum off) split: each is primary alone and writes; both are demoted again.
/// alpha writes `alpha_bytes` at 0, beta 64 KiB at 40 MiB. Reconnecting them finds a split brain.
pub fn split_brain_pair(extra: &'static str, alpha_bytes: u64) -> Cluster {
    const MIB: u64 = 1 << 20;
    let c = Cluster::new(&["alpha", "beta"], Options { extra, ..Options::default() });
    c.create_md_and_up();
    c.wait_for("alpha", "connection", |s| Cluster::peer(s, "beta")["connection"] == "Connected");
    c.ok("alpha", &["primary", "--force", "r0"]);
    c.wait_peer("alpha", "beta", "Established", "UpToDate");
    c.ok("alpha", &["disconnect", "r0"]);
    c.ok("beta", &["disconnect", "r0"]);
    write_patterns(&c.nbd_url("alpha"), &[(0, alpha_bytes, 0xA1)]);
    c.ok("beta", &["primary", "r0"]);
    write_patterns(&c.nbd_url("beta"), &[(40 * MIB, 64 << 10, 0xB2)]);
    c.ok("alpha", &["secondary", "r0"]);
    c.ok("beta", &["secondary", "r0"]);
    c
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs qemu-io against an NBD URL with the given commands; returns (success, stdout+stderr).
pub fn qemu_io(url: &str, commands: &[String]) -> (bool, String) {
    run_qemu_io(Command::new("qemu-io"), url, commands)
}

fn run_qemu_io(mut cmd: Command, url: &str, commands: &[String]) -> (bool, String) {
    cmd.args(["-f", "raw", "-t", "writeback", url]);
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    let out = cmd.output().unwrap_or_else(|e| panic!("qemu-io not runnable ({e}): apt-get install qemu-utils"));
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    let ok = out.status.success() && !all.contains("Pattern verification failed") && !all.contains("error");
    (ok, all)
}

/// Writes each (offset, len, pattern) and flushes.
pub fn write_patterns(url: &str, patterns: &[(u64, u64, u8)]) {
    let (ok, out) = qemu_io(url, &pattern_writes(patterns));
    assert!(ok, "qemu-io write failed: {out}");
}

/// Reads each (offset, len, pattern) back and checks it.
pub fn check_patterns(url: &str, patterns: &[(u64, u64, u8)]) -> (bool, String) {
    qemu_io(url, &pattern_reads(patterns))
}

/// qemu-io commands writing each (offset, len, pattern), then a flush.
fn pattern_writes(patterns: &[(u64, u64, u8)]) -> Vec<String> {
    let mut commands: Vec<String> = patterns.iter().map(|(o, l, p)| format!("write -P 0x{p:02x} {o} {l}")).collect();
    commands.push("flush".into());
    commands
}

fn pattern_reads(patterns: &[(u64, u64, u8)]) -> Vec<String> {
    patterns.iter().map(|(o, l, p)| format!("read -P 0x{p:02x} {o} {l}")).collect()
}
