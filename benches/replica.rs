//! The replica alone, with no I/O: how many replicated 4 KiB writes per second its rules take
//! when every action is carried out at once (the local write done, the peer's WriteAck and
//! BarrierAck back). What the event loop of issue 11 can reach at most, before any system call.

use blkrepl::core::inflight::AckLevel;
use blkrepl::frontend::BlockRequest;
use blkrepl::replica::testing::primary_replicating;
use blkrepl::replica::{Action, IoTag};
use blkrepl::wire::Message;
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// Writes go round a 1 MiB window: one activity-log extent, hot after the first pass.
const WINDOW_BLOCKS: u64 = 256;

fn replicated_write(c: &mut Criterion) {
    let (mut replica, now) = primary_replicating();
    let block = Bytes::from(vec![0x5a; 4096]);
    let mut request = 0u64;
    let mut group = c.benchmark_group("replica");
    group.throughput(Throughput::Elements(1));
    group.bench_function("protocol_c_write_4KiB", |b| {
        b.iter(|| {
            request += 1;
            let offset = (request % WINDOW_BLOCKS) * 4096;
            replica.submit(now, request, BlockRequest::Write { offset, data: block.clone(), fua: false }, |_| 0);
            let mut completed = 0;
            while completed == 0 {
                for action in replica.take_actions() {
                    match action {
                        Action::Io { tag: IoTag::Write(write), .. } => {
                            replica.io_done(now, IoTag::Write(write), Ok(None));
                            replica.peer_reached(now, write, 1, AckLevel::Written);
                        }
                        Action::Send { msg: Message::Barrier { epoch }, .. } => replica.barrier_acked(now, 1, epoch),
                        Action::Complete { result, .. } => {
                            assert!(result.is_ok(), "{result:?}");
                            completed += 1;
                        }
                        _ => {}
                    }
                }
            }
        })
    });
    group.finish();
}

criterion_group!(benches, replicated_write);
criterion_main!(benches);
