//! The journal's input and output types (`EventIn`, `AckOut`) and the CloudEvent 1.0 record
//! (JSON structured mode) every event becomes: stable ids, host stamps, the guest's claims
//! kept apart, inline JSON or `data_base64`, and the exact bytes a signature covers.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

/// `type` of the record that closes a commit batch in batch signing mode.
pub const BATCH_HEAD_TYPE: &str = "dev.vigil.journal.v1.batch_head";
/// `prevhash` of the first event of a chain (64 zero hex digits).
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Value of the `signedextattrs` attribute in per-event signing mode.
pub const SIGNED_EXT_ATTRS: &str = "cellid,runid,streamid,guestseq,sequence,prevhash";

/// One event to make durable.
#[derive(Debug, Clone)]
pub struct EventIn {
    /// Opaque (the drain's connection id); returned in [`AckOut`].
    pub token: u64,
    pub cell_id: Arc<str>,
    pub run_id: Arc<str>,
    /// `None` for vigil's own events.
    pub stream_id: Option<Arc<str>>,
    /// `None` for vigil's own events.
    pub guest_seq: Option<u64>,
    pub event_type: String,
    pub op_id: Option<String>,
    pub content_type: String,
    /// Payload bytes as received.
    pub data: Vec<u8>,
    pub guest_time_unix_nano: Option<u64>,
    /// Host receive time (wall clock, passed in).
    pub recv_time_unix_nano: u64,
    /// The guest's Hello claims, kept apart from host stamps.
    pub claims: Option<Arc<BTreeMap<String, String>>>,
}

impl EventIn {
    /// `(stream, guest_seq)` when this is a guest event (both present).
    pub fn guest_key(&self) -> Option<(&Arc<str>, u64)> {
        match (&self.stream_id, self.guest_seq) {
            (Some(s), Some(q)) => Some((s, q)),
            _ => None,
        }
    }
}

/// After a batch is durable: the highest contiguous durable guest_seq of one (run, stream),
/// addressed to the connection (`token`) that sent events of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckOut {
    pub token: u64,
    pub run_id: Arc<str>,
    pub stream_id: Arc<str>,
    pub durable_seq: u64,
}

/// One stored record: a CloudEvent 1.0 in JSON structured mode. Field order here is the
/// serialization order, which the per-event signature depends on (see docs/journal.md).
/// Integers that can exceed the CloudEvents Integer range (32-bit) are decimal strings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub specversion: String,
    pub id: String,
    pub source: String,
    #[serde(rename = "type")]
    pub ty: String,
    pub time: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub datacontenttype: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub cellid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub runid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub streamid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub guestseq: Option<String>,
    pub sequence: String,
    pub recordedtime: String,
    pub prevhash: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub opid: Option<String>,
    /// The guest's own clock (a claim), RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub guesttime: Option<String>,
    /// The guest's Hello claims as a JSON-encoded object (a claim, never identity).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub guestclaims: Option<String>,
    /// Batch mode: id of the batch head record that signs this event's hash.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub batchhead: Option<String>,
    /// Only inside the signed payload, never in a stored record.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub datasha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub signedextattrs: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub dssematerial: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub data: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub data_base64: Option<String>,
}

/// Errors of encoding or decoding one record.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("record is not a valid CloudEvent JSON object: {0}")]
    Parse(#[source] serde_json::Error),
    #[error("could not serialize the record: {0}")]
    Serialize(#[source] serde_json::Error),
    #[error("record has a `data_base64` that is not valid base64")]
    BadBase64,
    #[error("record carries a `datasha256` attribute, which only signed payloads may have")]
    StrayDataHash,
}

impl Record {
    pub fn parse(bytes: &[u8]) -> Result<Self, EventError> {
        let r: Record = serde_json::from_slice(bytes).map_err(EventError::Parse)?;
        if r.datasha256.is_some() {
            return Err(EventError::StrayDataHash);
        }
        Ok(r)
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>, EventError> {
        serde_json::to_vec(self).map_err(EventError::Serialize)
    }

    /// The data bytes a signature covers: the exact UTF-8 of the `data` member as stored, or
    /// the decoded `data_base64`, or nothing.
    pub fn data_bytes(&self) -> Result<Vec<u8>, EventError> {
        use base64::Engine as _;
        if let Some(raw) = &self.data {
            return Ok(raw.get().as_bytes().to_vec());
        }
        if let Some(b64) = &self.data_base64 {
            return base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|_| EventError::BadBase64);
        }
        Ok(Vec::new())
    }

    /// The per-event signed payload: this record with `dssematerial`, `data` and
    /// `data_base64` removed and `datasha256` (hex SHA-256 of [`Record::data_bytes`]) added,
    /// serialized compactly in field order.
    pub fn signed_payload(&self) -> Result<Vec<u8>, EventError> {
        let data_hash = hex::encode(Sha256::digest(self.data_bytes()?));
        let mut view = self.clone();
        view.dssematerial = None;
        view.data = None;
        view.data_base64 = None;
        view.datasha256 = Some(data_hash);
        view.to_bytes()
    }
}

/// Chain hash of a stored record: lowercase hex SHA-256 of its exact bytes.
pub fn record_hash(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn id_hash(kind: &str, parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    h.update(kind.as_bytes());
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    // 128 bits: unique in practice, short enough to read.
    hex::encode(&h.finalize()[..16])
}

/// Stable id of a guest event: derived from (cell, run, stream, guest_seq).
pub fn guest_event_id(cell: &str, run: &str, stream: &str, guest_seq: u64) -> String {
    id_hash(
        "vigil-guest-event",
        &[
            cell.as_bytes(),
            run.as_bytes(),
            stream.as_bytes(),
            &guest_seq.to_le_bytes(),
        ],
    )
}

/// Stable id of one of vigil's own events: derived from (cell, run, sequence).
pub fn own_event_id(cell: &str, run: &str, sequence: u64) -> String {
    id_hash(
        "vigil-own-event",
        &[cell.as_bytes(), run.as_bytes(), &sequence.to_le_bytes()],
    )
}

/// Stable id of a batch head: derived from (host, batch number).
pub fn batch_head_id(host: &str, batch: u64) -> String {
    id_hash("vigil-batch-head", &[host.as_bytes(), &batch.to_le_bytes()])
}

/// RFC 3339 (UTC, nanoseconds) of a Unix time in nanoseconds.
pub fn rfc3339(unix_nano: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_nano))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_owned())
}

fn is_json_type(content_type: &str) -> bool {
    let base = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    base == "application/json" || base == "text/json" || base.ends_with("+json")
}

/// How a payload is stored: inline JSON (exact bytes when they hold no line break, else a
/// compact re-serialization) or base64.
pub fn encode_data(content_type: &str, data: &[u8]) -> (Option<Box<RawValue>>, Option<String>) {
    use base64::Engine as _;
    if is_json_type(content_type) {
        if let Ok(text) = std::str::from_utf8(data) {
            let trimmed = text.trim_matches(|c: char| c == ' ' || c == '\t');
            if !trimmed.contains(['\n', '\r']) {
                if let Ok(raw) = RawValue::from_string(trimmed.to_owned()) {
                    return (Some(raw), None);
                }
            } else if let Ok(value) = serde_json::from_str::<serde_json::Value>(text) {
                if let Ok(raw) = serde_json::value::to_raw_value(&value) {
                    return (Some(raw), None);
                }
            }
        }
    }
    if data.is_empty() {
        return (None, None);
    }
    (
        None,
        Some(base64::engine::general_purpose::STANDARD.encode(data)),
    )
}

/// `source` of a cell's events.
pub fn cell_source(host: &str, cell: &str) -> String {
    format!("vigil://{host}/cells/{cell}")
}

/// `source` of the journal's own records (batch heads).
pub fn journal_source(host: &str) -> String {
    format!("vigil://{host}/journal")
}

/// Builds the unsigned record of `ev` at `sequence` after `prevhash` (pure: every time is
/// passed in).
pub fn build_record(
    ev: &EventIn,
    host: &str,
    sequence: u64,
    prevhash: &str,
    recorded_unix_nano: u64,
) -> Record {
    let id = match ev.guest_key() {
        Some((stream, seq)) => guest_event_id(&ev.cell_id, &ev.run_id, stream, seq),
        None => own_event_id(&ev.cell_id, &ev.run_id, sequence),
    };
    let (data, data_base64) = encode_data(&ev.content_type, &ev.data);
    let guestclaims = ev
        .claims
        .as_ref()
        .map(|c| serde_json::to_string(&**c).unwrap_or_else(|_| "{}".to_owned()));
    Record {
        specversion: "1.0".to_owned(),
        id,
        source: cell_source(host, &ev.cell_id),
        ty: ev.event_type.clone(),
        time: rfc3339(ev.recv_time_unix_nano),
        datacontenttype: (!ev.content_type.is_empty()).then(|| ev.content_type.clone()),
        cellid: Some(ev.cell_id.to_string()),
        runid: Some(ev.run_id.to_string()),
        streamid: ev.guest_key().map(|(s, _)| s.to_string()),
        guestseq: ev.guest_key().map(|(_, q)| q.to_string()),
        sequence: sequence.to_string(),
        recordedtime: rfc3339(recorded_unix_nano),
        prevhash: prevhash.to_owned(),
        opid: ev.op_id.clone().filter(|o| !o.is_empty()),
        guesttime: ev.guest_time_unix_nano.filter(|t| *t != 0).map(rfc3339),
        guestclaims,
        batchhead: None,
        datasha256: None,
        signedextattrs: None,
        dssematerial: None,
        data,
        data_base64,
    }
}

/// The list a batch head signs: the chain hashes of the events of one commit batch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BatchHeadData {
    pub host: String,
    pub batch: String,
    pub prevhash: String,
    /// `[event id, record hash]` in journal order.
    pub events: Vec<(String, String)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_payload_inline_exact_and_binary_base64() {
        let (raw, b64) = encode_data("application/json", br#"{"b":1,"a":[2]}"#);
        assert_eq!(raw.unwrap().get(), r#"{"b":1,"a":[2]}"#);
        assert!(b64.is_none());
        let (raw, b64) = encode_data("application/json", b"{\"a\":\n1}");
        assert_eq!(raw.unwrap().get(), r#"{"a":1}"#);
        assert!(b64.is_none());
        let (raw, b64) = encode_data("application/json", b"{not json");
        assert!(raw.is_none());
        assert_eq!(b64.unwrap(), "e25vdCBqc29u");
        let (raw, b64) = encode_data("application/octet-stream", b"{}");
        assert!(raw.is_none() && b64.is_some());
    }

    #[test]
    fn ids_are_stable_and_distinct() {
        assert_eq!(
            guest_event_id("c", "r", "s", 1),
            guest_event_id("c", "r", "s", 1)
        );
        assert_ne!(
            guest_event_id("c", "r", "s", 1),
            guest_event_id("c", "r", "s", 2)
        );
        assert_ne!(
            guest_event_id("c", "rs", "", 1),
            guest_event_id("c", "r", "s", 1)
        );
        assert_ne!(own_event_id("c", "r", 1), guest_event_id("c", "r", "", 1));
    }

    #[test]
    fn rfc3339_has_nanoseconds() {
        assert_eq!(rfc3339(1_000_000_000_123), "1970-01-01T00:16:40.000000123Z");
    }
}
