//! blkrepl: a replicated block device.
//!
//! Layering (arrows point one way): the CLI (`main.rs`) talks to a daemon through [`control`];
//! the daemon runs the [`engine`], whose drivers feed events into the pure state machines of
//! [`core`], which use the on-disk formats of [`meta`] and the frame formats of [`wire`].
//! [`frontend`] exposes the engine to hosts (NBD, ublk). Every disk access, data and metadata,
//! goes through [`disk`]. Sockets read their handshakes through [`handshake_stream`]. [`events`]
//! turns consecutive status snapshots into `blkrepl events` lines; [`control`] carries them.
//! [`handlers`] runs the resource file's commands on what those snapshots show; [`promoter`]
//! follows those lines and promotes, demotes and runs services as a client of the control
//! socket, above everything else. Under systemd the daemon reports readiness through
//! [`sd_notify`].

pub mod config;
pub mod control;
pub mod core;
pub mod daemon;
pub mod disk;
pub mod engine;
pub mod event_loop;
pub mod events;
pub mod frontend;
pub mod handlers;
pub mod handshake_stream;
pub mod manpage;
pub mod meta;
pub mod metrics;
pub mod promoter;
pub mod quiet_condvar;
pub mod replica;
pub mod sd_notify;
pub mod tls;
pub mod wire;
