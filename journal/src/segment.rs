//! On-disk segment format: file naming, the 16-byte header (magic + format version), record
//! framing (u32 length, u32 CRC32C, payload), creating segments durably and scanning them.
//!
//! Layout, all integers little-endian:
//! ```text
//! header: "VIGILJNL" (8 bytes) | format version u32 = 1 | reserved u32 = 0
//! record: payload length u32 | CRC32C of payload u32 | payload (one CloudEvent JSON)
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 8] = b"VIGILJNL";
pub const FORMAT_VERSION: u32 = 1;
pub const HEADER_LEN: u64 = 16;
pub const RECORD_HEADER_LEN: usize = 8;
/// Largest record payload accepted (4 MiB). Guest frames are bounded well below this by the
/// drain's maximum frame size; a larger event is refused and counted, never written, so a
/// corrupt length field can never make a reader allocate more than this.
pub const MAX_RECORD_BYTES: usize = 4 << 20;

const SEGMENT_PREFIX: &str = "seg-";
const SEGMENT_SUFFIX: &str = ".vjl";

/// Errors of segment file operations.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error("could not list journal directory {path}: {source}")]
    ListDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("could not read segment {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("could not create segment {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("segment {path} does not start with the vigil journal magic")]
    BadMagic { path: PathBuf },
    #[error(
        "segment {path} has format version {version}, this build reads version {FORMAT_VERSION}"
    )]
    UnsupportedVersion { path: PathBuf, version: u32 },
}

/// Why a scan stopped before the end of a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordFault {
    /// Fewer than 8 bytes remain for a record header.
    ShortHeader,
    /// The length field exceeds [`MAX_RECORD_BYTES`].
    TooLarge(u32),
    /// The file ends inside the payload.
    ShortPayload,
    /// The payload's CRC32C does not match.
    BadCrc,
}

impl std::fmt::Display for RecordFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ShortHeader => write!(f, "the file ends inside a record header (torn write)"),
            Self::TooLarge(n) => write!(f, "the record length {n} exceeds the maximum"),
            Self::ShortPayload => write!(f, "the file ends inside a record payload (torn write)"),
            Self::BadCrc => write!(f, "the record's CRC32C does not match its bytes"),
        }
    }
}

/// One segment read into memory.
#[derive(Debug)]
pub struct SegmentScan {
    pub index: u64,
    pub path: PathBuf,
    pub bytes: Vec<u8>,
    /// `(offset of the record header, payload range in bytes)`.
    pub records: Vec<(u64, std::ops::Range<usize>)>,
    /// Offset just after the last good record.
    pub good_end: u64,
    /// Set when the scan stopped at a bad record before the end of the file.
    pub fault: Option<(u64, RecordFault)>,
}

impl SegmentScan {
    pub fn payload(&self, i: usize) -> &[u8] {
        &self.bytes[self.records[i].1.clone()]
    }
}

pub fn segment_name(index: u64) -> String {
    format!("{SEGMENT_PREFIX}{index:016}{SEGMENT_SUFFIX}")
}

/// Segment files of `dir`, ordered by index.
pub fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, SegmentError> {
    let list_err = |source| SegmentError::ListDir {
        path: dir.to_owned(),
        source,
    };
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(list_err)? {
        let entry = entry.map_err(list_err)?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(num) = name
            .strip_prefix(SEGMENT_PREFIX)
            .and_then(|n| n.strip_suffix(SEGMENT_SUFFIX))
        else {
            continue;
        };
        if let Ok(index) = num.parse::<u64>() {
            out.push((index, entry.path()));
        }
    }
    out.sort_unstable_by_key(|(i, _)| *i);
    Ok(out)
}

/// Appends one framed record to `out`.
pub fn encode_record(payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

fn header() -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h
}

/// fsyncs a directory so a created, renamed or removed entry is durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates segment `index` in `dir` with its header, durably (file and directory fsynced).
pub fn create_segment(dir: &Path, index: u64) -> Result<(File, PathBuf), SegmentError> {
    let path = dir.join(segment_name(index));
    let make = || -> std::io::Result<File> {
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        f.write_all(&header())?;
        f.sync_all()?;
        sync_dir(dir)?;
        Ok(f)
    };
    match make() {
        Ok(f) => Ok((f, path)),
        Err(source) => {
            // Leave no headerless file behind (e.g. after ENOSPC).
            let _ = fs::remove_file(&path);
            Err(SegmentError::Create { path, source })
        }
    }
}

/// Reads segment `path` and frames its records, stopping at the first bad one.
pub fn scan_segment(index: u64, path: &Path) -> Result<SegmentScan, SegmentError> {
    let bytes = fs::read(path).map_err(|source| SegmentError::Read {
        path: path.to_owned(),
        source,
    })?;
    if bytes.len() < HEADER_LEN as usize || &bytes[..8] != MAGIC {
        return Err(SegmentError::BadMagic {
            path: path.to_owned(),
        });
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if version != FORMAT_VERSION {
        return Err(SegmentError::UnsupportedVersion {
            path: path.to_owned(),
            version,
        });
    }
    let mut records = Vec::new();
    let mut pos = HEADER_LEN as usize;
    let mut fault = None;
    while pos < bytes.len() {
        if bytes.len() - pos < RECORD_HEADER_LEN {
            fault = Some((pos as u64, RecordFault::ShortHeader));
            break;
        }
        let len = u32::from_le_bytes([bytes[pos], bytes[pos + 1], bytes[pos + 2], bytes[pos + 3]]);
        let crc = u32::from_le_bytes([
            bytes[pos + 4],
            bytes[pos + 5],
            bytes[pos + 6],
            bytes[pos + 7],
        ]);
        if len as usize > MAX_RECORD_BYTES {
            fault = Some((pos as u64, RecordFault::TooLarge(len)));
            break;
        }
        let start = pos + RECORD_HEADER_LEN;
        let end = start + len as usize;
        if end > bytes.len() {
            fault = Some((pos as u64, RecordFault::ShortPayload));
            break;
        }
        if crc32c::crc32c(&bytes[start..end]) != crc {
            fault = Some((pos as u64, RecordFault::BadCrc));
            break;
        }
        records.push((pos as u64, start..end));
        pos = end;
    }
    let good_end = records.last().map_or(HEADER_LEN, |(_, r)| r.end as u64);
    Ok(SegmentScan {
        index,
        path: path.to_owned(),
        bytes,
        records,
        good_end,
        fault,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_torn_tail_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let (mut f, path) = create_segment(dir.path(), 3).unwrap();
        let mut buf = Vec::new();
        encode_record(b"{\"a\":1}", &mut buf);
        encode_record(b"{\"b\":2}", &mut buf);
        f.write_all(&buf).unwrap();
        f.write_all(&buf[..5]).unwrap();
        let scan = scan_segment(3, &path).unwrap();
        assert_eq!(scan.records.len(), 2);
        assert_eq!(scan.payload(1), b"{\"b\":2}");
        assert_eq!(scan.fault, Some((scan.good_end, RecordFault::ShortHeader)));
        assert_eq!(list_segments(dir.path()).unwrap(), vec![(3, path)]);
    }
}
