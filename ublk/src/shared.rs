//! What a queue thread shares with the completions of its requests, which run on other
//! threads: the device's character device and buffers to copy data through, and the list of
//! finished requests with the eventfd that wakes the queue thread to commit them.

use crate::buffers::{BufferPool, WriteData};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkIOCtx};
use libublk::BufDesc;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex, PoisonError};

/// What the queue thread shares with the completions of its requests.
pub(crate) struct QueueShared {
    pub(crate) device_id: u32,
    pub(crate) qid: u16,
    /// Keeps `/dev/ublkcN` open while a completion may still copy data through it (a late
    /// completion must never write into a file descriptor number that was reused).
    pub(crate) dev: Arc<UblkDev>,
    /// Per-tag buffers the kernel copies data into and out of, when the driver has no user
    /// copy. Each tag's buffer is touched by one party at a time: the kernel until the request
    /// is delivered, then the queue thread (reading a write's data) or the completion (filling
    /// a read's data), then the kernel again at commit.
    pub(crate) buffers: Option<Vec<IoBuf<u8>>>,
    /// Where the data of large writes is copied to: the device's reused buffers.
    pub(crate) pool: Arc<BufferPool>,
    pub(crate) finished: Mutex<Vec<(u16, i32)>>,
    pub(crate) wake: OwnedFd,
}

impl QueueShared {
    pub(crate) fn new(dev: Arc<UblkDev>, qid: u16, user_copy: bool, pool: Arc<BufferPool>) -> io::Result<QueueShared> {
        // SAFETY: eventfd has no memory arguments; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let wake = unsafe { OwnedFd::from_raw_fd(fd) };
        let buffers = (!user_copy).then(|| dev.alloc_queue_io_bufs());
        let device_id = dev.dev_info.dev_id;
        Ok(QueueShared { device_id, qid, dev, buffers, pool, finished: Mutex::new(Vec::new()), wake })
    }

    pub(crate) fn cdev(&self) -> BorrowedFd<'_> {
        // SAFETY: fds[0] is /dev/ublkcN, opened by UblkDev and closed only when it drops; we
        // hold an Arc to it for as long as this borrow can live.
        unsafe { BorrowedFd::borrow_raw(self.dev.tgt.fds[0]) }
    }

    /// Where the kernel expects this tag's data in user-copy mode (a position in /dev/ublkcN).
    pub(crate) fn user_copy_pos(&self, tag: u16) -> libc::off_t {
        UblkIOCtx::ublk_user_copy_pos(self.qid, tag, 0) as libc::off_t
    }

    pub(crate) fn buffer(&self, tag: u16) -> Option<&IoBuf<u8>> {
        self.buffers.as_ref().map(|buffers| &buffers[usize::from(tag)])
    }

    /// Copies a read's data into the request (any thread; the tag is in flight and ours).
    pub(crate) fn copy_to_request(&self, tag: u16, data: &[u8]) -> io::Result<()> {
        match self.buffer(tag) {
            Some(buffer) => {
                if data.len() > buffer.len() {
                    return Err(io::Error::new(io::ErrorKind::InvalidInput, "read larger than the request buffer"));
                }
                // SAFETY: the buffer holds at least `data.len()` bytes (checked) and, the tag
                // being in flight and owned by this completion, nobody else touches it now.
                unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), buffer.as_mut_ptr(), data.len()) };
                Ok(())
            }
            None => {
                let mut done = 0;
                while done < data.len() {
                    let rest = &data[done..];
                    // SAFETY: `rest` is a valid slice for the length passed.
                    let n = unsafe {
                        libc::pwrite(
                            self.cdev().as_raw_fd(),
                            rest.as_ptr().cast(),
                            rest.len(),
                            self.user_copy_pos(tag) + done as libc::off_t,
                        )
                    };
                    match n {
                        n if n > 0 => done += n as usize,
                        0 => return Err(io::Error::new(io::ErrorKind::WriteZero, "the request took no data")),
                        _ => {
                            let e = io::Error::last_os_error();
                            if e.kind() != io::ErrorKind::Interrupted {
                                return Err(e);
                            }
                        }
                    }
                }
                Ok(())
            }
        }
    }

    /// A write's data, copied out of the request (queue thread, before the handler sees it).
    ///
    /// The room is not zeroed first: every byte is copied in before the data gets its length.
    /// Zeroing was a pass of its own over the data, and not a cheap one: in a TCG guest,
    /// filling memory costs 4.5 times what copying it does (`memset` 1.73 ms per MiB against
    /// `memcpy` 0.38, probed).
    pub(crate) fn copy_from_request(&self, tag: u16, len: u32) -> io::Result<WriteData> {
        let len = len as usize;
        let mut data = self.pool.take(len);
        let room = data.spare();
        match self.buffer(tag) {
            Some(buffer) => {
                if len > buffer.len() {
                    return Err(io::Error::new(io::ErrorKind::InvalidInput, "write larger than the request buffer"));
                }
                // SAFETY: the kernel filled `len` bytes of this tag's buffer before delivering
                // the request, and nothing writes it until the request is committed; `room`
                // has `len` bytes of capacity.
                unsafe { std::ptr::copy_nonoverlapping(buffer.as_ptr(), room, len) };
            }
            None => {
                let mut done = 0;
                while done < len {
                    // SAFETY: `room` has `len` bytes of capacity, so `len - done` bytes from
                    // `done` are inside it; the kernel only writes them.
                    let n = unsafe {
                        libc::pread(
                            self.cdev().as_raw_fd(),
                            room.add(done).cast(),
                            len - done,
                            self.user_copy_pos(tag) + done as libc::off_t,
                        )
                    };
                    match n {
                        n if n > 0 => done += n as usize,
                        0 => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the request had less data than announced")),
                        _ => {
                            let e = io::Error::last_os_error();
                            if e.kind() != io::ErrorKind::Interrupted {
                                return Err(e);
                            }
                        }
                    }
                }
            }
        }
        // SAFETY: all `len` bytes of the room were written above (a short copy returned an
        // error first), and `take` gave room for `len`.
        unsafe { data.set_len(len) };
        Ok(data)
    }

    /// Queues a result for commit by the queue thread (any thread).
    pub(crate) fn finish(&self, tag: u16, result: i32) {
        let was_empty = {
            let mut finished = self.finished.lock().unwrap_or_else(PoisonError::into_inner);
            let was_empty = finished.is_empty();
            finished.push((tag, result));
            was_empty
        };
        // Only the first result of a batch wakes the thread: it takes the whole list.
        if was_empty {
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from a live array to our eventfd. It can only fail with
            // EAGAIN when the counter is saturated, and then the thread is woken anyway.
            unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        }
    }

    pub(crate) fn take_finished(&self) -> Vec<(u16, i32)> {
        let mut counter = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a live array; the eventfd is non-blocking, and an
        // empty counter (EAGAIN) is fine: we only reset it before taking the list.
        unsafe { libc::read(self.wake.as_raw_fd(), counter.as_mut_ptr().cast(), counter.len()) };
        std::mem::take(&mut *self.finished.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// How a commit names this tag's buffer: none with user copy.
    pub(crate) fn buf_desc(&self, tag: u16) -> BufDesc<'static> {
        match self.buffer(tag) {
            Some(buffer) => BufDesc::RawAddress(buffer.as_ptr()),
            None => BufDesc::Slice(&[]),
        }
    }
}
