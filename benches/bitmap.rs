//! Dirty-bitmap operations on the write path (set on every write while a peer is away) and in
//! resync (scan for the next dirty run), on a bitmap for 1 TiB at 4 KiB per bit (32 MiB).

use blkrepl::meta::DirtyBitmap;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};

const TIB: u64 = 1 << 40;

fn bench_bitmap(c: &mut Criterion) {
    let mut group = c.benchmark_group("bitmap_1TiB");
    let mut bitmap = DirtyBitmap::new(TIB, 4096);
    let mut offset = 0u64;
    group.bench_function("set_range_4KiB_random", |b| {
        b.iter(|| {
            offset = offset.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407) % (TIB / 4096);
            black_box(bitmap.set_range(offset * 4096, 4096));
        })
    });
    group.bench_function("set_range_1MiB", |b| {
        b.iter(|| black_box(bitmap.set_range(black_box(512 << 20), 1 << 20)))
    });
    let mut sparse = DirtyBitmap::new(TIB, 4096);
    for i in 0..1000u64 {
        sparse.set_range(i * (TIB / 1000), 64 << 10);
    }
    group.throughput(Throughput::Bytes(TIB / 4096 / 8));
    group.bench_function("scan_all_runs_sparse", |b| {
        b.iter(|| {
            let mut from = 0;
            let mut runs = 0;
            while let Some((start, len)) = sparse.next_run(from, 64) {
                from = start + len;
                runs += 1;
            }
            black_box(runs)
        })
    });
    group.finish();
}

criterion_group!(benches, bench_bitmap);
criterion_main!(benches);
