//! Helpers shared by the journal's integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use vigil_journal::segment::{encode_record, list_segments, scan_segment, HEADER_LEN, MAGIC};
use vigil_journal::{AckOut, EventIn, HostKey, JournalConfig, JournalHandle, SigningMode};

pub fn key() -> HostKey {
    HostKey::from_seed([42; 32])
}

pub fn guest_event(token: u64, cell: &str, run: &str, stream: &str, seq: u64) -> EventIn {
    let mut claims = BTreeMap::new();
    claims.insert("agent".to_owned(), "test-agent".to_owned());
    EventIn {
        token,
        cell_id: Arc::from(cell),
        run_id: Arc::from(run),
        stream_id: Some(Arc::from(stream)),
        guest_seq: Some(seq),
        event_type: "com.example.step".to_owned(),
        op_id: Some("trace:span".to_owned()),
        content_type: "application/json".to_owned(),
        data: format!(r#"{{"n":{seq},"text":"hello"}}"#).into_bytes(),
        guest_time_unix_nano: Some(1_700_000_000_000_000_000 + seq),
        recv_time_unix_nano: 1_700_000_000_500_000_000 + seq,
        claims: Some(Arc::new(claims)),
    }
}

pub fn own_event(cell: &str, run: &str) -> EventIn {
    EventIn {
        token: 0,
        cell_id: Arc::from(cell),
        run_id: Arc::from(run),
        stream_id: None,
        guest_seq: None,
        event_type: "dev.vigil.cell.observability.v1.guest.agent_silenced".to_owned(),
        op_id: None,
        content_type: "application/json".to_owned(),
        data: br#"{"cellId":"c1","elapsedMs":10001}"#.to_vec(),
        guest_time_unix_nano: None,
        recv_time_unix_nano: 1_700_000_001_000_000_000,
        claims: None,
    }
}

pub fn fixed_clock() -> u64 {
    1_700_000_002_000_000_000
}

pub fn config(dir: &Path, mode: SigningMode) -> JournalConfig {
    let mut c = JournalConfig::new(dir, "host-a");
    c.signing = mode;
    c.clock = fixed_clock;
    c
}

/// Collects acks until `want` (token, stream) reaches `seq`, or panics after 10 s.
pub fn wait_ack(h: &JournalHandle, stream: &str, seq: u64) -> Vec<AckOut> {
    let mut got = Vec::new();
    loop {
        let acks = h
            .acks
            .recv_timeout(Duration::from_secs(10))
            .expect("ack in time");
        let done = acks
            .iter()
            .any(|a| &*a.stream_id == stream && a.durable_seq >= seq);
        got.extend(acks);
        if done {
            return got;
        }
    }
}

/// Writes `n` guest events of stream "s1" (plus one own event) and shuts down.
pub fn write_events(dir: &Path, mode: SigningMode, key: HostKey, n: u64) {
    let h = vigil_journal::spawn(config(dir, mode), key).unwrap();
    for seq in 1..=n {
        h.input
            .send(vec![guest_event(1, "c1", "r1", "s1", seq)])
            .unwrap();
    }
    h.input.send(vec![own_event("c1", "r1")]).unwrap();
    wait_ack(&h, "s1", n);
    h.shutdown().unwrap();
}

/// All record payloads of the journal, in order.
pub fn payloads(dir: &Path) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (i, p) in list_segments(dir).unwrap() {
        let s = scan_segment(i, &p).unwrap();
        for k in 0..s.records.len() {
            out.push(s.payload(k).to_vec());
        }
    }
    out
}

/// Rewrites the single segment of `dir` with `payloads` (valid CRCs).
pub fn rewrite_single_segment(dir: &Path, payloads: &[Vec<u8>]) {
    let segs = list_segments(dir).unwrap();
    assert_eq!(segs.len(), 1);
    let mut buf = Vec::new();
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&1u32.to_le_bytes());
    buf.extend_from_slice(&0u32.to_le_bytes());
    assert_eq!(buf.len() as u64, HEADER_LEN);
    for p in payloads {
        encode_record(p, &mut buf);
    }
    std::fs::write(&segs[0].1, buf).unwrap();
}
