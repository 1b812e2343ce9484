//! What the drivers count as they go, for the metrics endpoint: request latencies, writes in
//! flight, metadata writes. Everything else the endpoint shows comes from a status snapshot.
//!
//! Only relaxed atomics: these are bumped on the write path, which must not take another lock
//! for them (nor contend on one with a scrape). A scrape may see a request in the count of one
//! figure and not yet in another; every figure on its own only ever grows (or, for the gauge,
//! moves with the requests).

use crate::frontend::BlockRequest;
use crate::replica::MetaWrite;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Upper bounds of the latency buckets, in seconds: 50 µs (a write to a page cache) to 10 s (a
/// write held while a peer is dropped for silence).
pub const LATENCY_BOUNDS_S: [f64; 17] =
    [0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// A latency histogram with fixed buckets (plus one past the last bound).
pub struct LatencyHistogram {
    /// Not cumulative: each observation lands in one bucket.
    buckets: [AtomicU64; LATENCY_BOUNDS_S.len() + 1],
    sum_ns: AtomicU64,
}

/// A histogram as read at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    pub sum_s: f64,
    /// Every observation, those past the last bound included.
    pub count: u64,
    /// (upper bound in seconds, observations above the previous bound and at or below this
    /// one): not cumulative, as prometheus-client's encoder takes them.
    pub buckets: Vec<(f64, u64)>,
}

impl LatencyHistogram {
    fn new() -> LatencyHistogram {
        LatencyHistogram { buckets: std::array::from_fn(|_| AtomicU64::new(0)), sum_ns: AtomicU64::new(0) }
    }

    pub fn observe(&self, latency: Duration) {
        let seconds = latency.as_secs_f64();
        let bucket = LATENCY_BOUNDS_S.iter().position(|bound| seconds <= *bound).unwrap_or(LATENCY_BOUNDS_S.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// The count is the buckets' total, so the `+Inf` bucket and `_count` always agree.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        HistogramSnapshot {
            sum_s: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
            count: counts.iter().sum(),
            buckets: LATENCY_BOUNDS_S.iter().copied().zip(counts).collect(),
        }
    }
}

/// Which latency a request counts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timed {
    /// Anything that changes the device: writes, write-zeroes, discards.
    Write,
    Flush,
    Read,
}

impl Timed {
    pub fn of(request: &BlockRequest) -> Timed {
        match request {
            BlockRequest::Read { .. } => Timed::Read,
            BlockRequest::Flush => Timed::Flush,
            BlockRequest::Write { .. } | BlockRequest::WriteZeroes { .. } | BlockRequest::Discard { .. } => Timed::Write,
        }
    }
}

/// The drivers' counters of one engine.
pub struct Counters {
    pub write_latency: LatencyHistogram,
    pub flush_latency: LatencyHistogram,
    writes_in_flight: AtomicU64,
    al_transactions: AtomicU64,
    bitmap_page_writes: AtomicU64,
}

/// The counters as read at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct CountersSnapshot {
    pub write_latency: HistogramSnapshot,
    pub flush_latency: HistogramSnapshot,
    pub writes_in_flight: u64,
    pub al_transactions: u64,
    pub bitmap_page_writes: u64,
}

impl Counters {
    pub fn new() -> Counters {
        Counters {
            write_latency: LatencyHistogram::new(),
            flush_latency: LatencyHistogram::new(),
            writes_in_flight: AtomicU64::new(0),
            al_transactions: AtomicU64::new(0),
            bitmap_page_writes: AtomicU64::new(0),
        }
    }

    /// A frontend request arrived.
    pub fn arrived(&self, timed: Timed) {
        if timed == Timed::Write {
            self.writes_in_flight.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A request that arrived at `arrived` is answered now (successfully or not).
    pub fn completed(&self, timed: Timed, arrived: Instant) {
        match timed {
            Timed::Write => {
                self.write_latency.observe(arrived.elapsed());
                self.writes_in_flight.fetch_sub(1, Ordering::Relaxed);
            }
            Timed::Flush => self.flush_latency.observe(arrived.elapsed()),
            Timed::Read => {}
        }
    }

    /// The driver made one of the replica's metadata writes durable; the store has now written
    /// `bitmap_pages_total` bitmap pages in all (its own count: an activity-log transaction
    /// writes the pages of the extents it evicts, a page named twice is written once).
    pub fn metadata_written(&self, what: &MetaWrite, bitmap_pages_total: u64) {
        if matches!(what, MetaWrite::ActivityLog(_)) {
            self.al_transaction_written();
        }
        self.bitmap_pages_written(bitmap_pages_total);
    }

    pub fn al_transaction_written(&self) {
        self.al_transactions.fetch_add(1, Ordering::Relaxed);
    }

    /// `total`: the metadata store's count since it was opened.
    pub fn bitmap_pages_written(&self, total: u64) {
        self.bitmap_page_writes.store(total, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> CountersSnapshot {
        CountersSnapshot {
            write_latency: self.write_latency.snapshot(),
            flush_latency: self.flush_latency.snapshot(),
            writes_in_flight: self.writes_in_flight.load(Ordering::Relaxed),
            al_transactions: self.al_transactions.load(Ordering::Relaxed),
            bitmap_page_writes: self.bitmap_page_writes.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_observation_lands_in_one_bucket_and_the_count() {
        let h = LatencyHistogram::new();
        h.observe(Duration::from_micros(40));
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.buckets[0], (0.000_05, 2), "a value on a bound is in that bucket");
        assert_eq!(s.buckets.iter().find(|(b, _)| *b == 0.005).unwrap().1, 1);
        assert_eq!(s.buckets.iter().map(|(_, n)| n).sum::<u64>(), 3, "60 s is past the last bound: only in the count");
        assert!((s.sum_s - 60.003_09).abs() < 1e-9, "{}", s.sum_s);
    }

    #[test]
    fn writes_in_flight_follow_arrivals_and_completions() {
        let c = Counters::new();
        let now = Instant::now();
        c.arrived(Timed::Write);
        c.arrived(Timed::Write);
        c.arrived(Timed::Read);
        c.completed(Timed::Write, now);
        c.completed(Timed::Read, now);
        c.arrived(Timed::Flush);
        c.completed(Timed::Flush, now);
        let s = c.snapshot();
        assert_eq!((s.writes_in_flight, s.write_latency.count, s.flush_latency.count), (1, 1, 1));
    }
}
