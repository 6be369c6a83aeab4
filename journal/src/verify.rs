//! Offline verification of a journal directory with public keys alone: segment headers,
//! record CRCs, signatures (per-event DSSE or signed batch heads, by `keyid`), the hash
//! chain and gap-free sequence of every run, the batch-head chain, and the `durable.mark`.
//! The first fault is returned as one sentence naming segment, offset, cell, run and what.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use ed25519_dalek::VerifyingKey;

use crate::dsse::{open_material, DsseError};
use crate::event::{
    record_hash, BatchHeadData, Record, BATCH_HEAD_TYPE, GENESIS_HASH, SIGNED_EXT_ATTRS,
};
use crate::key::key_id_of;
use crate::segment::{list_segments, scan_segment, RecordFault, SegmentError};
use crate::writer::read_mark;

/// What a clean verification covered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifySummary {
    pub segments: usize,
    pub events: u64,
    pub batch_heads: u64,
    pub runs: usize,
    /// Runs whose first surviving event is not sequence 1 because retention removed older
    /// segments: their chain is checked from that event on.
    pub runs_anchored: usize,
    /// keyids that signed something.
    pub keys_used: BTreeSet<String>,
    /// Whether a `durable.mark` was found and the journal reaches it.
    pub durable_mark_checked: bool,
}

/// What is wrong at the fault.
#[derive(Debug, thiserror::Error)]
pub enum FaultKind {
    #[error("the segment cannot be read: {0}")]
    Segment(#[from] SegmentError),
    #[error("{0}")]
    Frame(RecordFault),
    #[error("the journal ends with a torn record ({0}); the events in it were never acknowledged")]
    TornTail(RecordFault),
    #[error("the record is not a vigil CloudEvent: {0}")]
    NotCloudEvent(String),
    #[error("signature check failed: {0}")]
    Signature(#[from] DsseError),
    #[error("the record's content was altered after signing (its attributes or data no longer match the signed payload)")]
    AlteredContent,
    #[error("the event is not signed (no dssematerial and no batchhead)")]
    Unsigned,
    #[error("signedextattrs is `{0}`, expected `{SIGNED_EXT_ATTRS}`")]
    SignedAttrs(String),
    #[error("sequence gap: expected {expected}, found {found} (an event of this run was dropped)")]
    SequenceGap { expected: u64, found: u64 },
    #[error("sequence went back: expected {expected}, found {found} (events of this run were reordered or duplicated)")]
    SequenceBack { expected: u64, found: u64 },
    #[error(
        "first event of the run has sequence {found}, expected 1 (earlier events are missing)"
    )]
    MissingStart { found: u64 },
    #[error("prevhash does not match the hash of the previous event of this run (an event was altered, dropped or reordered)")]
    ChainBroken,
    #[error("batch head {id} does not cover the events before it: {what}")]
    BatchMismatch { id: String, what: String },
    #[error("batch head chain broken: {what}")]
    BatchChain { what: String },
    #[error("{count} events at the end are not covered by a signed batch head (the batch was cut before its head)")]
    UncoveredTail { count: usize },
    #[error("durable.mark says segment {mark_segment} was durable up to offset {mark_offset}, but the journal ends at segment {segment} offset {end}: the tail was cut")]
    CutTail {
        mark_segment: u64,
        mark_offset: u64,
        segment: u64,
        end: u64,
    },
}

/// The first fault found by [`verify`].
#[derive(Debug, thiserror::Error)]
#[error("{}: offset {offset}: cell {}, run {}: {kind}", segment.display(), cell.as_deref().unwrap_or("-"), run.as_deref().unwrap_or("-"))]
pub struct VerifyFault {
    pub segment: PathBuf,
    pub offset: u64,
    pub cell: Option<String>,
    pub run: Option<String>,
    pub kind: Box<FaultKind>,
}

struct Pending {
    id: String,
    hash: String,
    head: String,
    offset: u64,
    segment: PathBuf,
    cell: Option<String>,
    run: Option<String>,
}

/// Verifies the journal in `dir` against trusted `pubkeys` (several for key rotation).
pub fn verify(dir: &Path, pubkeys: &[VerifyingKey]) -> Result<VerifySummary, VerifyFault> {
    let trusted: Vec<(String, VerifyingKey)> = pubkeys.iter().map(|k| (key_id_of(k), *k)).collect();
    let fault = |segment: &Path, offset, rec: Option<&Record>, kind| VerifyFault {
        segment: segment.to_owned(),
        offset,
        cell: rec.and_then(|r| r.cellid.clone()),
        run: rec.and_then(|r| r.runid.clone()),
        kind: Box::new(kind),
    };
    let segments = list_segments(dir).map_err(|e| fault(dir, 0, None, e.into()))?;
    let mut sum = VerifySummary {
        segments: segments.len(),
        ..VerifySummary::default()
    };
    let retention_cut = segments.first().is_some_and(|(i, _)| *i > 0);
    let mut runs: HashMap<(String, String), (u64, String)> = HashMap::new();
    let mut head_chain: Option<(u64, String)> = None;
    let mut pending: Vec<Pending> = Vec::new();
    let mut end = (0u64, 0u64);
    let count = segments.len();
    for (si, (index, path)) in segments.into_iter().enumerate() {
        let scan = scan_segment(index, &path).map_err(|e| fault(&path, 0, None, e.into()))?;
        for k in 0..scan.records.len() {
            let offset = scan.records[k].0;
            let bytes = scan.payload(k);
            let rec = Record::parse(bytes)
                .map_err(|e| fault(&path, offset, None, FaultKind::NotCloudEvent(e.to_string())))?;
            let f = |kind| fault(&path, offset, Some(&rec), kind);
            let hash = record_hash(bytes);
            if rec.ty == BATCH_HEAD_TYPE && rec.cellid.is_none() {
                let (body, keyid) =
                    open_material(rec.dssematerial.as_deref().unwrap_or(""), &trusted)
                        .map_err(|e| f(e.into()))?;
                sum.keys_used.insert(keyid);
                let data = rec.data.as_ref().map(|d| d.get().as_bytes());
                if data != Some(body.as_slice()) {
                    return Err(f(FaultKind::AlteredContent));
                }
                let head: BatchHeadData = serde_json::from_slice(&body)
                    .map_err(|e| f(FaultKind::NotCloudEvent(e.to_string())))?;
                if head.batch != rec.sequence || head.prevhash != rec.prevhash {
                    return Err(f(FaultKind::AlteredContent));
                }
                let n: u64 = rec.sequence.parse().unwrap_or(0);
                match &head_chain {
                    Some((last, last_hash)) => {
                        if n != last + 1 {
                            return Err(f(FaultKind::BatchChain {
                                what: format!("expected batch {}, found {n}", last + 1),
                            }));
                        }
                        if head.prevhash != *last_hash {
                            return Err(f(FaultKind::BatchChain {
                                what: "prevhash is not the hash of the previous batch head".into(),
                            }));
                        }
                    }
                    None if !retention_cut && (n != 1 || head.prevhash != GENESIS_HASH) => {
                        return Err(f(FaultKind::BatchChain {
                            what: format!("first batch head is number {n}, expected 1"),
                        }));
                    }
                    None => {}
                }
                head_chain = Some((n, hash));
                // Events before the first surviving head may belong to a removed head.
                if let Some(p) = pending.iter().find(|p| p.head != rec.id) {
                    if !(retention_cut && sum.batch_heads == 0) {
                        return Err(VerifyFault {
                            segment: p.segment.clone(),
                            offset: p.offset,
                            cell: p.cell.clone(),
                            run: p.run.clone(),
                            kind: Box::new(FaultKind::BatchMismatch {
                                id: rec.id.clone(),
                                what: format!("event {} names batch head {}", p.id, p.head),
                            }),
                        });
                    }
                }
                let listed: Vec<(String, String)> = pending
                    .drain(..)
                    .filter(|p| p.head == rec.id)
                    .map(|p| (p.id, p.hash))
                    .collect();
                if listed != head.events {
                    let what = match listed.iter().zip(&head.events).position(|(a, b)| a != b) {
                        Some(i) => format!(
                            "event {} at position {i} has a different hash or order than signed",
                            listed[i].0
                        ),
                        None => format!(
                            "it signs {} events but {} precede it",
                            head.events.len(),
                            listed.len()
                        ),
                    };
                    return Err(f(FaultKind::BatchMismatch {
                        id: rec.id.clone(),
                        what,
                    }));
                }
                sum.batch_heads += 1;
                continue;
            }
            let (Some(cell), Some(run)) = (rec.cellid.clone(), rec.runid.clone()) else {
                return Err(f(FaultKind::NotCloudEvent(
                    "an event without cellid or runid".into(),
                )));
            };
            if let Some(material) = &rec.dssematerial {
                let attrs = rec.signedextattrs.clone().unwrap_or_default();
                if attrs != SIGNED_EXT_ATTRS {
                    return Err(f(FaultKind::SignedAttrs(attrs)));
                }
                let (body, keyid) = open_material(material, &trusted).map_err(|e| f(e.into()))?;
                sum.keys_used.insert(keyid);
                let rebuilt = rec
                    .signed_payload()
                    .map_err(|e| f(FaultKind::NotCloudEvent(e.to_string())))?;
                if rebuilt != body {
                    return Err(f(FaultKind::AlteredContent));
                }
            } else if let Some(head) = &rec.batchhead {
                pending.push(Pending {
                    id: rec.id.clone(),
                    hash: hash.clone(),
                    head: head.clone(),
                    offset,
                    segment: path.clone(),
                    cell: Some(cell.clone()),
                    run: Some(run.clone()),
                });
            } else {
                return Err(f(FaultKind::Unsigned));
            }
            let found: u64 = rec.sequence.parse().unwrap_or(0);
            match runs.get(&(cell.clone(), run.clone())) {
                Some((last, last_hash)) => {
                    let expected = last + 1;
                    if found > expected {
                        return Err(f(FaultKind::SequenceGap { expected, found }));
                    }
                    if found < expected {
                        return Err(f(FaultKind::SequenceBack { expected, found }));
                    }
                    if rec.prevhash != *last_hash {
                        return Err(f(FaultKind::ChainBroken));
                    }
                }
                None => {
                    if found == 1 {
                        if rec.prevhash != GENESIS_HASH {
                            return Err(f(FaultKind::ChainBroken));
                        }
                    } else if retention_cut {
                        sum.runs_anchored += 1;
                    } else {
                        return Err(f(FaultKind::MissingStart { found }));
                    }
                }
            }
            runs.insert((cell, run), (found, hash));
            sum.events += 1;
        }
        if let Some((offset, what)) = scan.fault {
            let torn = si + 1 == count
                && matches!(what, RecordFault::ShortHeader | RecordFault::ShortPayload);
            let kind = if torn {
                FaultKind::TornTail(what)
            } else {
                FaultKind::Frame(what)
            };
            return Err(fault(&path, offset, None, kind));
        }
        end = (index, scan.good_end);
    }
    if let Some(p) = pending.first() {
        return Err(VerifyFault {
            segment: p.segment.clone(),
            offset: p.offset,
            cell: p.cell.clone(),
            run: p.run.clone(),
            kind: Box::new(FaultKind::UncoveredTail {
                count: pending.len(),
            }),
        });
    }
    if let Some((mark_segment, mark_offset)) = read_mark(dir) {
        if (mark_segment, mark_offset) > end {
            return Err(VerifyFault {
                segment: dir.to_owned(),
                offset: end.1,
                cell: None,
                run: None,
                kind: Box::new(FaultKind::CutTail {
                    mark_segment,
                    mark_offset,
                    segment: end.0,
                    end: end.1,
                }),
            });
        }
        sum.durable_mark_checked = true;
    }
    sum.runs = runs.len();
    Ok(sum)
}
