//! Network namespaces for a test cluster: one per node, each joined by a veth pair to a bridge
//! in a switch namespace, and one for clients on the same bridge. Cutting a node's switch port
//! partitions it from every other node and from the clients; raising it again heals the
//! partition. A blackhole route on both ends cuts one link alone. Addresses are private to
//! these namespaces.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// The clients' address on the cluster's network.
const CLIENT_ADDRESS: &str = "10.99.0.200";

pub struct Net {
    prefix: String,
    nodes: usize,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip (iproute2) runs");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Whether this machine lets the tests make namespaces (root and iproute2). CI must: there a
/// missing capability fails the test instead of skipping it.
pub fn usable() -> bool {
    let probe = format!("blkprobe{}x{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
    let ok = Command::new("ip").args(["netns", "add", &probe]).output().is_ok_and(|o| o.status.success());
    if ok {
        let _ = Command::new("ip").args(["netns", "del", &probe]).output();
    }
    assert!(ok || std::env::var("CI").is_err(), "CI must run the network-namespace tests: run as root with iproute2");
    if !ok {
        eprintln!("skipping: network namespaces need root and iproute2");
    }
    ok
}

impl Net {
    pub fn create(nodes: usize) -> Net {
        let net = Net { prefix: format!("blk{}x{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)), nodes };
        let switch = net.switch();
        ip(&["netns", "add", &switch]);
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &switch, "link", "set", "br0", "up"]);
        for i in 0..nodes {
            let ns = net.ns(i);
            ip(&["netns", "add", &ns]);
            let port = format!("port{i}");
            ip(&["link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &port, "netns", &switch]);
            ip(&["-n", &ns, "addr", "add", &format!("{}/24", Net::address(i)), "dev", "eth0"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &switch, "link", "set", &port, "master", "br0"]);
            ip(&["-n", &switch, "link", "set", &port, "up"]);
        }
        let client = net.client_ns();
        ip(&["netns", "add", &client]);
        ip(&["link", "add", "eth0", "netns", &client, "type", "veth", "peer", "name", "client", "netns", &switch]);
        ip(&["-n", &client, "addr", "add", &format!("{CLIENT_ADDRESS}/24"), "dev", "eth0"]);
        ip(&["-n", &client, "link", "set", "lo", "up"]);
        ip(&["-n", &client, "link", "set", "eth0", "up"]);
        ip(&["-n", &switch, "link", "set", "client", "master", "br0"]);
        ip(&["-n", &switch, "link", "set", "client", "up"]);
        net
    }

    /// The clients' namespace: it reaches every node that is not cut off.
    pub fn client_ns(&self) -> String {
        format!("{}cl", self.prefix)
    }

    /// Moves the calling thread into the clients' namespace: sockets it opens afterwards reach
    /// the nodes' addresses.
    pub fn enter_client(&self) {
        let path = format!("/var/run/netns/{}", self.client_ns());
        let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns into the clients' namespace");
    }

    /// Runs `f` on a thread inside the clients' namespace (sockets it opens stay there).
    pub fn as_client<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                self.enter_client();
                f()
            })
            .join()
            .unwrap()
        })
    }

    fn switch(&self) -> String {
        format!("{}sw", self.prefix)
    }

    /// The namespace of node `i`.
    pub fn ns(&self, i: usize) -> String {
        format!("{}n{i}", self.prefix)
    }

    pub fn address(i: usize) -> String {
        format!("10.99.0.{}", i + 1)
    }

    /// Cuts node `i` off from every other node (both directions, no reset: packets vanish).
    pub fn isolate(&self, i: usize) {
        ip(&["-n", &self.switch(), "link", "set", &format!("port{i}"), "down"]);
    }

    pub fn heal(&self, i: usize) {
        ip(&["-n", &self.switch(), "link", "set", &format!("port{i}"), "up"]);
    }

    /// Cuts the clients off from every node (packets vanish: no FIN, no reset), as when a
    /// client's host loses power.
    pub fn cut_clients(&self) {
        ip(&["-n", &self.switch(), "link", "set", "client", "down"]);
    }

    pub fn mend_clients(&self) {
        ip(&["-n", &self.switch(), "link", "set", "client", "up"]);
    }

    /// Cuts the link between nodes `i` and `j` alone (a blackhole route to the other on each
    /// side: packets vanish), while both still reach every other node and the clients.
    pub fn cut(&self, i: usize, j: usize) {
        self.routes("add", i, j);
    }

    pub fn mend(&self, i: usize, j: usize) {
        self.routes("del", i, j);
    }

    fn routes(&self, verb: &str, i: usize, j: usize) {
        for (from, to) in [(i, j), (j, i)] {
            ip(&["-n", &self.ns(from), "route", verb, "blackhole", &format!("{}/32", Net::address(to))]);
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in (0..self.nodes).map(|i| self.ns(i)).chain([self.client_ns(), self.switch()]) {
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        }
    }
}
