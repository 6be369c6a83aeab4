//! Keeps `docs/protocol.md` true: its example bytes are what the crate encodes and decodes,
//! and every error code, validation limit and default it states matches the code.

use prost::Message;
use vigil_wire::frame::{
    MAX_ACTION_BYTES, MAX_CONTENT_TYPE_BYTES, MAX_EVENT_TYPE_BYTES, MAX_OP_ID_BYTES,
    MAX_STREAM_ID_BYTES,
};
use vigil_wire::pb::{self, guest_frame::Kind};
use vigil_wire::{
    encode_guest_frame, encode_host_frame, FrameDecoder, GuestFrameView, DEFAULT_MAX_FRAME_BYTES,
    DEFAULT_VSOCK_PORT, MAX_FRAME_BYTES_LIMIT, PROTOCOL_VERSION,
};

fn doc() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md");
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// "08 0a 06" style, as the page writes bytes.
fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The page writes a frame as `prefix` `message`.
fn doc_form(frame: &[u8]) -> String {
    format!("`{}` `{}`", hex(&frame[..1]), hex(&frame[1..]))
}

#[test]
fn example_bytes_match_the_encoder_and_decode() {
    let doc = doc();
    let hello = pb::GuestFrame {
        kind: Some(Kind::Hello(pb::Hello {
            protocol_version: 1,
            stream_id: "s1".into(),
            ..pb::Hello::default()
        })),
    };
    let event = pb::GuestFrame {
        kind: Some(Kind::Event(pb::Event {
            guest_seq: 1,
            r#type: "t".into(),
            ..pb::Event::default()
        })),
    };
    let ack = pb::HostFrame {
        kind: Some(pb::host_frame::Kind::Ack(pb::Ack { durable_seq: 1 })),
    };
    let mut h = Vec::new();
    encode_guest_frame(&hello, &mut h);
    let mut e = Vec::new();
    encode_guest_frame(&event, &mut e);
    let mut a = Vec::new();
    encode_host_frame(&ack, &mut a);
    for bytes in [&h, &e, &a] {
        assert!(
            doc.contains(&doc_form(bytes)),
            "docs/protocol.md lacks {}",
            doc_form(bytes)
        );
    }
    // And the host decodes the guest examples, back to back, as those messages.
    let mut stream = h.clone();
    stream.extend_from_slice(&e);
    let mut got = Vec::new();
    FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES)
        .feed(&stream, &mut |v: GuestFrameView<'_>| {
            got.push(v.to_owned_frame());
            Ok::<(), ()>(())
        })
        .unwrap();
    assert_eq!(got, [hello, event]);
    assert_eq!(pb::HostFrame::decode(&a[1..]).unwrap(), ack);
}

#[test]
fn error_codes_limits_and_defaults_match() {
    let doc = doc();
    // Every Error code, with its number, is in the table.
    let mut n = 1;
    while let Ok(code) = pb::error::Code::try_from(n) {
        let row = format!("| `{}` | {n} |", code.as_str_name());
        assert!(doc.contains(&row), "docs/protocol.md lacks the row {row}");
        n += 1;
    }
    assert!(n > 11, "codes 1..=11 at least");
    for decision in [
        pb::policy_decision::Decision::Allow,
        pb::policy_decision::Decision::Deny,
        pb::policy_decision::Decision::Hold,
    ] {
        let text = format!("`{}` = {}", decision.as_str_name(), decision as i32);
        assert!(doc.contains(&text), "docs/protocol.md lacks {text}");
    }
    let facts = [
        format!("this is version **{PROTOCOL_VERSION}**"),
        format!("port **{DEFAULT_VSOCK_PORT}**"),
        format!(
            "{} bytes by default",
            DEFAULT_MAX_FRAME_BYTES
                .to_string()
                .replace("65536", "65,536")
        ),
        format!(
            "may be set up to {} and",
            MAX_FRAME_BYTES_LIMIT
                .to_string()
                .replace("262144", "262,144")
        ),
        format!("`stream_id` is 1..={MAX_STREAM_ID_BYTES} bytes"),
        format!("`type` is 1..={MAX_EVENT_TYPE_BYTES} bytes"),
        format!(
            "`op_id` ≤ {MAX_OP_ID_BYTES} bytes, `content_type` ≤ {MAX_CONTENT_TYPE_BYTES} bytes"
        ),
        format!("`action` ≤ {MAX_ACTION_BYTES} bytes"),
    ];
    for fact in facts {
        assert!(doc.contains(&fact), "docs/protocol.md lacks {fact:?}");
    }
}
