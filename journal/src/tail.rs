//! `tail`: prints journal records as JSON lines (the stored CloudEvent bytes, one per line),
//! filtered by cell, run and type, only up to what `durable.mark` says is durable; with
//! `follow`, keeps polling for new durable records.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::event::Record;
use crate::segment::{
    list_segments, SegmentError, HEADER_LEN, MAX_RECORD_BYTES, RECORD_HEADER_LEN,
};
use crate::writer::read_mark;

/// How often `--follow` looks for new durable records (200 ms): quick enough for a human
/// watching, cheap enough (one small read when nothing changed) to leave running.
pub const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// Errors of tailing.
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error("could not list the journal: {0}")]
    List(#[from] SegmentError),
    #[error("could not read segment {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("could not write to the output: {0}")]
    Output(#[source] std::io::Error),
}

/// Which records to print (`None` matches everything).
#[derive(Debug, Clone, Default)]
pub struct TailFilter {
    pub cell: Option<String>,
    pub run: Option<String>,
    pub ty: Option<String>,
}

impl TailFilter {
    fn matches(&self, rec: &Record) -> bool {
        self.cell
            .as_ref()
            .is_none_or(|c| rec.cellid.as_ref() == Some(c))
            && self
                .run
                .as_ref()
                .is_none_or(|r| rec.runid.as_ref() == Some(r))
            && self.ty.as_ref().is_none_or(|t| rec.ty == *t)
    }
}

/// Where the next unread record is: `(segment index, offset)`.
pub type TailCursor = Option<(u64, u64)>;

/// Prints the durable records after `cursor` that match, advances `cursor`, returns how many
/// were printed.
pub fn tail_once(
    dir: &Path,
    filter: &TailFilter,
    cursor: &mut TailCursor,
    out: &mut dyn Write,
) -> Result<usize, TailError> {
    let mark = read_mark(dir);
    let mut printed = 0;
    for (index, path) in list_segments(dir)? {
        if cursor.is_some_and(|(s, _)| index < s) || mark.is_some_and(|(s, _)| index > s) {
            continue;
        }
        let mut pos = match *cursor {
            Some((s, o)) if s == index => o,
            _ => HEADER_LEN,
        };
        let read_err = |source| TailError::Read {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(read_err)?;
        let file_len = file.metadata().map_err(read_err)?.len();
        let limit = match mark {
            Some((s, o)) if s == index => o.min(file_len),
            _ => file_len,
        };
        let mut hdr = [0u8; RECORD_HEADER_LEN];
        while pos + RECORD_HEADER_LEN as u64 <= limit {
            file.read_exact_at(&mut hdr, pos).map_err(read_err)?;
            let len = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) as usize;
            let crc = u32::from_le_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
            let end = pos + (RECORD_HEADER_LEN + len) as u64;
            if len > MAX_RECORD_BYTES || end > limit {
                break;
            }
            let mut payload = vec![0u8; len];
            file.read_exact_at(&mut payload, pos + RECORD_HEADER_LEN as u64)
                .map_err(read_err)?;
            if crc32c::crc32c(&payload) != crc {
                break;
            }
            if Record::parse(&payload).is_ok_and(|r| filter.matches(&r)) {
                out.write_all(&payload)
                    .and_then(|()| out.write_all(b"\n"))
                    .map_err(TailError::Output)?;
                printed += 1;
            }
            pos = end;
        }
        *cursor = Some((index, pos));
    }
    out.flush().map_err(TailError::Output)?;
    Ok(printed)
}

/// Prints matching durable records; with `follow`, never returns unless output fails.
pub fn tail(
    dir: &Path,
    filter: &TailFilter,
    follow: bool,
    out: &mut dyn Write,
) -> Result<(), TailError> {
    let mut cursor = None;
    tail_once(dir, filter, &mut cursor, out)?;
    if !follow {
        return Ok(());
    }
    loop {
        std::thread::sleep(FOLLOW_POLL);
        tail_once(dir, filter, &mut cursor, out)?;
    }
}
