//! The sending half of a peer connection: one ordered stream, with control frames (acks, pings,
//! barrier acks, state) overtaking queued bulk data so a large transfer never delays an ack.

use crate::wire::seal::Protection;
use crate::wire::{write_message_with, Message};
use std::collections::VecDeque;
use std::io::{BufWriter, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::quiet_condvar::QuietCondvar;
use std::time::Duration;

/// Runs once the frame it belongs to has been handed to the kernel (protocol A's completion).
pub type OnSent = Box<dyn FnOnce() + Send>;

/// Bulk bytes queued before writers of new data wait: the send buffer of protocol A.
pub const BULK_QUEUE_LIMIT_BYTES: usize = (crate::config::SEND_QUEUE_KIB * 1024) as usize;

/// Control frames queued at most. Acks are queued as the peer's writes arrive; a peer that
/// keeps sending and reads nothing back would otherwise grow this queue without end. Far above
/// what a peer that reads ever leaves queued (its writes in flight are bounded by its own
/// queue and the barriers it waits for).
pub const CONTROL_QUEUE_LIMIT: usize = 65_536;

/// A link whose queue [`PeerLink::close`] closed, with its last words still to send.
#[must_use = "the socket stays open until `finish` runs"]
pub struct Closing {
    link: Arc<PeerLink>,
    last_words: Option<Vec<Message>>,
}

impl Closing {
    /// Sends the last words, best effort and without waiting on a stuck socket (at most
    /// 100 ms, and not at all while the writer is in the middle of a frame), then breaks the
    /// socket, which also wakes the reader.
    pub fn finish(self) {
        let link = &self.link;
        if let (Some(words), Ok(mut out)) = (self.last_words, link.out.try_lock()) {
            if let Some(out) = out.as_mut() {
                let _ = link.stream.set_write_timeout(Some(Duration::from_millis(100)));
                let _ = words.iter().try_for_each(|msg| out.write(msg)).and_then(|()| out.w.flush());
            }
        }
        let _ = link.stream.shutdown(Shutdown::Both);
    }
}

#[derive(Default)]
struct SendQueue {
    control: VecDeque<Message>,
    bulk: VecDeque<(Message, Option<OnSent>)>,
    bulk_bytes: usize,
    closed: bool,
    /// Writes wait for room in this queue (see [`PeerLink::want_room`]).
    room_wanted: bool,
    /// Why the queue closed itself (see [`CONTROL_QUEUE_LIMIT`]).
    overflowed: bool,
    /// The writer waits for a frame and nobody has woken it since: only then does a new frame
    /// need a wake-up. Between a wake-up and the writer's return from its wait, every frame
    /// queued would otherwise make one more `futex` call for nothing (a protocol C primary
    /// made 0.8 such calls per 4 KiB write at QD32).
    writer_asleep: bool,
}

impl SendQueue {
    /// Queues a control frame, unless the queue is closed or full (then it closes, and the
    /// writer reports why). True when the frame was queued.
    fn push_control(&mut self, msg: Message) -> bool {
        if self.closed {
            return false;
        }
        if self.control.len() >= CONTROL_QUEUE_LIMIT {
            self.overflowed = true;
            self.closed = true;
            return false;
        }
        self.control.push_back(msg);
        true
    }
}

/// The socket's buffered writer and, on an authenticated link, this direction's frame MAC:
/// one lock, so frames are MACed in the order they go out.
struct Out {
    w: BufWriter<TcpStream>,
    mac: Option<Protection>,
}

impl Out {
    fn write(&mut self, msg: &Message) -> std::io::Result<()> {
        write_message_with(&mut self.w, msg, self.mac.as_mut())
    }
}

/// Lock order: `queue` before `out`. The writer thread takes `out` before it lets go of `queue`,
/// so a frame it popped is on the wire before any frame sent directly after it.
pub struct PeerLink {
    queue: Mutex<SendQueue>,
    changed: QuietCondvar,
    out: Mutex<Option<Out>>,
    stream: TcpStream,
    sent_bytes: AtomicU64,
}

/// The bytes of data a frame carries: what the send queue's limit and `sent_bytes` count.
impl PeerLink {
    /// The link over `stream`; `mac`: what this side MACs its frames with (authenticated links).
    pub fn new(stream: TcpStream, mac: Option<Protection>) -> std::io::Result<PeerLink> {
        let out = Out { w: BufWriter::with_capacity(256 << 10, stream.try_clone()?), mac };
        Ok(PeerLink {
            queue: Mutex::default(),
            changed: QuietCondvar::new(),
            out: Mutex::new(Some(out)),
            stream,
            sent_bytes: AtomicU64::new(0),
        })
    }

    pub fn sent_bytes(&self) -> u64 {
        self.sent_bytes.load(Ordering::Relaxed)
    }

    /// Sends acks ahead of queued bulk data, written by the caller itself when nothing else
    /// waits in the control queue and the socket is free, all in one system call: no thread
    /// handoff per write. Called without the engine lock.
    ///
    /// Acks are sent by the side that receives bulk data, and its reader keeps draining the
    /// peer's frames while another thread blocks writing one; so a thread blocked writing an
    /// ack always has a peer draining it, and two nodes can never wait on each other.
    pub fn send_acks(&self, acks: Vec<Message>) {
        let mut q = self.queue.lock().expect("link queue");
        if q.closed {
            return;
        }
        if q.control.is_empty() {
            if let Ok(mut out) = self.out.try_lock() {
                if let Some(out) = out.as_mut() {
                    if acks.iter().try_for_each(|msg| out.write(msg)).and_then(|()| out.w.flush()).is_err() {
                        // The writer thread finds the socket broken too and reports the loss.
                        let _ = self.stream.shutdown(Shutdown::Both);
                    }
                    return;
                }
            }
        }
        for msg in acks {
            self.push_control(&mut q, msg);
        }
    }

    /// Queues a control frame ahead of queued bulk data, never writing it from the calling
    /// thread (the engine queues frames under its lock).
    pub fn queue_control(&self, msg: Message) {
        let mut q = self.queue.lock().expect("link queue");
        self.push_control(&mut q, msg);
    }

    /// Queues a control frame; a queue that overflows breaks the socket, which also wakes a
    /// writer blocked on it (see [`CONTROL_QUEUE_LIMIT`]).
    fn push_control(&self, q: &mut SendQueue, msg: Message) {
        if !q.push_control(msg) && q.overflowed {
            let _ = self.stream.shutdown(Shutdown::Both);
        }
        self.wake_writer(q);
    }

    /// Wakes the writer if it sleeps for want of frames. Called with the queue locked, after
    /// queuing: the writer marks itself asleep under the same lock before it waits, so either
    /// it sees the frame or this sees the mark. Only the writer waits for frames: the threads
    /// waiting for room wait for the queue to shrink, which queuing does not.
    fn wake_writer(&self, q: &mut SendQueue) {
        if q.writer_asleep {
            q.writer_asleep = false;
            self.changed.notify_all();
        }
    }

    /// Why the writer stopped: the overflow if that was it, else `other`.
    fn stop_reason(&self, other: String) -> String {
        if self.queue.lock().expect("link queue").overflowed {
            format!("the peer reads nothing back: {CONTROL_QUEUE_LIMIT} acknowledgements and other control frames are queued for it")
        } else {
            other
        }
    }

    /// Queues a frame behind earlier bulk frames; `on_sent` runs when it is written (or never,
    /// if the link dies first: the engine's loss handling covers that write).
    pub fn send_bulk(&self, msg: Message, on_sent: Option<OnSent>) {
        let mut q = self.queue.lock().expect("link queue");
        if !q.closed {
            q.bulk_bytes += msg.payload_len();
            q.bulk.push_back((msg, on_sent));
            self.wake_writer(&mut q);
        }
    }

    /// Bulk bytes queued and not yet handed to the kernel.
    pub fn queued_bytes(&self) -> usize {
        self.queue.lock().expect("link queue").bulk_bytes
    }

    /// Writes wait for room in some send queue (in the replica, see `replica/send_queue.rs`):
    /// the writer calls its `on_room` once this queue holds no more than the limit, after the
    /// next bulk frame it takes (writes wait only while a queue, with what the replica is about
    /// to add to it, holds more, so that frame comes).
    pub fn want_room(&self) {
        self.queue.lock().expect("link queue").room_wanted = true;
    }

    /// Blocks while more than `limit_bytes` of bulk frames are queued (back-pressure: writers
    /// pass [`BULK_QUEUE_LIMIT_BYTES`], a resync may keep further below it).
    pub fn wait_for_room(&self, limit_bytes: usize) {
        let mut q = self.queue.lock().expect("link queue");
        while !q.closed && q.bulk_bytes > limit_bytes {
            q = self.changed.wait(q).expect("link queue");
        }
    }

    /// Closes the queue: the writer takes nothing more, and threads waiting for room go on.
    /// No system call but a wake-up, so it runs under the engine's lock; the socket is written
    /// and broken by [`Closing::finish`], once that lock is released. The last words are the
    /// queued control frames (this node's State among them) and a Disconnect with `reason`, so
    /// the peer learns why and reaches the same decision (a split brain is then reported on
    /// both sides); a queue closed before has none.
    pub fn close(self: &Arc<Self>, reason: &str) -> Closing {
        let mut q = self.queue.lock().expect("link queue");
        let last_words = (!q.closed).then(|| {
            let mut words: Vec<Message> = q.control.drain(..).collect();
            words.push(Message::Disconnect { reason: reason.to_owned() });
            words
        });
        q.closed = true;
        q.control.clear();
        q.bulk.clear();
        q.bulk_bytes = 0;
        self.changed.notify_all();
        Closing { link: self.clone(), last_words }
    }

    /// Sends everything queued, control first, until the link is closed or a write fails;
    /// `on_room` runs when writes wait for room and the queue has it (see
    /// [`PeerLink::want_room`]). Returns why it stopped.
    pub fn run_writer(&self, on_room: impl Fn()) -> String {
        let mut sent_callbacks: Vec<OnSent> = Vec::new();
        loop {
            let mut q = self.queue.lock().expect("link queue");
            let mut room_made = false;
            let (msg, on_sent) = loop {
                if q.closed {
                    drop(q);
                    return self.stop_reason("link closed".to_owned());
                }
                if let Some(msg) = q.control.pop_front() {
                    break (Some(msg), None);
                }
                if let Some((msg, on_sent)) = q.bulk.pop_front() {
                    q.bulk_bytes -= msg.payload_len();
                    if q.room_wanted && q.bulk_bytes <= BULK_QUEUE_LIMIT_BYTES {
                        q.room_wanted = false;
                        room_made = true;
                    }
                    self.changed.notify_all();
                    break (Some(msg), on_sent);
                }
                if !sent_callbacks.is_empty() || self.out_has_buffered() {
                    break (None, None);
                }
                q.writer_asleep = true;
                q = self.changed.wait(q).expect("link queue");
                q.writer_asleep = false;
            };
            let mut out_guard = self.out.lock().expect("link writer");
            drop(q);
            let Some(out) = out_guard.as_mut() else { return "link closed".to_owned() };
            let result = match msg {
                Some(msg) => {
                    let len = msg.payload_len() as u64;
                    out.write(&msg).map(|()| {
                        self.sent_bytes.fetch_add(len, Ordering::Relaxed);
                    })
                }
                // Queue drained: push buffered frames to the kernel and report them sent.
                None => out.w.flush(),
            };
            if let Err(e) = result {
                drop(out_guard);
                return self.stop_reason(format!("send failed: {e}"));
            }
            sent_callbacks.extend(on_sent);
            let flushed = out.w.buffer().is_empty();
            drop(out_guard);
            if room_made {
                on_room();
            }
            if flushed {
                sent_callbacks.drain(..).for_each(|callback| callback());
            }
        }
    }

    fn out_has_buffered(&self) -> bool {
        self.out.try_lock().map_or(true, |out| out.as_ref().is_some_and(|o| !o.w.buffer().is_empty()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A link over a loopback connection, and the peer's end of it.
    fn link() -> (PeerLink, TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (stream, _) = listener.accept().unwrap();
        (PeerLink::new(stream, None).unwrap(), peer)
    }

    #[test]
    fn writes_waiting_for_room_hear_once_the_queue_is_back_at_its_limit() {
        let (link, mut peer) = link();
        let link = std::sync::Arc::new(link);
        let rooms = std::sync::Arc::new(AtomicU64::new(0));
        let writer = {
            let (link, rooms) = (link.clone(), rooms.clone());
            std::thread::spawn(move || link.run_writer(move || {
                rooms.fetch_add(1, Ordering::SeqCst);
            }))
        };
        // 24 MiB: more than the queue's limit and what the sockets buffer while the peer reads
        // nothing.
        let payload = bytes::Bytes::from(vec![0u8; 64 << 10]);
        let frame = |id| Message::Data { id, epoch: 1, offset: 0, fua: false, payload: payload.clone() };
        let mut encoded = Vec::new();
        crate::wire::write_message(&mut encoded, &frame(0)).unwrap();
        let total = 384 * encoded.len() as u64;
        for id in 0..384 {
            link.send_bulk(frame(id), None);
        }
        link.want_room();
        std::thread::sleep(Duration::from_millis(100));
        assert!(link.queued_bytes() > BULK_QUEUE_LIMIT_BYTES);
        assert_eq!(rooms.load(Ordering::SeqCst), 0, "no room while the queue stays full");
        let received = std::sync::Arc::new(AtomicU64::new(0));
        let reader = {
            let received = received.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 16];
                while let Ok(n @ 1..) = std::io::Read::read(&mut peer, &mut buf) {
                    received.fetch_add(n as u64, Ordering::SeqCst);
                }
            })
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while link.queued_bytes() > 0 {
            assert!(std::time::Instant::now() < deadline, "the queue never drained");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(rooms.load(Ordering::SeqCst), 1, "told once, when the queue was back at its limit");
        // The last frame left the queue before its send ended: closed meanwhile, the writer
        // would end on the send's error instead.
        while received.load(Ordering::SeqCst) < total {
            assert!(std::time::Instant::now() < deadline, "the peer never got every frame");
            std::thread::sleep(Duration::from_millis(10));
        }
        link.close("test over").finish();
        assert_eq!(writer.join().unwrap(), "link closed");
        drop(reader);
    }

    /// Frames queued one at a time, each once the last was received, so the writer has gone
    /// back to sleep (or is on its way) each time: every one must wake it. A lost wake-up
    /// leaves a frame queued, and the peer's read times out.
    #[test]
    fn every_frame_queued_while_the_writer_sleeps_wakes_it() {
        let (link, mut peer) = link();
        let link = std::sync::Arc::new(link);
        let writer = {
            let link = link.clone();
            std::thread::spawn(move || link.run_writer(|| {}))
        };
        peer.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let payload = bytes::Bytes::from(vec![7u8; 4096]);
        for id in 0..2000u64 {
            if id % 3 == 0 {
                link.queue_control(Message::Ping);
                let msg = crate::wire::read_message(&mut peer).expect("the ping arrives");
                assert!(matches!(msg, Message::Ping), "{msg:?}");
            } else {
                link.send_bulk(Message::Data { id, epoch: 1, offset: 0, fua: false, payload: payload.clone() }, None);
                let msg = crate::wire::read_message(&mut peer).expect("the frame arrives");
                assert!(matches!(msg, Message::Data { id: got, .. } if got == id), "{msg:?}");
            }
        }
        link.close("test over").finish();
        assert_eq!(writer.join().unwrap(), "link closed");
    }

    /// Closing runs under the engine's lock and writes nothing; the last words leave, and the
    /// socket breaks, only with `finish`.
    #[test]
    fn a_closed_link_says_its_last_words_only_once_finished() {
        let (link, mut peer) = link();
        let link = std::sync::Arc::new(link);
        link.queue_control(Message::Ping);
        link.send_bulk(Message::Data { id: 1, epoch: 1, offset: 0, fua: false, payload: bytes::Bytes::from(vec![7u8; 4096]) }, None);
        let closing = link.close("split brain");
        assert_eq!(link.queued_bytes(), 0, "the bulk frames are dropped at once");
        peer.set_nonblocking(true).unwrap();
        let mut byte = [0u8; 1];
        let before = std::io::Read::read(&mut peer, &mut byte);
        assert!(matches!(&before, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock), "nothing sent yet: {before:?}");
        assert!(link.close("again").last_words.is_none(), "a closed link has nothing more to say");
        closing.finish();
        peer.set_nonblocking(false).unwrap();
        let first = crate::wire::read_message(&mut peer).expect("the queued control frame");
        assert!(matches!(first, Message::Ping), "{first:?}");
        let goodbye = crate::wire::read_message(&mut peer).expect("the goodbye");
        assert!(matches!(&goodbye, Message::Disconnect { reason } if reason == "split brain"), "{goodbye:?}");
        assert!(crate::wire::read_message(&mut peer).is_err(), "then the socket is shut down");
    }

    #[test]
    fn a_control_queue_that_reaches_its_limit_closes_and_says_why() {
        let (link, peer) = link();
        // No writer runs: nothing drains the queue, as when the peer reads nothing back.
        for _ in 0..CONTROL_QUEUE_LIMIT {
            link.queue_control(Message::Ping);
        }
        assert!(!link.queue.lock().unwrap().closed);
        link.queue_control(Message::Ping);
        assert!(link.queue.lock().unwrap().closed, "one more closes the link");
        let reason = link.run_writer(|| {});
        assert!(reason.contains("reads nothing back"), "{reason}");
        let mut byte = [0u8; 1];
        assert!(matches!(std::io::Read::read(&mut &peer, &mut byte), Ok(0) | Err(_)), "the socket was shut down");
    }
}
