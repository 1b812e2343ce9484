//! The Prometheus endpoint of one daemon (`metrics_address` in the node's section): `GET
//! /metrics` answers with the resource's status and the engine's counters. Off unless
//! configured.
//!
//! Values the status has are read from a status snapshot at scrape time, so a scrape and
//! `status --json` agree; latencies and metadata writes come from the engine's atomic counters
//! (`engine::counters`), which the write path bumps without a lock.

mod exposition;
mod http;

use crate::engine::Engine;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen for metrics scrapes on {address} (`metrics_address`): {source}; two daemons on one host need different ports")]
    Bind { address: SocketAddr, source: std::io::Error },
    #[error("cannot start the metrics thread: {0}")]
    Spawn(std::io::Error),
}

/// Listens on `address` (so a port in use fails the daemon's start, where `up` reports it).
pub fn bind(address: SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(address).map_err(|source| MetricsError::Bind { address, source })
}

/// Serves scrapes of `engine` on `listener` from a thread of its own, for the daemon's life.
pub fn spawn(listener: TcpListener, engine: Engine) -> Result<(), MetricsError> {
    let render: Arc<http::Render> = Arc::new(move || {
        let text = exposition::render(engine.status(), engine.counters()).map_err(|e| format!("encoding the metrics failed: {e}"))?;
        Ok((text, exposition::CONTENT_TYPE))
    });
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || http::serve(listener, render))
        .map(drop)
        .map_err(MetricsError::Spawn)
}
