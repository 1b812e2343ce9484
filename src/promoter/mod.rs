//! `blkrepl promoter`: promotes this node when it may and nobody else is primary, runs the
//! services of the resource file's `[promoter]` section on the primary, and stops them and
//! demotes when quorum goes (docs/OPERATIONS.md, "Running with the promoter"). It is a client
//! of the daemons' control sockets like the CLI: it follows `events` and sends `primary` and
//! `secondary`, and the daemon's rules (quorum, one primary) stay the only authority on who may
//! be primary.
//!
//! [`decide`] holds every decision, pure and tested on its own; [`view`] folds event lines into
//! what it decides on, and [`liveness`] the answers to the driver's status probes; [`services`]
//! and [`role`] carry its steps out; [`driver`] wires them to the event streams, the probes,
//! the clock and the signals.

pub mod decide;
pub mod driver;
pub mod liveness;
pub mod role;
pub mod services;
pub mod view;

use crate::config::{NodeConfig, PromoterConfig, ResourceConfig};
use crate::core::quorum::LinkTiming;
use decide::Placement;
use std::path::{Path, PathBuf};

/// One resource the promoter looks after on this node.
pub struct Target {
    pub resource: String,
    pub node: String,
    /// The daemon's control socket.
    pub socket: PathBuf,
    pub promoter: PromoterConfig,
    pub placement: Placement,
    /// The resource's ping timing: how often the daemon is probed, and for how long a silence
    /// is borne (see [`liveness`]).
    pub timing: LinkTiming,
}

/// Why a resource gets no promoter on this node.
#[derive(Debug, thiserror::Error)]
pub enum Unfit {
    #[error("{path} has no [promoter] section: nothing tells the promoter what to run")]
    NoSection { path: PathBuf },
    #[error("node {node} is a diskless witness of {resource}: it is never promoted, run no promoter there")]
    Witness { resource: String, node: String },
}

impl Target {
    pub fn new(config: &ResourceConfig, me: &NodeConfig, run_dir: &Path) -> Result<Target, Unfit> {
        let promoter = config.promoter.clone().ok_or_else(|| Unfit::NoSection { path: config.path.clone() })?;
        if me.disk.is_none() {
            return Err(Unfit::Witness { resource: config.name.clone(), node: me.name.clone() });
        }
        // Data nodes by id: equally good candidates take turns in that order.
        let data_nodes = config.data_nodes().count() as u32;
        let rank = config.data_nodes().filter(|n| n.id < me.id).count() as u32;
        Ok(Target {
            resource: config.name.clone(),
            node: me.name.clone(),
            socket: crate::control::socket_path(run_dir, &config.name, &me.name),
            promoter,
            placement: Placement { rank, ranks: data_nodes },
            timing: config.timing,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"
name = "r0"
[[node]]
name = "tie"
id = 0
address = "127.0.0.1:7789"
disk = "none"
[[node]]
name = "beta"
id = 5
address = "127.0.0.1:7790"
disk = "/b"
[[node]]
name = "alpha"
id = 2
address = "127.0.0.1:7791"
disk = "/a"
[promoter]
"#;

    #[test]
    fn data_nodes_take_turns_by_id_and_witnesses_get_no_promoter() {
        let config = ResourceConfig::parse(Path::new("/etc/blkrepl/r0.toml"), TEXT).unwrap();
        let target = |name: &str| Target::new(&config, config.node(name).unwrap(), Path::new("/run/blkrepl"));
        let alpha = target("alpha").unwrap();
        assert_eq!((alpha.placement, alpha.socket), (Placement { rank: 0, ranks: 2 }, PathBuf::from("/run/blkrepl/r0.alpha.sock")));
        assert_eq!(target("beta").unwrap().placement, Placement { rank: 1, ranks: 2 });
        assert!(matches!(target("tie"), Err(Unfit::Witness { .. })));
        let without = ResourceConfig::parse(Path::new("/etc/blkrepl/r0.toml"), TEXT.trim_end().trim_end_matches("[promoter]")).unwrap();
        assert!(matches!(Target::new(&without, without.node("alpha").unwrap(), Path::new("/run")), Err(Unfit::NoSection { .. })));
    }
}
