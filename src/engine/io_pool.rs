//! Local disk I/O off the callers' threads, so one frontend connection can keep many requests in
//! flight. A small fixed pool of threads doing positional I/O on the backing disk.

use crate::disk::Disk;
use crate::replica::LocalIo;
use bytes::Bytes;
use std::io;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

pub type IoDone = Box<dyn FnOnce(io::Result<Option<Bytes>>) + Send>;

/// Work for a pool thread, given the disk.
pub type Job = Box<dyn FnOnce(&dyn Disk) + Send>;

pub struct IoPool {
    jobs: Mutex<Option<Sender<Job>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// Zeroes are written in chunks of this size, so a large WRITE_ZEROES never allocates its length.
const ZERO_CHUNK: usize = 1 << 20;

impl IoPool {
    pub fn new(disk: Arc<dyn Disk>, threads: usize) -> std::io::Result<IoPool> {
        let (tx, rx) = channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let handles = (0..threads)
            .map(|i| {
                let (rx, disk) = (rx.clone(), disk.clone());
                std::thread::Builder::new()
                    .name(format!("disk-io-{i}"))
                    .spawn(move || worker(&*disk, &rx))
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(IoPool { jobs: Mutex::new(Some(tx)), threads: Mutex::new(handles) })
    }

    pub fn submit(&self, op: LocalIo, done: IoDone) {
        self.run(Box::new(move |disk| done(execute(disk, op))));
    }

    /// Runs `job` on a pool thread (a job that waits for the disk, off the caller's thread).
    pub fn run(&self, job: Job) {
        let jobs = self.jobs.lock().expect("io pool lock");
        match jobs.as_ref() {
            Some(tx) if tx.send(job).is_ok() => {}
            _ => {}
        }
    }

    /// Finishes queued jobs, then stops the threads.
    pub fn shutdown(&self) {
        self.jobs.lock().expect("io pool lock").take();
        for handle in self.threads.lock().expect("io pool lock").drain(..) {
            let _ = handle.join();
        }
    }
}

fn worker(disk: &dyn Disk, rx: &Mutex<Receiver<Job>>) {
    loop {
        let job = rx.lock().expect("io pool queue").recv();
        let Ok(job) = job else { return };
        job(disk);
    }
}

/// Performs one operation synchronously on the calling thread.
pub fn execute(disk: &dyn Disk, op: LocalIo) -> io::Result<Option<Bytes>> {
    match op {
        LocalIo::Read { offset, len } => {
            let mut buf = vec![0; len];
            disk.read_at(&mut buf, offset)?;
            Ok(Some(Bytes::from(buf)))
        }
        LocalIo::Write { offset, data, fua } => {
            disk.write_at(&data, offset)?;
            if fua {
                disk.sync()?;
            }
            Ok(None)
        }
        LocalIo::Zeroes { offset, len, discard, fua } => {
            if discard {
                disk.discard(offset, len)?;
            } else {
                write_zeroes(disk, offset, len)?;
            }
            if fua {
                disk.sync()?;
            }
            Ok(None)
        }
        LocalIo::Flush => disk.sync().map(|()| None),
    }
}

fn write_zeroes(disk: &dyn Disk, offset: u64, len: u64) -> io::Result<()> {
    let zeroes = vec![0u8; ZERO_CHUNK.min(len as usize)];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(zeroes.len() as u64) as usize;
        disk.write_at(&zeroes[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}
