//! Round trips, verify faults, dedupe, restarts, retention and key files.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use cloudevents::AttributesReader;
use common::*;
use vigil_journal::segment::{list_segments, scan_segment};
use vigil_journal::{
    verify, FaultKind, HostKey, KeyError, Record, SigningMode, TailFilter, VerifyFault,
};

fn ok(dir: &std::path::Path, keys: &[&HostKey]) -> vigil_journal::VerifySummary {
    let vks: Vec<_> = keys.iter().map(|k| k.verifying_key()).collect();
    verify(dir, &vks).unwrap_or_else(|e| panic!("verify failed: {e}"))
}

fn fails(dir: &std::path::Path) -> VerifyFault {
    verify(dir, &[key().verifying_key()]).expect_err("verify must fail")
}

fn parse_as_cloudevents(payloads: &[Vec<u8>]) {
    for p in payloads {
        let ev: cloudevents::Event = serde_json::from_slice(p)
            .unwrap_or_else(|e| panic!("not a CloudEvent ({e}): {}", String::from_utf8_lossy(p)));
        assert_eq!(ev.specversion(), cloudevents::event::SpecVersion::V10);
        assert!(ev.source().as_str().starts_with("vigil://host-a/"));
        assert!(ev.time().is_some());
        assert!(ev.extension("sequence").is_some());
        assert!(ev.extension("prevhash").is_some());
    }
}

#[test]
fn per_event_round_trip_verifies_and_is_cloudevents() {
    let dir = tempfile::tempdir().unwrap();
    write_events(dir.path(), SigningMode::PerEvent, key(), 20);
    let sum = ok(dir.path(), &[&key()]);
    assert_eq!(sum.events, 21);
    assert_eq!(sum.batch_heads, 0);
    assert_eq!(sum.runs, 1);
    assert!(sum.durable_mark_checked);
    assert_eq!(
        sum.keys_used.into_iter().collect::<Vec<_>>(),
        vec![key().key_id()]
    );
    let ps = payloads(dir.path());
    parse_as_cloudevents(&ps);
    let first: serde_json::Value = serde_json::from_slice(&ps[0]).unwrap();
    assert_eq!(first["sequence"], "1");
    assert_eq!(first["guestseq"], "1");
    assert_eq!(first["streamid"], "s1");
    assert_eq!(first["source"], "vigil://host-a/cells/c1");
    assert_eq!(first["data"]["n"], 1);
    assert_eq!(first["guestclaims"], r#"{"agent":"test-agent"}"#);
    assert_eq!(
        first["signedextattrs"],
        "cellid,runid,streamid,guestseq,sequence,prevhash"
    );
    assert!(first["dssematerial"].is_string());
    assert_eq!(first["prevhash"], vigil_journal::event::GENESIS_HASH);
    let own: serde_json::Value = serde_json::from_slice(ps.last().unwrap()).unwrap();
    assert_eq!(own["sequence"], "21");
    assert!(own.get("streamid").is_none());
    assert_eq!(
        own["id"],
        vigil_journal::event::own_event_id("c1", "r1", 21)
    );
}

#[test]
fn batch_round_trip_verifies_and_is_cloudevents() {
    let dir = tempfile::tempdir().unwrap();
    write_events(dir.path(), SigningMode::Batch, key(), 20);
    let sum = ok(dir.path(), &[&key()]);
    assert_eq!(sum.events, 21);
    assert!(sum.batch_heads >= 1);
    let ps = payloads(dir.path());
    parse_as_cloudevents(&ps);
    let last: Record = Record::parse(ps.last().unwrap()).unwrap();
    assert_eq!(last.ty, vigil_journal::event::BATCH_HEAD_TYPE);
    let first: Record = Record::parse(&ps[0]).unwrap();
    assert!(first.batchhead.is_some() && first.dssematerial.is_none());
}

#[test]
fn binary_payload_goes_to_data_base64_and_is_signed() {
    let dir = tempfile::tempdir().unwrap();
    let h = vigil_journal::spawn(config(dir.path(), SigningMode::PerEvent), key()).unwrap();
    let mut ev = guest_event(1, "c1", "r1", "s1", 1);
    ev.content_type = "application/octet-stream".to_owned();
    ev.data = vec![0, 159, 146, 150, b'\n'];
    h.input.send(vec![ev]).unwrap();
    wait_ack(&h, "s1", 1);
    h.shutdown().unwrap();
    ok(dir.path(), &[&key()]);
    let ps = payloads(dir.path());
    parse_as_cloudevents(&ps);
    let r = Record::parse(&ps[0]).unwrap();
    assert_eq!(r.data_bytes().unwrap(), vec![0, 159, 146, 150, b'\n']);
    assert!(r.data.is_none());
}

#[test]
fn flipped_bit_anywhere_in_a_record_fails_verify() {
    for mode in [SigningMode::PerEvent, SigningMode::Batch] {
        let dir = tempfile::tempdir().unwrap();
        write_events(dir.path(), mode, key(), 3);
        let (idx, path) = list_segments(dir.path()).unwrap().remove(0);
        let scan = scan_segment(idx, &path).unwrap();
        let (start, range) = scan.records[1].clone();
        let original = std::fs::read(&path).unwrap();
        for pos in start as usize..range.end {
            let mut bytes = original.clone();
            bytes[pos] ^= 0x10;
            std::fs::write(&path, &bytes).unwrap();
            let f = fails(dir.path());
            if pos >= range.start {
                assert!(matches!(*f.kind, FaultKind::Frame(_)), "byte {pos}: {f}");
                assert!(f.to_string().contains("CRC32C"), "{f}");
            }
            assert!(f.to_string().contains("seg-0000000000000000.vjl"), "{f}");
        }
    }
}

fn alter_data(p: &[u8]) -> Vec<u8> {
    let s = String::from_utf8(p.to_vec()).unwrap();
    let t = s.replace(r#""text":"hello""#, r#""text":"HELLO""#);
    assert_ne!(s, t);
    t.into_bytes()
}

#[test]
fn altered_content_with_valid_crc_fails_verify() {
    let dir = tempfile::tempdir().unwrap();
    write_events(dir.path(), SigningMode::PerEvent, key(), 3);
    let mut ps = payloads(dir.path());
    ps[1] = alter_data(&ps[1]);
    rewrite_single_segment(dir.path(), &ps);
    let f = fails(dir.path());
    assert!(matches!(*f.kind, FaultKind::AlteredContent), "{f}");
    assert!(f.to_string().contains("cell c1, run r1"), "{f}");
    assert!(f.to_string().contains("altered after signing"), "{f}");

    // A host stamp (sequence) changed too: still caught by the signature.
    let dir = tempfile::tempdir().unwrap();
    write_events(dir.path(), SigningMode::PerEvent, key(), 3);
    let mut ps = payloads(dir.path());
    let s = String::from_utf8(ps[2].clone()).unwrap();
    ps[2] = s
        .replace(r#""streamid":"s1""#, r#""streamid":"s2""#)
        .into_bytes();
    rewrite_single_segment(dir.path(), &ps);
    assert!(matches!(*fails(dir.path()).kind, FaultKind::AlteredContent));

    // Batch mode: the last event of the run is altered, so only the batch head can tell.
    let dir = tempfile::tempdir().unwrap();
    write_events(dir.path(), SigningMode::Batch, key(), 3);
    let mut ps = payloads(dir.path());
    let last_guest = ps
        .iter()
        .rposition(|p| p.windows(6).any(|w| w == b"hello\""))
        .unwrap();
    ps[last_guest] = alter_data(&ps[last_guest]);
    rewrite_single_segment(dir.path(), &ps);
    let f = fails(dir.path());
    assert!(
        matches!(
            *f.kind,
            FaultKind::BatchMismatch { .. } | FaultKind::ChainBroken
        ),
        "{f}"
    );
}

#[test]
fn dropped_record_fails_verify() {
    for mode in [SigningMode::PerEvent, SigningMode::Batch] {
        let dir = tempfile::tempdir().unwrap();
        write_events(dir.path(), mode, key(), 5);
        let mut ps = payloads(dir.path());
        ps.remove(2);
        rewrite_single_segment(dir.path(), &ps);
        let f = fails(dir.path());
        assert!(
            matches!(
                *f.kind,
                FaultKind::SequenceGap {
                    expected: 3,
                    found: 4
                }
            ),
            "{mode:?}: {f}"
        );
        assert!(f.to_string().contains("was dropped"), "{f}");
    }
}

#[test]
fn swapped_records_fail_verify() {
    for mode in [SigningMode::PerEvent, SigningMode::Batch] {
        let dir = tempfile::tempdir().unwrap();
        write_events(dir.path(), mode, key(), 5);
        let mut ps = payloads(dir.path());
        ps.swap(1, 2);
        rewrite_single_segment(dir.path(), &ps);
        let f = fails(dir.path());
        assert!(
            matches!(
                *f.kind,
                FaultKind::SequenceGap {
                    expected: 2,
                    found: 3
                }
            ),
            "{f}"
        );
    }
}

#[test]
fn record_signed_by_another_key_fails_and_rotation_is_accepted() {
    for mode in [SigningMode::PerEvent, SigningMode::Batch] {
        let dir = tempfile::tempdir().unwrap();
        let other = HostKey::from_seed([9; 32]);
        write_events(dir.path(), mode, other, 2);
        let f = fails(dir.path());
        assert!(
            matches!(&*f.kind, FaultKind::Signature(vigil_journal::dsse::DsseError::UnknownKey(id)) if *id == HostKey::from_seed([9; 32]).key_id()),
            "{f}"
        );
        assert!(f.to_string().contains("not among the trusted"), "{f}");
    }
    // Rotation: the first part signed by A, the rest by B; both keys given → clean.
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (HostKey::from_seed([1; 32]), HostKey::from_seed([2; 32]));
    let h = vigil_journal::spawn(
        config(dir.path(), SigningMode::PerEvent),
        HostKey::from_seed([1; 32]),
    )
    .unwrap();
    h.input
        .send(vec![guest_event(1, "c1", "r1", "s1", 1)])
        .unwrap();
    wait_ack(&h, "s1", 1);
    h.shutdown().unwrap();
    let h = vigil_journal::spawn(
        config(dir.path(), SigningMode::Batch),
        HostKey::from_seed([2; 32]),
    )
    .unwrap();
    h.input
        .send(vec![guest_event(1, "c1", "r1", "s1", 2)])
        .unwrap();
    wait_ack(&h, "s1", 2);
    h.shutdown().unwrap();
    let sum = ok(dir.path(), &[&a, &b]);
    assert_eq!(sum.keys_used.len(), 2);
    assert_eq!(sum.events, 2);
    assert!(verify(dir.path(), &[a.verifying_key()]).is_err());
}

#[test]
fn truncated_tail_fails_verify() {
    let dir = tempfile::tempdir().unwrap();
    write_events(dir.path(), SigningMode::PerEvent, key(), 4);
    let (idx, path) = list_segments(dir.path()).unwrap().remove(0);
    let scan = scan_segment(idx, &path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    // Cut inside the last record: a torn record.
    std::fs::write(&path, &bytes[..bytes.len() - 7]).unwrap();
    let f = fails(dir.path());
    assert!(matches!(*f.kind, FaultKind::TornTail(_)), "{f}");
    assert!(f.to_string().contains("torn"), "{f}");
    // Cut cleanly at a record boundary: only durable.mark can tell.
    let boundary = scan.records.last().unwrap().0 as usize;
    std::fs::write(&path, &bytes[..boundary]).unwrap();
    let f = fails(dir.path());
    assert!(matches!(*f.kind, FaultKind::CutTail { .. }), "{f}");
    std::fs::remove_file(dir.path().join("durable.mark")).unwrap();
    let sum = ok(dir.path(), &[&key()]);
    assert_eq!(
        sum.events, 4,
        "without the mark a clean cut is not detectable"
    );

    // Batch mode: events cut away from their head.
    let dir = tempfile::tempdir().unwrap();
    write_events(dir.path(), SigningMode::Batch, key(), 1);
    let (idx, path) = list_segments(dir.path()).unwrap().remove(0);
    let scan = scan_segment(idx, &path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..scan.records.last().unwrap().0 as usize]).unwrap();
    std::fs::remove_file(dir.path().join("durable.mark")).unwrap();
    let f = fails(dir.path());
    assert!(matches!(*f.kind, FaultKind::UncoveredTail { .. }), "{f}");
}

#[test]
fn resend_is_acked_not_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    let h = vigil_journal::spawn(config(dir.path(), SigningMode::Batch), key()).unwrap();
    h.input
        .send(
            (1..=5)
                .map(|q| guest_event(7, "c1", "r1", "s1", q))
                .collect(),
        )
        .unwrap();
    let acks = wait_ack(&h, "s1", 5);
    assert!(acks.iter().all(|a| a.token == 7 && &*a.run_id == "r1"));
    // Reconnect (new token) and resend 3..=7, with a duplicate inside the batch.
    let mut resend: Vec<_> = (3..=7)
        .map(|q| guest_event(8, "c1", "r1", "s1", q))
        .collect();
    resend.push(guest_event(8, "c1", "r1", "s1", 6));
    h.input.send(resend).unwrap();
    let acks = wait_ack(&h, "s1", 7);
    assert_eq!(acks.last().unwrap().token, 8);
    assert_eq!(acks.last().unwrap().durable_seq, 7);
    // A resend of already durable events alone is acked too.
    h.input
        .send(vec![guest_event(9, "c1", "r1", "s1", 2)])
        .unwrap();
    let acks = wait_ack(&h, "s1", 7);
    assert_eq!(acks[0].token, 9);
    assert_eq!(
        h.health
            .events_deduped
            .load(std::sync::atomic::Ordering::Relaxed),
        5
    );
    h.shutdown().unwrap();
    let sum = ok(dir.path(), &[&key()]);
    assert_eq!(sum.events, 7);
}

#[test]
fn gap_holds_the_ack_watermark() {
    let dir = tempfile::tempdir().unwrap();
    let h = vigil_journal::spawn(config(dir.path(), SigningMode::Batch), key()).unwrap();
    h.input
        .send(vec![
            guest_event(1, "c1", "r1", "s1", 1),
            guest_event(1, "c1", "r1", "s1", 3),
        ])
        .unwrap();
    let acks = wait_ack(&h, "s1", 1);
    assert_eq!(acks.last().unwrap().durable_seq, 1);
    h.input
        .send(vec![guest_event(1, "c1", "r1", "s1", 2)])
        .unwrap();
    let acks = wait_ack(&h, "s1", 3);
    assert_eq!(acks.last().unwrap().durable_seq, 3);
    h.shutdown().unwrap();
}

#[test]
fn chain_and_dedupe_continue_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    write_events(dir.path(), SigningMode::Batch, key(), 3);
    let state = vigil_journal::recovered_state(dir.path()).unwrap();
    assert_eq!(state.run("c1", "r1").unwrap().last_sequence, 4);
    let h = vigil_journal::spawn(config(dir.path(), SigningMode::PerEvent), key()).unwrap();
    h.input
        .send(
            (2..=5)
                .map(|q| guest_event(1, "c1", "r1", "s1", q))
                .collect(),
        )
        .unwrap();
    let acks = wait_ack(&h, "s1", 5);
    assert_eq!(acks.last().unwrap().durable_seq, 5);
    h.shutdown().unwrap();
    let sum = ok(dir.path(), &[&key()]);
    assert_eq!(sum.events, 6);
}

#[test]
fn segments_roll_and_retention_keeps_a_verifiable_suffix() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), SigningMode::PerEvent);
    c.segment_bytes = 4096;
    c.retention_bytes = Some(12 * 1024);
    let h = vigil_journal::spawn(c, key()).unwrap();
    for q in 1..=100 {
        h.input
            .send(vec![guest_event(1, "c1", "r1", "s1", q)])
            .unwrap();
        wait_ack(&h, "s1", q);
    }
    assert!(
        h.health
            .segments_deleted
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    h.shutdown().unwrap();
    let segs = list_segments(dir.path()).unwrap();
    assert!(segs[0].0 > 0 && segs.len() >= 2);
    let total: u64 = segs
        .iter()
        .map(|(_, p)| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(total <= 12 * 1024 + 4096, "{total}");
    let sum = ok(dir.path(), &[&key()]);
    assert_eq!(sum.runs_anchored, 1);
    assert!(sum.segments >= 2);
}

#[test]
fn tail_filters_and_follows_durable_records() {
    let dir = tempfile::tempdir().unwrap();
    let h = vigil_journal::spawn(config(dir.path(), SigningMode::Batch), key()).unwrap();
    h.input
        .send(vec![
            guest_event(1, "c1", "r1", "s1", 1),
            guest_event(2, "c2", "r9", "s1", 1),
        ])
        .unwrap();
    wait_ack(&h, "s1", 1);
    let filter = TailFilter {
        cell: Some("c2".into()),
        ..TailFilter::default()
    };
    let mut cursor = None;
    let mut out = Vec::new();
    assert_eq!(
        vigil_journal::tail_once(dir.path(), &filter, &mut cursor, &mut out).unwrap(),
        1
    );
    assert_eq!(String::from_utf8(out.clone()).unwrap().lines().count(), 1);
    let line: serde_json::Value = serde_json::from_slice(&out[..out.len() - 1]).unwrap();
    assert_eq!(line["runid"], "r9");
    h.input
        .send(vec![guest_event(2, "c2", "r9", "s1", 2)])
        .unwrap();
    wait_ack(&h, "s1", 2);
    let mut out = Vec::new();
    assert_eq!(
        vigil_journal::tail_once(dir.path(), &filter, &mut cursor, &mut out).unwrap(),
        1
    );
    let by_type = TailFilter {
        ty: Some(vigil_journal::event::BATCH_HEAD_TYPE.into()),
        ..TailFilter::default()
    };
    let mut c2 = None;
    assert_eq!(
        vigil_journal::tail_once(dir.path(), &by_type, &mut c2, &mut Vec::new()).unwrap(),
        2
    );
    h.shutdown().unwrap();
}

#[test]
fn key_file_is_created_0600_and_loose_or_foreign_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys/host.key");
    let k = HostKey::load_or_create(&path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let pubk = vigil_journal::read_public_key(&HostKey::public_key_path(&path)).unwrap();
    assert_eq!(pubk, k.verifying_key());
    assert_eq!(k.key_id().len(), 64);
    assert_eq!(HostKey::load_or_create(&path).unwrap().key_id(), k.key_id());
    assert!(matches!(
        HostKey::generate_to(&path),
        Err(KeyError::AlreadyExists { .. })
    ));

    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = HostKey::load_or_create(&path).unwrap_err();
    assert!(matches!(e, KeyError::LooseMode { mode: 0o644, .. }), "{e}");
    assert!(e.to_string().contains("chmod 600"), "{e}");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();

    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        std::os::unix::fs::chown(&path, Some(4242), None).unwrap();
        let e = HostKey::load_or_create(&path).unwrap_err();
        assert!(matches!(e, KeyError::WrongOwner { owner: 4242, .. }), "{e}");
    } else {
        println!("skipped the foreign-owner case: needs root to chown the key file");
    }
    let _ = Arc::new(());
}

#[test]
fn recovery_truncates_torn_tail_and_headless_batch() {
    let dir = tempfile::tempdir().unwrap();
    write_events(dir.path(), SigningMode::Batch, key(), 3);
    let (idx, path) = list_segments(dir.path()).unwrap().remove(0);
    let good = std::fs::read(&path).unwrap();
    // Append a batch's event without its head, then half a record: a crash mid-write.
    let scan = scan_segment(idx, &path).unwrap();
    let mut bytes = good.clone();
    bytes.extend_from_slice(&good[scan.records[0].0 as usize..scan.records[0].1.end]);
    bytes.extend_from_slice(&[9, 0, 0, 0, 1, 2]);
    std::fs::write(&path, &bytes).unwrap();
    let h = vigil_journal::spawn(config(dir.path(), SigningMode::Batch), key()).unwrap();
    assert_eq!(
        h.health
            .recovered_truncated_bytes
            .load(std::sync::atomic::Ordering::Relaxed),
        (bytes.len() - good.len()) as u64
    );
    h.input
        .send(vec![guest_event(1, "c1", "r1", "s1", 4)])
        .unwrap();
    wait_ack(&h, "s1", 4);
    h.shutdown().unwrap();
    let sum = ok(dir.path(), &[&key()]);
    assert_eq!(sum.events, 5);
}
