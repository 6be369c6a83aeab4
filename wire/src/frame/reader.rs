//! A hand-written, zero-copy protobuf reader for the two hot guest messages (`Event`,
//! `PolicyQuery`), plus the scan of the enclosing `GuestFrame`.
//!
//! It accepts exactly what prost's own decoder accepts for these messages, with the same
//! results: fields in any order, a repeated scalar field takes its last value, unknown fields
//! (every wire type, nested groups included, to prost's recursion limit) are skipped, string
//! fields must be UTF-8 (every occurrence, not only the last), a known field with the wrong
//! wire type is an error, and a oneof field that occurs several times is merged the way prost
//! merges it. The tests check that claim against prost over randomised inputs. It never
//! panics and never reads out of bounds: every access goes through a bounds-checked slice.

use super::{EventView, PolicyQueryView};

/// Why a byte sequence is not a valid protobuf encoding of the message (a fixed sentence,
/// so the hot path allocates nothing until an error is reported).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DecodeFail(pub(crate) &'static str);

const WT_VARINT: u8 = 0;
const WT_I64: u8 = 1;
const WT_LEN: u8 = 2;
const WT_SGROUP: u8 = 3;
const WT_EGROUP: u8 = 4;
const WT_I32: u8 = 5;

/// prost's recursion limit (`prost::RECURSION_LIMIT`): skipping an unknown field costs one
/// level, each nested group one more, and each nested message one more. Mirrored so that
/// deeply nested unknown groups are rejected exactly where prost rejects them.
const RECURSION_LIMIT: u32 = 100;

/// GuestFrame oneof field numbers.
pub(crate) const TAG_HELLO: u32 = 1;
pub(crate) const TAG_EVENT: u32 = 2;
pub(crate) const TAG_HEARTBEAT: u32 = 3;
pub(crate) const TAG_POLICY_QUERY: u32 = 4;
pub(crate) const TAG_EXECUTOR_STATS: u32 = 5;

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn at(buf: &'a [u8], pos: usize) -> Self {
        Reader { buf, pos }
    }

    fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn remaining(&self) -> &'a [u8] {
        self.buf.get(self.pos..).unwrap_or(&[])
    }

    /// A base-128 varint of at most 10 bytes whose value fits in 64 bits (prost's rule: the
    /// tenth byte must be 0 or 1).
    fn varint(&mut self) -> Result<u64, DecodeFail> {
        let rest = self.remaining();
        let mut value: u64 = 0;
        for (i, &b) in rest.iter().take(10).enumerate() {
            value |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                if i == 9 && b >= 0x02 {
                    return Err(DecodeFail("varint overflows 64 bits"));
                }
                self.pos += i + 1;
                return Ok(value);
            }
        }
        if rest.len() >= 10 {
            Err(DecodeFail("varint longer than 10 bytes"))
        } else {
            Err(DecodeFail("varint truncated at the end of the message"))
        }
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], DecodeFail> {
        let rest = self.remaining();
        if n > rest.len() as u64 {
            return Err(DecodeFail("field runs past the end of the message"));
        }
        let n = n as usize;
        self.pos += n;
        Ok(&rest[..n])
    }

    /// A field key: (field number, wire type).
    fn key(&mut self) -> Result<(u32, u8), DecodeFail> {
        let key = self.varint()?;
        if key > u64::from(u32::MAX) {
            return Err(DecodeFail("field key larger than 32 bits"));
        }
        let wire_type = (key & 0x07) as u8;
        if wire_type > WT_I32 {
            return Err(DecodeFail("invalid wire type (6 or 7)"));
        }
        let tag = (key as u32) >> 3;
        if tag == 0 {
            return Err(DecodeFail("field number 0"));
        }
        Ok((tag, wire_type))
    }

    /// A length-delimited field's bytes.
    fn len_delimited(&mut self) -> Result<&'a [u8], DecodeFail> {
        let len = self.varint()?;
        self.take(len)
    }

    /// Skips one unknown field (prost's `skip_field`), with `budget` recursion levels left.
    fn skip(&mut self, wire_type: u8, tag: u32, budget: u32) -> Result<(), DecodeFail> {
        if budget == 0 {
            return Err(DecodeFail(
                "unknown fields nested too deeply (recursion limit)",
            ));
        }
        match wire_type {
            WT_VARINT => self.varint().map(drop),
            WT_I64 => self.take(8).map(drop),
            WT_I32 => self.take(4).map(drop),
            WT_LEN => self.len_delimited().map(drop),
            WT_SGROUP => loop {
                let (inner_tag, inner_wt) = self.key()?;
                if inner_wt == WT_EGROUP {
                    if inner_tag != tag {
                        return Err(DecodeFail("end-group tag does not match its start-group"));
                    }
                    return Ok(());
                }
                self.skip(inner_wt, inner_tag, budget - 1)?;
            },
            _ => Err(DecodeFail("end-group without a matching start-group")),
        }
    }
}

fn expect_wire_type(got: u8, want: u8) -> Result<(), DecodeFail> {
    if got == want {
        Ok(())
    } else {
        Err(DecodeFail("known field has the wrong wire type"))
    }
}

fn utf8(bytes: &[u8]) -> Result<&str, DecodeFail> {
    std::str::from_utf8(bytes).map_err(|_| DecodeFail("string field is not valid UTF-8"))
}

/// What one pass over a GuestFrame's top-level fields found.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FrameScan {
    /// The oneof field number that wins (the last one present), 0 when none is.
    pub(crate) kind: u32,
    /// Offset of the first field of the final run of `kind` occurrences: prost merges
    /// repeated occurrences of the same oneof field and starts afresh when the kind changes,
    /// so only fields from here on contribute to the result.
    pub(crate) run_start: usize,
    /// Another oneof field occurred before that run; its contents are not checked by the
    /// scan, so the caller must have prost check the whole frame.
    pub(crate) mixed: bool,
}

/// Scans a GuestFrame's top-level fields: checks every key, skips unknown fields, and notes
/// which oneof kind wins. Does not look inside the oneof messages.
pub(crate) fn scan_guest_frame(bytes: &[u8]) -> Result<FrameScan, DecodeFail> {
    let mut r = Reader::new(bytes);
    let mut scan = FrameScan {
        kind: 0,
        run_start: 0,
        mixed: false,
    };
    while !r.is_empty() {
        let field_start = r.pos;
        let (tag, wire_type) = r.key()?;
        if (TAG_HELLO..=TAG_EXECUTOR_STATS).contains(&tag) {
            expect_wire_type(wire_type, WT_LEN)?;
            r.len_delimited()?;
            if tag != scan.kind {
                scan.mixed |= scan.kind != 0;
                scan.kind = tag;
                scan.run_start = field_start;
            }
        } else {
            r.skip(wire_type, tag, RECURSION_LIMIT)?;
        }
    }
    Ok(scan)
}

/// Calls `merge` on the body of every occurrence of field `kind` from `run_start` on.
fn for_each_occurrence<'a>(
    bytes: &'a [u8],
    run_start: usize,
    kind: u32,
    mut merge: impl FnMut(Reader<'a>) -> Result<(), DecodeFail>,
) -> Result<(), DecodeFail> {
    let mut r = Reader::at(bytes, run_start);
    while !r.is_empty() {
        let (tag, wire_type) = r.key()?;
        if tag == kind {
            expect_wire_type(wire_type, WT_LEN)?;
            merge(Reader::new(r.len_delimited()?))?;
        } else {
            r.skip(wire_type, tag, RECURSION_LIMIT)?;
        }
    }
    Ok(())
}

/// Unknown fields inside a oneof message are skipped one recursion level down.
const NESTED_BUDGET: u32 = RECURSION_LIMIT - 1;

/// Reads the `Event` of a frame whose scan says `kind == TAG_EVENT`, zero-copy.
pub(crate) fn read_event(bytes: &[u8], scan: FrameScan) -> Result<EventView<'_>, DecodeFail> {
    let mut ev = EventView {
        guest_seq: 0,
        event_type: "",
        op_id: "",
        content_type: "",
        payload: &[],
        guest_time_unix_nano: 0,
    };
    for_each_occurrence(bytes, scan.run_start, TAG_EVENT, |mut r| {
        while !r.is_empty() {
            let (tag, wire_type) = r.key()?;
            match tag {
                1 => {
                    expect_wire_type(wire_type, WT_VARINT)?;
                    ev.guest_seq = r.varint()?;
                }
                2 => {
                    expect_wire_type(wire_type, WT_LEN)?;
                    ev.event_type = utf8(r.len_delimited()?)?;
                }
                3 => {
                    expect_wire_type(wire_type, WT_LEN)?;
                    ev.op_id = utf8(r.len_delimited()?)?;
                }
                4 => {
                    expect_wire_type(wire_type, WT_LEN)?;
                    ev.content_type = utf8(r.len_delimited()?)?;
                }
                5 => {
                    expect_wire_type(wire_type, WT_LEN)?;
                    ev.payload = r.len_delimited()?;
                }
                6 => {
                    expect_wire_type(wire_type, WT_VARINT)?;
                    ev.guest_time_unix_nano = r.varint()?;
                }
                _ => r.skip(wire_type, tag, NESTED_BUDGET)?,
            }
        }
        Ok(())
    })?;
    Ok(ev)
}

/// Reads the `PolicyQuery` of a frame whose scan says `kind == TAG_POLICY_QUERY`, zero-copy.
pub(crate) fn read_policy_query(
    bytes: &[u8],
    scan: FrameScan,
) -> Result<PolicyQueryView<'_>, DecodeFail> {
    let mut q = PolicyQueryView {
        query_id: 0,
        op_id: "",
        action: "",
    };
    for_each_occurrence(bytes, scan.run_start, TAG_POLICY_QUERY, |mut r| {
        while !r.is_empty() {
            let (tag, wire_type) = r.key()?;
            match tag {
                1 => {
                    expect_wire_type(wire_type, WT_VARINT)?;
                    q.query_id = r.varint()?;
                }
                2 => {
                    expect_wire_type(wire_type, WT_LEN)?;
                    q.op_id = utf8(r.len_delimited()?)?;
                }
                3 => {
                    expect_wire_type(wire_type, WT_LEN)?;
                    q.action = utf8(r.len_delimited()?)?;
                }
                _ => r.skip(wire_type, tag, NESTED_BUDGET)?,
            }
        }
        Ok(())
    })?;
    Ok(q)
}

/// Result of reading a frame-length prefix from the front of `bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Prefix {
    /// The length, and how many bytes the varint took.
    Complete(u64, usize),
    /// `bytes` ends inside the varint (fewer than 10 bytes, all with the continuation bit).
    Incomplete,
    /// More than 10 bytes, or a value over 64 bits.
    Invalid,
}

pub(crate) fn read_prefix(bytes: &[u8]) -> Prefix {
    let mut value: u64 = 0;
    for (i, &b) in bytes.iter().take(10).enumerate() {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            if i == 9 && b >= 0x02 {
                return Prefix::Invalid;
            }
            return Prefix::Complete(value, i + 1);
        }
    }
    if bytes.len() >= 10 {
        Prefix::Invalid
    } else {
        Prefix::Incomplete
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_edges() {
        assert_eq!(read_prefix(&[]), Prefix::Incomplete);
        assert_eq!(read_prefix(&[0x05]), Prefix::Complete(5, 1));
        assert_eq!(read_prefix(&[0x80]), Prefix::Incomplete);
        assert_eq!(read_prefix(&[0x85, 0x00]), Prefix::Complete(5, 2));
        assert_eq!(read_prefix(&[0xff; 9]), Prefix::Incomplete);
        assert_eq!(read_prefix(&[0xff; 10]), Prefix::Invalid);
        let mut max = [0xff_u8; 10];
        max[9] = 0x01;
        assert_eq!(read_prefix(&max), Prefix::Complete(u64::MAX, 10));
        max[9] = 0x02;
        assert_eq!(read_prefix(&max), Prefix::Invalid);
    }

    #[test]
    fn deep_groups_hit_the_recursion_limit_not_the_stack() {
        // field 7 start-group, nested 200 deep, then matching end-groups.
        let mut bytes = Vec::new();
        for _ in 0..200 {
            bytes.push((7 << 3) | WT_SGROUP);
        }
        for _ in 0..200 {
            bytes.push((7 << 3) | WT_EGROUP);
        }
        assert!(scan_guest_frame(&bytes).is_err());
    }
}
