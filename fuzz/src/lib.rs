//! What the fuzz targets share with each other and with `make-corpus`, which writes their
//! seeds: an allocator that turns an oversized allocation into a crash, the frame protection of
//! an authenticated link, and the input format of the metadata target.

pub mod meta_input;

use blkrepl::wire::auth::{Role, Transcript};
use blkrepl::wire::seal::Protection;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The system allocator, with a cap on the size of any one allocation.
///
/// A length field that makes a parser allocate what it says, before checking it against what
/// follows, lets a few bytes of hostile input cost gigabytes. libFuzzer only notices that when
/// the process as a whole runs out of its RSS limit, and not at all when the memory is never
/// touched; this cap makes any single allocation above what the target may need a crash, with
/// the input that caused it.
pub struct CappedAlloc;

static CAP: AtomicUsize = AtomicUsize::new(usize::MAX);

#[global_allocator]
static ALLOCATOR: CappedAlloc = CappedAlloc;

/// Sets the largest allocation the target may make (called from its `init`).
pub fn cap_allocations(bytes: usize) {
    CAP.store(bytes, Ordering::Relaxed);
}

/// The frame protection of one fixed authenticated link, plain (frames MACed) or TLS (frames
/// sealed), as `(what the dialer sends with, what the acceptor receives with)`: the same key,
/// both at the first frame. Seeds written with the first pass the second, so the fuzzer starts
/// from frames that pass the MAC or open.
pub fn link_protection(tls: bool) -> (Protection, Protection) {
    let transcript = Transcript {
        resource: "r0",
        dialer_nonce: [1; 32],
        acceptor_nonce: [2; 32],
        dialer: 0,
        acceptor: 1,
        channel: tls.then_some([3; 32]),
    };
    let secret = b"a long shared secret";
    let (dialer_sends, _) = transcript.protection(secret, Role::Dialer);
    let (_, acceptor_receives) = transcript.protection(secret, Role::Acceptor);
    (dialer_sends, acceptor_receives)
}

impl CappedAlloc {
    fn check(layout: Layout) {
        let cap = CAP.load(Ordering::Relaxed);
        if layout.size() > cap {
            // No allocation from here on: formatting integers into stderr needs none.
            let _ = writeln!(
                std::io::stderr(),
                "blkrepl-fuzz: an allocation of {} bytes exceeds this target's cap of {cap} bytes",
                layout.size()
            );
            std::process::abort();
        }
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator after the size check.
unsafe impl GlobalAlloc for CappedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::check(layout);
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::check(layout);
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        Self::check(Layout::from_size_align_unchecked(new_size, layout.align()));
        System.realloc(ptr, layout, new_size)
    }
}
