//! Chain and dedupe state of the journal: per (cell, run) the last sequence and record hash
//! (so chains continue), per (cell, run, stream) the durable guest_seq watermark (so resends
//! are acked, not rewritten), and the batch-head chain. Rebuilt from segments on start.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use crate::event::{Record, BATCH_HEAD_TYPE, GENESIS_HASH};

/// Durable guest_seqs remembered above a gap, per stream (1,024). Guests send in order, so a
/// gap only appears when a guest skips numbers; past this many, further out-of-order seqs
/// are still written and acked by watermark but not remembered for dedupe (counted in
/// [`ChainState::ooo_overflow`]), so a resend of one of them would be written twice.
pub const MAX_OUT_OF_ORDER_PER_STREAM: usize = 1024;

/// Last link of one run's chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunChain {
    pub last_sequence: u64,
    pub last_hash: String,
}

#[derive(Debug, Default, Clone)]
struct StreamMark {
    contiguous: u64,
    above: BTreeSet<u64>,
}

/// (cell, run, stream, highest contiguous durable guest_seq).
pub type StreamWatermark = (Arc<str>, Arc<str>, Arc<str>, u64);

type RunKey = (Arc<str>, Arc<str>);
type StreamKey = (Arc<str>, Arc<str>, Arc<str>);

/// Everything needed to continue chains and dedupe after a restart.
#[derive(Debug, Default, Clone)]
pub struct ChainState {
    runs: HashMap<RunKey, RunChain>,
    streams: HashMap<StreamKey, StreamMark>,
    /// Number of the last batch head written (0: none).
    pub last_batch: u64,
    /// Record hash of the last batch head (GENESIS before the first).
    pub last_batch_hash: String,
    /// Out-of-order seqs not remembered because a stream's set was full.
    pub ooo_overflow: u64,
}

impl ChainState {
    pub fn new() -> Self {
        Self {
            last_batch_hash: GENESIS_HASH.to_owned(),
            ..Self::default()
        }
    }

    /// Next `(sequence, prevhash)` of a run.
    pub fn next_link(&self, cell: &Arc<str>, run: &Arc<str>) -> (u64, String) {
        match self.runs.get(&(cell.clone(), run.clone())) {
            Some(c) => (c.last_sequence + 1, c.last_hash.clone()),
            None => (1, GENESIS_HASH.to_owned()),
        }
    }

    pub fn advance_run(&mut self, cell: &Arc<str>, run: &Arc<str>, sequence: u64, hash: String) {
        self.runs.insert(
            (cell.clone(), run.clone()),
            RunChain {
                last_sequence: sequence,
                last_hash: hash,
            },
        );
    }

    pub fn run(&self, cell: &str, run: &str) -> Option<&RunChain> {
        self.runs.get(&(Arc::from(cell), Arc::from(run)))
    }

    /// Whether (cell, run, stream, seq) is already durable.
    pub fn is_durable(&self, cell: &Arc<str>, run: &Arc<str>, stream: &Arc<str>, seq: u64) -> bool {
        self.streams
            .get(&(cell.clone(), run.clone(), stream.clone()))
            .is_some_and(|m| seq <= m.contiguous || m.above.contains(&seq))
    }

    /// Records that (cell, run, stream, seq) is durable.
    pub fn mark_durable(&mut self, cell: &Arc<str>, run: &Arc<str>, stream: &Arc<str>, seq: u64) {
        let m = self
            .streams
            .entry((cell.clone(), run.clone(), stream.clone()))
            .or_default();
        if seq <= m.contiguous {
            return;
        }
        if seq == m.contiguous + 1 {
            m.contiguous = seq;
            while m.above.remove(&(m.contiguous + 1)) {
                m.contiguous += 1;
            }
        } else if m.above.len() < MAX_OUT_OF_ORDER_PER_STREAM {
            m.above.insert(seq);
        } else {
            self.ooo_overflow += 1;
        }
    }

    /// Highest contiguous durable guest_seq of a stream (0: none).
    pub fn watermark(&self, cell: &Arc<str>, run: &Arc<str>, stream: &Arc<str>) -> u64 {
        self.streams
            .get(&(cell.clone(), run.clone(), stream.clone()))
            .map_or(0, |m| m.contiguous)
    }

    /// Number of runs with a chain.
    pub fn run_count(&self) -> usize {
        self.runs.len()
    }

    /// `(cell, run, stream, watermark)` of every stream.
    pub fn watermarks(&self) -> Vec<StreamWatermark> {
        self.streams
            .iter()
            .map(|((c, r, s), m)| (c.clone(), r.clone(), s.clone(), m.contiguous))
            .collect()
    }

    /// Folds one durable record (read back from a segment) into the state.
    pub fn apply_record(&mut self, rec: &Record, hash: &str) {
        let sequence = rec.sequence.parse::<u64>().unwrap_or(0);
        if rec.ty == BATCH_HEAD_TYPE && rec.cellid.is_none() {
            self.last_batch = sequence;
            hash.clone_into(&mut self.last_batch_hash);
            return;
        }
        let (Some(cell), Some(run)) = (&rec.cellid, &rec.runid) else {
            return;
        };
        let cell: Arc<str> = Arc::from(cell.as_str());
        let run: Arc<str> = Arc::from(run.as_str());
        self.advance_run(&cell, &run, sequence, hash.to_owned());
        if let (Some(stream), Some(seq)) = (
            &rec.streamid,
            rec.guestseq.as_ref().and_then(|s| s.parse::<u64>().ok()),
        ) {
            self.mark_durable(&cell, &run, &Arc::from(stream.as_str()), seq);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watermark_is_contiguous_and_dedupe_sees_gaps() {
        let mut s = ChainState::new();
        let (c, r, st): (Arc<str>, Arc<str>, Arc<str>) = ("c".into(), "r".into(), "s".into());
        s.mark_durable(&c, &r, &st, 1);
        s.mark_durable(&c, &r, &st, 3);
        assert_eq!(s.watermark(&c, &r, &st), 1);
        assert!(s.is_durable(&c, &r, &st, 3));
        assert!(!s.is_durable(&c, &r, &st, 2));
        s.mark_durable(&c, &r, &st, 2);
        assert_eq!(s.watermark(&c, &r, &st), 3);
        assert_eq!(s.next_link(&c, &r), (1, GENESIS_HASH.to_owned()));
    }
}
