//! The crate against a real ublk driver: needs root and `ublk_drv`, so every test is ignored on
//! an ordinary host. `scripts/vm/test.sh` runs them (`--ignored`) inside a qemu guest whose
//! kernel has ublk.
//!
//! The device is a RAM disk whose requests complete on a worker thread, never on the queue
//! thread, as the replication engine's do.

use blkrepl_ublk::{Completion, CopyMode, Device, DeviceConfig, Handler, Holder, Request};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};

const SIZE: u64 = 64 << 20;

/// `UBLK_TEST_LOG=trace` shows every request and commit.
fn logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("UBLK_TEST_LOG").unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}
const OWNER_TAG: u64 = 0x7465_7374;

#[derive(Default)]
struct Counters {
    flushes: AtomicUsize,
    fua_writes: AtomicUsize,
    discards: AtomicUsize,
    zeroes: AtomicUsize,
}

/// Requests go to one worker thread, which applies them to memory and completes them.
struct RamDisk {
    data: Arc<Mutex<Vec<u8>>>,
    counters: Arc<Counters>,
    worker: Mutex<Sender<(Request, Completion)>>,
}

impl RamDisk {
    fn new() -> Arc<RamDisk> {
        let data = Arc::new(Mutex::new(vec![0u8; SIZE as usize]));
        let counters = Arc::new(Counters::default());
        let (tx, rx) = channel::<(Request, Completion)>();
        let (d, c) = (data.clone(), counters.clone());
        std::thread::spawn(move || {
            for (request, done) in rx {
                let mut mem = d.lock().unwrap();
                let range = |offset: u64, len: usize| offset as usize..offset as usize + len;
                match request {
                    Request::Read { offset, len } => done.read(&mem[range(offset, len as usize)]),
                    Request::Write { offset, data, fua } => {
                        mem[range(offset, data.len())].copy_from_slice(&data);
                        c.fua_writes.fetch_add(usize::from(fua), Ordering::SeqCst);
                        done.ok();
                    }
                    Request::Flush => {
                        c.flushes.fetch_add(1, Ordering::SeqCst);
                        done.ok();
                    }
                    Request::Discard { offset, len } => {
                        mem[range(offset, len as usize)].fill(0);
                        c.discards.fetch_add(1, Ordering::SeqCst);
                        done.ok();
                    }
                    Request::WriteZeroes { offset, len, .. } => {
                        mem[range(offset, len as usize)].fill(0);
                        c.zeroes.fetch_add(1, Ordering::SeqCst);
                        done.ok();
                    }
                }
            }
        });
        Arc::new(RamDisk { data, counters, worker: Mutex::new(tx) })
    }
}

impl Handler for RamDisk {
    fn handle(&self, request: Request, done: Completion) {
        self.worker.lock().unwrap().send((request, done)).expect("worker alive");
    }
}

#[repr(C, align(4096))]
#[derive(Clone, Copy)]
struct Block([u8; 4096]);

/// A page-aligned buffer for O_DIRECT, filled with a pattern derived from `seed`.
fn pattern(blocks: usize, seed: u8) -> Vec<Block> {
    (0..blocks)
        .map(|b| {
            let mut block = Block([0; 4096]);
            for (i, byte) in block.0.iter_mut().enumerate() {
                *byte = seed.wrapping_add((b * 7 + i / 512) as u8);
            }
            block
        })
        .collect()
}

fn bytes(blocks: &[Block]) -> &[u8] {
    // SAFETY: Block is plain bytes with no padding.
    unsafe { std::slice::from_raw_parts(blocks.as_ptr().cast(), blocks.len() * 4096) }
}

fn bytes_mut(blocks: &mut [Block]) -> &mut [u8] {
    // SAFETY: as above.
    unsafe { std::slice::from_raw_parts_mut(blocks.as_mut_ptr().cast(), blocks.len() * 4096) }
}

fn open_direct(device: &Device, extra: i32) -> File {
    File::options().read(true).write(true).custom_flags(libc::O_DIRECT | extra).open(device.path()).unwrap()
}

/// BLKDISCARD / BLKZEROOUT on a byte range.
fn range_ioctl(file: &File, request: libc::c_ulong, offset: u64, len: u64) {
    let range = [offset, len];
    // SAFETY: both ioctls read two u64 from the pointer.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), request, range.as_ptr()) };
    assert_eq!(rc, 0, "ioctl {request:#x}: {}", std::io::Error::last_os_error());
}
const BLKDISCARD: libc::c_ulong = 0x1277;
const BLKZEROOUT: libc::c_ulong = 0x127f;

fn roundtrip(copy: CopyMode, logical_block_size: u32) {
    logs();
    let disk = RamDisk::new();
    let mut config = DeviceConfig::new(SIZE, OWNER_TAG);
    config.queues = 2;
    config.depth = 32;
    config.logical_block_size = logical_block_size;
    config.max_discard_bytes = 4 << 20;
    config.max_write_zeroes_bytes = 4 << 20;
    config.copy = copy;
    let device = Device::create(&config, disk.clone()).expect("create the device");
    let offered = blkrepl_ublk::Features::probe().unwrap();
    assert_eq!(device.features().user_copy(), copy == CopyMode::Auto && offered.user_copy(), "{:?}", device.features());
    assert_eq!(device.features().user_recovery(), offered.user_recovery());
    let sysfs = |attr: &str| {
        std::fs::read_to_string(format!("/sys/block/ublkb{}/{attr}", device.id())).unwrap().trim().to_owned()
    };
    assert_eq!(sysfs("queue/logical_block_size"), logical_block_size.to_string());
    assert_eq!(sysfs("size"), (SIZE / 512).to_string());

    let file = open_direct(&device, 0);
    // 3 MiB crosses the 512 KiB request limit: the block layer splits it over several tags.
    let cases = [(0u64, 1usize, 0x11u8), (4 << 20, 768, 0x22), (SIZE - 8192, 2, 0x33), (12345 * 4096, 5, 0x44)];
    for &(offset, blocks, seed) in &cases {
        file.write_all_at(bytes(&pattern(blocks, seed)), offset).unwrap();
    }
    for &(offset, blocks, seed) in &cases {
        let mut back = pattern(blocks, 0);
        file.read_exact_at(bytes_mut(&mut back), offset).unwrap();
        let want = pattern(blocks, seed);
        assert!(bytes(&back) == bytes(&want), "read back differs at {offset}");
        let mem = disk.data.lock().unwrap();
        assert!(&mem[offset as usize..offset as usize + blocks * 4096] == bytes(&want), "handler memory differs at {offset}");
    }

    file.sync_all().unwrap();
    assert!(disk.counters.flushes.load(Ordering::SeqCst) >= 1, "fsync must reach the handler as FLUSH");
    let dsync = open_direct(&device, libc::O_DSYNC);
    dsync.write_all_at(bytes(&pattern(1, 0x55)), 8 << 20).unwrap();
    assert!(disk.counters.fua_writes.load(Ordering::SeqCst) >= 1, "an O_DSYNC write must reach the handler as FUA");

    range_ioctl(&file, BLKDISCARD, 4 << 20, 1 << 20);
    range_ioctl(&file, BLKZEROOUT, 5 << 20, 64 << 10);
    assert!(disk.counters.discards.load(Ordering::SeqCst) >= 1);
    assert!(disk.counters.zeroes.load(Ordering::SeqCst) >= 1);
    let mut back = pattern(768, 0x22);
    file.read_exact_at(bytes_mut(&mut back), 4 << 20).unwrap();
    let (cleared, kept) = bytes(&back).split_at((1 << 20) + (64 << 10));
    assert!(cleared.iter().all(|b| *b == 0), "discarded and zeroed ranges read back as zeroes");
    assert!(kept == &bytes(&pattern(768, 0x22))[cleared.len()..], "data after the zeroed range is untouched");

    drop((file, dsync));
    let path = device.path();
    device.remove().expect("remove");
    assert!(!path.exists(), "{} must disappear", path.display());
}

#[test]
#[ignore = "needs root and ublk_drv: run by scripts/vm/test.sh in a guest"]
fn ram_disk_with_user_copy_or_the_kernel_default() {
    roundtrip(CopyMode::Auto, 512);
}

#[test]
#[ignore = "needs root and ublk_drv: run by scripts/vm/test.sh in a guest"]
fn ram_disk_with_buffered_copies_and_4k_blocks() {
    roundtrip(CopyMode::Buffered, 4096);
}

#[test]
#[ignore = "needs root and ublk_drv: run by scripts/vm/test.sh in a guest"]
fn holders_name_the_process_that_has_the_device_open() {
    logs();
    let disk = RamDisk::new();
    let device = Device::create(&DeviceConfig::new(SIZE, OWNER_TAG), disk).expect("create the device");
    assert_eq!(device.holders().unwrap(), []);
    let mut child = std::process::Command::new("sh")
        .args(["-c", &format!("exec 3<{}; exec sleep 60", device.path().display())])
        .spawn()
        .unwrap();
    // The shell opens the device, then becomes `sleep`.
    let comm = format!("/proc/{}/comm", child.id());
    for _ in 0..1000 {
        if std::fs::read_to_string(&comm).unwrap() == "sleep\n" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let holders = device.holders().unwrap();
    assert_eq!(holders, [Holder::Process { pid: child.id(), command: "sleep".into() }]);
    assert!(holders[0].to_string().contains(&format!("process {} (sleep)", child.id())));
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(device.holders().unwrap(), []);

    // Exclusively held, as a filesystem would hold it: found through the O_EXCL probe.
    let exclusive = File::options().read(true).custom_flags(libc::O_EXCL).open(device.path()).unwrap();
    // Our own fd is not listed as a process; only the exclusive claim shows.
    assert_eq!(device.holders().unwrap(), [Holder::Exclusive]);
    drop(exclusive);
    device.remove().unwrap();
}

#[test]
#[ignore = "needs root and ublk_drv: run by scripts/vm/test.sh in a guest"]
fn a_fixed_id_is_used_and_a_taken_one_is_refused() {
    logs();
    let mut config = DeviceConfig::new(SIZE, OWNER_TAG);
    config.id = Some(42);
    let device = Device::create(&config, RamDisk::new()).expect("create /dev/ublkb42");
    assert_eq!(device.id(), 42);
    assert!(device.path().ends_with("ublkb42"));
    let err = Device::create(&config, RamDisk::new()).expect_err("the id is taken").to_string();
    assert!(err.contains("ADD_DEV on /dev/ublkb42"), "{err}");
    let status = Device::status(42).unwrap().expect("device 42 exists");
    assert_eq!(status.owner_tag, OWNER_TAG);
    assert_eq!(status.state, blkrepl_ublk::DeviceState::Live);
    assert!(matches!(
        Device::recover(42, &DeviceConfig { owner_tag: 1, ..config.clone() }, RamDisk::new()),
        Err(blkrepl_ublk::Error::NotOurs { id: 42, .. })
    ));
    device.remove().unwrap();
    assert_eq!(Device::status(42).unwrap(), None);
}
