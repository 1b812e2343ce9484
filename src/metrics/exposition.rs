//! The text a scrape gets: one status snapshot and one read of the drivers' counters, in the
//! Prometheus text format (prometheus-client's encoder). States are state sets: one series per
//! possible state, 1 for the current one and 0 for the others, so a dashboard or an alert can
//! select a state by its label and a change of state is a change of value, not a new series.
//!
//! Every series carries the `resource` label; per-peer ones `peer` too. docs/OPERATIONS.md
//! ("Metrics") lists them all.

use crate::core::states::{ConnState, DiskState, ReplState, Role};
use crate::engine::{CountersSnapshot, HistogramSnapshot, PeerStatus, ResourceStatus, WAITING_FOR_BITMAPS};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{prometheus_text, DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::borrow::Cow;
use std::fmt;

/// The `Content-Type` of what [`render`] returns.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// The whole exposition of one resource.
pub fn render(status: ResourceStatus, counters: CountersSnapshot) -> Result<String, fmt::Error> {
    let resource = [(Cow::Borrowed("resource"), Cow::Owned(status.name.clone()))];
    let mut registry = Registry::with_prefix_and_labels("blkrepl", resource.into_iter());
    registry.register_collector(Box::new(Scrape { status, counters }));
    let mut text = String::new();
    prometheus_text::encode(&mut text, &registry)?;
    Ok(text)
}

#[derive(Debug)]
struct Scrape {
    status: ResourceStatus,
    counters: CountersSnapshot,
}

type Labels = Vec<(&'static str, String)>;

#[derive(Clone, Copy)]
enum Value {
    Int(u64),
    Real(f64),
}

impl From<bool> for Value {
    fn from(b: bool) -> Value {
        Value::Int(u64::from(b))
    }
}

/// One metric: its series, written only when it has any (a resync's rate is absent while no
/// resync runs, rather than a misleading 0).
fn family(e: &mut DescriptorEncoder, name: &str, help: &str, kind: MetricType, series: Vec<(Labels, Value)>) -> fmt::Result {
    if series.is_empty() {
        return Ok(());
    }
    let mut metric = e.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in &series {
        let mut one = metric.encode_family(labels)?;
        match (kind, *value) {
            (MetricType::Counter, Value::Int(v)) => one.encode_counter::<NoLabelSet, _, u64>(&v, None)?,
            (MetricType::Counter, Value::Real(v)) => one.encode_counter::<NoLabelSet, _, f64>(&v, None)?,
            (_, Value::Int(v)) => one.encode_gauge(&v)?,
            (_, Value::Real(v)) => one.encode_gauge(&v)?,
        }
    }
    Ok(())
}

/// A state set: every state `all` lists, 1 for `current`.
fn states(base: &Labels, label: &'static str, all: &[&'static str], current: &str) -> Vec<(Labels, Value)> {
    all.iter()
        .map(|state| {
            let mut labels = base.clone();
            labels.push((label, (*state).to_owned()));
            (labels, Value::from(*state == current))
        })
        .collect()
}

/// Every state of a wire enum, found through its wire values (so a state added there appears
/// here without a list to keep in step).
fn every<T: Copy>(from_wire: fn(u8) -> Option<T>, as_str: fn(T) -> &'static str) -> Vec<&'static str> {
    (0..=u8::MAX).filter_map(from_wire).map(as_str).collect()
}

fn histogram(e: &mut DescriptorEncoder, name: &str, help: &str, h: &HistogramSnapshot) -> fmt::Result {
    let mut metric = e.encode_descriptor(name, help, None, MetricType::Histogram)?;
    metric.encode_histogram::<NoLabelSet>(h.sum_s, h.count, &h.buckets, None)
}

fn per_peer(peers: &[PeerStatus], value: impl Fn(&PeerStatus) -> Option<Value>) -> Vec<(Labels, Value)> {
    peers.iter().filter_map(|p| value(p).map(|v| (vec![("peer", p.name.clone())], v))).collect()
}

fn per_peer_states(peers: &[PeerStatus], all: &[&'static str], current: impl Fn(&PeerStatus) -> &str) -> Vec<(Labels, Value)> {
    peers.iter().flat_map(|p| states(&vec![("peer", p.name.clone())], "state", all, current(p))).collect()
}

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        use MetricType::{Counter, Gauge};
        let (s, c) = (&self.status, &self.counters);
        let none = Labels::new();
        let one = |v: Value| vec![(Labels::new(), v)];
        let roles = every(Role::from_wire, Role::as_str);
        let disks = every(DiskState::from_wire, DiskState::as_str);
        family(&mut e, "role", "This node's role: 1 for the current one", Gauge, states(&none, "role", &roles, &s.role))?;
        family(&mut e, "disk_state", "This node's disk state: 1 for the current one", Gauge, states(&none, "state", &disks, &s.disk))?;
        family(&mut e, "quorum", "Whether this node has quorum (always 1 under quorum = \"off\")", Gauge, one(s.quorum.into()))?;
        family(&mut e, "quorum_votes", "Voters this node reaches, itself included", Gauge, one(Value::Int(s.quorum_votes.into())))?;
        family(&mut e, "quorum_voters", "Voters counted (departed nodes are not)", Gauge, one(Value::Int(s.quorum_voters.into())))?;
        family(&mut e, "quorum_votes_needed", "Votes needed for quorum", Gauge, one(Value::Int(s.quorum_needed.into())))?;
        family(&mut e, "suspended_writes", "Writes held because this primary has no quorum or waits for its fence-peer handler", Gauge, one(Value::Int(s.suspended_writes as u64)))?;
        family(&mut e, "writes_waiting_for_room", "New writes waiting for room in a peer's send queue (back-pressure)", Gauge, one(Value::Int(s.writes_waiting_for_room as u64)))?;
        let fencing = match s.io_suspended.as_deref() {
            None => 0,
            Some("fencing") => 1,
            Some(_) => 2,
        };
        family(&mut e, "fencing_io_suspended", "1 while writes wait for the fence-peer handler, 2 while they fail because it failed (until the peer is back or resume-io), else 0", Gauge, one(Value::Int(fencing)))?;
        family(&mut e, "writes_in_flight", "Application writes received and not yet answered", Gauge, one(Value::Int(c.writes_in_flight)))?;
        family(&mut e, "activity_log_transactions", "Activity-log transactions written durably", Counter, one(Value::Int(c.al_transactions)))?;
        family(&mut e, "bitmap_page_writes", "Dirty-bitmap pages (4 KiB) written durably", Counter, one(Value::Int(c.bitmap_page_writes)))?;
        histogram(&mut e, "write_latency_seconds", "Application writes (and write-zeroes, discards) from arrival to answer", &c.write_latency)?;
        histogram(&mut e, "flush_latency_seconds", "Application flushes from arrival to answer", &c.flush_latency)?;

        let peers = &s.peers;
        let connections = every(ConnState::from_wire, ConnState::as_str);
        let mut replications = every(ReplState::from_wire, ReplState::as_str);
        replications.extend(WAITING_FOR_BITMAPS);
        family(&mut e, "peer_connection_state", "The connection to the peer: 1 for the current state", Gauge, per_peer_states(peers, &connections, |p| &p.connection))?;
        family(&mut e, "peer_replication_state", "Replication with the peer: 1 for the current state", Gauge, per_peer_states(peers, &replications, |p| &p.replication))?;
        family(&mut e, "peer_disk_state", "The peer's disk as this node knows it: 1 for the current state", Gauge, per_peer_states(peers, &disks, |p| &p.peer_disk))?;
        family(&mut e, "peer_out_of_sync_bytes", "Bytes that differ (or may) between this node and the peer", Gauge, per_peer(peers, |p| Some(Value::Int(p.out_of_sync_bytes))))?;
        family(&mut e, "peer_sent_bytes", "Bytes sent to the peer", Counter, per_peer(peers, |p| Some(Value::Int(p.sent_bytes))))?;
        family(&mut e, "peer_received_bytes", "Bytes received from the peer", Counter, per_peer(peers, |p| Some(Value::Int(p.received_bytes))))?;
        family(&mut e, "peer_unwritten_bytes", "Data of the peer's stream received and not yet written here", Gauge, per_peer(peers, |p| Some(Value::Int(p.unwritten_bytes))))?;
        family(&mut e, "peer_resync_rate_bytes_per_second", "Resync rate with the peer (KiB resolution), while a resync runs", Gauge,
            per_peer(peers, |p| p.resync.as_ref().map(|r| Value::Int(r.rate_kib_per_s * 1024))))?;
        family(&mut e, "peer_resync_eta_seconds", "Estimated time left of the resync with the peer, once known", Gauge,
            per_peer(peers, |p| p.resync.as_ref().and_then(|r| r.eta_s).map(Value::Int)))?;
        family(&mut e, "peer_resync_done_ratio", "Part of the running resync with the peer that is done (0 to 1)", Gauge,
            per_peer(peers, |p| p.resync.as_ref().map(|r| Value::Real(r.done_percent / 100.0))))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_of_a_wire_enum_is_found() {
        let roles = every(Role::from_wire, Role::as_str);
        assert_eq!(roles.len(), 3);
        assert!(roles.contains(&"Primary") && roles.contains(&"Secondary"));
        assert!(every(ReplState::from_wire, ReplState::as_str).contains(&"SyncTarget"));
    }

    #[test]
    fn a_peer_waiting_for_the_bitmaps_is_in_a_state_of_its_own() {
        let mut status = crate::events::fixtures::status();
        status.peers[0].replication = WAITING_FOR_BITMAPS[1].into();
        let none = HistogramSnapshot { sum_s: 0.0, count: 0, buckets: Vec::new() };
        let counters = CountersSnapshot { write_latency: none.clone(), flush_latency: none, writes_in_flight: 0, al_transactions: 0, bitmap_page_writes: 0 };
        let text = render(status, counters).unwrap();
        let value = |state: &str| {
            let series = format!("blkrepl_peer_replication_state{{resource=\"r0\",peer=\"beta\",state=\"{state}\"}} ");
            text.lines().find_map(|l| l.strip_prefix(&series)).unwrap_or_else(|| panic!("no {series}in {text}")).to_owned()
        };
        assert_eq!((value("WFBitMapT").as_str(), value("WFBitMapS").as_str(), value("Established").as_str()), ("1", "0", "0"));
    }

    #[test]
    fn a_state_set_marks_only_the_current_state() {
        let set = states(&vec![("peer", "beta".into())], "state", &["A", "B"], "B");
        let values: Vec<(String, u64)> = set
            .iter()
            .map(|(labels, v)| (labels[1].1.clone(), match v { Value::Int(i) => *i, Value::Real(_) => unreachable!() }))
            .collect();
        assert_eq!(values, [("A".to_owned(), 0), ("B".to_owned(), 1)]);
    }
}
