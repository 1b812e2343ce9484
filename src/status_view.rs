//! `blkrepl status` for people, in the layout of `drbdadm status`: the default view, and what
//! `--verbose` and `--statistics` add. (A module of the binary: the library never prints.)

use blkrepl::engine::{PeerStatus, ResourceStatus, ResyncStatus};

/// What the human view adds to the default.
#[derive(Debug, Clone, Copy, Default)]
pub struct Detail {
    /// Every field: node ids, generation, quorum detail, export details, each peer's last error.
    pub verbose: bool,
    /// Byte counters, sizes and rates.
    pub statistics: bool,
}

fn kib(bytes: u64) -> String {
    format!("{}KiB", bytes / 1024)
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

pub fn format_status(s: &ResourceStatus, detail: Detail) -> String {
    let mut out = format!(
        "{} node:{} role:{} disk:{} quorum:{} (votes {} of {}, need {}, {}) may-promote:{} promotion-score:{} protocol:{}",
        s.name,
        s.node,
        s.role,
        s.disk,
        yes_no(s.quorum),
        s.quorum_votes,
        s.quorum_voters,
        s.quorum_needed,
        s.quorum_policy,
        yes_no(s.may_promote),
        s.promotion_score.map_or_else(|| "none".to_owned(), |v| v.to_string()),
        s.protocol
    );
    if s.suspended_writes > 0 {
        out += &format!(" suspended-writes:{}", s.suspended_writes);
    }
    if let Some(why) = &s.io_suspended {
        out += &format!(" io-suspended:{why}");
    }
    if let Some(device) = &s.device {
        out += &format!(" device:{device}");
    }
    out.push('\n');
    if detail.verbose {
        out += &format!("  node-id:{} generation:{} on-no-quorum:{}", s.node_id, s.generation_uuid, serde_label(&s.on_no_quorum));
        if let Some(features) = &s.ublk_features {
            out += &format!(" ublk-features:{}", features.join(","));
        }
        out.push('\n');
    }
    if detail.statistics {
        out += &format!(
            "  size:{} nbd-clients:{} suspended-writes:{} waiting-for-room:{}\n",
            kib(s.size_bytes),
            s.nbd_clients,
            s.suspended_writes,
            s.writes_waiting_for_room
        );
    }
    if let Some(io) = s.device_io.as_deref().filter(|io| detail.verbose || *io != "serving") {
        out += &format!("  device-io: {io}\n");
    }
    if let Some(why) = &s.stepped_down {
        out += &format!("  stepped-down: {why}\n");
    }
    if let Some(why) = &s.local_write_failed {
        out += &format!("  local-write-failed: {why}; every read and write fails: demote this node (`blkrepl secondary`)\n");
    }
    for p in &s.peers {
        out += &format_peer(p, detail);
    }
    out
}

/// An enum's name as `status --json` spells it.
fn serde_label(value: &impl serde::Serialize) -> String {
    serde_json::to_value(value).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

fn format_peer(p: &PeerStatus, detail: Detail) -> String {
    let mut out = format!("  {} node-id:{} connection:{}", p.name, p.node_id, p.connection);
    if p.witness {
        out += " witness";
    }
    if p.departed {
        out += " departed";
    }
    if detail.verbose || p.connection == "Connected" {
        out += &format!(" role:{}", p.peer_role);
    }
    out.push('\n');
    out += &format!("    replication:{} peer-disk:{}", p.replication, p.peer_disk);
    if let Some(r) = &p.resync {
        out += &format!(" done:{:.1}% rate:{}KiB/s", r.done_percent, r.rate_kib_per_s);
        if let Some(eta) = r.eta_s {
            out += &format!(" eta:{eta}s");
        }
    }
    out.push('\n');
    if let Some(r) = &p.resync {
        out += &format!("        {}\n", progress_line(r));
    }
    out += &format!("    out-of-sync:{} sent:{} received:{}", kib(p.out_of_sync_bytes), kib(p.sent_bytes), kib(p.received_bytes));
    if detail.statistics {
        out += &format!(" unwritten:{}", kib(p.unwritten_bytes));
        if let Some(r) = &p.resync {
            out += &format!(" resync-done:{} resync-total:{} resync-full:{}", kib(r.done_bytes), kib(r.total_bytes), yes_no(r.full));
        }
    }
    out.push('\n');
    if let Some(v) = &p.verify {
        out += &format!("    verify:{} done:{:.1}% found-out-of-sync:{}", v.state, v.done_percent, kib(v.out_of_sync_found_bytes));
        if detail.statistics {
            out += &format!(" checked:{} total:{} rate:{}KiB/s", kib(v.checked_bytes), kib(v.total_bytes), v.rate_kib_per_s);
        }
        for range in &v.first_out_of_sync {
            out += &format!(" {}+{}", range.offset, range.len);
        }
        out.push('\n');
    }
    if detail.verbose || p.connection != "Connected" {
        if let Some(e) = &p.last_error {
            out += &format!("    last-error: {e}\n");
        }
    }
    out
}

/// Cells of the progress bar.
const BAR_WIDTH: usize = 20;

/// `[=========>..........] sync'ed: 47.5% (3072/5120)K finish: 0:00:12 speed: 256 K/sec`, as
/// DRBD draws a resync: the numbers in brackets are KiB left and KiB this pass moves, the speed
/// the average since the pass started.
fn progress_line(r: &ResyncStatus) -> String {
    let filled = ((r.done_percent / 100.0 * BAR_WIDTH as f64) as usize).min(BAR_WIDTH - 1);
    let bar = format!("{}>{}", "=".repeat(filled), ".".repeat(BAR_WIDTH - 1 - filled));
    let finish = r.eta_s.map_or_else(|| "-".to_owned(), |eta| format!("{}:{:02}:{:02}", eta / 3600, eta / 60 % 60, eta % 60));
    format!(
        "[{bar}] sync'ed: {:.1}% ({}/{})K finish: {finish} speed: {} K/sec",
        r.done_percent,
        r.total_bytes.saturating_sub(r.done_bytes) / 1024,
        r.total_bytes / 1024,
        r.rate_kib_per_s
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resync(done_percent: f64, done_kib: u64, total_kib: u64, eta_s: Option<u64>) -> ResyncStatus {
        ResyncStatus { full: false, total_bytes: total_kib << 10, done_bytes: done_kib << 10, done_percent, rate_kib_per_s: 256, eta_s }
    }

    #[test]
    fn the_bar_grows_with_the_resync() {
        assert_eq!(
            progress_line(&resync(0.0, 0, 5120, None)),
            "[>...................] sync'ed: 0.0% (5120/5120)K finish: - speed: 256 K/sec"
        );
        assert_eq!(
            progress_line(&resync(47.5, 2432, 5120, Some(3725))),
            "[=========>..........] sync'ed: 47.5% (2688/5120)K finish: 1:02:05 speed: 256 K/sec"
        );
        assert_eq!(
            progress_line(&resync(100.0, 5120, 5120, Some(0))),
            "[===================>] sync'ed: 100.0% (0/5120)K finish: 0:00:00 speed: 256 K/sec"
        );
    }
}
