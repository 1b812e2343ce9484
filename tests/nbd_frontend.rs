//! The NBD frontend driven by real clients: `qemu-io` and `qemu-img` (package qemu-utils).
//!
//! Every check looks at both what the client reports (exit status, pattern verification) and
//! what reached the device (its contents and the requests it saw), so a server that merely
//! answers "success" cannot pass.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use blkrepl::config::NbdAddress;
use blkrepl::frontend::nbd::{NbdHandle, NbdServer};
use blkrepl::frontend::{BlockDevice, BlockError, BlockRequest, Completion, MemDevice};

const MIB: usize = 1 << 20;
const EXPORT: &str = "blkrepl";

/// What a device saw, without payloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Read { offset: u64, len: u32 },
    Write { offset: u64, len: u32, fua: bool },
    Flush,
    Discard { offset: u64, len: u32 },
    WriteZeroes { offset: u64, len: u32, fua: bool },
}

impl Op {
    fn of(request: &BlockRequest) -> Op {
        match *request {
            BlockRequest::Read { offset, len } => Op::Read { offset, len },
            BlockRequest::Write { offset, ref data, fua } => {
                Op::Write { offset, len: data.len() as u32, fua }
            }
            BlockRequest::Flush => Op::Flush,
            BlockRequest::Discard { offset, len } => Op::Discard { offset, len },
            BlockRequest::WriteZeroes { offset, len, fua } => Op::WriteZeroes { offset, len, fua },
        }
    }
}

/// A `MemDevice` that records every request and, when `delayed`, completes each one on its
/// own thread after a delay that shrinks with the submission sequence, so requests that are in
/// flight together complete in a different order than they were sent.
struct TestDevice {
    mem: MemDevice,
    ops: Mutex<Vec<Op>>,
    delayed: bool,
    submitted: AtomicUsize,
    in_flight: AtomicUsize,
    peak_in_flight: AtomicUsize,
    /// Submission sequence numbers in completion order.
    completions: Mutex<Vec<usize>>,
}

impl TestDevice {
    fn new(size: usize, delayed: bool) -> Arc<TestDevice> {
        Arc::new(TestDevice {
            mem: MemDevice::new(size),
            ops: Mutex::default(),
            delayed,
            submitted: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            peak_in_flight: AtomicUsize::new(0),
            completions: Mutex::default(),
        })
    }

    fn ops(&self) -> Vec<Op> {
        self.ops.lock().unwrap().clone()
    }

    fn complete(self: &Arc<Self>, seq: usize, request: BlockRequest, done: Completion) {
        let device = Arc::clone(self);
        self.mem.submit(
            request,
            Box::new(move |result| {
                device.in_flight.fetch_sub(1, Ordering::SeqCst);
                device.completions.lock().unwrap().push(seq);
                done(result);
            }),
        );
    }
}

/// `BlockDevice` for an `Arc` so the delayed completions can keep the device alive.
struct Shared(Arc<TestDevice>);

impl BlockDevice for Shared {
    fn size_bytes(&self) -> u64 {
        self.0.mem.size_bytes()
    }

    fn submit(&self, request: BlockRequest, done: Completion) {
        let device = &self.0;
        device.ops.lock().unwrap().push(Op::of(&request));
        let seq = device.submitted.fetch_add(1, Ordering::SeqCst);
        let now = device.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        device.peak_in_flight.fetch_max(now, Ordering::SeqCst);
        if !device.delayed {
            device.complete(seq, request, done);
            return;
        }
        let device = Arc::clone(device);
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(15 * (3 - (seq % 4)) as u64));
            device.complete(seq, request, done);
        });
    }
}

/// Fails every request the same way.
struct FailingDevice(BlockError);

impl BlockDevice for FailingDevice {
    fn size_bytes(&self) -> u64 {
        MIB as u64
    }

    fn submit(&self, _request: BlockRequest, done: Completion) {
        done(Err(self.0.clone()));
    }
}

fn serve(device: Arc<dyn BlockDevice>) -> NbdHandle {
    // Server logs show up in failing tests' output; RUST_LOG=debug for per-connection detail.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    NbdServer::bind(&NbdAddress::Tcp("127.0.0.1:0".parse().unwrap())).expect("bind").serve(EXPORT, device)
}

fn serve_test_device(size: usize, delayed: bool) -> (NbdHandle, Arc<TestDevice>) {
    let device = TestDevice::new(size, delayed);
    (serve(Arc::new(Shared(device.clone()))), device)
}

fn url(server: &NbdHandle) -> String {
    server.address().url(EXPORT)
}

/// Runs a qemu tool, failing (not skipping) when qemu-utils is missing.
fn run(tool: &str, args: &[String]) -> (bool, String) {
    let output = Command::new(tool).args(args).output().unwrap_or_else(|error| {
        panic!("cannot run {tool} ({error}); install it with `apt-get install qemu-utils`")
    });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// Runs `qemu-io` with one `-c` per command; returns (exit success, stdout + stderr).
///
/// Uses writeback caching: qemu-io's default (writethrough) sets FUA on every write, which
/// would hide whether `write -f` really asks for FUA.
fn qemu_io(server: &NbdHandle, commands: &[&str]) -> (bool, String) {
    let mut args: Vec<String> =
        ["-f", "raw", "-t", "writeback", &url(server)].map(str::to_owned).to_vec();
    for command in commands {
        args.push("-c".to_owned());
        args.push((*command).to_owned());
    }
    run("qemu-io", &args)
}

/// Like [`qemu_io`], asserting every command succeeded and every pattern verified.
fn qemu_io_ok(server: &NbdHandle, commands: &[&str]) -> String {
    let (success, output) = qemu_io(server, commands);
    assert!(success, "qemu-io {commands:?} failed:\n{output}");
    assert!(!output.contains("Pattern verification failed"), "{commands:?}:\n{output}");
    assert!(!output.contains("failed"), "{commands:?}:\n{output}");
    output
}

fn assert_filled(snapshot: &[u8], offset: usize, len: usize, byte: u8) {
    let range = &snapshot[offset..offset + len];
    let wrong = range.iter().position(|&b| b != byte);
    assert_eq!(wrong, None, "device bytes at {offset}+{len} should all be {byte:#04x}");
}

#[test]
fn write_then_read_one_mebibyte() {
    let (server, device) = serve_test_device(4 * MIB, false);
    let output = qemu_io_ok(&server, &["write -P 0x5a 0 1M", "read -P 0x5a 0 1M"]);
    assert!(output.contains("wrote 1048576/1048576 bytes at offset 0"), "{output}");
    assert!(output.contains("read 1048576/1048576 bytes at offset 0"), "{output}");
    let snapshot = device.mem.snapshot();
    assert_filled(&snapshot, 0, MIB, 0x5a);
    assert_filled(&snapshot, MIB, 3 * MIB, 0);
}

#[test]
fn qemu_writes_and_reads_over_a_unix_socket_only_its_owner_may_open() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r0.nbd");
    let device = TestDevice::new(2 * MIB, false);
    let address = NbdAddress::Unix { path: path.clone(), mode: 0o600 };
    let server = NbdServer::bind(&address).expect("bind").serve(EXPORT, Arc::new(Shared(device.clone())));
    let meta = std::fs::metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "owner only, as configured");
    assert!(url(&server).starts_with("nbd+unix:///"), "{}", url(&server));
    qemu_io_ok(&server, &["write -P 0x3e 4096 64k", "read -P 0x3e 4096 64k"]);
    assert_filled(&device.mem.snapshot(), 4096, 64 << 10, 0x3e);
    server.shutdown();
    assert!(!path.exists(), "the socket file goes with the server");
}

#[test]
fn a_wrong_pattern_is_detected() {
    // Guards the other tests: a read that does not match must make qemu-io fail.
    let (server, _) = serve_test_device(MIB, false);
    qemu_io_ok(&server, &["write -P 0x11 0 64k"]);
    let (success, output) = qemu_io(&server, &["read -P 0x22 0 64k"]);
    assert!(!success, "{output}");
    assert!(output.contains("Pattern verification failed"), "{output}");
}

#[test]
fn writes_at_several_offsets_read_back_across_connections() {
    let (server, device) = serve_test_device(8 * MIB, false);
    let writes = [
        (0usize, 4096usize, 0x01u8),
        (4096, 512, 0x02),
        (65536, 131072, 0x03),
        (5 * MIB, 3 * MIB, 0x04),
    ];
    let commands: Vec<String> =
        writes.iter().map(|(off, len, byte)| format!("write -P {byte:#04x} {off} {len}")).collect();
    let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
    qemu_io_ok(&server, &commands);

    // A fresh connection sees the same data.
    let reads: Vec<String> =
        writes.iter().map(|(off, len, byte)| format!("read -P {byte:#04x} {off} {len}")).collect();
    let mut reads: Vec<&str> = reads.iter().map(String::as_str).collect();
    reads.push("read -P 0 8192 57344"); // the gap between the second and third write
    qemu_io_ok(&server, &reads);

    let snapshot = device.mem.snapshot();
    let mut expected = vec![0u8; 8 * MIB];
    for (off, len, byte) in writes {
        expected[off..off + len].fill(byte);
    }
    assert!(snapshot == expected, "device contents differ from what was written");
}

#[test]
fn large_requests_are_split_within_the_maximum_payload() {
    let (server, device) = serve_test_device(64 * MIB, false);
    qemu_io_ok(&server, &["write -P 0x33 0 40M", "read -P 0x33 0 40M"]);
    assert_filled(&device.mem.snapshot(), 0, 40 * MIB, 0x33);
    let ops = device.ops();
    let writes: Vec<u32> = ops
        .iter()
        .filter_map(|op| if let Op::Write { len, .. } = op { Some(*len) } else { None })
        .collect();
    assert!(writes.len() >= 2, "40 MiB must need several writes: {writes:?}");
    assert_eq!(writes.iter().map(|&l| l as usize).sum::<usize>(), 40 * MIB);
    assert!(writes.iter().all(|&len| len as usize <= 32 * MIB), "{writes:?}");
}

#[test]
fn flush_and_fua_reach_the_device() {
    let (server, device) = serve_test_device(MIB, false);
    qemu_io_ok(&server, &["write -P 0x44 0 4k", "flush", "write -f -P 0x45 4096 4k"]);
    let ops = device.ops();
    assert!(ops.contains(&Op::Write { offset: 0, len: 4096, fua: false }), "{ops:?}");
    assert!(ops.contains(&Op::Flush), "{ops:?}");
    assert!(ops.contains(&Op::Write { offset: 4096, len: 4096, fua: true }), "{ops:?}");
    let snapshot = device.mem.snapshot();
    assert_filled(&snapshot, 0, 4096, 0x44);
    assert_filled(&snapshot, 4096, 4096, 0x45);
}

#[test]
fn write_zeroes_become_write_zeroes_requests() {
    let (server, device) = serve_test_device(MIB, false);
    qemu_io_ok(
        &server,
        &["write -P 0x55 0 256k", "write -z 64k 64k", "write -z -f 192k 64k", "read -P 0 64k 64k"],
    );
    let ops = device.ops();
    assert!(ops.contains(&Op::WriteZeroes { offset: 65536, len: 65536, fua: false }), "{ops:?}");
    assert!(ops.contains(&Op::WriteZeroes { offset: 196608, len: 65536, fua: true }), "{ops:?}");
    assert!(
        !ops.iter().any(|op| matches!(op, Op::Write { offset: 65536, .. })),
        "zeroes must not fall back to a data write: {ops:?}"
    );
    let snapshot = device.mem.snapshot();
    assert_filled(&snapshot, 0, 65536, 0x55);
    assert_filled(&snapshot, 65536, 65536, 0);
    assert_filled(&snapshot, 131072, 65536, 0x55);
    assert_filled(&snapshot, 196608, 65536, 0);
}

#[test]
fn discard_becomes_a_discard_request() {
    let (server, device) = serve_test_device(64 * MIB, false);
    qemu_io_ok(&server, &["write -P 0x66 0 128k", "discard 0 64k", "discard 1M 48M"]);
    let ops = device.ops();
    assert!(ops.contains(&Op::Discard { offset: 0, len: 65536 }), "{ops:?}");
    // Discards carry no payload, so the 32 MiB maximum payload does not limit them.
    assert!(ops.contains(&Op::Discard { offset: MIB as u64, len: 48 * MIB as u32 }), "{ops:?}");
    // MemDevice zeroes discarded ranges; the untouched half keeps its data.
    let snapshot = device.mem.snapshot();
    assert_filled(&snapshot, 0, 65536, 0);
    assert_filled(&snapshot, 65536, 65536, 0x66);
}

#[test]
fn concurrent_aio_writes_complete_out_of_order() {
    let (server, device) = serve_test_device(MIB, true);
    let mut commands: Vec<String> =
        (0..8).map(|i| format!("aio_write -P {:#04x} {} 64k", 0x10 + i, i * 65536)).collect();
    commands.push("aio_flush".to_owned());
    commands.extend((0..8).map(|i| format!("read -P {:#04x} {} 64k", 0x10 + i, i * 65536)));
    let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
    qemu_io_ok(&server, &commands);

    let snapshot = device.mem.snapshot();
    for i in 0..8 {
        assert_filled(&snapshot, i * 65536, 65536, 0x10 + i as u8);
    }
    let peak = device.peak_in_flight.load(Ordering::SeqCst);
    assert!(peak >= 2, "aio writes were never in flight together (peak {peak})");
    let completions = device.completions.lock().unwrap().clone();
    assert!(completions.windows(2).any(|w| w[0] > w[1]), "completed in order: {completions:?}");
}

#[test]
fn parallel_clients_write_disjoint_ranges() {
    let (server, device) = serve_test_device(4 * MIB, true);
    let server = Arc::new(server);
    let clients: Vec<_> = (0..4u8)
        .map(|i| {
            let server = Arc::clone(&server);
            thread::spawn(move || {
                let write = format!("write -P {:#04x} {}M 1M", 0x70 + i, i);
                let read = format!("read -P {:#04x} {}M 1M", 0x70 + i, i);
                qemu_io_ok(&server, &[&write, "flush", &read]);
            })
        })
        .collect();
    for client in clients {
        client.join().unwrap();
    }
    let snapshot = device.mem.snapshot();
    for i in 0..4 {
        assert_filled(&snapshot, i * MIB, MIB, 0x70 + i as u8);
    }
    // Each qemu-io disconnected; the server notices shortly after the process exits.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while server.connected_clients() != 0 {
        assert!(std::time::Instant::now() < deadline, "clients never left");
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn qemu_img_info_reports_the_size() {
    let (server, _) = serve_test_device(3 * MIB, false);
    let (success, output) = run("qemu-img", &["info".into(), "--output=json".into(), url(&server)]);
    assert!(success, "{output}");
    let info: serde_json::Value = serde_json::from_str(&output).expect("qemu-img JSON");
    assert_eq!(info["virtual-size"], 3 * MIB as u64, "{output}");
}

#[test]
fn an_unknown_export_name_is_refused() {
    let (server, _) = serve_test_device(MIB, false);
    let url = server.address().url("no-such-export");
    let (success, output) =
        run("qemu-io", &["-f".into(), "raw".into(), url, "-c".into(), "read 0 4k".into()]);
    assert!(!success, "{output}");
    assert!(output.contains("no-such-export"), "{output}");
}

#[test]
fn device_io_errors_reach_the_client() {
    let server = serve(Arc::new(FailingDevice(BlockError::Io)));
    let (success, output) = qemu_io(&server, &["read 0 4k"]);
    assert!(!success, "{output}");
    assert!(output.contains("read failed: Input/output error"), "{output}");
    let (success, output) = qemu_io(&server, &["write -P 1 0 4k"]);
    assert!(!success, "{output}");
    assert!(output.contains("write failed: Input/output error"), "{output}");
}

#[test]
fn a_read_only_device_refuses_writes_with_eperm() {
    let server = serve(Arc::new(FailingDevice(BlockError::ReadOnly)));
    let (success, output) = qemu_io(&server, &["write -P 1 0 4k"]);
    assert!(!success, "{output}");
    assert!(output.contains("write failed: Operation not permitted"), "{output}");
}
