//! Event lines from consecutive status snapshots: pure functions, no I/O, no clock.

use super::{Action, ConnectionObject, DeviceObject, Object, PeerDeviceObject, ResourceObject};
use crate::core::quorum::OnNoQuorum;
use crate::engine::ResourceStatus;

/// The objects a snapshot shows, in the order DRBD lists them: the resource, its connections,
/// the device, its peer devices. `statistics` adds the byte counters and resync rate (which
/// change with every write, so they are left out unless asked for).
pub fn objects(status: &ResourceStatus, statistics: bool) -> Vec<Object> {
    let name = &status.name;
    let suspended = status.role == "Primary" && !status.quorum && status.on_no_quorum == OnNoQuorum::SuspendIo;
    let mut objects = vec![Object::Resource(ResourceObject {
        name: name.clone(),
        role: status.role.clone(),
        // Fencing first: while it decides, quorum cannot release anything.
        suspended: status.io_suspended.clone().unwrap_or_else(|| if suspended { "quorum" } else { "no" }.into()),
        quorum: status.quorum,
        may_promote: status.may_promote,
        promotion_score: status.promotion_score,
    })];
    objects.extend(status.peers.iter().map(|p| {
        Object::Connection(ConnectionObject {
            name: name.clone(),
            peer_node_id: p.node_id,
            conn_name: p.name.clone(),
            connection: p.connection.clone(),
            role: p.peer_role.clone(),
        })
    }));
    objects.push(Object::Device(DeviceObject {
        name: name.clone(),
        disk: status.disk.clone(),
        export: status.device.clone(),
        // "suspended: WHY" -> "suspended": values in a line have no spaces.
        io: status.device_io.as_deref().map(|io| io.split(':').next().unwrap_or(io).to_owned()),
        write_failed: status.local_write_failed.is_some(),
    }));
    objects.extend(status.peers.iter().map(|p| {
        let resync = p.resync.as_ref();
        let stat = |v: u64| statistics.then_some(v / 1024);
        Object::PeerDevice(PeerDeviceObject {
            name: name.clone(),
            peer_node_id: p.node_id,
            conn_name: p.name.clone(),
            replication: p.replication.clone(),
            peer_disk: p.peer_disk.clone(),
            out_of_sync_kib: p.out_of_sync_bytes / 1024,
            // One decimal, as shown: finer steps would only add lines.
            done: resync.map(|r| (r.done_percent * 10.0).floor() / 10.0),
            sent_kib: stat(p.sent_bytes),
            received_kib: stat(p.received_bytes),
            resync_rate_kib: resync.filter(|_| statistics).map(|r| r.rate_kib_per_s),
            eta_s: resync.filter(|_| statistics).and_then(|r| r.eta_s),
        })
    }));
    objects
}

/// What turns `before` into `after`: objects gone (`destroy`, the last listed first), then
/// objects new (`create`) or different (`change`) in `after`'s order. Objects are matched by
/// resource and [`Object::key`].
pub fn diff(before: &[Object], after: &[Object]) -> Vec<(Action, Object)> {
    let same = |a: &Object, b: &Object| a.resource() == b.resource() && a.key() == b.key();
    let mut lines: Vec<(Action, Object)> =
        before.iter().rev().filter(|b| !after.iter().any(|a| same(a, b))).map(|b| (Action::Destroy, b.clone())).collect();
    for a in after {
        match before.iter().find(|b| same(a, b)) {
            None => lines.push((Action::Create, a.clone())),
            Some(b) if b != a => lines.push((Action::Change, a.clone())),
            Some(_) => {}
        }
    }
    lines
}

/// The lines between two snapshots of one resource (no line when nothing shown changed).
pub fn changes(before: &ResourceStatus, after: &ResourceStatus, statistics: bool) -> Vec<(Action, Object)> {
    diff(&objects(before, statistics), &objects(after, statistics))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ResyncStatus;
    use crate::events::fixtures::status;

    fn lines(before: &ResourceStatus, after: &ResourceStatus) -> Vec<String> {
        changes(before, after, false).iter().map(|(action, object)| format!("{action:?} {}", object.text())).collect()
    }

    #[test]
    fn a_snapshot_lists_resource_connections_device_peer_devices() {
        let texts: Vec<String> = objects(&status(), false).iter().map(Object::text).collect();
        assert_eq!(
            texts,
            [
                "resource name:r0 role:Secondary suspended:no quorum:yes may-promote:yes promotion-score:10000",
                "connection name:r0 peer-node-id:1 conn-name:beta connection:Connected role:Secondary",
                "connection name:r0 peer-node-id:2 conn-name:tie connection:Connected role:Secondary",
                "device name:r0 disk:UpToDate write-failed:no",
                "peer-device name:r0 peer-node-id:1 conn-name:beta replication:Established peer-disk:UpToDate out-of-sync:0",
                "peer-device name:r0 peer-node-id:2 conn-name:tie replication:Established peer-disk:UpToDate out-of-sync:0",
            ]
        );
    }

    #[test]
    fn equal_snapshots_give_no_line() {
        assert!(lines(&status(), &status()).is_empty());
    }

    #[test]
    fn a_promotion_changes_the_resource_and_the_device() {
        let before = status();
        let mut after = status();
        after.role = "Primary".into();
        after.may_promote = false;
        after.device = Some("/dev/ublkb0".into());
        after.device_io = Some("serving".into());
        assert_eq!(
            lines(&before, &after),
            [
                "Change resource name:r0 role:Primary suspended:no quorum:yes may-promote:no promotion-score:10000",
                "Change device name:r0 disk:UpToDate export:/dev/ublkb0 io:serving write-failed:no",
            ]
        );
    }

    #[test]
    fn a_lost_connection_changes_only_that_peer() {
        let before = status();
        let mut after = status();
        let beta = &mut after.peers[0];
        beta.connection = "Connecting".into();
        beta.replication = "Off".into();
        beta.peer_role = "Unknown".into();
        beta.peer_disk = "DUnknown".into();
        beta.out_of_sync_bytes = 8192;
        assert_eq!(
            lines(&before, &after),
            [
                "Change connection name:r0 peer-node-id:1 conn-name:beta connection:Connecting role:Unknown",
                "Change peer-device name:r0 peer-node-id:1 conn-name:beta replication:Off peer-disk:DUnknown out-of-sync:8",
            ]
        );
    }

    #[test]
    fn resync_progress_shows_in_one_decimal_steps() {
        let resyncing = |done_percent: f64, out_of_sync_bytes: u64| {
            let mut s = status();
            s.peers[0].replication = "SyncSource".into();
            s.peers[0].peer_disk = "Inconsistent".into();
            s.peers[0].out_of_sync_bytes = out_of_sync_bytes;
            s.peers[0].resync = Some(ResyncStatus {
                full: false,
                total_bytes: 8 << 20,
                done_bytes: (8 << 20) - out_of_sync_bytes,
                done_percent,
                rate_kib_per_s: 512,
                eta_s: Some(1),
            });
            s
        };
        assert_eq!(
            lines(&resyncing(42.51, 4 << 20), &resyncing(42.58, 4 << 20)),
            Vec::<String>::new(),
            "a change below the shown decimal is no line"
        );
        assert_eq!(
            lines(&resyncing(42.5, 4 << 20), &resyncing(57.0, 3 << 20)),
            ["Change peer-device name:r0 peer-node-id:1 conn-name:beta replication:SyncSource peer-disk:Inconsistent out-of-sync:3072 done:57.0"]
        );
        let stats: Vec<String> = objects(&resyncing(57.0, 3 << 20), true).iter().map(Object::text).skip(4).take(1).collect();
        assert_eq!(
            stats,
            ["peer-device name:r0 peer-node-id:1 conn-name:beta replication:SyncSource peer-disk:Inconsistent out-of-sync:3072 done:57.0 sent:0 received:0 resync-rate:512 eta:1"]
        );
        // The end of the resync: no progress any more.
        assert_eq!(
            lines(&resyncing(99.9, 4096), &status()),
            ["Change peer-device name:r0 peer-node-id:1 conn-name:beta replication:Established peer-disk:UpToDate out-of-sync:0"]
        );
    }

    #[test]
    fn statistics_are_left_out_unless_asked_for() {
        let before = status();
        let mut after = status();
        after.peers[0].sent_bytes = 1 << 20;
        assert!(changes(&before, &after, false).is_empty());
        assert_eq!(changes(&before, &after, true).len(), 1);
    }

    #[test]
    fn objects_that_appear_are_created_and_those_that_go_are_destroyed_last_first() {
        let all = objects(&status(), false);
        let created: Vec<(Action, (u8, u8))> = diff(&[], &all).iter().map(|(a, o)| (*a, o.key())).collect();
        assert_eq!(created, [(Action::Create, (0, 0)), (Action::Create, (1, 1)), (Action::Create, (1, 2)), (Action::Create, (2, 0)), (Action::Create, (3, 1)), (Action::Create, (3, 2))]);
        let destroyed: Vec<(Action, (u8, u8))> = diff(&all, &[]).iter().map(|(a, o)| (*a, o.key())).collect();
        assert_eq!(destroyed, [(Action::Destroy, (3, 2)), (Action::Destroy, (3, 1)), (Action::Destroy, (2, 0)), (Action::Destroy, (1, 2)), (Action::Destroy, (1, 1)), (Action::Destroy, (0, 0))]);
    }

    #[test]
    fn objects_of_two_resources_are_not_confused() {
        let mut other = status();
        other.name = "r1".into();
        let mut both = objects(&status(), false);
        both.extend(objects(&other, false));
        let r0 = objects(&status(), false);
        let lines = diff(&both, &r0);
        assert_eq!(lines.len(), 6);
        assert!(lines.iter().all(|(action, object)| *action == Action::Destroy && object.resource() == Some("r1")));
    }

    #[test]
    fn a_primary_without_quorum_under_suspend_io_is_suspended() {
        let mut s = status();
        s.role = "Primary".into();
        s.quorum = false;
        s.promotion_score = None;
        assert!(objects(&s, false)[0].text().contains(" suspended:quorum ") && objects(&s, false)[0].text().ends_with("promotion-score:none"));
        s.on_no_quorum = OnNoQuorum::IoError;
        assert!(objects(&s, false)[0].text().contains(" suspended:no "));
        s.io_suspended = Some("fencing".into());
        assert!(objects(&s, false)[0].text().contains(" suspended:fencing "), "fencing freezes I/O whatever quorum says");
    }

    #[test]
    fn events_round_trip_through_json_with_stable_names() {
        let event = super::super::Event { time: "2026-12-01T17:41:21.123Z".into(), action: Action::Exists, object: objects(&status(), false)[4].clone() };
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "time": "2026-12-01T17:41:21.123Z", "action": "exists", "object": "peer-device", "name": "r0",
                "peer_node_id": 1, "conn_name": "beta", "replication": "Established", "peer_disk": "UpToDate",
                "out_of_sync_kib": 0, "done": null
            })
        );
        assert_eq!(serde_json::from_value::<super::super::Event>(json).unwrap(), event);
        let marker = super::super::Event { time: event.time.clone(), action: Action::Exists, object: Object::Marker };
        assert_eq!(serde_json::to_value(&marker).unwrap(), serde_json::json!({"time": "2026-12-01T17:41:21.123Z", "action": "exists", "object": "-"}));
        assert_eq!(marker.text(false), "exists -");
        assert_eq!(event.text(true), format!("2026-12-01T17:41:21.123Z exists {}", event.object.text()));
    }
}
