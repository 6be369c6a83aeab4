//! The cell registry: which guest is which. Cells come from the config file and from
//! `vigil ctl cell add|remove` (a VMM launcher registering a VM at boot). The registry is
//! persisted to `<state_dir>/cells.json` after every change (write to a temporary file,
//! fsync, rename) and restored on start, so a restart of vigil keeps every run.
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{CellConfig, ConfigProblem};

/// Most cells one vigil tracks: the drain's capacity (a 2-core host runs at most a few
/// thousand microVMs). Registering one more is refused with a sentence (the launcher sees
/// it), never silently dropped.
pub const MAX_CELLS: usize = vigil_drain::MAX_CELLS;

const FILE_NAME: &str = "cells.json";

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{0}")]
    Invalid(#[from] ConfigProblem),
    #[error("CID {cid} is already registered to cell {other:?}")]
    CidTaken { cid: u32, other: String },
    #[error("uds_path {path} is already registered to cell {other:?}")]
    PathTaken { path: PathBuf, other: String },
    #[error("no cell {0:?} is registered")]
    Unknown(String),
    #[error("the registry is full ({MAX_CELLS} cells); remove a cell first")]
    Full,
    #[error("writing the registry to {path} failed: {source}")]
    Persist {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the persisted registry {path} is unreadable ({source}); move it aside to start with the config's cells only")]
    Restore {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// What a registration did, so the caller can end and start runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A new cell.
    Added(CellConfig),
    /// An existing cell registered with a new run (the old run ended).
    NewRun { old: CellConfig, new: CellConfig },
    /// An existing cell with the same run: address or settings updated.
    Updated { old: CellConfig, new: CellConfig },
    /// Registered again with identical settings: nothing to do.
    Unchanged,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Registry {
    cells: BTreeMap<String, CellConfig>,
}

impl Registry {
    pub fn get(&self, cell_id: &str) -> Option<&CellConfig> {
        self.cells.get(cell_id)
    }

    pub fn iter(&self) -> impl Iterator<Item = &CellConfig> {
        self.cells.values()
    }

    pub fn len(&self) -> usize {
        self.cells.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }

    /// Adds or re-registers a cell. Addresses must be unique across cells.
    pub fn upsert(&mut self, cell: CellConfig) -> Result<Change, RegistryError> {
        cell.validate()?;
        for other in self.cells.values().filter(|o| o.cell_id != cell.cell_id) {
            if let (Some(a), Some(b)) = (cell.cid, other.cid) {
                if a == b {
                    return Err(RegistryError::CidTaken {
                        cid: a,
                        other: other.cell_id.clone(),
                    });
                }
            }
            if let (Some(a), Some(b)) = (&cell.uds_path, &other.uds_path) {
                if a == b {
                    return Err(RegistryError::PathTaken {
                        path: a.clone(),
                        other: other.cell_id.clone(),
                    });
                }
            }
        }
        match self.cells.get(&cell.cell_id) {
            Some(old) if *old == cell => Ok(Change::Unchanged),
            Some(old) => {
                let old = old.clone();
                self.cells.insert(cell.cell_id.clone(), cell.clone());
                if old.run_id == cell.run_id {
                    Ok(Change::Updated { old, new: cell })
                } else {
                    Ok(Change::NewRun { old, new: cell })
                }
            }
            None => {
                if self.cells.len() >= MAX_CELLS {
                    return Err(RegistryError::Full);
                }
                self.cells.insert(cell.cell_id.clone(), cell.clone());
                Ok(Change::Added(cell))
            }
        }
    }

    pub fn remove(&mut self, cell_id: &str) -> Result<CellConfig, RegistryError> {
        self.cells
            .remove(cell_id)
            .ok_or_else(|| RegistryError::Unknown(cell_id.to_string()))
    }

    /// The persisted registry in `state_dir`, or an empty one if none was saved yet.
    pub fn restore(state_dir: &Path) -> Result<Self, RegistryError> {
        let path = state_dir.join(FILE_NAME);
        match std::fs::read(&path) {
            Ok(bytes) => {
                let cells: Vec<CellConfig> =
                    serde_json::from_slice(&bytes).map_err(|e| RegistryError::Restore {
                        path: path.clone(),
                        source: Box::new(e),
                    })?;
                let mut reg = Registry::default();
                for c in cells {
                    reg.upsert(c).map_err(|e| RegistryError::Restore {
                        path: path.clone(),
                        source: Box::new(e),
                    })?;
                }
                Ok(reg)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Registry::default()),
            Err(e) => Err(RegistryError::Restore {
                path,
                source: Box::new(e),
            }),
        }
    }

    /// Writes the registry atomically (temporary file, fsync, rename, fsync of the directory).
    pub fn persist(&self, state_dir: &Path) -> Result<(), RegistryError> {
        let path = state_dir.join(FILE_NAME);
        let err = |source| RegistryError::Persist {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(state_dir).map_err(err)?;
        let tmp = state_dir.join(format!("{FILE_NAME}.tmp"));
        let cells: Vec<&CellConfig> = self.cells.values().collect();
        let bytes = serde_json::to_vec_pretty(&cells).map_err(|e| err(std::io::Error::other(e)))?;
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        f.write_all(&bytes).map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, &path).map_err(err)?;
        std::fs::File::open(state_dir)
            .and_then(|d| d.sync_all())
            .map_err(err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(id: &str, run: &str, cid: Option<u32>, uds: Option<&str>) -> CellConfig {
        CellConfig {
            cell_id: id.into(),
            run_id: run.into(),
            cid,
            uds_path: uds.map(PathBuf::from),
            keepalive_ms: 10_000,
            cgroup: None,
            probes: None,
        }
    }

    #[test]
    fn upsert_reports_what_changed() {
        let mut r = Registry::default();
        assert!(matches!(
            r.upsert(cell("a", "r1", Some(3), None)).unwrap(),
            Change::Added(_)
        ));
        assert_eq!(
            r.upsert(cell("a", "r1", Some(3), None)).unwrap(),
            Change::Unchanged
        );
        assert!(matches!(
            r.upsert(cell("a", "r2", Some(3), None)).unwrap(),
            Change::NewRun { .. }
        ));
        assert!(matches!(
            r.upsert(cell("a", "r2", Some(4), None)).unwrap(),
            Change::Updated { .. }
        ));
        assert!(matches!(
            r.upsert(cell("b", "r1", Some(4), None)),
            Err(RegistryError::CidTaken { cid: 4, .. })
        ));
        r.upsert(cell("c", "r1", None, Some("/x"))).unwrap();
        assert!(matches!(
            r.upsert(cell("d", "r1", None, Some("/x"))),
            Err(RegistryError::PathTaken { .. })
        ));
        assert!(matches!(r.remove("zz"), Err(RegistryError::Unknown(_))));
        assert_eq!(r.remove("a").unwrap().run_id, "r2");
    }

    #[test]
    fn persisted_registry_is_restored() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Registry::restore(dir.path()).unwrap().is_empty());
        let mut r = Registry::default();
        r.upsert(cell("a", "r1", Some(3), None)).unwrap();
        r.upsert(cell("b", "r9", None, Some("/run/b.vsock")))
            .unwrap();
        r.persist(dir.path()).unwrap();
        assert_eq!(Registry::restore(dir.path()).unwrap(), r);
        std::fs::write(dir.path().join(FILE_NAME), b"{not json").unwrap();
        let e = Registry::restore(dir.path()).unwrap_err();
        assert!(e.to_string().contains("move it aside"), "{e}");
    }
}
