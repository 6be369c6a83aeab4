//! The kernel side of vigil as seen from user space: loading and attaching the embedded eBPF
//! programs on the vsock tracepoints, checking the tracepoint record layout they assume,
//! pinning (for `vigil kernel load`), and reading the per-peer tables on demand (at silence
//! deadlines, for `vigil ctl peers`) — never by a polling loop.
use std::path::{Path, PathBuf};

use aya::maps::{MapData, PerCpuHashMap};
use aya::programs::{links::FdLink, TracePoint};
use aya::Ebpf;
use serde::{Deserialize, Serialize};
use vigil_common::{
    tp_offset, PeerKey, PeerStats, PEER_MAP, PEER_TX_MAP, PROG_ALLOC, PROG_RECV, TP_ALLOC,
    TP_CATEGORY, TP_RECV,
};

use crate::sys;

/// Where `vigil kernel load` pins maps and links (and where operators look for them).
pub const PIN_DIR: &str = "/sys/fs/bpf/vigil";

/// The eBPF object this binary was built with, if `cargo xtask build` built it first.
#[cfg(vigil_ebpf)]
pub static OBJECT: Option<&[u8]> =
    Some(aya::include_bytes_aligned!(env!("VIGIL_EBPF_OBJECT_PATH")));
#[cfg(not(vigil_ebpf))]
pub static OBJECT: Option<&[u8]> = None;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("this vigil was built without its eBPF object; build it with `cargo xtask build` (vigil runs on without kernel evidence)")]
    NoObject,
    #[error("the kernel has no vsock tracepoint {0} (no virtio-vsock transport on this host?): vigil runs on without kernel evidence")]
    NoTracepoint(&'static str),
    #[error("the record layout of tracepoint {name} is not the one vigil's programs read (field {field} expected at offset {expected}, found {found:?}); kernel evidence is off")]
    Layout {
        name: &'static str,
        field: &'static str,
        expected: usize,
        found: Option<usize>,
    },
    #[error("loading vigil's eBPF object into the kernel failed: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("the eBPF object has no program or map named {0}")]
    Missing(&'static str),
    #[error("loading or attaching eBPF program {name} failed: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("reading eBPF map {name} failed: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("pinning {path} failed: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error(
        "the attach link of {0} cannot be pinned on this kernel (no bpf_link for perf events)"
    )]
    LinkNotPinnable(&'static str),
    #[error("{0}")]
    Sys(#[from] sys::SysError),
    #[error("removing {path} failed: {source}")]
    Unpin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One row of the per-peer table, folded over CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRow {
    pub cid: u32,
    pub port: u32,
    pub local_port: u32,
    pub packets: u64,
    pub bytes: u64,
    pub rst: u64,
    pub shutdown: u64,
    pub last_data_ns: u64,
    pub last_any_ns: u64,
    pub last_op: u16,
}

impl PeerRow {
    fn new(key: PeerKey, s: PeerStats) -> Self {
        Self {
            cid: key.cid,
            port: key.port,
            local_port: key.local_port,
            packets: s.packets,
            bytes: s.bytes,
            rst: s.rst,
            shutdown: s.shutdown,
            last_data_ns: s.last_data_ns,
            last_any_ns: s.last_any_ns,
            last_op: s.last_op,
        }
    }
}

/// The loaded and attached programs. Dropping it detaches both programs and frees the maps.
pub struct Probes {
    ebpf: Ebpf,
}

/// Checks that the tracepoint exists and that its record has the fields at the offsets the
/// programs read. A kernel that moved a field must not feed garbage to the classifier.
pub fn check_layout(tracefs: &Path, name: &'static str) -> Result<(), KernelError> {
    let format = tracefs
        .join("events")
        .join(TP_CATEGORY)
        .join(name)
        .join("format");
    let Ok(text) = std::fs::read_to_string(&format) else {
        return Err(KernelError::NoTracepoint(name));
    };
    let expected = [
        ("src_cid", tp_offset::SRC_CID),
        ("src_port", tp_offset::SRC_PORT),
        ("dst_cid", tp_offset::DST_CID),
        ("dst_port", tp_offset::DST_PORT),
        ("len", tp_offset::LEN),
        ("op", tp_offset::OP),
    ];
    for (field, offset) in expected {
        let found = field_offset(&text, field);
        if found != Some(offset) {
            return Err(KernelError::Layout {
                name,
                field,
                expected: offset,
                found,
            });
        }
    }
    Ok(())
}

/// Finds `offset:N` on the line declaring `field` in a tracefs `format` file.
fn field_offset(format: &str, field: &str) -> Option<usize> {
    format.lines().find_map(|line| {
        let decl = line.trim().strip_prefix("field:")?;
        let (decl, rest) = decl.split_once(';')?;
        let name = decl.rsplit(' ').next()?;
        if name != field {
            return None;
        }
        let off = rest.trim().strip_prefix("offset:")?;
        off.split(';').next()?.trim().parse().ok()
    })
}

impl Probes {
    /// Loads the embedded object and attaches both programs. Mounts tracefs if needed.
    pub fn load_and_attach() -> Result<Self, KernelError> {
        let object = OBJECT.ok_or(KernelError::NoObject)?;
        let tracefs = sys::ensure_tracefs()?;
        check_layout(&tracefs, TP_RECV)?;
        let alloc_ok = check_layout(&tracefs, TP_ALLOC);
        let mut ebpf = Ebpf::load(object).map_err(KernelError::Load)?;
        attach(&mut ebpf, PROG_RECV, TP_RECV)?;
        match alloc_ok {
            Ok(()) => attach(&mut ebpf, PROG_ALLOC, TP_ALLOC)?,
            Err(e) => tracing::warn!("host→guest packet counts are off: {e}"),
        }
        Ok(Self { ebpf })
    }

    /// Reads the guest → host table (what the silence classifier uses).
    pub fn peers(&self) -> Result<Vec<PeerRow>, KernelError> {
        read_table(&self.ebpf, PEER_MAP)
    }

    /// Reads the host → guest table.
    pub fn peers_tx(&self) -> Result<Vec<PeerRow>, KernelError> {
        read_table(&self.ebpf, PEER_TX_MAP)
    }

    /// Pins both maps and both links under `dir`, so they outlive this process.
    pub fn pin(mut self, dir: &Path) -> Result<(), KernelError> {
        sys::ensure_bpffs()?;
        std::fs::create_dir_all(dir).map_err(|source| KernelError::Unpin {
            path: dir.to_path_buf(),
            source,
        })?;
        // Idempotent: a previous (or half-finished) pin is removed first.
        unpin(dir)?;
        std::fs::create_dir_all(dir).map_err(|source| KernelError::Unpin {
            path: dir.to_path_buf(),
            source,
        })?;
        for name in [PEER_MAP, PEER_TX_MAP] {
            let map = self.ebpf.map(name).ok_or(KernelError::Missing(name))?;
            let path = dir.join(name);
            map.pin(&path)
                .map_err(|source| KernelError::Pin { path, source })?;
        }
        for name in [PROG_RECV, PROG_ALLOC] {
            let prog: &mut TracePoint = program(&mut self.ebpf, name)?;
            let Some(link_id) = LINK_IDS.with(|ids| ids.borrow_mut().remove(name)) else {
                continue;
            };
            let link = prog
                .take_link(link_id)
                .map_err(|source| KernelError::Program { name, source })?;
            let fd_link: FdLink = link
                .try_into()
                .map_err(|_| KernelError::LinkNotPinnable(name))?;
            let path = dir.join(format!("{name}_link"));
            fd_link
                .pin(&path)
                .map_err(|source| KernelError::Pin { path, source })?;
        }
        Ok(())
    }
}

std::thread_local! {
    /// Link ids of the programs attached by this thread, so `pin` can take them.
    static LINK_IDS: std::cell::RefCell<std::collections::HashMap<&'static str, aya::programs::trace_point::TracePointLinkId>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut TracePoint, KernelError> {
    let prog = ebpf.program_mut(name).ok_or(KernelError::Missing(name))?;
    prog.try_into()
        .map_err(|source| KernelError::Program { name, source })
}

fn attach(
    ebpf: &mut Ebpf,
    name: &'static str,
    tracepoint: &'static str,
) -> Result<(), KernelError> {
    let prog = program(ebpf, name)?;
    prog.load()
        .map_err(|source| KernelError::Program { name, source })?;
    let id = prog
        .attach(TP_CATEGORY, tracepoint)
        .map_err(|source| KernelError::Program { name, source })?;
    LINK_IDS.with(|ids| ids.borrow_mut().insert(name, id));
    Ok(())
}

fn read_table(ebpf: &Ebpf, name: &'static str) -> Result<Vec<PeerRow>, KernelError> {
    let map = ebpf.map(name).ok_or(KernelError::Missing(name))?;
    let table: PerCpuHashMap<&MapData, PeerKey, PeerStats> =
        PerCpuHashMap::try_from(map).map_err(|source| KernelError::Map { name, source })?;
    fold(&table, name)
}

fn fold<T: std::borrow::Borrow<MapData>>(
    table: &PerCpuHashMap<T, PeerKey, PeerStats>,
    name: &'static str,
) -> Result<Vec<PeerRow>, KernelError> {
    let mut rows = Vec::new();
    for entry in table.iter() {
        let (key, values) = entry.map_err(|source| KernelError::Map { name, source })?;
        let mut total = PeerStats::default();
        for v in values.iter() {
            total.merge(v);
        }
        rows.push(PeerRow::new(key, total));
    }
    rows.sort_by_key(|r| (r.cid, r.local_port, r.port));
    Ok(rows)
}

/// Reads a table pinned by `vigil kernel load`.
pub fn read_pinned(dir: &Path, name: &'static str) -> Result<Vec<PeerRow>, KernelError> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path).map_err(|source| KernelError::Map { name, source })?;
    let map = aya::maps::Map::PerCpuLruHashMap(data);
    let table: PerCpuHashMap<MapData, PeerKey, PeerStats> =
        PerCpuHashMap::try_from(map).map_err(|source| KernelError::Map { name, source })?;
    fold(&table, name)
}

/// Removes everything `pin` created under `dir` (links first, so the programs detach).
pub fn unpin(dir: &Path) -> Result<(), KernelError> {
    for name in [
        format!("{PROG_RECV}_link"),
        format!("{PROG_ALLOC}_link"),
        PEER_MAP.to_string(),
        PEER_TX_MAP.to_string(),
    ] {
        let path = dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(KernelError::Unpin { path, source }),
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(KernelError::Unpin {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

/// Prints a table for operators.
pub fn print_table(title: &str, rows: &[PeerRow]) {
    println!("{title}: {} peer(s)", rows.len());
    println!(
        "{:>10} {:>10} {:>10} {:>10} {:>12} {:>5} {:>5} {:>16} {:>16}",
        "cid", "port", "local", "packets", "bytes", "rst", "shut", "last_data_ns", "last_any_ns"
    );
    for r in rows {
        println!(
            "{:>10} {:>10} {:>10} {:>10} {:>12} {:>5} {:>5} {:>16} {:>16}",
            r.cid,
            r.port,
            r.local_port,
            r.packets,
            r.bytes,
            r.rst,
            r.shutdown,
            r.last_data_ns,
            r.last_any_ns
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORMAT: &str = "name: virtio_transport_recv_pkt\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\n\tfield:__u32 src_cid;\toffset:8;\tsize:4;\tsigned:0;\n\tfield:__u32 src_port;\toffset:12;\tsize:4;\tsigned:0;\n\tfield:__u32 dst_cid;\toffset:16;\tsize:4;\tsigned:0;\n\tfield:__u32 dst_port;\toffset:20;\tsize:4;\tsigned:0;\n\tfield:__u32 len;\toffset:24;\tsize:4;\tsigned:0;\n\tfield:__u16 type;\toffset:28;\tsize:2;\tsigned:0;\n\tfield:__u16 op;\toffset:30;\tsize:2;\tsigned:0;\n";

    #[test]
    fn field_offsets_are_parsed_from_the_format_file() {
        assert_eq!(field_offset(FORMAT, "src_cid"), Some(8));
        assert_eq!(field_offset(FORMAT, "op"), Some(30));
        assert_eq!(field_offset(FORMAT, "type"), Some(28));
        assert_eq!(field_offset(FORMAT, "missing"), None);
    }

    #[test]
    fn a_moved_field_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ev = dir.path().join("events/vsock").join(TP_RECV);
        std::fs::create_dir_all(&ev).unwrap();
        std::fs::write(ev.join("format"), FORMAT.replace("offset:30", "offset:32")).unwrap();
        let err = check_layout(dir.path(), TP_RECV).unwrap_err();
        assert!(
            matches!(
                err,
                KernelError::Layout {
                    field: "op",
                    expected: 30,
                    found: Some(32),
                    ..
                }
            ),
            "{err}"
        );
        std::fs::write(ev.join("format"), FORMAT).unwrap();
        check_layout(dir.path(), TP_RECV).unwrap();
        assert!(matches!(
            check_layout(dir.path(), TP_ALLOC),
            Err(KernelError::NoTracepoint(_))
        ));
    }

    /// Root test: loads the real object into this kernel, attaches, reads the maps.
    #[test]
    fn root_loads_attaches_and_reads_the_real_object() {
        if !crate::sys::is_root() {
            println!("SKIPPED root_loads_attaches_and_reads_the_real_object: needs root (run `cargo xtask test` as root)");
            return;
        }
        if OBJECT.is_none() {
            println!("SKIPPED root_loads_attaches_and_reads_the_real_object: built without the eBPF object (run `cargo xtask test`)");
            assert!(
                std::env::var_os("VIGIL_REQUIRE_EBPF").is_none(),
                "VIGIL_REQUIRE_EBPF is set but the eBPF object was not embedded"
            );
            return;
        }
        let probes = Probes::load_and_attach().expect("load and attach on this kernel");
        // This host's own vsock link to its hypervisor may add rows: readable is what we assert.
        let rx = probes.peers().expect("read rx table");
        let tx = probes.peers_tx().expect("read tx table");
        for r in rx.iter().chain(tx.iter()) {
            assert!(r.packets > 0, "a row exists only after a packet: {r:?}");
            assert!(r.last_any_ns >= r.last_data_ns);
        }
        // The programs are visible to the kernel while attached.
        let names: Vec<String> = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .filter_map(|p| p.name_as_str().map(str::to_owned))
            .collect();
        assert!(
            names.iter().any(|n| PROG_RECV.starts_with(n.as_str())),
            "{names:?}"
        );
        drop(probes);
    }

    /// The shared structs' sizes match the map definitions inside the eBPF object.
    #[test]
    fn object_map_sizes_match_shared_structs() {
        let Some(object) = OBJECT else {
            println!("SKIPPED object_map_sizes_match_shared_structs: built without the eBPF object (run `cargo xtask test`)");
            assert!(
                std::env::var_os("VIGIL_REQUIRE_EBPF").is_none(),
                "VIGIL_REQUIRE_EBPF is set but the eBPF object was not embedded"
            );
            return;
        };
        let obj = aya_obj_parse(object);
        for name in [PEER_MAP, PEER_TX_MAP] {
            let (key, value, max) = obj
                .iter()
                .find(|m| m.0 == name)
                .map(|m| (m.1, m.2, m.3))
                .expect(name);
            assert_eq!(key as usize, vigil_common::PEER_KEY_SIZE, "{name} key");
            assert_eq!(
                value as usize,
                vigil_common::PEER_STATS_SIZE,
                "{name} value"
            );
            assert_eq!(max, vigil_common::PEER_MAP_CAPACITY, "{name} capacity");
        }
    }

    /// (name, key size, value size, max entries) of each map in the object, from its BTF-defined
    /// map section, parsed with aya's own object parser.
    fn aya_obj_parse(object: &[u8]) -> Vec<(String, u32, u32, u32)> {
        // Parsed without the kernel (no root needed) by aya's own object parser.
        let parsed = aya_obj::Object::parse(object).expect("parse eBPF object");
        parsed
            .maps
            .iter()
            .map(|(name, m)| (name.clone(), m.key_size(), m.value_size(), m.max_entries()))
            .collect()
    }
}
