//! The cpio "newc" (SVR4, no CRC) archive format the Linux kernel unpacks as an initramfs:
//! a writer that builds archives entry by entry, and a strict parser used to check them.
//!
//! Layout of one entry: a 110-byte ASCII header (`070701` then 13 fields of 8 hex digits),
//! the NUL-terminated name padded to a 4-byte boundary (counting the header), then the data
//! padded to a 4-byte boundary. The archive ends with an entry named `TRAILER!!!`.

use std::collections::HashSet;
use std::io::Write;

/// Magic of a newc header (no checksum variant).
pub const NEWC_MAGIC: &[u8; 6] = b"070701";
/// Fixed size of a newc header: 6 magic bytes + 13 fields × 8 hex digits.
pub const HEADER_LEN: usize = 110;
/// Name of the final entry that ends every archive.
pub const TRAILER_NAME: &str = "TRAILER!!!";
/// Longest path accepted for one entry: the kernel's PATH_MAX (4096 including the NUL);
/// longer names are refused with [`CpioError::NameTooLong`] instead of being truncated.
pub const MAX_NAME_LEN: usize = 4095;
/// Largest file body: the size field is 8 hex digits, so 4 GiB − 1. A bigger file is
/// refused with [`CpioError::FileTooLarge`].
pub const MAX_FILE_LEN: u64 = u32::MAX as u64;

/// File type bits of `st_mode`.
const S_IFMT: u32 = 0o170_000;
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Errors of writing or parsing a newc archive.
#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    #[error("writing the archive failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("entry name {name:?} is empty, absolute, contains a NUL byte or `..`")]
    BadName { name: String },
    #[error("entry name is {len} bytes long; at most {MAX_NAME_LEN} are accepted")]
    NameTooLong { len: usize },
    #[error("entry {name:?} was already written to this archive")]
    Duplicate { name: String },
    #[error("file {name:?} is {len} bytes; a newc entry holds at most {MAX_FILE_LEN}")]
    FileTooLarge { name: String, len: u64 },
    #[error("archive is truncated at offset {offset}: needed {needed} more bytes")]
    Truncated { offset: usize, needed: usize },
    #[error("bad magic at offset {offset}: expected 070701")]
    BadMagic { offset: usize },
    #[error("header field {field} at offset {offset} is not 8 hex digits")]
    BadField { field: &'static str, offset: usize },
    #[error("entry at offset {offset} has a name that is not NUL-terminated UTF-8")]
    BadNameBytes { offset: usize },
    #[error("padding at offset {offset} is not zero")]
    BadPadding { offset: usize },
    #[error("archive has no TRAILER!!! entry")]
    MissingTrailer,
}

/// What an entry is, with its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Directory,
    File(Vec<u8>),
    Symlink(String),
    CharDevice { major: u32, minor: u32 },
}

/// One entry as read back by [`parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedEntry {
    pub name: String,
    pub ino: u32,
    /// Full `st_mode` (type bits and permissions).
    pub mode: u32,
    pub nlink: u32,
    pub mtime: u32,
    pub kind: EntryKind,
    /// Offset of this entry's header in the archive (always a multiple of 4).
    pub header_offset: usize,
    /// Offset of this entry's data (always a multiple of 4).
    pub data_offset: usize,
}

/// Streams a newc archive into any writer. Every entry gets its own inode number; times are
/// fixed at 0 so the same input gives the same bytes.
pub struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
    offset: u64,
    names: HashSet<String>,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            next_ino: 1,
            offset: 0,
            names: HashSet::new(),
        }
    }

    /// Bytes written so far (header, names, data and padding).
    pub fn bytes_written(&self) -> u64 {
        self.offset
    }

    /// A directory with permission bits `perm` (e.g. 0o755).
    pub fn dir(&mut self, name: &str, perm: u32) -> Result<(), CpioError> {
        self.entry(name, S_IFDIR | (perm & 0o7777), 2, 0, 0, &[])
    }

    /// A regular file with permission bits `perm` holding `data`.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> Result<(), CpioError> {
        if data.len() as u64 > MAX_FILE_LEN {
            return Err(CpioError::FileTooLarge {
                name: name.to_owned(),
                len: data.len() as u64,
            });
        }
        self.entry(name, S_IFREG | (perm & 0o7777), 1, 0, 0, data)
    }

    /// A symbolic link `name` → `target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> Result<(), CpioError> {
        self.entry(name, S_IFLNK | 0o777, 1, 0, 0, target.as_bytes())
    }

    /// A character device node (e.g. `dev/console`, 5:1).
    pub fn char_device(
        &mut self,
        name: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        self.entry(name, S_IFCHR | (perm & 0o7777), 1, major, minor, &[])
    }

    /// Writes the trailer and returns the underlying writer.
    pub fn finish(mut self) -> Result<W, CpioError> {
        self.write_raw(TRAILER_NAME, 0, 0, 1, 0, 0, &[])?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev_major: u32,
        rdev_minor: u32,
        data: &[u8],
    ) -> Result<(), CpioError> {
        check_name(name)?;
        if !self.names.insert(name.to_owned()) {
            return Err(CpioError::Duplicate {
                name: name.to_owned(),
            });
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.write_raw(name, ino, mode, nlink, rdev_major, rdev_minor, data)
    }

    #[allow(clippy::too_many_arguments)] // mirrors the header's fields one to one
    fn write_raw(
        &mut self,
        name: &str,
        ino: u32,
        mode: u32,
        nlink: u32,
        rdev_major: u32,
        rdev_minor: u32,
        data: &[u8],
    ) -> Result<(), CpioError> {
        let namesize = name.len() + 1;
        let fields: [u32; 13] = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            data.len() as u32,
            0, // devmajor
            0, // devminor
            rdev_major,
            rdev_minor,
            namesize as u32,
            0, // check (unused by newc)
        ];
        let mut header = Vec::with_capacity(HEADER_LEN + namesize + 3);
        header.extend_from_slice(NEWC_MAGIC);
        for f in fields {
            header.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        header.extend_from_slice(name.as_bytes());
        header.push(0);
        header.resize(header.len() + pad4(header.len()), 0);
        self.out.write_all(&header)?;
        self.out.write_all(data)?;
        let pad = pad4(data.len());
        self.out.write_all(&[0u8; 3][..pad])?;
        self.offset += (header.len() + data.len() + pad) as u64;
        Ok(())
    }
}

/// Bytes of zero padding that bring `len` up to a multiple of 4.
fn pad4(len: usize) -> usize {
    (4 - len % 4) % 4
}

fn check_name(name: &str) -> Result<(), CpioError> {
    if name.len() > MAX_NAME_LEN {
        return Err(CpioError::NameTooLong { len: name.len() });
    }
    let bad = name.is_empty()
        || name.starts_with('/')
        || name.contains('\0')
        || name == TRAILER_NAME
        || name.split('/').any(|c| c == ".." || c.is_empty());
    if bad {
        return Err(CpioError::BadName {
            name: name.to_owned(),
        });
    }
    Ok(())
}

const FIELD_NAMES: [&str; 13] = [
    "ino",
    "mode",
    "uid",
    "gid",
    "nlink",
    "mtime",
    "filesize",
    "devmajor",
    "devminor",
    "rdevmajor",
    "rdevminor",
    "namesize",
    "check",
];

/// Parses a whole newc archive, checking magic, hex fields, 4-byte alignment, zero padding
/// and the trailer. Returns the entries before the trailer.
pub fn parse(bytes: &[u8]) -> Result<Vec<ParsedEntry>, CpioError> {
    let mut entries = Vec::new();
    let mut pos = 0usize;
    loop {
        let header = take(bytes, pos, HEADER_LEN)?;
        if &header[..6] != NEWC_MAGIC {
            return Err(CpioError::BadMagic { offset: pos });
        }
        let mut fields = [0u32; 13];
        for (i, slot) in fields.iter_mut().enumerate() {
            let start = 6 + i * 8;
            let text = std::str::from_utf8(&header[start..start + 8]).map_err(|_| {
                CpioError::BadField {
                    field: FIELD_NAMES[i],
                    offset: pos + start,
                }
            })?;
            *slot = u32::from_str_radix(text, 16).map_err(|_| CpioError::BadField {
                field: FIELD_NAMES[i],
                offset: pos + start,
            })?;
        }
        let [ino, mode, _uid, _gid, nlink, mtime, filesize, _dmaj, _dmin, rmaj, rmin, namesize, _check] =
            fields;
        let name_start = pos + HEADER_LEN;
        let name_bytes = take(bytes, name_start, namesize as usize)?;
        let name = match name_bytes.split_last() {
            Some((0, rest)) => std::str::from_utf8(rest)
                .map_err(|_| CpioError::BadNameBytes { offset: pos })?
                .to_owned(),
            _ => return Err(CpioError::BadNameBytes { offset: pos }),
        };
        let name_end = name_start + namesize as usize;
        let data_offset = name_end + pad4(name_end);
        check_zero(bytes, name_end, data_offset)?;
        let data = take(bytes, data_offset, filesize as usize)?;
        let data_end = data_offset + filesize as usize;
        let next = data_end + pad4(data_end);
        check_zero(bytes, data_end, next)?;
        if name == TRAILER_NAME {
            return Ok(entries);
        }
        let kind = match mode & S_IFMT {
            S_IFDIR => EntryKind::Directory,
            S_IFLNK => EntryKind::Symlink(
                String::from_utf8(data.to_vec())
                    .map_err(|_| CpioError::BadNameBytes { offset: pos })?,
            ),
            S_IFCHR => EntryKind::CharDevice {
                major: rmaj,
                minor: rmin,
            },
            _ => EntryKind::File(data.to_vec()),
        };
        entries.push(ParsedEntry {
            name,
            ino,
            mode,
            nlink,
            mtime,
            kind,
            header_offset: pos,
            data_offset,
        });
        pos = next;
        if pos >= bytes.len() {
            return Err(CpioError::MissingTrailer);
        }
    }
}

fn take(bytes: &[u8], at: usize, len: usize) -> Result<&[u8], CpioError> {
    bytes
        .get(at..at.saturating_add(len))
        .ok_or(CpioError::Truncated {
            offset: at,
            needed: (at + len).saturating_sub(bytes.len()),
        })
}

fn check_zero(bytes: &[u8], from: usize, to: usize) -> Result<(), CpioError> {
    let pad = take(bytes, from, to - from)?;
    if pad.iter().any(|&b| b != 0) {
        return Err(CpioError::BadPadding { offset: from });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("bin", 0o755).unwrap();
        w.file("bin/busybox", 0o755, b"\x7fELF-ish body of odd length")
            .unwrap();
        w.symlink("bin/sh", "busybox").unwrap();
        w.dir("dev", 0o755).unwrap();
        w.char_device("dev/console", 0o600, 5, 1).unwrap();
        w.file("empty", 0o644, b"").unwrap();
        w.file("init", 0o755, b"#!/bin/sh\necho hi\n").unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn round_trip_preserves_names_modes_and_bodies() {
        let bytes = sample();
        let entries = parse(&bytes).unwrap();
        let names: Vec<_> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "bin",
                "bin/busybox",
                "bin/sh",
                "dev",
                "dev/console",
                "empty",
                "init"
            ]
        );
        assert_eq!(entries[0].mode, 0o040_755);
        assert_eq!(entries[0].kind, EntryKind::Directory);
        assert_eq!(entries[0].nlink, 2);
        assert_eq!(entries[1].mode, 0o100_755);
        assert_eq!(
            entries[1].kind,
            EntryKind::File(b"\x7fELF-ish body of odd length".to_vec())
        );
        assert_eq!(entries[2].mode, 0o120_777);
        assert_eq!(entries[2].kind, EntryKind::Symlink("busybox".into()));
        assert_eq!(
            entries[4].kind,
            EntryKind::CharDevice { major: 5, minor: 1 }
        );
        assert_eq!(entries[4].mode, 0o020_600);
        assert_eq!(entries[5].kind, EntryKind::File(Vec::new()));
        // Distinct inode numbers, fixed mtime.
        let inos: HashSet<u32> = entries.iter().map(|e| e.ino).collect();
        assert_eq!(inos.len(), entries.len());
        assert!(entries.iter().all(|e| e.mtime == 0));
    }

    #[test]
    fn headers_data_and_archive_are_four_byte_aligned() {
        let bytes = sample();
        assert_eq!(bytes.len() % 4, 0);
        for e in parse(&bytes).unwrap() {
            assert_eq!(e.header_offset % 4, 0, "{}", e.name);
            assert_eq!(e.data_offset % 4, 0, "{}", e.name);
            assert_eq!(&bytes[e.header_offset..e.header_offset + 6], NEWC_MAGIC);
        }
    }

    #[test]
    fn header_fields_are_eight_uppercase_hex_digits() {
        let bytes = sample();
        let first = &bytes[..HEADER_LEN];
        // ino 1, mode 040755, namesize 4 ("bin\0").
        assert_eq!(&first[6..14], b"00000001");
        assert_eq!(&first[14..22], b"000041ED");
        assert_eq!(&first[94..102], b"00000004");
        assert_eq!(&bytes[HEADER_LEN..HEADER_LEN + 4], b"bin\0");
    }

    #[test]
    fn trailer_ends_the_archive() {
        let bytes = sample();
        let tail = String::from_utf8_lossy(&bytes[bytes.len() - 16..]).into_owned();
        assert!(tail.contains(TRAILER_NAME), "{tail:?}");
        let mut no_trailer = bytes.clone();
        let at = bytes
            .windows(TRAILER_NAME.len())
            .rposition(|w| w == TRAILER_NAME.as_bytes())
            .unwrap();
        no_trailer.truncate(at - HEADER_LEN);
        assert!(matches!(parse(&no_trailer), Err(CpioError::MissingTrailer)));
    }

    #[test]
    fn parser_rejects_corruption() {
        let bytes = sample();
        let mut bad_magic = bytes.clone();
        bad_magic[0] = b'1';
        assert!(matches!(
            parse(&bad_magic),
            Err(CpioError::BadMagic { offset: 0 })
        ));
        let mut bad_hex = bytes.clone();
        bad_hex[7] = b'G';
        assert!(matches!(
            parse(&bad_hex),
            Err(CpioError::BadField { field: "ino", .. })
        ));
        assert!(matches!(
            parse(&bytes[..50]),
            Err(CpioError::Truncated { .. })
        ));
    }

    #[test]
    fn writer_rejects_bad_names_and_duplicates() {
        let mut w = CpioWriter::new(Vec::new());
        for bad in ["", "/abs", "a/../b", "a//b", "TRAILER!!!", "nul\0"] {
            assert!(
                matches!(w.file(bad, 0o644, b""), Err(CpioError::BadName { .. })),
                "{bad:?}"
            );
        }
        let long = "x".repeat(MAX_NAME_LEN + 1);
        assert!(matches!(
            w.dir(&long, 0o755),
            Err(CpioError::NameTooLong { .. })
        ));
        w.dir("a", 0o755).unwrap();
        assert!(matches!(
            w.dir("a", 0o755),
            Err(CpioError::Duplicate { .. })
        ));
        let before = w.bytes_written();
        assert_eq!(before % 4, 0);
        let out = w.finish().unwrap();
        assert_eq!(parse(&out).unwrap().len(), 1);
    }
}
