//! Roles and states, in DRBD's vocabulary so operators can read `status` without a glossary.

use serde::Serialize;
use std::fmt;

macro_rules! wire_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $value:literal => $text:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
        pub enum $name { $($(#[$vdoc])* #[serde(rename = $text)] $variant = $value,)+ }

        impl $name {
            /// The value carried in `State` frames.
            pub fn to_wire(self) -> u8 { self as u8 }
            pub fn from_wire(value: u8) -> Option<Self> {
                match value { $($value => Some(Self::$variant),)+ _ => None }
            }
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text,)+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(self.as_str()) }
        }
    };
}

wire_enum!(
    /// Whether this node serves the device.
    Role {
        Secondary = 1 => "Secondary",
        Primary = 2 => "Primary",
        Unknown = 0 => "Unknown",
    }
);

wire_enum!(
    /// The quality of a node's data.
    DiskState {
        Diskless = 0 => "Diskless",
        Attaching = 1 => "Attaching",
        Failed = 2 => "Failed",
        /// Being written by a resync, or never synced: must not be promoted or used as a source.
        Inconsistent = 3 => "Inconsistent",
        /// Consistent but known to miss writes a peer has.
        Outdated = 4 => "Outdated",
        /// Consistent, not yet known whether it is the newest (no peer confirmed it).
        Consistent = 5 => "Consistent",
        UpToDate = 6 => "UpToDate",
        /// A peer's disk we cannot see.
        DUnknown = 7 => "DUnknown",
    }
);

wire_enum!(
    /// The connection to one peer.
    ConnState {
        /// Not trying to connect (`disconnect`, or a refused peer such as a split brain).
        StandAlone = 0 => "StandAlone",
        Connecting = 1 => "Connecting",
        Connected = 2 => "Connected",
    }
);

wire_enum!(
    /// What flows over an established connection.
    ReplState {
        Off = 0 => "Off",
        Established = 1 => "Established",
        SyncSource = 2 => "SyncSource",
        SyncTarget = 3 => "SyncTarget",
        /// Protocol A, `on_congestion = "pull-ahead"`: the send queue to this peer filled up, so
        /// this primary stopped sending it data and records its writes in the bitmap until the
        /// queue has drained (then it resyncs them).
        Ahead = 4 => "Ahead",
        /// The mirror of Ahead: the primary records what this node misses; it is Outdated.
        Behind = 5 => "Behind",
    }
);

impl DiskState {
    /// Data that may serve reads and be promoted without `--force`.
    pub fn is_up_to_date(self) -> bool {
        self == DiskState::UpToDate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_values_round_trip() {
        for state in [DiskState::Diskless, DiskState::Inconsistent, DiskState::UpToDate, DiskState::DUnknown] {
            assert_eq!(DiskState::from_wire(state.to_wire()), Some(state));
        }
        assert_eq!(Role::from_wire(2), Some(Role::Primary));
        assert_eq!(Role::from_wire(9), None);
        assert_eq!(ReplState::SyncTarget.to_string(), "SyncTarget");
    }
}
