//! Rate limit for "refused a connection from unregistered CID n" log lines: at most one line
//! per CID per minute, with the time passed in, so a guest retrying in a loop cannot flood the
//! log while every refusal is still counted.

use std::collections::HashMap;

/// Minimum spacing of two log lines about the same CID.
pub const REJECT_LOG_INTERVAL_NS: u64 = 60 * 1_000_000_000;

/// CIDs remembered at once. A host has at most a few thousand guests; when full, entries older
/// than the interval are forgotten, and if none are, further new CIDs are not logged (still
/// counted) until some age out.
pub const REJECT_LOG_CAPACITY: usize = 4096;

/// Remembers when each CID was last logged.
#[derive(Debug, Default)]
pub struct RejectLog {
    last_logged: HashMap<u32, u64>,
}

impl RejectLog {
    /// Whether a refusal of `cid` at `now_ns` should be logged; records it when so.
    pub fn should_log(&mut self, cid: u32, now_ns: u64) -> bool {
        if let Some(last) = self.last_logged.get_mut(&cid) {
            if now_ns.saturating_sub(*last) >= REJECT_LOG_INTERVAL_NS {
                *last = now_ns;
                return true;
            }
            return false;
        }
        if self.last_logged.len() >= REJECT_LOG_CAPACITY {
            self.last_logged
                .retain(|_, last| now_ns.saturating_sub(*last) < REJECT_LOG_INTERVAL_NS);
            if self.last_logged.len() >= REJECT_LOG_CAPACITY {
                return false;
            }
        }
        self.last_logged.insert(cid, now_ns);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_once_per_cid_per_minute() {
        let mut log = RejectLog::default();
        let t0 = 5_000_000_000;
        assert!(log.should_log(7, t0));
        assert!(!log.should_log(7, t0 + 1));
        assert!(!log.should_log(7, t0 + REJECT_LOG_INTERVAL_NS - 1));
        assert!(log.should_log(8, t0 + 1), "another CID is independent");
        assert!(log.should_log(7, t0 + REJECT_LOG_INTERVAL_NS));
        assert!(!log.should_log(7, t0 + REJECT_LOG_INTERVAL_NS + 10));
    }

    #[test]
    fn full_table_forgets_old_entries_and_refuses_when_all_fresh() {
        let mut log = RejectLog::default();
        for cid in 0..REJECT_LOG_CAPACITY as u32 {
            assert!(log.should_log(cid, 0));
        }
        // All fresh: a new CID is not logged.
        assert!(!log.should_log(999_999, 1));
        // A minute later the old ones age out and new CIDs are logged again.
        assert!(log.should_log(999_999, REJECT_LOG_INTERVAL_NS));
        assert_eq!(log.last_logged.len(), 1);
    }
}
