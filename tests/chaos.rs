//! Faults on the primary, cycle after cycle, under a client that keeps writing and remembers the
//! fate of every write: two data nodes and a diskless witness, or three data nodes, each in its
//! own network namespace (root only), quorum "majority", the NBD export. Each cycle
//! puts one fault on the primary (kill -9 of its daemon, a silent partition of its node, SIGSTOP
//! past the ping timeout), promotes another data node with `primary` (one that may promote, as a
//! cluster manager would choose it; the only operator command, and a killed daemon is started
//! again with `up`, as its service manager would), moves the writer there, reads every block
//! back, heals the fault, waits for the old primary to come back as a secondary by itself, and
//! compares the replicas: every data node shows every other in sync with no bit held, and their
//! bytes are equal. Under quorum there must be no split brain,
//! no lost acknowledged write, and no write failed by the primary that has quorum.
//!
//! A third test puts the faults on the secondary and the witness instead, one at a time: the
//! primary keeps quorum with the node left and must fail no write.
//!
//! Two data nodes run protocol C, three run protocol B: every fault here leaves the peers'
//! daemons running, so B promises as much as C (a write acknowledged as received reaches the
//! peers' disks). Under B, a write still waiting on a secondary when its primary was killed
//! was once acknowledged and then dropped with the link (see `Replica::issue_step`).

mod common;

use common::nbd_client::{NbdClient, Outcome};
use common::{netns, Cluster, Options};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const BLOCK: usize = 4096;
/// The writer's blocks, one every `STRIDE` bytes from the start of the device: 32 MiB, eight
/// activity-log extents, one more than `SMALL_ACTIVITY_LOG` holds.
const BLOCKS: u64 = 1024;
const STRIDE: u64 = 32 << 10;
/// The failover probe writes here, outside the writer's region.
const PROBE_OFFSET: u64 = 48 * MIB;
/// Cycles in CI (two data nodes and a witness, then three data nodes); `BLKREPL_CHAOS_CYCLES`
/// runs more of each.
const CYCLES: usize = 21;
const CYCLES_OF_THREE: usize = 12;
/// Cycles of faults on the secondary and the witness: each of the three faults on each.
const CYCLES_OFF_THE_PRIMARY: usize = 6;
const CLIENT_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    Kill,
    Partition,
    Stop,
}

/// What the writer did, write by write.
#[derive(Default)]
struct History {
    next_version: u64,
    /// Per block: the newest acknowledged version (0: never written).
    acked: Vec<u64>,
    /// Per block: every version a write carried, acknowledged or not.
    tried: Vec<Vec<u64>>,
    acked_writes: u64,
    /// Per node: writes answered with an error, and writes never answered.
    failed: BTreeMap<String, u64>,
    unanswered: BTreeMap<String, u64>,
}

#[derive(Default)]
struct Control {
    /// Where to write (node name, NBD address); `None`: nowhere for now.
    target: Option<(String, SocketAddr)>,
    paused: bool,
    /// How long the writer waits for an answer (`None`: `CLIENT_TIMEOUT`).
    client_timeout: Option<Duration>,
    /// The writer is between writes, waiting (set while `paused` or without a target).
    idle: bool,
    stop: bool,
    history: History,
}

type Shared = Arc<(Mutex<Control>, Condvar)>;

/// Stops the writer when dropped, also when an assertion fails: the thread scope waits for it.
struct StopWriter<'a>(&'a Shared);

impl Drop for StopWriter<'_> {
    fn drop(&mut self) {
        let (lock, cv) = &**self.0;
        lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner).stop = true;
        cv.notify_all();
    }
}

/// Every 16 bytes of a block: its number and the version written, so a torn or misplaced write
/// shows.
fn pattern(block: u64, version: u64) -> Vec<u8> {
    let mut chunk = block.to_le_bytes().to_vec();
    chunk.extend(version.to_le_bytes());
    chunk.repeat(BLOCK / 16)
}

fn run_writer(net: &netns::Net, shared: &Shared) {
    net.enter_client();
    let mut rng: u64 = 0x9E37_79B9_7F4A_7C15;
    loop {
        let (node, address, timeout) = {
            let (lock, cv) = &**shared;
            let mut ctl = lock.lock().unwrap();
            loop {
                if ctl.stop {
                    return;
                }
                match (&ctl.target, ctl.paused) {
                    (Some((node, address)), false) => break (node.clone(), *address, ctl.client_timeout.unwrap_or(CLIENT_TIMEOUT)),
                    _ => {
                        ctl.idle = true;
                        cv.notify_all();
                        ctl = cv.wait(ctl).unwrap();
                    }
                }
            }
        };
        shared.0.lock().unwrap().idle = false;
        let Ok(mut client) = NbdClient::connect(address, "r0", timeout) else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        loop {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let block = rng % BLOCKS;
            let version = {
                let mut ctl = shared.0.lock().unwrap();
                if ctl.stop || ctl.paused || ctl.target.as_ref().map(|t| &t.0) != Some(&node) {
                    break;
                }
                let h = &mut ctl.history;
                h.next_version += 1;
                let v = h.next_version;
                h.tried[block as usize].push(v);
                v
            };
            let outcome = client.write(block * STRIDE, &pattern(block, version));
            let mut ctl = shared.0.lock().unwrap();
            let h = &mut ctl.history;
            match outcome {
                Outcome::Answered(0) => {
                    h.acked_writes += 1;
                    let acked = &mut h.acked[block as usize];
                    *acked = (*acked).max(version);
                }
                Outcome::Answered(_) => *h.failed.entry(node.clone()).or_default() += 1,
                Outcome::Unanswered(_) => {
                    *h.unanswered.entry(node.clone()).or_default() += 1;
                    break;
                }
            }
        }
    }
}

/// Promotes the first of `candidates` that may promote, as a cluster manager does by their
/// scores, and fails on a refusal. Once the primary is gone, the secondaries of three data
/// nodes resync between them what they applied lately, and a resync target neither promotes
/// nor gives a vote: `primary` waits for that resync rather than refuse (it refused in 59 of
/// 60 cycles before it did).
fn promote_one<'a>(c: &Cluster, candidates: &[&'a str]) -> &'a str {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(node) = candidates.iter().find(|node| c.status(node)["may_promote"] == true) {
            c.ok(node, &["primary", "r0"]);
            return node;
        }
        assert!(Instant::now() < deadline, "no node may promote\n{}", c.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The writer's state, its target `node`.
fn writer_for(c: &Cluster, node: &str) -> Shared {
    let shared: Shared = Arc::default();
    {
        let mut ctl = shared.0.lock().unwrap();
        ctl.history.acked = vec![0; BLOCKS as usize];
        ctl.history.tried = vec![Vec::new(); BLOCKS as usize];
        ctl.target = Some((node.to_owned(), c.nbd_address(node)));
    }
    shared
}

fn pause_writer(c: &Cluster, shared: &Shared) {
    {
        let mut ctl = shared.0.lock().unwrap();
        ctl.paused = true;
        shared.1.notify_all();
    }
    wait_until(c, "the writer to pause", 30, || shared.0.lock().unwrap().idle);
}

fn resume_writer(shared: &Shared) {
    let mut ctl = shared.0.lock().unwrap();
    ctl.paused = false;
    shared.1.notify_all();
}

fn inflict(c: &Cluster, node: &str, fault: Fault) {
    match fault {
        Fault::Kill => c.kill(node),
        Fault::Partition => c.isolate(node),
        Fault::Stop => c.signal(node, "STOP"),
    }
}

/// Undoes `fault` as a service manager or the network would: a killed daemon is started again.
fn mend(c: &Cluster, node: &str, fault: Fault) {
    match fault {
        Fault::Kill => drop(c.ok(node, &["up", "r0"])),
        Fault::Partition => c.heal(node),
        Fault::Stop => c.signal(node, "CONT"),
    }
}

/// With the writer paused: every acknowledged write reads back through `reader`, every data
/// node shows the others in sync with no bit held, and their data areas are equal.
fn check_quiet_replicas(c: &Cluster, shared: &Shared, reader: &str, data_nodes: &[&str], when: &str) {
    check_blocks(c, reader, shared);
    c.wait_all_in_sync(data_nodes);
    c.assert_data_equal(reader, data_nodes, when);
}

/// Reads every block of the writer's region through `node` and checks it against the history:
/// the newest acknowledged version or a later one that was tried, never anything older.
fn check_blocks(c: &Cluster, node: &str, shared: &Shared) {
    let net = c.net.as_ref().unwrap();
    let address = c.nbd_address(node);
    let data = net.as_client(|| {
        let mut client = NbdClient::connect(address, "r0", Duration::from_secs(10)).expect("connect to the new primary");
        let mut data = vec![0u8; (BLOCKS * STRIDE) as usize];
        for (i, chunk) in data.chunks_mut(256 << 10).enumerate() {
            let outcome = client.read(i as u64 * (256 << 10), chunk);
            assert!(matches!(outcome, Outcome::Answered(0)), "read through {node}: {outcome:?}");
        }
        data
    });
    let ctl = shared.0.lock().unwrap();
    let h = &ctl.history;
    for block in 0..BLOCKS {
        let bytes = &data[(block * STRIDE) as usize..][..BLOCK];
        let version = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
        let acked = h.acked[block as usize];
        if version == 0 && bytes.iter().all(|b| *b == 0) {
            assert_eq!(acked, 0, "block {block} lost acknowledged version {acked} on {node}");
            continue;
        }
        assert_eq!(bytes, pattern(block, version).as_slice(), "block {block} on {node} is torn or misplaced");
        assert!(version >= acked, "block {block} on {node} holds version {version}, older than the acknowledged {acked}");
        assert!(h.tried[block as usize].contains(&version), "block {block} on {node} holds version {version}, never written there");
    }
}

/// Written past the test harness's capture, so CI's log shows every cycle.
fn say(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{text}");
}

fn split_brains(c: &Cluster) -> usize {
    c.nodes
        .iter()
        .map(|n| std::fs::read_to_string(c.run_dir().join(format!("r0.{n}.log"))).unwrap_or_default())
        .map(|log| log.matches("split brain").count())
        .sum()
}

fn wait_until(c: &Cluster, what: &str, deadline_s: u64, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(deadline_s);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}\n{}", c.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An activity log of 7 extents (28 MiB) over the 64 MiB devices: the writes keep evicting
/// extents, so transactions that flush, evict and gather writes are written while the faults
/// strike, on the primary and on the secondaries.
const SMALL_ACTIVITY_LOG: &str = "al_extents = 7";

#[test]
fn faults_on_the_primary_heal_without_split_brain_or_lost_writes() {
    if !netns::usable() {
        return;
    }
    let c = Cluster::witness_trio(Options { netns: true, disk_mib: 64, extra: SMALL_ACTIVITY_LOG, ..Options::default() });
    run_cycles(&c, &["alpha", "beta"], CYCLES);
}

/// Faults on the others, never the primary: the secondary or the witness is killed, cut off
/// silently or stopped past the ping timeout, one at a time, while the writer goes on. The
/// primary keeps quorum with the node left, so it fails no write and answers every one (under
/// protocol C a silent secondary holds the writes until its link is declared dead, then the
/// primary records for it), and the node comes back in sync by itself once the fault is undone.
#[test]
fn faults_on_the_secondary_or_the_witness_fail_no_write_of_the_primary() {
    if !netns::usable() {
        return;
    }
    let c = Cluster::witness_trio(Options { netns: true, disk_mib: 64, extra: SMALL_ACTIVITY_LOG, ..Options::default() });
    let net = c.net.as_ref().unwrap();
    let shared = writer_for(&c, "alpha");
    // Protocol C holds the writes while a silent secondary is not yet declared dead: the
    // writer waits that out rather than give up on an answer that comes.
    shared.0.lock().unwrap().client_timeout = Some(Duration::from_secs(30));
    let acked = || shared.0.lock().unwrap().history.acked_writes;
    std::thread::scope(|s| {
        let writer = s.spawn(|| run_writer(net, &shared));
        let stop_writer = StopWriter(&shared);
        let cycles = std::env::var("BLKREPL_CHAOS_CYCLES").ok().and_then(|n| n.parse().ok()).unwrap_or(CYCLES_OFF_THE_PRIMARY);
        for cycle in 0..cycles {
            let node = ["beta", "tie"][cycle % 2];
            let fault = [Fault::Kill, Fault::Partition, Fault::Stop][cycle / 2 % 3];
            let before = acked();
            inflict(&c, node, fault);
            wait_until(&c, "writes while the fault holds", 30, || acked() > before + 50);
            mend(&c, node, fault);
            match node {
                "beta" => drop(c.wait_peer("alpha", "beta", "Established", "UpToDate")),
                _ => drop(c.wait_for("alpha", "the witness back", |st| Cluster::peer(st, node)["connection"] == "Connected")),
            }
            let after = acked();
            wait_until(&c, "writes after the fault", 30, || acked() > after + 50);
            pause_writer(&c, &shared);
            check_quiet_replicas(&c, &shared, "alpha", &["alpha", "beta"], &format!("cycle {cycle}, {fault:?} on {node}"));
            let (failed, unanswered) = {
                let h = &shared.0.lock().unwrap().history;
                (h.failed.clone(), h.unanswered.clone())
            };
            say(&format!("chaos off the primary: cycle {cycle:2} {fault:?} on {node}: acknowledged {}, failed {failed:?}, unanswered {unanswered:?}", acked()));
            assert!(failed.is_empty() && unanswered.is_empty(), "cycle {cycle}: the primary with quorum failed or left writes unanswered\n{}", c.logs());
            assert_eq!(c.status("alpha")["role"], "Primary", "cycle {cycle}");
            resume_writer(&shared);
        }
        drop(stop_writer);
        writer.join().unwrap();
    });
}

/// The two secondaries of three data nodes follow the primary, record for each other what one
/// lacks, and one of them is promoted each cycle: the old primary then comes back to two nodes
/// that both moved on.
#[test]
fn faults_on_the_primary_of_three_data_nodes_heal_without_split_brain_or_lost_writes() {
    if !netns::usable() {
        return;
    }
    let nodes = ["alpha", "beta", "gamma"];
    let c = Cluster::new(&nodes, Options { netns: true, protocol: "B", disk_mib: 64, quorum: "majority", extra: SMALL_ACTIVITY_LOG, ..Options::default() });
    c.create_md_and_up();
    c.wait_connected("alpha", &["beta", "gamma"]);
    c.ok("alpha", &["primary", "--force", "r0"]);
    c.wait_all_in_sync(&nodes);
    run_cycles(&c, &nodes, CYCLES_OF_THREE);
}

/// The cycles on `data_nodes`, whose first is the primary: each cycle promotes the next.
fn run_cycles(c: &Cluster, data_nodes: &[&str], default_cycles: usize) {
    let net = c.net.as_ref().unwrap();
    // Data nodes + witnesses, as the simulator names its shapes: the two tests' lines interleave.
    let shape = format!("{}+{}", data_nodes.len(), c.nodes.len() - data_nodes.len());
    let shared = writer_for(c, data_nodes[0]);
    std::thread::scope(|s| {
        let writer = s.spawn(|| run_writer(net, &shared));
        let stop_writer = StopWriter(&shared);
        let faults = [Fault::Kill, Fault::Partition, Fault::Stop];
        let mut failovers = Vec::new();
        let cycles = std::env::var("BLKREPL_CHAOS_CYCLES").ok().and_then(|n| n.parse().ok()).unwrap_or(default_cycles);
        let mut primary = data_nodes[0];
        for cycle in 0..cycles {
            let fault = faults[cycle % faults.len()];
            // The others, from the one after the primary on: each gets its turn.
            let at = data_nodes.iter().position(|n| *n == primary).unwrap();
            let candidates: Vec<&str> = (1..data_nodes.len()).map(|i| data_nodes[(at + i) % data_nodes.len()]).collect();
            let acked_before = shared.0.lock().unwrap().history.acked_writes;
            wait_until(c, "the writer to make progress", 30, || shared.0.lock().unwrap().history.acked_writes > acked_before + 50);

            let t0 = Instant::now();
            inflict(c, primary, fault);
            let secondary = promote_one(c, &candidates);
            let probe = c.nbd_address(secondary);
            net.as_client(|| {
                let mut client = NbdClient::connect(probe, "r0", Duration::from_secs(10)).expect("connect to the new primary");
                let outcome = client.write(PROBE_OFFSET, &pattern(u64::MAX, cycle as u64));
                assert!(matches!(outcome, Outcome::Answered(0)), "the new primary refused a write: {outcome:?}");
            });
            let failover = t0.elapsed();
            failovers.push(failover);
            {
                let mut ctl = shared.0.lock().unwrap();
                ctl.target = Some((secondary.to_owned(), probe));
                shared.1.notify_all();
            }
            let (failed_before, acked_before) = {
                let ctl = shared.0.lock().unwrap();
                (ctl.history.failed.get(secondary).copied().unwrap_or(0), ctl.history.acked_writes)
            };
            wait_until(c, "writes on the new primary", 30, || shared.0.lock().unwrap().history.acked_writes > acked_before + 50);

            // Heal while the writer goes on: the old primary must come back as a secondary by
            // itself, and the new one must keep serving.
            mend(c, primary, fault);
            c.wait_for(primary, "the old primary back as a secondary", |s| s["role"] == "Secondary" && s["disk"] == "UpToDate");
            let acked_now = shared.0.lock().unwrap().history.acked_writes;
            wait_until(c, "writes after the heal", 30, || shared.0.lock().unwrap().history.acked_writes > acked_now + 50);

            // Quiet: every acknowledged write reads back through the new primary, and the
            // replicas are identical.
            pause_writer(c, &shared);
            check_quiet_replicas(c, &shared, secondary, data_nodes, &format!("cycle {cycle}"));
            let (failed, unanswered, acked, failed_new) = {
                let ctl = shared.0.lock().unwrap();
                let h = &ctl.history;
                (h.failed.clone(), h.unanswered.clone(), h.acked_writes, h.failed.get(secondary).copied().unwrap_or(0))
            };
            assert_eq!(failed_new, failed_before, "cycle {cycle}: the primary with quorum ({secondary}) failed writes\n{}", c.logs());
            let brains = split_brains(c);
            say(&format!(
                "chaos {shape}: cycle {cycle:2} {fault:?} on {primary}: {secondary} promoted, failover {:.2} s; acknowledged {acked}, failed {failed:?}, unanswered {unanswered:?}, split brains {brains}",
                failover.as_secs_f64()
            ));
            assert_eq!(brains, 0, "split brain in cycle {cycle}\n{}", c.logs());
            resume_writer(&shared);
            primary = secondary;
        }
        drop(stop_writer);
        writer.join().unwrap();
        for fault in faults {
            let times: Vec<String> = failovers
                .iter()
                .enumerate()
                .filter(|(i, _)| faults[i % faults.len()] == fault)
                .map(|(_, d)| format!("{:.2}", d.as_secs_f64()))
                .collect();
            say(&format!("chaos {shape}: failover after {fault:?}: {} s", times.join(", ")));
        }
    });
}
