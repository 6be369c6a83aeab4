//! The per-connection protocol step, free of sockets and io_uring: feed one received chunk to
//! the connection's `FrameDecoder`, turn each frame into hand-off outputs (events copied once
//! into the chunk's [`GuestBatch`]) or host frames (inline policy denials), and map a bad
//! frame to the close reason, error code and sentence the guest is sent.

use std::collections::VecDeque;
use std::sync::Arc;

use vigil_wire::frame::{FeedError, FrameDecoder, FrameError, GuestFrameView};
use vigil_wire::pb;

use crate::cell::{CellInfo, CellSlot};
use crate::output::{ConnId, DrainOutput, GuestBatch};
use crate::stats::{CloseReason, DrainStats};

/// Reason sent with the DENY of an inline-answered policy query.
pub const INLINE_DENY_REASON: &str = "op-control not available: fail-closed";

/// Typical encoded size of an event frame, used to size a chunk's event vector once (a
/// guess too small only costs a regrowth; too large, a little unused capacity).
const EVENT_BYTES_GUESS: usize = 256;

/// What the drain knows about one connection's protocol state.
#[derive(Debug)]
pub struct Session {
    pub conn: ConnId,
    pub cell: Arc<CellInfo>,
    pub slot: Arc<CellSlot>,
    pub decoder: FrameDecoder,
    /// Set by the connection's Hello.
    pub stream_id: Option<Arc<str>>,
}

/// Why a chunk ended the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("the guest sent a bad frame: {0}")]
    Frame(#[from] FrameError),
}

impl Violation {
    /// The close reason (for counters) and the Error frame sent before closing.
    pub fn to_close(&self) -> (CloseReason, pb::HostFrame) {
        let Violation::Frame(err) = self;
        let reason = match err {
            FrameError::TooLarge { .. } => CloseReason::FrameTooLarge,
            FrameError::BadVarint => CloseReason::BadVarint,
            FrameError::HelloRequired { .. } => CloseReason::HelloRequired,
            FrameError::DuplicateHello => CloseReason::SecondHello,
            FrameError::UnsupportedVersion { .. } => CloseReason::UnsupportedVersion,
            FrameError::BadHello { .. } => CloseReason::BadHello,
            FrameError::BadEvent { .. } => CloseReason::BadEvent,
            FrameError::BadPolicyQuery { .. } => CloseReason::BadPolicyQuery,
            FrameError::EmptyFrame
            | FrameError::Undecodable { .. }
            | FrameError::UnknownKind
            | FrameError::Truncated { .. }
            | FrameError::Poisoned => CloseReason::Undecodable,
        };
        (reason, err.to_host_frame())
    }
}

/// Sink error of the decode callback. The callback never refuses a frame (all validation is
/// the decoder's), so this has no values.
#[derive(Debug)]
enum Never {}

/// Who answers a chunk's policy queries.
pub enum Policy<'a> {
    /// Handed to the caller as [`DrainOutput::PolicyQuery`].
    Caller,
    /// Denied on the drain thread (no op-control: fail-closed).
    DenyInline,
    /// Answered on the drain thread by the op-control gate.
    Gate(&'a mut dyn crate::policy::PolicyGate),
}

/// Answers one query from the gate: allow and deny go out now (a deny is audited); a hold is
/// audited and answered later when the gate releases it.
#[allow(clippy::too_many_arguments)]
fn answer_with_gate(
    gate: &mut dyn crate::policy::PolicyGate,
    conn: crate::output::ConnId,
    cell: &Arc<crate::cell::CellInfo>,
    q: &vigil_wire::frame::PolicyQueryView<'_>,
    now: u64,
    stats: &DrainStats,
    pending: &mut VecDeque<DrainOutput>,
    send_queue: &mut Vec<u8>,
) {
    use crate::policy::GateAnswer;
    let answer = gate.query(
        conn.token(),
        q.query_id,
        &cell.cell_id,
        &cell.run_id,
        q.op_id,
        q.action,
        now,
    );
    let (decision, reason, label) = match answer {
        GateAnswer::Allow => (pb::policy_decision::Decision::Allow, String::new(), None),
        GateAnswer::Deny { reason, label } => {
            (pb::policy_decision::Decision::Deny, reason, Some(label))
        }
        GateAnswer::Hold => (
            pb::policy_decision::Decision::Hold,
            "operation paused: held until resumed or terminated".to_owned(),
            Some("hold"),
        ),
    };
    let frame = pb::HostFrame {
        kind: Some(pb::host_frame::Kind::PolicyDecision(pb::PolicyDecision {
            query_id: q.query_id,
            decision: decision as i32,
            reason,
        })),
    };
    vigil_wire::frame::encode_host_frame(&frame, send_queue);
    DrainStats::add(&stats.host_frames_sent, 1);
    if let Some(label) = label {
        pending.push_back(DrainOutput::PolicyAudit {
            conn,
            cell: Arc::clone(cell),
            op_id: q.op_id.to_owned(),
            action: q.action.to_owned(),
            decision: label,
            held_ns: 0,
        });
    }
}

/// Decodes one received chunk. Outputs go to `pending` in frame order (events of the chunk
/// gathered into batches); host frames to send go to `send_queue`. Returns the violation that
/// must close the connection, if any (frames before it were still delivered).
pub fn process_chunk(
    session: &mut Session,
    data: &[u8],
    now: u64,
    mut policy: Policy<'_>,
    stats: &DrainStats,
    pending: &mut VecDeque<DrainOutput>,
    send_queue: &mut Vec<u8>,
) -> Option<Violation> {
    let mut events = crate::output::EventBuilder::default();
    let mut heartbeats = 0u32;
    let mut frames = 0u64;
    let Session {
        conn,
        cell,
        slot,
        decoder,
        stream_id,
    } = session;
    let (conn, cell_ref) = (*conn, &*cell);
    let result = decoder.feed(data, &mut |view: GuestFrameView<'_>| -> Result<(), Never> {
        frames += 1;
        match view {
            GuestFrameView::Event(e) => {
                events.reserve(data.len(), data.len() / EVENT_BYTES_GUESS + 1);
                events.push(
                    e.guest_seq,
                    e.event_type,
                    e.op_id,
                    e.content_type,
                    e.payload,
                    e.guest_time_unix_nano,
                );
            }
            GuestFrameView::Heartbeat(_) => heartbeats += 1,
            GuestFrameView::Hello(h) => {
                let sid: Arc<str> = Arc::from(h.stream_id.as_str());
                *stream_id = Some(Arc::clone(&sid));
                pending.push_back(DrainOutput::Hello {
                    conn,
                    cell: Arc::clone(cell_ref),
                    stream_id: sid,
                    protocol_version: h.protocol_version,
                    agent_name: h.agent_name,
                    agent_version: h.agent_version,
                    claims: h.claims.into_iter().collect(),
                });
            }
            GuestFrameView::PolicyQuery(q) => {
                if let Policy::Gate(gate) = &mut policy {
                    answer_with_gate(
                        &mut **gate,
                        conn,
                        cell_ref,
                        &q,
                        now,
                        stats,
                        pending,
                        send_queue,
                    );
                } else if matches!(policy, Policy::DenyInline) {
                    let frame = pb::HostFrame {
                        kind: Some(pb::host_frame::Kind::PolicyDecision(pb::PolicyDecision {
                            query_id: q.query_id,
                            decision: pb::policy_decision::Decision::Deny as i32,
                            reason: INLINE_DENY_REASON.to_owned(),
                        })),
                    };
                    vigil_wire::frame::encode_host_frame(&frame, send_queue);
                    DrainStats::add(&stats.policy_denied_inline, 1);
                    DrainStats::add(&stats.host_frames_sent, 1);
                } else if let Some(sid) = stream_id.as_ref() {
                    let sid = Arc::clone(sid);
                    flush_events(
                        pending,
                        conn,
                        cell_ref,
                        &sid,
                        now,
                        &mut events,
                        &mut heartbeats,
                    );
                    pending.push_back(DrainOutput::PolicyQuery {
                        conn,
                        cell: Arc::clone(cell_ref),
                        stream_id: sid,
                        query_id: q.query_id,
                        op_id: q.op_id.to_owned(),
                        action: q.action.to_owned(),
                    });
                }
            }
            GuestFrameView::ExecutorStats(s) => {
                if let Some(sid) = stream_id.as_ref() {
                    let sid = Arc::clone(sid);
                    flush_events(
                        pending,
                        conn,
                        cell_ref,
                        &sid,
                        now,
                        &mut events,
                        &mut heartbeats,
                    );
                }
                pending.push_back(DrainOutput::ExecutorStats {
                    conn,
                    cell: Arc::clone(cell_ref),
                    stats: s,
                });
            }
        }
        Ok(())
    });
    slot.record_chunk(now, frames, data.len() as u64);
    DrainStats::add(&stats.frames, frames);
    if let Some(sid) = session.stream_id.clone() {
        flush_events(
            pending,
            conn,
            &session.cell,
            &sid,
            now,
            &mut events,
            &mut heartbeats,
        );
    }
    match result {
        Ok(()) => None,
        Err(FeedError::Frame(err)) => Some(Violation::Frame(err)),
        Err(FeedError::Sink(never)) => match never {},
    }
}

fn flush_events(
    pending: &mut VecDeque<DrainOutput>,
    conn: ConnId,
    cell: &Arc<CellInfo>,
    stream_id: &Arc<str>,
    now: u64,
    events: &mut crate::output::EventBuilder,
    heartbeats: &mut u32,
) {
    if events.is_empty() {
        return;
    }
    pending.push_back(DrainOutput::Batch(GuestBatch {
        conn,
        cell: Arc::clone(cell),
        stream_id: Arc::clone(stream_id),
        received_mono_ns: now,
        heartbeats: std::mem::take(heartbeats),
        events: events.take(),
        credit: None,
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use vigil_wire::frame::{encode_guest_frame, HostFrameDecoder, PROTOCOL_VERSION};

    fn session() -> Session {
        Session {
            conn: ConnId {
                slot: 3,
                generation: 1,
            },
            cell: Arc::new(CellInfo {
                index: 0,
                cell_id: Arc::from("c"),
                run_id: Arc::from("r"),
            }),
            slot: CellSlot::shared(),
            decoder: FrameDecoder::new(vigil_wire::frame::DEFAULT_MAX_FRAME_BYTES),
            stream_id: None,
        }
    }

    fn frame(kind: pb::guest_frame::Kind) -> Vec<u8> {
        let mut out = Vec::new();
        encode_guest_frame(&pb::GuestFrame { kind: Some(kind) }, &mut out);
        out
    }

    fn hello() -> Vec<u8> {
        frame(pb::guest_frame::Kind::Hello(pb::Hello {
            protocol_version: PROTOCOL_VERSION,
            stream_id: "s1".into(),
            ..Default::default()
        }))
    }

    fn event(seq: u64) -> Vec<u8> {
        frame(pb::guest_frame::Kind::Event(pb::Event {
            guest_seq: seq,
            r#type: "t".into(),
            payload: vec![seq as u8; 40],
            ..Default::default()
        }))
    }

    fn query(id: u64) -> Vec<u8> {
        frame(pb::guest_frame::Kind::PolicyQuery(pb::PolicyQuery {
            query_id: id,
            op_id: "a:b".into(),
            action: "exec".into(),
        }))
    }

    #[test]
    fn frames_split_across_chunks_come_out_whole_and_in_order() {
        let mut s = session();
        let stats = DrainStats::default();
        let mut bytes = hello();
        for seq in 1..=20 {
            bytes.extend(event(seq));
        }
        let mut pending = VecDeque::new();
        let mut sends = Vec::new();
        // Feed in awkward 7-byte chunks: every frame straddles chunks.
        for (i, chunk) in bytes.chunks(7).enumerate() {
            let v = process_chunk(
                &mut s,
                chunk,
                i as u64,
                Policy::Caller,
                &stats,
                &mut pending,
                &mut sends,
            );
            assert!(v.is_none());
        }
        assert!(sends.is_empty());
        let mut seqs = Vec::new();
        let mut saw_hello = false;
        for out in pending {
            match out {
                DrainOutput::Hello { stream_id, .. } => {
                    assert!(seqs.is_empty());
                    assert_eq!(&*stream_id, "s1");
                    saw_hello = true;
                }
                DrainOutput::Batch(b) => {
                    assert_eq!(&*b.stream_id, "s1");
                    seqs.extend(b.events.iter().map(|e| e.guest_seq));
                    assert!(b
                        .events
                        .iter()
                        .all(|e| e.payload() == vec![e.guest_seq as u8; 40]));
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(saw_hello);
        assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
        assert_eq!(DrainStats::get(&stats.frames), 21);
        assert_eq!(s.slot.frames.load(std::sync::atomic::Ordering::Relaxed), 21);
        assert_eq!(
            s.slot.bytes.load(std::sync::atomic::Ordering::Relaxed),
            bytes.len() as u64
        );
    }

    #[test]
    fn one_chunk_keeps_events_and_queries_in_frame_order() {
        let mut s = session();
        let stats = DrainStats::default();
        let mut bytes = hello();
        bytes.extend(event(1));
        bytes.extend(query(9));
        bytes.extend(event(2));
        let (mut pending, mut sends) = (VecDeque::new(), Vec::new());
        assert!(process_chunk(
            &mut s,
            &bytes,
            5,
            Policy::Caller,
            &stats,
            &mut pending,
            &mut sends
        )
        .is_none());
        let kinds: Vec<&str> = pending
            .iter()
            .map(|o| match o {
                DrainOutput::Hello { .. } => "hello",
                DrainOutput::Batch(b) if b.events[0].guest_seq == 1 => "batch1",
                DrainOutput::Batch(_) => "batch2",
                DrainOutput::PolicyQuery { query_id: 9, .. } => "query",
                _ => "other",
            })
            .collect();
        assert_eq!(kinds, ["hello", "batch1", "query", "batch2"]);
    }

    #[test]
    fn inline_deny_answers_with_a_host_frame_and_no_output() {
        let mut s = session();
        let stats = DrainStats::default();
        let mut bytes = hello();
        bytes.extend(query(4));
        let (mut pending, mut sends) = (VecDeque::new(), Vec::new());
        assert!(process_chunk(
            &mut s,
            &bytes,
            1,
            Policy::DenyInline,
            &stats,
            &mut pending,
            &mut sends
        )
        .is_none());
        assert!(!pending
            .iter()
            .any(|o| matches!(o, DrainOutput::PolicyQuery { .. })));
        let mut frames = Vec::new();
        HostFrameDecoder::new(1024)
            .feed(&sends, &mut |f| -> Result<(), ()> {
                frames.push(f);
                Ok(())
            })
            .unwrap();
        assert_eq!(
            frames,
            vec![pb::HostFrame {
                kind: Some(pb::host_frame::Kind::PolicyDecision(pb::PolicyDecision {
                    query_id: 4,
                    decision: pb::policy_decision::Decision::Deny as i32,
                    reason: INLINE_DENY_REASON.into(),
                }))
            }]
        );
        assert_eq!(DrainStats::get(&stats.policy_denied_inline), 1);
    }

    #[test]
    fn violations_map_to_reasons_and_error_frames_after_delivering_earlier_frames() {
        let stats = DrainStats::default();
        // Event before Hello.
        let mut s = session();
        let (mut pending, mut sends) = (VecDeque::new(), Vec::new());
        let v = process_chunk(
            &mut s,
            &event(1),
            0,
            Policy::Caller,
            &stats,
            &mut pending,
            &mut sends,
        )
        .unwrap();
        let (reason, frame) = v.to_close();
        assert_eq!(reason, CloseReason::HelloRequired);
        match frame.kind {
            Some(pb::host_frame::Kind::Error(e)) => {
                assert_eq!(e.code, pb::error::Code::HelloRequired as i32);
                assert!(!e.message.is_empty());
            }
            other => panic!("{other:?}"),
        }
        // Good frames, then a duplicate Hello: the good ones are still handed off.
        let mut s = session();
        let mut bytes = hello();
        bytes.extend(event(1));
        bytes.extend(hello());
        let (mut pending, mut sends) = (VecDeque::new(), Vec::new());
        let v = process_chunk(
            &mut s,
            &bytes,
            0,
            Policy::Caller,
            &stats,
            &mut pending,
            &mut sends,
        )
        .unwrap();
        assert_eq!(v.to_close().0, CloseReason::SecondHello);
        assert!(pending
            .iter()
            .any(|o| matches!(o, DrainOutput::Batch(b) if b.events.len() == 1)));
        // A bad varint.
        let mut s = session();
        let (mut pending, mut sends) = (VecDeque::new(), Vec::new());
        let v = process_chunk(
            &mut s,
            &[0xFF; 11],
            0,
            Policy::Caller,
            &stats,
            &mut pending,
            &mut sends,
        )
        .unwrap();
        assert_eq!(v.to_close().0, CloseReason::BadVarint);
    }
}
