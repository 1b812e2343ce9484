//! Wire codec micro-benchmarks: what framing costs per byte of replicated data, to compare
//! with the ~3 GB/s a single loopback TCP stream carries on these machines.

use std::hint::black_box;

use blkrepl::wire::auth::{Role, Transcript};
use blkrepl::wire::{decode, encode, read_message, read_message_with, write_message, write_message_with, Message};
use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const SIZES: [(&str, usize); 2] = [("4KiB", 4096), ("1MiB", 1 << 20)];
const STREAM_FRAMES: usize = 1000;

fn data(len: usize) -> Message {
    Message::Data {
        id: 1,
        epoch: 1,
        offset: 0,
        fua: false,
        payload: Bytes::from(vec![0x5a; len]),
    }
}

fn crc(c: &mut Criterion) {
    let mut group = c.benchmark_group("crc32c");
    for (name, len) in SIZES {
        let buf = vec![0x5a; len];
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_function(name, |b| b.iter(|| crc32c::crc32c(black_box(&buf))));
    }
    group.finish();
}

fn encode_decode_data(c: &mut Criterion) {
    let mut group = c.benchmark_group("data_encode_decode");
    for (name, len) in SIZES {
        let msg = data(len);
        let mut out = BytesMut::with_capacity(len + 64);
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                out.clear();
                encode(black_box(&msg), &mut out);
                decode(&out).expect("own frame decodes")
            })
        });
    }
    group.finish();
}

fn read_stream(c: &mut Criterion) {
    let mut stream = Vec::new();
    let msg = data(4096);
    for _ in 0..STREAM_FRAMES {
        write_message(&mut stream, &msg).expect("writing to a Vec succeeds");
    }
    let mut group = c.benchmark_group("read_message");
    group.throughput(Throughput::Bytes(stream.len() as u64));
    group.bench_function("1000x4KiB_data", |b| {
        b.iter(|| {
            let mut reader = stream.as_slice();
            for _ in 0..STREAM_FRAMES {
                black_box(read_message(&mut reader).expect("own frame reads"));
            }
        })
    });
    group.finish();
}

/// A frame written and read back, plain, on an authenticated plain link (a MAC made by the
/// sender and checked by the receiver) and on a TLS link (sealed and opened): what
/// authenticating, and encrypting, every frame costs.
fn frame_protection(c: &mut Criterion) {
    let transcript = Transcript { resource: "r0", dialer_nonce: [1; 32], acceptor_nonce: [2; 32], dialer: 1, acceptor: 0, channel: None };
    let secret = b"the benchmark's shared secret";
    let mut group = c.benchmark_group("frame_write_read");
    for (name, len) in SIZES {
        let msg = data(len);
        let mut out = Vec::with_capacity(len + 64);
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_function(format!("{name}_plain"), |b| {
            b.iter(|| {
                out.clear();
                write_message(&mut out, black_box(&msg)).expect("writing to a Vec succeeds");
                read_message(&mut out.as_slice()).expect("own frame reads")
            })
        });
        for (kind, channel) in [("mac", None), ("sealed", Some([3; 32]))] {
            let transcript = Transcript { channel, ..transcript };
            let (mut tx, _) = transcript.protection(secret, Role::Dialer);
            let (_, mut rx) = transcript.protection(secret, Role::Acceptor);
            group.bench_function(format!("{name}_{kind}"), |b| {
                b.iter(|| {
                    out.clear();
                    write_message_with(&mut out, black_box(&msg), Some(&mut tx)).expect("writing to a Vec succeeds");
                    read_message_with(&mut out.as_slice(), Some(&mut rx)).expect("own frame reads")
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, crc, encode_decode_data, read_stream, frame_protection);
criterion_main!(benches);
