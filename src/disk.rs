//! Positional storage: the one interface through which blkrepl touches a disk.
//!
//! The metadata store and the engine's data path both go through [`Disk`], so the same code runs
//! over a real file or block device ([`FileDisk`]), over memory ([`MemDisk`], for tests and the
//! simulator), and under fault injection ([`FaultyDisk`], for crash-safety tests).
//!
//! All I/O is positional and exact: a short read or write is an error, never a partial success,
//! so callers never loop and never see half-done operations they could mistake for done ones.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use nix::errno::Errno;
use nix::fcntl::{fallocate, FallocateFlags, Flock, FlockArg};

/// The size of a sector: the unit a crash can tear a write into (see [`FaultyDisk`]).
pub const SECTOR_SIZE: u64 = 512;

/// Largest chunk written at once when a discard falls back to writing zeroes.
const ZERO_CHUNK: u64 = 1 << 20;

/// Positional storage with explicit durability.
// A disk is never empty in a way callers would ask about; `len` is its size.
#[allow(clippy::len_without_is_empty)]
pub trait Disk: Send + Sync + std::fmt::Debug {
    /// Fills `buf` from `offset`. Reading past the end is `ErrorKind::UnexpectedEof`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`. Not durable until [`Disk::sync`] returns.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable (fdatasync).
    fn sync(&self) -> io::Result<()>;
    /// Makes the range read back as zeroes, cheaply where the storage allows (hole punching,
    /// discard with guaranteed zeroing), by writing zeroes otherwise. Replicas must stay
    /// byte-identical, so "unspecified content" is not an acceptable outcome.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// The size in bytes: the file size, or the block device size.
    fn len(&self) -> io::Result<u64>;
}

impl<D: Disk + ?Sized> Disk for Arc<D> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        (**self).sync()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).discard(offset, len)
    }
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
}

/// Why a disk could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open disk {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("disk {path} is in use by another process (another blkrepl daemon, or mounted)")]
    InUse { path: PathBuf },
    #[error("disk {path} is neither a regular file nor a block device")]
    NotADisk { path: PathBuf },
}

/// A regular file or a block device, locked for exclusive use while open.
///
/// Two daemons writing the same backing disk would silently corrupt it, so opening takes an
/// exclusive non-blocking `flock`; block devices are also opened with `O_EXCL`, which the kernel
/// refuses while the device is mounted or claimed by another exclusive opener.
#[derive(Debug)]
pub struct FileDisk {
    file: Flock<File>,
    path: PathBuf,
    block_device: bool,
}

impl FileDisk {
    pub fn open(path: impl AsRef<Path>) -> Result<FileDisk, DiskError> {
        let path = path.as_ref().to_path_buf();
        let open_err = |source| DiskError::Open { path: path.clone(), source };
        let file_type = std::fs::metadata(&path).map_err(open_err)?.file_type();
        let block_device = file_type.is_block_device();
        if !block_device && !file_type.is_file() {
            return Err(DiskError::NotADisk { path });
        }
        let mut options = OpenOptions::new();
        options.read(true).write(true);
        if block_device {
            options.custom_flags(nix::libc::O_EXCL);
        }
        let file = match options.open(&path) {
            Ok(file) => file,
            Err(e) if e.raw_os_error() == Some(Errno::EBUSY as i32) => {
                return Err(DiskError::InUse { path });
            }
            Err(e) => return Err(open_err(e)),
        };
        let file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((_, Errno::EWOULDBLOCK)) => return Err(DiskError::InUse { path }),
            Err((_, errno)) => return Err(open_err(io::Error::from(errno))),
        };
        Ok(FileDisk { file, path, block_device })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let zeroes = vec![0u8; len.min(ZERO_CHUNK) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(ZERO_CHUNK) as usize;
            self.write_at(&zeroes[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

impl Disk for FileDisk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        // Punching a hole reads back as zeroes on files, and on block devices it is a discard
        // the kernel only accepts when the device guarantees zeroes afterwards.
        let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "discard range overflows"));
        };
        match fallocate(self.file.as_raw_fd(), punch, off, n) {
            Ok(()) => Ok(()),
            // Not supported by the file system / device, or misaligned for the device.
            Err(Errno::EOPNOTSUPP | Errno::EINVAL | Errno::ENODEV) => {
                self.write_zeroes(offset, len)
            }
            Err(errno) => Err(errno.into()),
        }
    }

    fn len(&self) -> io::Result<u64> {
        if self.block_device {
            // Seeking to the end yields the device size; all I/O here is positional, so moving
            // the file offset is harmless.
            (&*self.file).seek(SeekFrom::End(0))
        } else {
            Ok(self.file.metadata()?.len())
        }
    }
}

/// A fixed-size disk in memory. Writes past the end fail like a full block device would.
pub struct MemDisk {
    data: Mutex<Vec<u8>>,
}

impl MemDisk {
    /// A zero-filled disk of `len` bytes.
    pub fn new(len: usize) -> MemDisk {
        MemDisk::from_vec(vec![0; len])
    }

    pub fn from_vec(data: Vec<u8>) -> MemDisk {
        MemDisk { data: Mutex::new(data) }
    }

    /// A copy of the whole content, e.g. to restart a crash test from the same state.
    pub fn snapshot(&self) -> Vec<u8> {
        self.lock().clone()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        // The data is plain bytes: a panic in another thread cannot leave it inconsistent.
        self.data.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl std::fmt::Debug for MemDisk {
    /// The size only: the content can be gigabytes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemDisk").field("len", &self.lock().len()).finish_non_exhaustive()
    }
}

/// The in-bounds byte range `offset..offset+len` of a `size`-byte disk, if there is one.
fn span(offset: u64, len: usize, size: usize) -> Option<std::ops::Range<usize>> {
    let start = usize::try_from(offset).ok()?;
    let end = start.checked_add(len)?;
    (end <= size).then_some(start..end)
}

impl Disk for MemDisk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let data = self.lock();
        let range = span(offset, buf.len(), data.len()).ok_or_else(|| {
            io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end of the disk")
        })?;
        buf.copy_from_slice(&data[range]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut data = self.lock();
        let range =
            span(offset, buf.len(), data.len()).ok_or_else(|| io::Error::from(Errno::ENOSPC))?;
        data[range].copy_from_slice(buf);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut data = self.lock();
        let len = usize::try_from(len).map_err(|_| io::Error::from(Errno::ENOSPC))?;
        let range = span(offset, len, data.len()).ok_or_else(|| io::Error::from(Errno::ENOSPC))?;
        data[range].fill(0);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().len() as u64)
    }
}

/// The error a [`FaultyDisk`] injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `EIO`: a failing medium.
    Eio,
    /// `ENOSPC` (`ErrorKind::StorageFull`): e.g. a thin-provisioned pool that ran out.
    Enospc,
}

impl Fault {
    fn error(self) -> io::Error {
        match self {
            Fault::Eio => Errno::EIO.into(),
            Fault::Enospc => Errno::ENOSPC.into(),
        }
    }
}

/// Wraps a disk and injects failures and crashes, for tests (unit, integration, simulator).
///
/// Mutating operations (`write_at` and `discard`, both called "writes" here) are numbered from 1
/// in the order they are issued. A crash models power loss with a disk that applies writes in
/// order: the chosen write is torn (only a prefix of its 512-byte sectors reaches the inner disk)
/// and every later write is silently dropped, while the caller keeps seeing success, as a
/// process that is about to die would. Reads always see the inner disk.
#[derive(Debug)]
pub struct FaultyDisk<D: Disk> {
    inner: D,
    state: Mutex<FaultState>,
    /// Signalled when hung writes may go on (see [`FaultyDisk::hang_writes`]).
    released: Condvar,
}

#[derive(Debug, Default)]
struct FaultState {
    /// Writes issued so far.
    writes: u64,
    /// Fail exactly this write.
    fail_one: Option<(u64, Fault)>,
    /// Fail every write after this one (and syncs once the first such write failed).
    fail_after: Option<(u64, Fault)>,
    failing: Option<Fault>,
    /// Fail the next sync (only it).
    fail_sync: Option<Fault>,
    /// Tear this write, then drop everything.
    crash_at: Option<(u64, u64)>,
    crashed: bool,
    /// Writes block until released: a disk that stopped answering.
    hung: bool,
}

/// What to do with one write.
enum Action {
    Pass,
    Fail(Fault),
    Tear(u64),
    Drop,
}

impl<D: Disk> FaultyDisk<D> {
    pub fn new(inner: D) -> FaultyDisk<D> {
        FaultyDisk { inner, state: Mutex::new(FaultState::default()), released: Condvar::new() }
    }

    pub fn inner(&self) -> &D {
        &self.inner
    }

    /// Writes issued so far (including failed, torn and dropped ones).
    pub fn writes(&self) -> u64 {
        self.lock().writes
    }

    /// Fails the `n`-th write from now (1 = the next one) with `fault`; others are unaffected.
    pub fn fail_nth_write(&self, n: u64, fault: Fault) {
        let mut state = self.lock();
        state.fail_one = Some((state.writes + n, fault));
    }

    /// Lets `n` more writes succeed, then fails every later write, and every sync from the first
    /// failure on, with `fault`: a disk that died.
    pub fn fail_writes_after(&self, n: u64, fault: Fault) {
        let mut state = self.lock();
        state.fail_after = Some((state.writes + n, fault));
    }

    /// Fails the next sync with `fault` (writeback that failed once; later syncs succeed).
    pub fn fail_next_sync(&self, fault: Fault) {
        self.lock().fail_sync = Some(fault);
    }

    /// Simulates a crash: `k - 1` more writes reach the disk, the `k`-th only with its first
    /// `torn_sectors` sectors (all of it if it is shorter), and every later write is dropped.
    /// `k == 0` crashes at once: nothing written from now on reaches the disk.
    pub fn crash_after(&self, k: u64, torn_sectors: u64) {
        let mut state = self.lock();
        if k == 0 {
            state.crashed = true;
        } else {
            state.crash_at = Some((state.writes + k, torn_sectors));
        }
    }

    /// Whether the simulated crash has happened (everything written since is lost).
    pub fn has_crashed(&self) -> bool {
        self.lock().crashed
    }

    /// Makes every write from now on block until [`FaultyDisk::release_writes`]: a disk that
    /// hangs (reads still work).
    pub fn hang_writes(&self) {
        self.lock().hung = true;
    }

    /// Lets hung writes go on.
    pub fn release_writes(&self) {
        self.lock().hung = false;
        self.released.notify_all();
    }

    /// Removes injected failures (not a crash: a crashed disk stays crashed).
    pub fn heal(&self) {
        let mut state = self.lock();
        state.fail_one = None;
        state.fail_after = None;
        state.failing = None;
        state.fail_sync = None;
    }

    fn lock(&self) -> MutexGuard<'_, FaultState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Numbers the next write and decides its fate.
    fn next_write(&self) -> Action {
        let mut state = self.lock();
        while state.hung {
            state = self.released.wait(state).unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        state.writes += 1;
        let n = state.writes;
        if state.crashed {
            return Action::Drop;
        }
        if let Some((at, torn)) = state.crash_at {
            if n == at {
                state.crashed = true;
                return Action::Tear(torn);
            }
        }
        if let Some((after, fault)) = state.fail_after {
            if n > after {
                state.failing = Some(fault);
            }
        }
        if let Some(fault) = state.failing {
            return Action::Fail(fault);
        }
        match state.fail_one {
            Some((at, fault)) if at == n => Action::Fail(fault),
            _ => Action::Pass,
        }
    }
}

impl<D: Disk> Disk for FaultyDisk<D> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match self.next_write() {
            Action::Pass => self.inner.write_at(buf, offset),
            Action::Fail(fault) => Err(fault.error()),
            Action::Tear(sectors) => {
                let keep = sectors.saturating_mul(SECTOR_SIZE).min(buf.len() as u64) as usize;
                // The process is dying: whether the torn prefix landed is all that matters.
                let _ = self.inner.write_at(&buf[..keep], offset);
                Ok(())
            }
            Action::Drop => Ok(()),
        }
    }

    fn sync(&self) -> io::Result<()> {
        let mut state = self.lock();
        if state.crashed {
            return Ok(());
        }
        if let Some(fault) = state.failing.or(state.fail_sync.take()) {
            return Err(fault.error());
        }
        drop(state);
        self.inner.sync()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.next_write() {
            Action::Pass => self.inner.discard(offset, len),
            Action::Fail(fault) => Err(fault.error()),
            Action::Tear(sectors) => {
                let _ = self.inner.discard(offset, sectors.saturating_mul(SECTOR_SIZE).min(len));
                Ok(())
            }
            Action::Drop => Ok(()),
        }
    }

    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_disk_reads_back_and_bounds() {
        let disk = MemDisk::new(8192);
        disk.write_at(&[7; 100], 4000).unwrap();
        let mut buf = [0; 100];
        disk.read_at(&mut buf, 4000).unwrap();
        assert_eq!(buf, [7; 100]);
        let err = disk.read_at(&mut buf, 8100).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        let err = disk.write_at(&buf, 8100).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::StorageFull);
        disk.discard(4000, 50).unwrap();
        disk.read_at(&mut buf, 4000).unwrap();
        assert_eq!(&buf[..50], &[0; 50]);
        assert_eq!(&buf[50..], &[7; 50]);
    }

    #[test]
    fn faulty_disk_fails_nth_write_only() {
        let disk = FaultyDisk::new(MemDisk::new(4096));
        disk.fail_nth_write(2, Fault::Eio);
        disk.write_at(&[1], 0).unwrap();
        let err = disk.write_at(&[2], 1).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(Errno::EIO as i32));
        disk.write_at(&[3], 2).unwrap();
        disk.sync().unwrap();
        assert_eq!(&disk.inner().snapshot()[..3], &[1, 0, 3]);
    }

    #[test]
    fn faulty_disk_fails_everything_after_countdown() {
        let disk = FaultyDisk::new(MemDisk::new(4096));
        disk.fail_writes_after(1, Fault::Enospc);
        disk.write_at(&[1], 0).unwrap();
        disk.sync().unwrap();
        assert_eq!(disk.write_at(&[2], 1).unwrap_err().kind(), io::ErrorKind::StorageFull);
        assert_eq!(disk.discard(0, 1).unwrap_err().kind(), io::ErrorKind::StorageFull);
        assert_eq!(disk.sync().unwrap_err().kind(), io::ErrorKind::StorageFull);
        disk.heal();
        disk.write_at(&[3], 1).unwrap();
        disk.sync().unwrap();
    }

    #[test]
    fn faulty_disk_crash_tears_then_drops() {
        let disk = FaultyDisk::new(MemDisk::new(8192));
        disk.crash_after(2, 3);
        disk.write_at(&[1; 512], 0).unwrap();
        disk.write_at(&[2; 4096], 4096).unwrap();
        assert!(disk.has_crashed());
        disk.write_at(&[3; 512], 512).unwrap();
        disk.discard(0, 512).unwrap();
        let image = disk.inner().snapshot();
        assert_eq!(&image[..512], &[1; 512]);
        assert_eq!(&image[512..1024], &[0; 512]);
        assert_eq!(&image[4096..4096 + 3 * 512], &[2; 3 * 512]);
        assert!(image[4096 + 3 * 512..].iter().all(|&b| b == 0));
        assert_eq!(disk.writes(), 4);
    }

    #[test]
    fn file_disk_locks_reads_writes_and_discards() {
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(1 << 20).unwrap();
        let disk = FileDisk::open(file.path()).unwrap();
        assert_eq!(disk.len().unwrap(), 1 << 20);
        match FileDisk::open(file.path()) {
            Err(DiskError::InUse { path }) => assert_eq!(path, file.path()),
            other => panic!("second open must fail as in use, got {other:?}"),
        }
        disk.write_at(&[9; 8192], 4096).unwrap();
        disk.sync().unwrap();
        disk.discard(4096, 4096).unwrap();
        let mut buf = [1; 8192];
        disk.read_at(&mut buf, 4096).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0));
        assert!(buf[4096..].iter().all(|&b| b == 9));
        let err = disk.read_at(&mut buf, (1 << 20) - 100).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        drop(disk);
        FileDisk::open(file.path()).expect("lock released on drop");
    }

    #[test]
    fn file_disk_rejects_directories() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(FileDisk::open(dir.path()), Err(DiskError::NotADisk { .. })));
    }
}
