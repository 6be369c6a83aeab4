//! Shared test helpers: a seeded PRNG (no external crate, reproducible by seed) and a
//! hand-written protobuf encoder that can produce encodings prost never would (reordered,
//! repeated and unknown fields, non-minimal varints, groups).

#![allow(dead_code, reason = "each test binary uses a different subset")]

use vigil_wire::pb;

/// splitmix64: tiny, good enough for test inputs, and reproducible from a printed seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }

    /// Random bytes, fewer than `max`.
    pub fn bytes_below(&mut self, max: usize) -> Vec<u8> {
        let len = self.below(max);
        self.bytes(len)
    }

    /// A UTF-8 string of fewer than `max` bytes.
    pub fn utf8_below(&mut self, max: usize) -> String {
        let len = self.below(max);
        self.utf8(len)
    }

    /// A UTF-8 string of `len` bytes exactly, mixing ASCII and multi-byte characters.
    pub fn utf8(&mut self, len: usize) -> String {
        let mut s = String::new();
        while s.len() < len {
            let left = len - s.len();
            let c = match self.below(6) {
                0 if left >= 2 => 'é',
                1 if left >= 3 => '€',
                2 if left >= 4 => '🦀',
                _ => char::from(b'a' + self.below(26) as u8),
            };
            s.push(c);
        }
        s
    }

    /// A varint-ish value: small most of the time, sometimes huge.
    pub fn value(&mut self) -> u64 {
        match self.below(4) {
            0 => self.below(128) as u64,
            1 => self.below(1 << 20) as u64,
            2 => u64::MAX - self.below(3) as u64,
            _ => self.next_u64(),
        }
    }

    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

pub const WT_VARINT: u8 = 0;
pub const WT_I64: u8 = 1;
pub const WT_LEN: u8 = 2;
pub const WT_SGROUP: u8 = 3;
pub const WT_EGROUP: u8 = 4;
pub const WT_I32: u8 = 5;

pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A varint padded with `extra` redundant continuation bytes (still at most 10 bytes, so
/// prost accepts it).
pub fn put_varint_padded(out: &mut Vec<u8>, v: u64, extra: usize) {
    let mut tmp = Vec::new();
    put_varint(&mut tmp, v);
    let extra = extra.min(10 - tmp.len());
    if extra == 0 {
        out.extend_from_slice(&tmp);
        return;
    }
    let last = tmp.len() - 1;
    tmp[last] |= 0x80;
    tmp.extend(std::iter::repeat_n(0x80, extra - 1));
    tmp.push(0x00);
    out.extend_from_slice(&tmp);
}

pub fn put_key(out: &mut Vec<u8>, tag: u32, wt: u8) {
    put_varint(out, (u64::from(tag) << 3) | u64::from(wt));
}

pub fn put_varint_field(out: &mut Vec<u8>, tag: u32, v: u64) {
    put_key(out, tag, WT_VARINT);
    put_varint(out, v);
}

pub fn put_len_field(out: &mut Vec<u8>, tag: u32, bytes: &[u8]) {
    put_key(out, tag, WT_LEN);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// One random unknown field with a tag not in `known` (groups nest up to `depth`).
pub fn put_unknown_field(
    rng: &mut Rng,
    out: &mut Vec<u8>,
    known: std::ops::RangeInclusive<u32>,
    depth: u32,
) {
    let tag = loop {
        let t = match rng.below(3) {
            0 => 1 + rng.below(20) as u32,
            1 => 1 + rng.below(5000) as u32,
            _ => (1 << 29) - 1 - rng.below(4) as u32,
        };
        if !known.contains(&t) {
            break t;
        }
    };
    let wt = if depth == 0 {
        [WT_VARINT, WT_I64, WT_LEN, WT_I32][rng.below(4)]
    } else {
        rng.below(6) as u8
    };
    match wt {
        WT_VARINT => {
            put_key(out, tag, WT_VARINT);
            let v = rng.value();
            put_varint(out, v);
        }
        WT_I64 => {
            put_key(out, tag, WT_I64);
            let b = rng.bytes(8);
            out.extend_from_slice(&b);
        }
        WT_I32 => {
            put_key(out, tag, WT_I32);
            let b = rng.bytes(4);
            out.extend_from_slice(&b);
        }
        WT_SGROUP | WT_EGROUP => {
            put_key(out, tag, WT_SGROUP);
            for _ in 0..rng.below(3) {
                put_unknown_field(rng, out, 0..=0, depth - 1);
            }
            put_key(out, tag, WT_EGROUP);
        }
        _ => {
            let len = rng.below(40);
            let b = rng.bytes(len);
            put_len_field(out, tag, &b);
        }
    }
}

/// A random, valid Event message (as prost would build it).
pub fn random_event(rng: &mut Rng, seq: u64) -> pb::Event {
    let type_len = 1 + rng.below(60);
    let op_id = if rng.chance(50) {
        format!("{:032x}:{:016x}", rng.next_u64(), rng.next_u64())
    } else {
        String::new()
    };
    let payload_len = match rng.below(10) {
        0 => 0,
        1 => rng.below(4000),
        _ => rng.below(300),
    };
    pb::Event {
        guest_seq: seq,
        r#type: rng.utf8(type_len),
        op_id,
        content_type: if rng.chance(50) {
            "application/json".into()
        } else {
            "text/plain".into()
        },
        payload: rng.bytes(payload_len),
        guest_time_unix_nano: rng.next_u64(),
    }
}

pub fn random_hello(rng: &mut Rng) -> pb::Hello {
    let sid_len = 1 + rng.below(128);
    let mut claims = std::collections::HashMap::new();
    for i in 0..rng.below(4) {
        claims.insert(format!("k{i}"), rng.utf8_below(20));
    }
    pb::Hello {
        protocol_version: 1,
        stream_id: rng.utf8(sid_len),
        agent_name: rng.utf8_below(20),
        agent_version: "1.2.3".into(),
        claims,
    }
}

/// A random valid frame of any kind but Hello.
pub fn random_frame(rng: &mut Rng, seq: u64) -> pb::GuestFrame {
    use pb::guest_frame::Kind;
    let kind = match rng.below(10) {
        0 => Kind::Heartbeat(pb::Heartbeat {
            guest_time_unix_nano: rng.next_u64(),
        }),
        1 => Kind::PolicyQuery(pb::PolicyQuery {
            query_id: rng.value(),
            op_id: rng.utf8_below(60),
            action: rng.utf8_below(30),
        }),
        2 => Kind::ExecutorStats(pb::ExecutorStats {
            tasks: (0..rng.below(4))
                .map(|i| pb::TaskSample {
                    task: format!("task{i}"),
                    started: rng.value(),
                    stopped: rng.value(),
                    errors: rng.value(),
                    last_duration_ns: rng.value(),
                })
                .collect(),
        }),
        _ => Kind::Event(random_event(rng, seq)),
    };
    pb::GuestFrame { kind: Some(kind) }
}

pub fn hello_frame(rng: &mut Rng) -> pb::GuestFrame {
    pb::GuestFrame {
        kind: Some(pb::guest_frame::Kind::Hello(random_hello(rng))),
    }
}
