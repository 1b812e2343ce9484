//! One thread and one io_uring per hardware queue (libublk's model).
//!
//! The queue thread owns the ring: it receives requests (FETCH completions), hands them to the
//! [`Handler`], and commits results (COMMIT_AND_FETCH). Requests complete on other threads (a
//! replicated write completes when the peer acknowledges it), so a completion copies its read
//! data to the kernel itself, appends `(tag, result)` to the queue's list and, when the list was
//! empty, writes the queue's eventfd. A poll on that eventfd sits in the ring, so the queue
//! thread wakes, takes the whole list and commits it: many requests stay in flight per queue
//! and the queue thread never waits for one.

use crate::error::{to_io, Error};
use crate::request::{decode, Completion, Handler, Op, Request};
use crate::shared::QueueShared;
use io_uring::{opcode, types};
use libublk::io::{UblkIOCtx, UblkQueue};
use libublk::{BufDescList, UblkIORes};
use std::io;
use std::os::fd::AsRawFd;
use std::sync::mpsc::Sender;
use std::sync::Arc;

/// The ring's user data of the eventfd poll: a "target I/O" in libublk's terms, so it is told
/// apart from the kernel's request completions.
const WAKE_USER_DATA_OP: u32 = 0xff;

/// The body of queue thread `shared.qid`: reports its thread id (or why it could not start)
/// on `ready`, then serves requests until the device is stopped.
pub(crate) fn run(shared: Arc<QueueShared>, handler: Arc<dyn Handler>, ready: Sender<Result<libc::pid_t, Error>>) {
    // PR_SET_IO_FLUSHER: this thread serves a block device, so memory reclaim must not make it
    // wait for I/O on that same device.
    let tid = libublk::ctrl::UblkCtrl::init_queue_thread();
    let dev = Arc::clone(&shared.dev);
    let failed = |source: io::Error| Error::Queue { id: shared.device_id, queue: shared.qid, source };
    let queue = match UblkQueue::new(shared.qid, &dev)
        .and_then(|q| q.submit_fetch_commands_unified(BufDescList::Slices(shared.buffers.as_ref())))
    {
        Ok(queue) => queue,
        Err(e) => {
            let _ = ready.send(Err(failed(to_io(e))));
            return;
        }
    };
    if let Err(e) = arm_wakeup(&queue, &shared) {
        let _ = ready.send(Err(failed(e)));
        return;
    }
    let _ = ready.send(Ok(tid));
    queue.wait_and_handle_io(|q, tag, event| {
        if event.is_tgt_io() {
            commit_finished(q, &shared);
            if let Err(error) = arm_wakeup(q, &shared) {
                // Without the poll no completion would ever be committed again.
                tracing::error!(device = shared.device_id, queue = shared.qid, %error, "cannot re-arm the completion wakeup");
            }
        } else {
            start_request(q, tag, &shared, handler.as_ref());
        }
    });
    tracing::debug!(device = shared.device_id, queue = shared.qid, "queue stopped");
}

fn arm_wakeup(queue: &UblkQueue<'_>, shared: &QueueShared) -> io::Result<()> {
    let poll = opcode::PollAdd::new(types::Fd(shared.wake.as_raw_fd()), libc::POLLIN as u32)
        .build()
        .user_data(UblkIOCtx::build_user_data(0, WAKE_USER_DATA_OP, 0, true));
    queue.ublk_submit_sqe_sync(poll).map_err(to_io)
}

fn commit_finished(queue: &UblkQueue<'_>, shared: &QueueShared) {
    for (tag, result) in shared.take_finished() {
        tracing::trace!(device = shared.device_id, queue = shared.qid, tag, result, "commit");
        if let Err(e) = queue.complete_io_cmd_unified(tag, shared.buf_desc(tag), Ok(UblkIORes::Result(result))) {
            tracing::error!(device = shared.device_id, queue = shared.qid, tag, error = %to_io(e), "cannot commit a request");
        }
    }
}

fn start_request(queue: &UblkQueue<'_>, tag: u16, shared: &Arc<QueueShared>, handler: &dyn Handler) {
    let iod = queue.get_iod(tag);
    let op = match decode(iod.op_flags, iod.start_sector, iod.nr_sectors) {
        Ok(op) => op,
        Err(errno) => {
            tracing::debug!(device = shared.device_id, op_flags = iod.op_flags, errno, "request refused");
            // The op of a completion only shapes a success; any will do for a failure.
            return Completion::new(Arc::clone(shared), tag, Op::Flush).fail(errno);
        }
    };
    tracing::trace!(device = shared.device_id, queue = shared.qid, tag, ?op, "request");
    let done = Completion::new(Arc::clone(shared), tag, op);
    let request = match op {
        Op::Read { offset, len } => Request::Read { offset, len },
        Op::Write { offset, len, fua } => match shared.copy_from_request(tag, len) {
            Ok(data) => Request::Write { offset, data, fua },
            Err(error) => {
                tracing::error!(device = shared.device_id, queue = shared.qid, %error, "cannot copy write data from the request");
                return done.fail(libc::EIO);
            }
        },
        Op::Flush => Request::Flush,
        Op::Discard { offset, len } => Request::Discard { offset, len },
        Op::WriteZeroes { offset, len, fua } => Request::WriteZeroes { offset, len, fua },
    };
    handler.handle(request, done);
}
