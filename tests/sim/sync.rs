//! Connections and resync: the handshake (the higher id dials), link liveness (pings, the
//! read timeout), what a lost link leaves behind (`connection::drop_peer`), the decision at
//! connect (`connection::reconsider`, plus the split-brain policies of issue #4), the bitmap
//! exchange, and the resync itself (`resync.rs`).

use super::disk::Crashed;
use super::network::{Envelope, Msg, StateMsg};
use super::node::{fresh_uuid, holds, Link, Node, ResyncRun, PING_INTERVAL, READ_TIMEOUT, TICK};
use super::replication::RESYNC_BLOCKS_PER_EPOCH;
use super::world::{Ctx, NodeEvent};
use super::{BLOCKS, BLOCK_BYTES, MS};
use blkrepl::core::split_brain::{resolve, SbResolution, SbSide};
use blkrepl::core::states::{DiskState, ReplState, Role};
use blkrepl::core::sync_decision::{decide, same_uuid, SyncDecision, UuidView, UUID_JUST_CREATED};
use blkrepl::meta::MetaFlags;

impl Node {
    /// A frame arrived from the network.
    pub fn receive(&mut self, cx: &mut Ctx, env: Envelope) -> Result<(), Crashed> {
        let (peer, conn) = (env.from, env.conn);
        match env.msg {
            Msg::Hello => {
                let p = self.peer(peer);
                if self.id < peer && p.want_connect && p.link.is_none() {
                    self.attach(cx, peer, conn);
                    cx.send(self.id, peer, conn, Msg::HelloReply);
                } else {
                    cx.send(self.id, peer, conn, Msg::Refuse);
                }
            }
            Msg::HelloReply => {
                let p = self.peer(peer);
                if p.dialing.is_some_and(|(c, _)| c == conn) && p.want_connect && p.link.is_none() {
                    self.attach(cx, peer, conn);
                }
            }
            Msg::Refuse => {
                let p = self.peer_mut(peer);
                if p.dialing.is_some_and(|(c, _)| c == conn) {
                    p.dialing = None;
                }
            }
            msg => {
                let now = cx.now;
                if let Some(link) = self.link_on(peer, conn) {
                    link.last_received = now;
                    link.inbox.push_back(msg);
                    self.pump_stream(cx, peer)?;
                }
            }
        }
        Ok(())
    }

    fn attach(&mut self, cx: &mut Ctx, peer: u8, conn: u64) {
        cx.log(self.id, || format!("connected to n{peer} #{conn}"));
        let p = self.peer_mut(peer);
        p.dialing = None;
        p.departed = false;
        p.link = Some(Link::new(conn, cx.now));
    }

    /// Pings, read timeouts, dialing.
    pub fn tick(&mut self, cx: &mut Ctx) -> Result<(), Crashed> {
        for i in 0..self.peers.len() {
            let id = self.peers[i].id;
            if let Some(link) = self.peers[i].link.as_mut() {
                if cx.now - link.last_received >= READ_TIMEOUT {
                    self.drop_peer(cx, id, "timeout", true)?;
                } else if cx.now >= link.next_ping {
                    link.next_ping = cx.now + PING_INTERVAL;
                    let conn = link.conn;
                    cx.send(self.id, id, conn, Msg::Ping { sent_at: cx.now });
                }
                continue;
            }
            let p = &mut self.peers[i];
            if p.dialing.is_some_and(|(_, started)| cx.now - started >= READ_TIMEOUT) {
                p.dialing = None;
            }
            if self.id > id && p.want_connect && p.dialing.is_none() && !cx.net.is_cut(self.id, id) {
                let conn = cx.ids.conn();
                p.dialing = Some((conn, cx.now));
                cx.send(self.id, id, conn, Msg::Hello);
            }
        }
        self.schedule(cx, TICK, NodeEvent::Tick);
        Ok(())
    }

    /// Tears down the link to `peer` (the engine's `drop_peer`): everything it may lack goes
    /// into its bitmap, a primary starts a new generation (persisted before any write waiting
    /// for that peer completes), and those writes finish without it.
    pub fn drop_peer(&mut self, cx: &mut Ctx, peer: u8, reason: &str, close: bool) -> Result<(), Crashed> {
        let Some(mut link) = self.peer_mut(peer).link.take() else { return Ok(()) };
        cx.log(self.id, || format!("lost n{peer} ({}): {reason}", link.repl));
        if close {
            cx.send(self.id, peer, link.conn, Msg::Close);
        }
        if let Some(slot) = self.peer(peer).slot {
            let mut lacking: Vec<(u64, u64)> = link.tl.drain_lost().into_iter().map(|s| (s.offset, s.len)).collect();
            lacking.extend(self.inflight.pending_for(peer));
            let primary = self.role == Role::Primary;
            let fresh = fresh_uuid(cx);
            let meta = self.meta();
            for (offset, len) in lacking {
                meta.bitmaps[slot].set_range(offset, len);
            }
            if primary {
                let mut generation = meta.generation();
                generation.new_current(fresh, true, true, &[slot]);
                meta.set_generation(generation);
                meta.persist()?;
                self.acknowledge(fresh);
            }
        }
        let mut finished = self.inflight.peer_lost(peer);
        finished.sort_by_key(|f| f.id);
        for f in finished {
            self.finish(cx, f)?;
        }
        Ok(())
    }

    /// The peer's State: remember it, end a resync it confirms, and decide what to do with it.
    pub fn on_state(&mut self, cx: &mut Ctx, peer: u8, state: StateMsg) -> Result<(), Crashed> {
        if state.role == Role::Primary
            && self.role != Role::Primary
            && holds(state.current, &state.ancestors, self.acknowledged)
        {
            self.acknowledge(state.current);
        }
        let link = self.link_mut(peer).expect("linked");
        link.role = state.role;
        link.disk = state.disk;
        link.state = Some(state);
        let (source, disk, idle) = (link.repl == ReplState::SyncSource, link.disk, link.pending_sync.is_none());
        let finished = match link.resync.as_mut() {
            Some(run) if source => {
                run.target_started |= disk == DiskState::Inconsistent;
                let started = run.target_started || !cx.rules.amend.resync_end_after_target_started;
                disk == DiskState::UpToDate && idle && started
            }
            _ => false,
        };
        if finished {
            self.finish_as_source(cx, peer)?;
        }
        self.reconsider(cx, peer)
    }

    /// Re-runs the decision with every idle connected data peer (after a promotion).
    pub fn reconsider_peers(&mut self, cx: &mut Ctx) -> Result<(), Crashed> {
        let ids: Vec<u8> = self.peers.iter().filter(|p| p.link.is_some()).map(|p| p.id).collect();
        for id in ids {
            self.reconsider(cx, id)?;
        }
        Ok(())
    }

    /// This node's side of the connect-time decision with `peer`.
    pub fn uuid_view(&self, peer: u8) -> UuidView {
        let meta = self.meta.as_ref().expect("data node");
        let slot = self.peer(peer).slot.expect("data peer");
        UuidView {
            node_id: self.id,
            current: meta.sb.uuids.current,
            bitmap_for_peer: meta.sb.peers[slot].bitmap_uuid,
            history: meta.sb.uuids.history,
            crashed_primary: self.crashed_primary,
            data_position: (0, 0),
            cache_lost: false,
            is_primary: self.role == Role::Primary,
            inconsistent: self.disk == DiskState::Inconsistent,
        }
    }

    /// The engine's `reconsider`: decide with a connected data peer whose state is known and
    /// whose link is idle. A split brain goes through the resource's policies (and the
    /// operator's `--discard-my-data`); what they cannot resolve leaves the pair StandAlone.
    fn reconsider(&mut self, cx: &mut Ctx, peer: u8) -> Result<(), Crashed> {
        let p = self.peer(peer);
        let Some(link) = &p.link else { return Ok(()) };
        let Some(theirs) = &link.state else { return Ok(()) };
        if self.witness
            || p.witness
            || !matches!(link.repl, ReplState::Off | ReplState::Established)
            || link.pending_sync.is_some()
        {
            return Ok(());
        }
        let mine = self.uuid_view(peer);
        let their_view = UuidView {
            node_id: peer,
            current: theirs.current,
            bitmap_for_peer: theirs.bitmap_uuid,
            history: theirs.history,
            crashed_primary: theirs.crashed_primary,
            is_primary: theirs.role == Role::Primary,
            inconsistent: theirs.disk == DiskState::Inconsistent,
            data_position: (0, 0),
            cache_lost: false,
        };
        let decision = decide(&mine, &their_view);
        cx.stats.unrelated += u64::from(decision == SyncDecision::Unrelated);
        let plan = match decision {
            SyncDecision::SplitBrain => {
                let slot = p.slot.expect("data peer");
                let me = SbSide {
                    node_id: self.id,
                    is_primary: mine.is_primary,
                    was_primary_at_split: mine.bitmap_for_peer & 1 != 0,
                    changed_blocks: self.meta.as_ref().expect("data node").bitmaps[slot].weight(),
                    discard_my_data: self.discard_my_data,
                };
                let them = SbSide {
                    node_id: peer,
                    is_primary: their_view.is_primary,
                    was_primary_at_split: their_view.bitmap_for_peer & 1 != 0,
                    changed_blocks: theirs.changed_blocks,
                    discard_my_data: theirs.discard_my_data,
                };
                let resolution = resolve(&cx.rules.split_brain, &me, &them);
                if matches!(resolution, SbResolution::Disconnect(_)) {
                    cx.stats.split_brains_stand_alone += 1;
                } else {
                    cx.stats.split_brains_resolved += 1;
                }
                match resolution {
                    SbResolution::DiscardMine => SyncDecision::BitmapTarget,
                    SbResolution::DiscardTheirs => SyncDecision::BitmapSource,
                    SbResolution::Disconnect(why) => return self.stand_alone(cx, peer, &format!("split brain: {why}")),
                }
            }
            // Only shared history, or none left to see: the victim the operator names gets
            // everything (`--discard-my-data`, or `invalidate`, with a full sync).
            SyncDecision::SplitBrainManual | SyncDecision::Unrelated if self.discard_my_data && !mine.is_primary => {
                SyncDecision::FullTarget
            }
            SyncDecision::SplitBrainManual | SyncDecision::Unrelated
                if theirs.discard_my_data && !their_view.is_primary =>
            {
                SyncDecision::FullSource
            }
            other => other,
        };
        match plan {
            SyncDecision::InSync => {
                let fresh_pair = mine.inconsistent && their_view.inconsistent;
                let peer_disk = theirs.disk;
                let link = self.link_mut(peer).expect("linked");
                link.repl = ReplState::Established;
                // Consistent data a good peer agrees with is UpToDate (the engine's rule). An
                // Outdated node (it left cleanly) is UpToDate again once in sync with an
                // UpToDate peer.
                let vouches = match self.disk {
                    DiskState::Consistent => matches!(peer_disk, DiskState::UpToDate | DiskState::Consistent),
                    DiskState::Outdated => peer_disk == DiskState::UpToDate,
                    _ => false,
                };
                if !fresh_pair && vouches {
                    self.disk = DiskState::UpToDate;
                }
                Ok(())
            }
            d if d.is_source() || d.is_target() => {
                cx.log(self.id, || {
                    format!(
                        "with n{peer}: {d:?} (mine {:X}/{:X}, theirs {:X}/{:X})",
                        mine.current, mine.bitmap_for_peer, their_view.current, their_view.bitmap_for_peer
                    )
                });
                let slot = self.peer(peer).slot.expect("data peer");
                let blocks: Vec<usize> = (0..BLOCKS)
                    .filter(|b| self.meta.as_ref().expect("data node").bitmaps[slot].test_block(*b as u64))
                    .collect();
                let link = self.link_mut(peer).expect("linked");
                link.pending_sync = Some(d);
                let conn = link.conn;
                cx.send(self.id, peer, conn, Msg::BitmapBlocks(blocks));
                Ok(())
            }
            other => self.stand_alone(cx, peer, &format!("{other:?}")),
        }
    }

    /// Stops connecting to `peer` until the operator says otherwise.
    fn stand_alone(&mut self, cx: &mut Ctx, peer: u8, reason: &str) -> Result<(), Crashed> {
        self.peer_mut(peer).want_connect = false;
        self.drop_peer(cx, peer, &format!("StandAlone: {reason}"), true)
    }

    /// The peer's bitmap for this node: merged into ours, so both resync the union.
    pub fn on_bitmap(&mut self, cx: &mut Ctx, peer: u8, blocks: &[usize]) -> Result<(), Crashed> {
        let slot = self.peer(peer).slot.expect("data peer");
        for &block in blocks {
            self.meta().mark(slot, block);
        }
        let Some(decision) = self.link_mut(peer).expect("linked").pending_sync.take() else {
            return self.drop_peer(cx, peer, "bitmap received without a sync decision", true);
        };
        let full = matches!(decision, SyncDecision::FullSource | SyncDecision::FullTarget);
        if full {
            self.meta().bitmaps[slot].set_all();
        }
        if full && decision.is_source() {
            let theirs = self.link(peer).and_then(|l| l.state).expect("decided on the peer's State");
            let (_, ancestors) = self.lineage();
            let asked = self.discard_my_data || theirs.discard_my_data;
            // The target adopted this node's generation at the end of a resync whose end this
            // node missed, and it has moved on since (a primary does when it loses the link).
            let missed_end = theirs.disk != DiskState::Inconsistent
                && self.meta().sb.peers[slot].bitmap_uuid != 0
                && holds(0, &ancestors, theirs.current);
            super::checkers::on_full_sync(self.id, peer, asked, missed_end, cx);
        }
        if decision.is_source() {
            *if full { &mut cx.stats.full_syncs } else { &mut cx.stats.bitmap_resyncs } += 1;
        }
        if decision == SyncDecision::FullSource && cx.rules.amend.full_sync_resumes_by_bitmap {
            let target_current =
                self.link(peer).and_then(|l| l.state.as_ref()).expect("decided on the peer's State").current;
            let meta = self.meta();
            meta.sb.peers[slot].bitmap_uuid = target_current & !1;
            meta.persist()?;
        }
        self.discard_my_data = false;
        // A target that was Inconsistent already (an interrupted resync) says nothing new.
        let target_started = self.link(peer).expect("linked").disk == DiskState::Inconsistent;
        let run = ResyncRun {
            id: cx.ids.resync(),
            total_blocks: self.meta().bitmaps[slot].weight(),
            cursor: 0,
            draining: None,
            target_started,
        };
        cx.log(self.id, || format!("resync with n{peer}: {decision:?}, {} blocks", run.total_blocks));
        let link = self.link_mut(peer).expect("linked");
        link.resync = Some(run);
        let conn = link.conn;
        if decision.is_target() {
            link.repl = ReplState::SyncTarget;
            self.disk = DiskState::Inconsistent;
            let meta = self.meta();
            meta.sb.flags.remove(MetaFlags::CONSISTENT);
            meta.persist()
        } else {
            link.repl = ReplState::SyncSource;
            self.meta().persist_bitmap(slot)?;
            self.schedule(cx, 0, NodeEvent::ResyncStep { peer, conn });
            Ok(())
        }
    }

    /// One step of the resync source (the engine's `run_source` loop): walk the bitmap, read
    /// each dirty block under the resync lock and send it; after a pass, wait for its barrier
    /// and rescan; when nothing is left, hand over the generation.
    pub fn resync_step(&mut self, cx: &mut Ctx, peer: u8, conn: u64) {
        let slot = self.peer(peer).slot.expect("data peer");
        let Some(link) = self.link_on(peer, conn).filter(|l| l.repl == ReplState::SyncSource) else { return };
        let barrier_pending = |epoch: u64| link.barriers.iter().any(|(e, _)| *e <= epoch);
        let run = link.resync.as_ref().expect("resync running");
        if run.draining.is_some_and(barrier_pending) {
            self.schedule(cx, 10 * MS, NodeEvent::ResyncStep { peer, conn });
            return;
        }
        let run = link.resync.as_mut().expect("resync running");
        if run.draining.take().is_some() {
            run.cursor = 0;
        }
        let cursor = run.cursor;
        match self.meta().bitmaps[slot].next_run(cursor, 1) {
            None if cursor == 0 => {
                let uuids = self.meta().sb.uuids;
                cx.send(self.id, peer, conn, Msg::ResyncDone { current: uuids.current, history: uuids.history });
            }
            None => {
                let epoch = self.send_barriers(cx);
                self.link_on(peer, conn).and_then(|l| l.resync.as_mut()).expect("resync running").draining =
                    Some(epoch);
                self.schedule(cx, 10 * MS, NodeEvent::ResyncStep { peer, conn });
            }
            Some((block, _)) => {
                let block = block as usize;
                let (offset, len) = (block as u64 * BLOCK_BYTES, BLOCK_BYTES);
                if self.inflight.overlaps(offset, len) {
                    self.schedule(cx, MS, NodeEvent::ResyncStep { peer, conn });
                    return;
                }
                self.resync_lock = Some(block);
                let latency = super::replication::disk_latency(cx);
                self.schedule(cx, latency, NodeEvent::ResyncRead { peer, conn, block });
            }
        }
    }

    /// The resync source read `block`: unlock it and send what it holds.
    pub fn resync_read(&mut self, cx: &mut Ctx, peer: u8, conn: u64, block: usize) -> Result<(), Crashed> {
        self.resync_lock = None;
        let version = self.data.blocks()[block];
        let epoch = self.epoch;
        if let Some(link) = self.link_on(peer, conn).filter(|l| l.repl == ReplState::SyncSource) {
            link.tl.record(epoch, block as u64 * BLOCK_BYTES, BLOCK_BYTES);
            link.resync.as_mut().expect("resync running").cursor = block as u64 + 1;
            let close = link.tl.open_epoch_writes() >= RESYNC_BLOCKS_PER_EPOCH;
            cx.send(self.id, peer, conn, Msg::ResyncData { block, version });
            if close {
                self.send_barriers(cx);
            }
            let pace = cx.rng.range(MS, 10 * MS);
            self.schedule(cx, pace, NodeEvent::ResyncStep { peer, conn });
        }
        self.start_waiting(cx)
    }

    /// The source finished: adopt its generation (the engine's `finish_as_target`).
    pub fn finish_as_target(&mut self, cx: &mut Ctx, peer: u8, current: u64, history: [u64; 4]) -> Result<(), Crashed> {
        let fresh = same_uuid(self.meta().sb.uuids.current, UUID_JUST_CREATED);
        let repl = self.link(peer).expect("linked").repl;
        if repl != ReplState::SyncTarget && !(fresh && repl == ReplState::Established) {
            return self.drop_peer(cx, peer, "ResyncDone while not SyncTarget", true);
        }
        if self.role == Role::Primary {
            return self.drop_peer(cx, peer, "ResyncDone on a Primary", true);
        }
        let slot = self.peer(peer).slot.expect("data peer");
        let meta = self.meta();
        let mut generation = meta.generation();
        generation.resync_finished_as_target(slot, current, history);
        meta.set_generation(generation);
        meta.bitmaps[slot].clear_all();
        meta.sb.flags.insert(MetaFlags::CONSISTENT | MetaFlags::WAS_UP_TO_DATE);
        self.acknowledge(current);
        self.clear_crash_marker();
        let meta = self.meta();
        meta.persist_bitmap(slot)?;
        meta.persist()?;
        self.disk = DiskState::UpToDate;
        let link = self.link_mut(peer).expect("linked");
        link.repl = ReplState::Established;
        link.resync = None;
        cx.log(self.id, || format!("resync from n{peer} finished: UpToDate"));
        Ok(())
    }

    /// The target confirmed it is UpToDate (the engine's `finish_as_source`).
    fn finish_as_source(&mut self, cx: &mut Ctx, peer: u8) -> Result<(), Crashed> {
        let slot = self.peer(peer).slot.expect("data peer");
        let meta = self.meta();
        let mut generation = meta.generation();
        generation.resync_finished_as_source(slot);
        meta.set_generation(generation);
        self.clear_crash_marker();
        let meta = self.meta();
        meta.persist_bitmap(slot)?;
        meta.persist()?;
        let link = self.link_mut(peer).expect("linked");
        link.repl = ReplState::Established;
        link.resync = None;
        cx.log(self.id, || format!("resync to n{peer} finished"));
        Ok(())
    }
}
