//! Framing and decoding: streams split at every byte boundary and at random, zero-copy views
//! against prost's own decode (over randomised, deliberately odd encodings), every kind of
//! bad input, random bytes, and the reassembly buffer's bounds.

mod common;

use common::*;
use prost::Message;
use vigil_wire::frame::{
    decode_guest_frame, decode_guest_frame_unchecked, MAX_CONTENT_TYPE_BYTES, MAX_EVENT_TYPE_BYTES,
    MAX_OP_ID_BYTES, MAX_STREAM_ID_BYTES,
};
use vigil_wire::pb::{self, guest_frame::Kind};
use vigil_wire::{
    encode_guest_frame, encode_host_frame, FeedError, FrameDecoder, FrameError, GuestFrameView,
    HostFrameDecoder, DEFAULT_MAX_FRAME_BYTES, MAX_FRAME_BYTES_LIMIT,
};

/// A Hello followed by `n` random frames, encoded back to back.
fn stream(rng: &mut Rng, n: usize, small: bool) -> (Vec<pb::GuestFrame>, Vec<u8>) {
    let mut frames = vec![hello_frame(rng)];
    for i in 0..n {
        let mut f = random_frame(rng, i as u64 + 1);
        if small {
            if let Some(Kind::Event(e)) = f.kind.as_mut() {
                e.payload.truncate(200);
            }
        }
        frames.push(f);
    }
    let mut bytes = Vec::new();
    for f in &frames {
        encode_guest_frame(f, &mut bytes);
    }
    (frames, bytes)
}

/// Feeds `chunks` to a fresh decoder and returns the frames it delivered, owned.
fn decode_chunks<'a>(
    chunks: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Vec<pb::GuestFrame>, FrameError> {
    let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES);
    let mut got = Vec::new();
    for chunk in chunks {
        dec.feed(chunk, &mut |v: GuestFrameView<'_>| {
            got.push(v.to_owned_frame());
            Ok::<(), ()>(())
        })
        .map_err(|e| match e {
            FeedError::Frame(e) => e,
            FeedError::Sink(()) => unreachable!("the sink never fails here"),
        })?;
    }
    dec.finish()?;
    assert!(dec.is_idle());
    assert_eq!(dec.buffered_bytes(), 0);
    Ok(got)
}

/// Feeds one chunk to `dec` and returns the first error (frames before it are dropped).
fn feed_err(dec: &mut FrameDecoder, chunk: &[u8]) -> FrameError {
    match dec.feed(chunk, &mut |_v: GuestFrameView<'_>| Ok::<(), ()>(())) {
        Err(FeedError::Frame(e)) => e,
        other => panic!("expected a frame error, got {other:?}"),
    }
}

fn framed(frame: &pb::GuestFrame) -> Vec<u8> {
    let mut out = Vec::new();
    encode_guest_frame(frame, &mut out);
    out
}

fn framed_raw(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    put_varint(&mut out, body.len() as u64);
    out.extend_from_slice(body);
    out
}

fn valid_hello() -> pb::GuestFrame {
    pb::GuestFrame {
        kind: Some(Kind::Hello(pb::Hello {
            protocol_version: 1,
            stream_id: "s1".into(),
            ..pb::Hello::default()
        })),
    }
}

fn event(seq: u64, ty: &str) -> pb::Event {
    pb::Event {
        guest_seq: seq,
        r#type: ty.into(),
        ..pb::Event::default()
    }
}

fn event_frame(e: pb::Event) -> pb::GuestFrame {
    pb::GuestFrame {
        kind: Some(Kind::Event(e)),
    }
}

#[test]
fn every_split_point_yields_exactly_the_frames_sent() {
    let mut rng = Rng::new(1);
    let (frames, bytes) = stream(&mut rng, 30, true);
    assert!(
        bytes.len() > 2000,
        "stream long enough to be interesting: {}",
        bytes.len()
    );
    for cut in 0..=bytes.len() {
        let got = decode_chunks([&bytes[..cut], &bytes[cut..]])
            .unwrap_or_else(|e| panic!("cut {cut}: {e}"));
        assert_eq!(got, frames, "cut at {cut}");
    }
    // One byte at a time.
    assert_eq!(decode_chunks(bytes.chunks(1)).unwrap(), frames);
}

#[test]
fn random_chunkings_yield_exactly_the_frames_sent() {
    for seed in 0..300 {
        let mut rng = Rng::new(1000 + seed);
        let n = 1 + rng.below(40);
        let (frames, bytes) = stream(&mut rng, n, false);
        let mut chunks = Vec::new();
        let mut rest = &bytes[..];
        let max_chunk = [3, 17, 300, 5000][rng.below(4)];
        while !rest.is_empty() {
            let n = (1 + rng.below(max_chunk)).min(rest.len());
            let (a, b) = rest.split_at(n);
            chunks.push(a);
            rest = b;
        }
        let got = decode_chunks(chunks).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        assert_eq!(got, frames, "seed {seed}");
    }
}

#[test]
fn many_frames_in_one_buffer_are_decoded_in_place() {
    let mut rng = Rng::new(2);
    let (frames, bytes) = stream(&mut rng, 500, false);
    let range = bytes.as_ptr_range();
    let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES);
    let mut got = Vec::new();
    let mut events = 0;
    dec.feed(&bytes, &mut |v: GuestFrameView<'_>| {
        if let GuestFrameView::Event(e) = &v {
            // Zero-copy: the view's slices point into the fed buffer.
            assert!(range.contains(&e.payload.as_ptr()) || e.payload.is_empty());
            assert!(range.contains(&e.event_type.as_ptr()));
            events += 1;
        }
        got.push(v.to_owned_frame());
        Ok::<(), ()>(())
    })
    .unwrap();
    assert_eq!(got, frames);
    assert!(events > 300);
    // Nothing straddled, so the reassembly buffer was never allocated.
    assert_eq!(dec.reassembly_capacity(), 0);
    assert!(dec.is_idle());
}

/// A deliberately odd but mostly valid encoding of an Event or PolicyQuery body: fields in
/// random order, some repeated, unknown fields of every wire type, non-minimal varints, and
/// now and then something invalid (bad UTF-8, a wrong wire type).
fn odd_body(rng: &mut Rng, query: bool) -> Vec<u8> {
    // (field number, length-delimited?)
    let fields: &[(u32, bool)] = if query {
        &[(1, false), (2, true), (3, true)]
    } else {
        &[
            (1, false),
            (2, true),
            (3, true),
            (4, true),
            (5, true),
            (6, false),
        ]
    };
    let max_known = fields.len() as u32;
    let mut parts: Vec<Vec<u8>> = Vec::new();
    for &(tag, len_delimited) in fields {
        if rng.chance(15) {
            continue;
        }
        for _ in 0..=rng.below(3) {
            let mut p = Vec::new();
            if rng.chance(2) {
                // Wrong wire type for a known field.
                if len_delimited {
                    put_varint_field(&mut p, tag, 5);
                } else {
                    put_len_field(&mut p, tag, b"x");
                }
            } else if len_delimited {
                let mut s = rng.utf8_below(40).into_bytes();
                if tag != 5 && rng.chance(3) {
                    s.push(0xff); // invalid UTF-8 (payload, tag 5, is bytes: always fine)
                }
                put_key(&mut p, tag, 2);
                put_varint_padded(&mut p, s.len() as u64, if rng.chance(10) { 2 } else { 0 });
                p.extend_from_slice(&s);
            } else if rng.chance(3) {
                // A 10-byte varint over 64 bits, or an 11-byte one: both invalid.
                put_key(&mut p, tag, 0);
                p.extend_from_slice(&[0xff; 9]);
                if rng.chance(50) {
                    p.push(0x02 + rng.below(0x7e) as u8);
                } else {
                    p.extend_from_slice(&[0x81, 0x00]);
                }
            } else {
                put_key(&mut p, tag, 0);
                let v = rng.value();
                put_varint_padded(&mut p, v, if rng.chance(10) { 1 + rng.below(3) } else { 0 });
            }
            parts.push(p);
        }
    }
    for _ in 0..rng.below(4) {
        let mut p = Vec::new();
        put_unknown_field(rng, &mut p, 1..=max_known, 2);
        parts.push(p);
    }
    rng.shuffle(&mut parts);
    parts.concat()
}

/// A whole GuestFrame body built from odd oneof occurrences and unknown top-level fields.
fn odd_frame(rng: &mut Rng) -> Vec<u8> {
    let mut parts: Vec<Vec<u8>> = Vec::new();
    let occurrences = match rng.below(10) {
        0..=5 => 1,
        6 | 7 => 2,
        _ => 3,
    };
    for _ in 0..occurrences {
        let mut p = Vec::new();
        match rng.below(10) {
            0 => put_len_field(&mut p, 1, &random_hello(rng).encode_to_vec()),
            1 => put_len_field(
                &mut p,
                3,
                &pb::Heartbeat {
                    guest_time_unix_nano: rng.value(),
                }
                .encode_to_vec(),
            ),
            2 | 3 => put_len_field(&mut p, 4, &odd_body(rng, true)),
            _ => put_len_field(&mut p, 2, &odd_body(rng, false)),
        }
        parts.push(p);
    }
    for _ in 0..rng.below(3) {
        let mut p = Vec::new();
        put_unknown_field(rng, &mut p, 1..=5, 2);
        let at = rng.below(parts.len() + 1);
        parts.insert(at, p);
    }
    let mut bytes = parts.concat();
    if rng.chance(5) && !bytes.is_empty() {
        let i = rng.below(bytes.len());
        bytes[i] ^= 1 << rng.below(8);
    }
    if rng.chance(3) {
        let n = rng.below(bytes.len() + 1);
        bytes.truncate(n);
    }
    bytes
}

/// Our decode and prost's must agree on accept/reject, and on every value when both accept.
fn assert_agrees_with_prost(bytes: &[u8], what: &str) -> bool {
    let ours = decode_guest_frame_unchecked(bytes);
    let theirs = pb::GuestFrame::decode(bytes);
    match (&ours, &theirs) {
        (Ok(Some(view)), Ok(frame)) => {
            assert_eq!(
                &view.to_owned_frame(),
                frame,
                "{what}: values differ for {bytes:02x?}"
            );
            true
        }
        (Ok(None), Ok(frame)) => {
            assert!(
                frame.kind.is_none(),
                "{what}: we saw no kind, prost saw {frame:?}"
            );
            true
        }
        (Err(FrameError::Undecodable { .. }), Err(_)) => false,
        _ => panic!("{what}: disagreement on {bytes:02x?}: ours {ours:?}, prost {theirs:?}"),
    }
}

#[test]
fn zero_copy_views_equal_prost_over_randomised_encodings() {
    let mut rng = Rng::new(3);
    // prost's own encodings of random messages.
    for i in 0..5000 {
        let frame = random_frame(&mut rng, 1 + i);
        let bytes = frame.encode_to_vec();
        assert!(assert_agrees_with_prost(&bytes, "prost encoding"));
        let view = decode_guest_frame_unchecked(&bytes).unwrap().unwrap();
        assert_eq!(view.to_owned_frame(), frame);
    }
    // Odd encodings: reordered, repeated, unknown fields, merged occurrences, corruption.
    let (mut ok, mut events, mut queries) = (0, 0, 0);
    let total = 30_000;
    for i in 0..total {
        let bytes = odd_frame(&mut rng);
        if assert_agrees_with_prost(&bytes, &format!("odd frame {i}")) {
            ok += 1;
            match decode_guest_frame_unchecked(&bytes) {
                Ok(Some(GuestFrameView::Event(_))) => events += 1,
                Ok(Some(GuestFrameView::PolicyQuery(_))) => queries += 1,
                _ => {}
            }
        }
    }
    // The generator must exercise both outcomes, and the zero-copy kinds a lot.
    assert!(ok > total / 3, "only {ok} of {total} odd frames were valid");
    assert!(
        ok < total * 95 / 100,
        "{ok} of {total} valid: too few invalid inputs"
    );
    assert!(
        events > total / 5 && queries > total / 20,
        "events {events}, queries {queries}"
    );
}

#[test]
fn nested_unknown_groups_are_refused_exactly_where_prost_refuses_them() {
    let groups = |depth: usize| {
        let mut b = Vec::new();
        for _ in 0..depth {
            put_key(&mut b, 9, WT_SGROUP);
        }
        put_varint_field(&mut b, 10, 1);
        for _ in 0..depth {
            put_key(&mut b, 9, WT_EGROUP);
        }
        b
    };
    let mut outcomes = Vec::new();
    for depth in 90..=102 {
        // At the top level of the frame (next to a valid Event) and inside the Event.
        let mut top = Vec::new();
        put_len_field(&mut top, 2, &event(1, "t").encode_to_vec());
        top.extend(groups(depth));
        outcomes.push(assert_agrees_with_prost(
            &top,
            &format!("top-level groups {depth} deep"),
        ));
        let mut body = event(1, "t").encode_to_vec();
        body.extend(groups(depth));
        let mut inner = Vec::new();
        put_len_field(&mut inner, 2, &body);
        outcomes.push(assert_agrees_with_prost(
            &inner,
            &format!("event groups {depth} deep"),
        ));
    }
    assert!(outcomes.contains(&true) && outcomes.contains(&false));
}

#[test]
fn random_bytes_never_panic_and_agree_with_prost() {
    let mut rng = Rng::new(4);
    for i in 0..20_000 {
        let len = rng.below(48);
        let mut bytes = rng.bytes(len);
        // Bias towards plausible starts so the deeper paths run too.
        if rng.chance(50) && !bytes.is_empty() {
            bytes[0] = [0x0a, 0x12, 0x1a, 0x22, 0x2a][rng.below(5)];
            if bytes.len() > 1 {
                bytes[1] = (bytes.len() - 2).min(127) as u8;
            }
        }
        assert_agrees_with_prost(&bytes, &format!("random {i}"));
        let _ = decode_guest_frame(&bytes);
    }
    // Whole streams of random bytes, fed in random chunks, into decoders that have and have
    // not seen a Hello.
    for seed in 0..3000 {
        let mut rng = Rng::new(10_000 + seed);
        let mut dec = FrameDecoder::new(1 + rng.below(DEFAULT_MAX_FRAME_BYTES));
        if rng.chance(50) {
            dec.feed(&framed(&valid_hello()), &mut |_v: GuestFrameView<'_>| {
                Ok::<(), ()>(())
            })
            .unwrap();
        }
        let mut bytes = rng.bytes_below(400);
        if rng.chance(50) && !bytes.is_empty() {
            bytes[0] = rng.below(60) as u8; // a plausible length
        }
        for chunk in bytes.chunks(1 + rng.below(64)) {
            if dec
                .feed(chunk, &mut |_v: GuestFrameView<'_>| Ok::<(), ()>(()))
                .is_err()
            {
                break;
            }
        }
        let _ = dec.finish();
        dec.shrink();
    }
}

#[test]
fn oversized_length_is_refused_before_any_body_arrives() {
    let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES);
    let mut bytes = Vec::new();
    put_varint(&mut bytes, DEFAULT_MAX_FRAME_BYTES as u64 + 1);
    let err = feed_err(&mut dec, &bytes);
    assert_eq!(
        err,
        FrameError::TooLarge {
            len: DEFAULT_MAX_FRAME_BYTES as u64 + 1,
            max: DEFAULT_MAX_FRAME_BYTES
        }
    );
    assert_eq!(err.code(), pb::error::Code::FrameTooLarge);
    assert_eq!(err.reason(), "frame_too_large");
    assert_eq!(dec.reassembly_capacity(), 0);

    // Exactly the maximum is fine.
    let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES);
    let mut stream = framed(&valid_hello());
    let mut e = event(1, "t");
    e.payload = vec![7; DEFAULT_MAX_FRAME_BYTES];
    while event_frame(e.clone()).encoded_len() > DEFAULT_MAX_FRAME_BYTES {
        e.payload.pop();
    }
    let at_max = event_frame(e);
    assert_eq!(at_max.encoded_len(), DEFAULT_MAX_FRAME_BYTES);
    encode_guest_frame(&at_max, &mut stream);
    let mut n = 0;
    dec.feed(&stream, &mut |_v: GuestFrameView<'_>| {
        n += 1;
        Ok::<(), ()>(())
    })
    .unwrap();
    assert_eq!(n, 2);

    // A configured maximum above the hard cap is clamped.
    assert_eq!(
        FrameDecoder::new(usize::MAX).max_frame_bytes(),
        MAX_FRAME_BYTES_LIMIT
    );
}

#[test]
fn truncated_and_overlong_varints() {
    // Truncated: the decoder waits for more; at end of stream it is an error.
    let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES);
    dec.feed(
        &[0x80, 0x80],
        &mut |_v: GuestFrameView<'_>| Ok::<(), ()>(()),
    )
    .unwrap();
    assert!(!dec.is_idle());
    assert_eq!(dec.buffered_bytes(), 2);
    assert_eq!(dec.finish(), Err(FrameError::Truncated { buffered: 2 }));

    // Overlong: more than 10 bytes, in one chunk or split.
    for split in 0..=11 {
        let bytes = [0xff_u8; 11];
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES);
        let r1 = dec.feed(&bytes[..split], &mut |_v: GuestFrameView<'_>| {
            Ok::<(), ()>(())
        });
        let err = match r1 {
            Err(FeedError::Frame(e)) => e,
            Ok(()) => feed_err(&mut dec, &bytes[split..]),
            Err(other) => panic!("{other:?}"),
        };
        assert_eq!(err, FrameError::BadVarint, "split {split}");
        assert_eq!(err.code(), pb::error::Code::BadVarint);
    }
    // Ten bytes whose value overflows 64 bits.
    let mut bytes = [0xff_u8; 10];
    bytes[9] = 0x02;
    assert_eq!(
        feed_err(&mut FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES), &bytes),
        FrameError::BadVarint
    );
    // Non-minimal but valid: 5 encoded in 3 bytes is fine (then a 5-byte body).
    let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES);
    let body = valid_hello().encode_to_vec();
    let mut bytes = Vec::new();
    put_varint_padded(&mut bytes, body.len() as u64, 2);
    bytes.extend_from_slice(&body);
    dec.feed(&bytes, &mut |v: GuestFrameView<'_>| {
        assert!(matches!(v, GuestFrameView::Hello(_)));
        Ok::<(), ()>(())
    })
    .unwrap();
}

#[test]
fn undecodable_frames() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("invalid wire type", vec![0x0f]),
        ("field number 0", vec![0x02, 0x00]),
        ("length past the end", vec![0x12, 0x05, 0x08]),
        ("truncated varint inside", vec![0x12, 0x02, 0x08, 0x80]),
        ("unmatched end group", vec![0x3c]),
        ("oneof with wrong wire type", vec![0x10, 0x01]),
        (
            "event field with wrong wire type",
            vec![0x12, 0x03, 0x0a, 0x01, 0x41],
        ),
        (
            "bad UTF-8 in type",
            vec![0x12, 0x05, 0x08, 0x01, 0x12, 0x01, 0xff],
        ),
        (
            "bad UTF-8 in op_id",
            vec![0x12, 0x08, 0x08, 0x01, 0x12, 0x01, b'a', 0x1a, 0x01, 0xc3],
        ),
        ("bad UTF-8 in an earlier, overridden type", {
            let mut b = Vec::new();
            let mut e = Vec::new();
            put_varint_field(&mut e, 1, 1);
            put_len_field(&mut e, 2, &[0xff]);
            put_len_field(&mut e, 2, b"fine");
            put_len_field(&mut b, 2, &e);
            b
        }),
        (
            "bad UTF-8 in a policy query",
            vec![0x22, 0x03, 0x1a, 0x01, 0x80],
        ),
        ("invalid Hello overridden by a valid Event", {
            let mut b = Vec::new();
            put_len_field(&mut b, 1, &[0x12, 0x01, 0xff]); // stream_id not UTF-8
            put_len_field(&mut b, 2, &event(1, "t").encode_to_vec());
            b
        }),
    ];
    for (what, body) in cases {
        let err = decode_guest_frame(&body).unwrap_err();
        assert!(
            matches!(err, FrameError::Undecodable { .. }),
            "{what}: {err:?}"
        );
        assert_eq!(err.code(), pb::error::Code::Undecodable, "{what}");
        assert!(
            pb::GuestFrame::decode(&body[..]).is_err(),
            "{what}: prost accepts it"
        );
        // Same through the stream decoder, after a Hello.
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES);
        let mut bytes = framed(&valid_hello());
        bytes.extend_from_slice(&framed_raw(&body));
        assert!(
            matches!(feed_err(&mut dec, &bytes), FrameError::Undecodable { .. }),
            "{what}"
        );
    }
    // A frame with only unknown fields has no kind.
    assert_eq!(
        decode_guest_frame(&[0x38, 0x01]),
        Err(FrameError::UnknownKind)
    );
    // A frame with length 0.
    let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES);
    let err = feed_err(&mut dec, &[0x00]);
    assert_eq!(err, FrameError::EmptyFrame);
    assert_eq!(err.reason(), "empty_frame");
}

#[test]
fn hello_rules() {
    let hello = |version: u32, stream_id: &str| pb::GuestFrame {
        kind: Some(Kind::Hello(pb::Hello {
            protocol_version: version,
            stream_id: stream_id.into(),
            ..pb::Hello::default()
        })),
    };
    let check =
        |f: pb::GuestFrame| decode_guest_frame(&f.encode_to_vec()).map(|v| v.to_owned_frame());
    assert!(check(hello(1, "a")).is_ok());
    assert!(check(hello(1, &"a".repeat(MAX_STREAM_ID_BYTES))).is_ok());
    let err = check(hello(2, "a")).unwrap_err();
    assert_eq!(
        err,
        FrameError::UnsupportedVersion {
            got: 2,
            supported: 1
        }
    );
    assert_eq!(err.code(), pb::error::Code::UnsupportedVersion);
    assert_eq!(
        check(hello(0, "a")).unwrap_err().reason(),
        "unsupported_version"
    );
    let err = check(hello(1, "")).unwrap_err();
    assert!(matches!(err, FrameError::BadHello { .. }), "{err:?}");
    assert_eq!(err.code(), pb::error::Code::BadHello);
    let err = check(hello(1, &"a".repeat(MAX_STREAM_ID_BYTES + 1))).unwrap_err();
    assert!(
        err.to_string()
            .contains("stream_id must be 1..=128 bytes, got 129"),
        "{err}"
    );

    // Order: Hello first, and only once.
    let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES);
    let err = feed_err(&mut dec, &framed(&event_frame(event(1, "t"))));
    assert_eq!(err, FrameError::HelloRequired { got: "Event" });
    assert_eq!(err.code(), pb::error::Code::HelloRequired);
    let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES);
    let mut bytes = framed(&valid_hello());
    bytes.extend(framed(&valid_hello()));
    assert_eq!(feed_err(&mut dec, &bytes), FrameError::DuplicateHello);
    assert!(dec.hello_seen());
}

#[test]
fn event_rules() {
    type Mutation = fn(&mut pb::Event);
    let check = |e: pb::Event| {
        decode_guest_frame(&event_frame(e).encode_to_vec()).map(|v| v.to_owned_frame())
    };
    let ok = |f: fn(&mut pb::Event)| {
        let mut e = event(1, "t");
        f(&mut e);
        check(e)
    };
    assert!(ok(|_| {}).is_ok());
    assert!(ok(|e| e.r#type = "t".repeat(MAX_EVENT_TYPE_BYTES)).is_ok());
    assert!(ok(|e| e.op_id = "o".repeat(MAX_OP_ID_BYTES)).is_ok());
    assert!(ok(|e| e.content_type = "c".repeat(MAX_CONTENT_TYPE_BYTES)).is_ok());
    assert!(ok(|e| e.guest_seq = u64::MAX).is_ok());
    let bad: [(Mutation, &str); 5] = [
        (|e| e.guest_seq = 0, "guest_seq must be at least 1"),
        (
            |e| e.r#type = String::new(),
            "type must be 1..=256 bytes, got 0",
        ),
        (
            |e| e.r#type = "t".repeat(MAX_EVENT_TYPE_BYTES + 1),
            "type must be 1..=256 bytes, got 257",
        ),
        (
            |e| e.op_id = "o".repeat(MAX_OP_ID_BYTES + 1),
            "op_id must be at most 256 bytes, got 257",
        ),
        (
            |e| e.content_type = "c".repeat(MAX_CONTENT_TYPE_BYTES + 1),
            "content_type must be at most 128 bytes",
        ),
    ];
    for (mutate, msg) in bad {
        let err = ok(mutate).unwrap_err();
        assert!(matches!(err, FrameError::BadEvent { .. }), "{err:?}");
        assert_eq!(err.code(), pb::error::Code::BadEvent);
        assert_eq!(err.reason(), "bad_event");
        assert!(err.to_string().contains(msg), "{err} lacks {msg}");
    }
    let q = pb::GuestFrame {
        kind: Some(Kind::PolicyQuery(pb::PolicyQuery {
            query_id: 9,
            op_id: "o".repeat(257),
            action: "a".into(),
        })),
    };
    let err = decode_guest_frame(&q.encode_to_vec()).unwrap_err();
    assert_eq!(err.code(), pb::error::Code::BadPolicyQuery);
}

#[test]
fn errors_stop_the_decoder_after_delivering_earlier_frames() {
    let mut bytes = framed(&valid_hello());
    bytes.extend(framed(&event_frame(event(1, "a"))));
    bytes.extend(framed(&event_frame(event(0, "bad"))));
    bytes.extend(framed(&event_frame(event(3, "never seen"))));
    let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES);
    let mut seqs = Vec::new();
    let r = dec.feed(&bytes, &mut |v: GuestFrameView<'_>| {
        if let GuestFrameView::Event(e) = v {
            seqs.push(e.guest_seq);
        }
        Ok::<(), ()>(())
    });
    assert!(matches!(
        r,
        Err(FeedError::Frame(FrameError::BadEvent { guest_seq: 0, .. }))
    ));
    assert_eq!(seqs, [1]);
    // Poisoned from now on.
    assert_eq!(
        feed_err(&mut dec, &framed(&event_frame(event(4, "x")))),
        FrameError::Poisoned
    );

    // A sink error stops it too, and comes back as Sink.
    let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES);
    let r = dec.feed(&bytes, &mut |v: GuestFrameView<'_>| match v {
        GuestFrameView::Event(_) => Err("queue full"),
        _ => Ok(()),
    });
    assert_eq!(r, Err(FeedError::Sink("queue full")));
    assert!(matches!(
        dec.feed(&[], &mut |_v: GuestFrameView<'_>| Ok::<(), ()>(())),
        Err(FeedError::Frame(FrameError::Poisoned))
    ));
}

#[test]
fn a_lying_length_prefix_does_not_allocate_max_bytes() {
    let declared = 200_000;
    let mut dec = FrameDecoder::new(MAX_FRAME_BYTES_LIMIT);
    dec.feed(&framed(&valid_hello()), &mut |_v: GuestFrameView<'_>| {
        Ok::<(), ()>(())
    })
    .unwrap();
    let mut bytes = Vec::new();
    put_varint(&mut bytes, declared);
    bytes.extend_from_slice(&[0x12; 10]);
    dec.feed(&bytes, &mut |_v: GuestFrameView<'_>| Ok::<(), ()>(()))
        .unwrap();
    assert_eq!(dec.buffered_bytes(), 10);
    assert!(
        dec.reassembly_capacity() <= 64,
        "capacity {}",
        dec.reassembly_capacity()
    );
    // More bytes: capacity follows what arrived (at most doubling), never the declared size.
    for i in 1..=50 {
        dec.feed(&[0u8; 100], &mut |_v: GuestFrameView<'_>| Ok::<(), ()>(()))
            .unwrap();
        let held = 10 + 100 * i;
        assert_eq!(dec.buffered_bytes(), held);
        assert!(
            dec.reassembly_capacity() <= 2 * held,
            "held {held}, capacity {}",
            dec.reassembly_capacity()
        );
    }
}

#[test]
fn a_large_straddling_frame_is_reassembled_within_bounds_and_released() {
    let mut e = event(1, "big");
    e.payload = (0..200_000u32).map(|i| i as u8).collect();
    let frame = event_frame(e);
    let mut bytes = framed(&valid_hello());
    let hello_len = bytes.len();
    encode_guest_frame(&frame, &mut bytes);
    let frame_len = bytes.len() - hello_len;
    let mut dec = FrameDecoder::new(MAX_FRAME_BYTES_LIMIT);
    let mut got = Vec::new();
    for chunk in bytes.chunks(4096) {
        dec.feed(chunk, &mut |v: GuestFrameView<'_>| {
            got.push(v.to_owned_frame());
            Ok::<(), ()>(())
        })
        .unwrap();
        assert!(dec.reassembly_capacity() <= frame_len);
    }
    assert_eq!(got.len(), 2);
    assert_eq!(got[1], frame);
    assert!(dec.is_idle());
    assert!(dec.reassembly_capacity() > 100_000);
    dec.shrink();
    assert_eq!(dec.reassembly_capacity(), 0);
}

#[test]
fn host_frames_round_trip() {
    let frames = vec![
        pb::HostFrame {
            kind: Some(pb::host_frame::Kind::Ack(pb::Ack { durable_seq: 0 })),
        },
        pb::HostFrame {
            kind: Some(pb::host_frame::Kind::Ack(pb::Ack { durable_seq: 42 })),
        },
        pb::HostFrame {
            kind: Some(pb::host_frame::Kind::PolicyDecision(pb::PolicyDecision {
                query_id: 7,
                decision: pb::policy_decision::Decision::Deny as i32,
                reason: "state unknown: fail-closed".into(),
            })),
        },
        FrameError::UnsupportedVersion {
            got: 9,
            supported: 1,
        }
        .to_host_frame(),
    ];
    let mut bytes = Vec::new();
    for f in &frames {
        encode_host_frame(f, &mut bytes);
    }
    for cut in 0..=bytes.len() {
        let mut dec = HostFrameDecoder::new(DEFAULT_MAX_FRAME_BYTES);
        let mut got = Vec::new();
        for chunk in [&bytes[..cut], &bytes[cut..]] {
            dec.feed(chunk, &mut |f: pb::HostFrame| {
                got.push(f);
                Ok::<(), ()>(())
            })
            .unwrap();
        }
        assert_eq!(got, frames);
        assert!(dec.is_idle());
    }
    let Some(pb::host_frame::Kind::Error(e)) = &frames[3].kind else {
        unreachable!()
    };
    assert_eq!(e.code, pb::error::Code::UnsupportedVersion as i32);
    assert_eq!(
        e.message,
        "protocol version 9 is not supported; this host speaks version 1"
    );
}
