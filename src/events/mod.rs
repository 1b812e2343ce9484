//! `blkrepl events`: a resource's state as a stream of lines in the shape of DRBD's
//! `drbdsetup events2` (`exists|create|change|destroy <object> key:value ...`), or one JSON
//! object per line, for cluster managers, promoters and handlers.
//!
//! Events live above the replica: they are derived from consecutive [`ResourceStatus`]
//! snapshots ([`diff`]), never from inside the replication rules, so what a consumer sees is
//! exactly what `blkrepl status` would have shown at that moment. Every line carries the
//! object's whole current state (not only what changed): a consumer that joins late or misses a
//! line needs no memory of earlier ones.
//!
//! [`ResourceStatus`]: crate::engine::ResourceStatus

pub mod diff;
#[cfg(test)]
pub mod fixtures;
pub mod follow;
pub mod time;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Part of the state as it was when the stream started (up to the `exists -` marker).
    Exists,
    /// An object that appeared after the marker (a daemon started or came back).
    Create,
    Change,
    /// An object that went away (its daemon stopped or died).
    Destroy,
}

/// One line of the stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// When the daemon sampled the state (ISO-8601, UTC).
    pub time: String,
    pub action: Action,
    #[serde(flatten)]
    pub object: Object,
}

/// What a line is about. Field names are the JSON schema (documented in docs/OPERATIONS.md,
/// "Events"); the text form uses the same names with `-` for `_`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "object", rename_all = "kebab-case")]
pub enum Object {
    Resource(ResourceObject),
    Connection(ConnectionObject),
    Device(DeviceObject),
    PeerDevice(PeerDeviceObject),
    /// `exists -`: the state that existed when the stream started has been listed.
    #[serde(rename = "-")]
    Marker,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResourceObject {
    pub name: String,
    pub role: String,
    /// `no`; `quorum` while this primary holds writes because it lacks quorum (suspend-io);
    /// `fencing` or `fence-failed` while fencing freezes its I/O (see `io_suspended` in status).
    pub suspended: String,
    pub quorum: bool,
    pub may_promote: bool,
    /// None while the node may not be promoted at all (no quorum, another primary, diskless).
    pub promotion_score: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectionObject {
    pub name: String,
    pub peer_node_id: u8,
    pub conn_name: String,
    pub connection: String,
    /// The peer's role (`Unknown` while not connected).
    pub role: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceObject {
    pub name: String,
    pub disk: String,
    /// `/dev/ublkbN` or an NBD URI while exported.
    pub export: Option<String>,
    /// `serving`, `suspended` or `failing` (see `device_io` in `status --json`) while exported.
    pub io: Option<String>,
    /// A local write failed: this primary fails every read and write until demoted.
    pub write_failed: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerDeviceObject {
    pub name: String,
    pub peer_node_id: u8,
    pub conn_name: String,
    pub replication: String,
    pub peer_disk: String,
    pub out_of_sync_kib: u64,
    /// Percent of the running resync done (one decimal), none without a resync.
    pub done: Option<f64>,
    /// With `--statistics` only, as the fields below.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_kib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received_kib: Option<u64>,
    /// Resync rate, average since the pass started (statistics, during a resync).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync_rate_kib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_s: Option<u64>,
}

impl Object {
    /// The resource the object belongs to (none for the marker).
    pub fn resource(&self) -> Option<&str> {
        match self {
            Object::Resource(o) => Some(&o.name),
            Object::Connection(o) => Some(&o.name),
            Object::Device(o) => Some(&o.name),
            Object::PeerDevice(o) => Some(&o.name),
            Object::Marker => None,
        }
    }

    /// Which object of its resource this is: two snapshots' objects with the same key are the
    /// same object (changed or not).
    pub fn key(&self) -> (u8, u8) {
        match self {
            Object::Resource(_) => (0, 0),
            Object::Connection(o) => (1, o.peer_node_id),
            Object::Device(_) => (2, 0),
            Object::PeerDevice(o) => (3, o.peer_node_id),
            Object::Marker => (4, 0),
        }
    }

    /// `resource name:r0 role:Primary ...`: DRBD's events2 layout; absent values are left out.
    pub fn text(&self) -> String {
        let yes_no = |b: bool| if b { "yes" } else { "no" }.to_owned();
        let mut fields: Vec<(&str, Option<String>)> = Vec::new();
        let kind = match self {
            Object::Resource(o) => {
                fields.extend([
                    ("name", Some(o.name.clone())),
                    ("role", Some(o.role.clone())),
                    ("suspended", Some(o.suspended.clone())),
                    ("quorum", Some(yes_no(o.quorum))),
                    ("may-promote", Some(yes_no(o.may_promote))),
                    ("promotion-score", Some(o.promotion_score.map_or_else(|| "none".to_owned(), |s| s.to_string()))),
                ]);
                "resource"
            }
            Object::Connection(o) => {
                fields.extend([
                    ("name", Some(o.name.clone())),
                    ("peer-node-id", Some(o.peer_node_id.to_string())),
                    ("conn-name", Some(o.conn_name.clone())),
                    ("connection", Some(o.connection.clone())),
                    ("role", Some(o.role.clone())),
                ]);
                "connection"
            }
            Object::Device(o) => {
                fields.extend([
                    ("name", Some(o.name.clone())),
                    ("disk", Some(o.disk.clone())),
                    ("export", o.export.clone()),
                    ("io", o.io.clone()),
                    ("write-failed", Some(yes_no(o.write_failed))),
                ]);
                "device"
            }
            Object::PeerDevice(o) => {
                fields.extend([
                    ("name", Some(o.name.clone())),
                    ("peer-node-id", Some(o.peer_node_id.to_string())),
                    ("conn-name", Some(o.conn_name.clone())),
                    ("replication", Some(o.replication.clone())),
                    ("peer-disk", Some(o.peer_disk.clone())),
                    ("out-of-sync", Some(o.out_of_sync_kib.to_string())),
                    ("done", o.done.map(|d| format!("{d:.1}"))),
                    ("sent", o.sent_kib.map(|v| v.to_string())),
                    ("received", o.received_kib.map(|v| v.to_string())),
                    ("resync-rate", o.resync_rate_kib.map(|v| v.to_string())),
                    ("eta", o.eta_s.map(|v| v.to_string())),
                ]);
                "peer-device"
            }
            Object::Marker => "-",
        };
        let mut line = kind.to_owned();
        for (key, value) in fields {
            if let Some(value) = value {
                line += &format!(" {key}:{value}");
            }
        }
        line
    }
}

impl Event {
    /// The text line: `[TIME ]ACTION OBJECT key:value ...`.
    pub fn text(&self, timestamps: bool) -> String {
        let action = match self.action {
            Action::Exists => "exists",
            Action::Create => "create",
            Action::Change => "change",
            Action::Destroy => "destroy",
        };
        let line = format!("{action} {}", self.object.text());
        if timestamps {
            format!("{} {line}", self.time)
        } else {
            line
        }
    }
}
