//! Pull-ahead's share of the send queue (`on_congestion = "pull-ahead"`, whose rules are the
//! replica's, see `Replica::send_queues`): resync and verify traffic keep to part of it.

use super::link::BULK_QUEUE_LIMIT_BYTES;
use crate::config::{OnCongestion, ResourceConfig};

/// How full a resync (or verify) lets the send queue get before it waits. Under pull-ahead it
/// stays at half the fill mark, so that resync traffic alone never makes the primary go Ahead
/// and application writes keep the other half.
pub fn resync_room_bytes(config: &ResourceConfig) -> usize {
    match config.on_congestion {
        OnCongestion::Block => BULK_QUEUE_LIMIT_BYTES,
        OnCongestion::PullAhead { fill_bytes } => (fill_bytes / 2) as usize,
    }
}
