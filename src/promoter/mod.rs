//! `blkrepl promoter`: promotes this node when it may and nobody else is primary, runs the
//! services of the resource file's `[promoter]` section on the primary, and stops them and
//! demotes when quorum goes (docs/OPERATIONS.md, "Running with the promoter"). It is a client
//! of the daemons' control sockets like the CLI: it follows `events` and sends `primary` and
//! `secondary`, and the daemon's rules (quorum, one primary) stay the only authority on who may
//! be primary.
//!
//! [`decide`] holds every decision, pure and tested on its own; [`view`] folds event lines into
//! what it decides on; [`services`] and [`role`] carry its steps out; [`driver`] wires them to
//! the event streams, the clock and the signals.

pub mod decide;
pub mod driver;
pub mod role;
pub mod services;
pub mod view;

use crate::config::{NodeConfig, PromoterConfig, ResourceConfig};
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
        })
    }
}
