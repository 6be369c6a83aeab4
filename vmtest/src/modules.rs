//! Kernel module resolution for the initramfs: reads `modules.dep` (as written by
//! `depmod -b`) and `modules.builtin`, and lists the module files to `insmod` in dependency
//! order (every dependency before its users, each once).

use std::collections::{HashMap, HashSet};

/// Deepest dependency chain followed; a deeper one means a cycle or a corrupt modules.dep,
/// reported as [`ModulesError::TooDeep`] instead of recursing without end.
pub const MAX_DEP_DEPTH: usize = 32;

/// Errors of resolving modules.
#[derive(Debug, thiserror::Error)]
pub enum ModulesError {
    #[error("module {0} is neither in modules.dep nor built into the kernel")]
    NotFound(String),
    #[error("modules.dep line {line} has no `path:` prefix")]
    BadLine { line: usize },
    #[error("dependency chain of module {0} is deeper than {MAX_DEP_DEPTH} (a cycle?)")]
    TooDeep(String),
}

/// Module name of a path: `kernel/net/vmw_vsock/vsock-x.ko.xz` → `vsock_x`.
pub fn module_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let stem = base.find(".ko").map_or(base, |i| &base[..i]);
    stem.replace('-', "_")
}

/// Parsed modules.dep: module name → (path, dependency paths).
#[derive(Debug, Default)]
pub struct DepTable {
    entries: HashMap<String, (String, Vec<String>)>,
    builtin: HashSet<String>,
}

impl DepTable {
    /// Parses `modules.dep` and `modules.builtin` texts.
    pub fn parse(modules_dep: &str, modules_builtin: &str) -> Result<Self, ModulesError> {
        let mut entries = HashMap::new();
        for (i, line) in modules_dep.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let (path, deps) = line
                .split_once(':')
                .ok_or(ModulesError::BadLine { line: i + 1 })?;
            let deps = deps.split_whitespace().map(str::to_string).collect();
            entries.insert(module_name(path), (path.trim().to_string(), deps));
        }
        let builtin = modules_builtin
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(module_name)
            .collect();
        Ok(Self { entries, builtin })
    }

    /// True when the module is compiled into the kernel (nothing to load).
    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&name.replace('-', "_"))
    }

    /// Paths (relative to the modules dir) to load for `wanted`, dependencies first.
    /// Built-in modules are skipped; unknown ones are an error.
    pub fn load_order(&self, wanted: &[&str]) -> Result<Vec<String>, ModulesError> {
        let mut order = Vec::new();
        let mut seen = HashSet::new();
        for name in wanted {
            self.visit(&name.replace('-', "_"), 0, &mut seen, &mut order)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        depth: usize,
        seen: &mut HashSet<String>,
        order: &mut Vec<String>,
    ) -> Result<(), ModulesError> {
        if depth > MAX_DEP_DEPTH {
            return Err(ModulesError::TooDeep(name.to_string()));
        }
        if seen.contains(name) {
            return Ok(());
        }
        let Some((path, deps)) = self.entries.get(name) else {
            if self.is_builtin(name) {
                return Ok(());
            }
            return Err(ModulesError::NotFound(name.to_string()));
        };
        for dep in deps {
            self.visit(&module_name(dep), depth + 1, seen, order)?;
        }
        if seen.insert(name.to_string()) {
            order.push(path.clone());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/net/vmw_vsock/vsock_loopback.ko.xz: kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko.xz kernel/net/vmw_vsock/vsock.ko.xz
kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko.xz: kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko.xz kernel/net/vmw_vsock/vsock.ko.xz
kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko.xz: kernel/net/vmw_vsock/vsock.ko.xz
kernel/net/vmw_vsock/vsock.ko.xz:
kernel/drivers/a-b.ko: kernel/drivers/c.ko
";

    #[test]
    fn dependencies_come_first_and_once() {
        let t = DepTable::parse(DEP, "kernel/drivers/c.ko\n").unwrap();
        let order = t
            .load_order(&["vsock_loopback", "vmw_vsock_virtio_transport", "vsock"])
            .unwrap();
        assert_eq!(
            order,
            [
                "kernel/net/vmw_vsock/vsock.ko.xz",
                "kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko.xz",
                "kernel/net/vmw_vsock/vsock_loopback.ko.xz",
                "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko.xz",
            ]
        );
        // Dashes and underscores name the same module; built-in deps are skipped.
        assert_eq!(t.load_order(&["a_b"]).unwrap(), ["kernel/drivers/a-b.ko"]);
        assert!(t.load_order(&["c"]).unwrap().is_empty());
    }

    #[test]
    fn unknown_modules_bad_lines_and_cycles_are_errors() {
        let t = DepTable::parse(DEP, "").unwrap();
        assert!(matches!(
            t.load_order(&["nope"]),
            Err(ModulesError::NotFound(n)) if n == "nope"
        ));
        assert!(matches!(
            DepTable::parse("no colon here\n", ""),
            Err(ModulesError::BadLine { line: 1 })
        ));
        let cyc = DepTable::parse("a.ko: b.ko\nb.ko: a.ko\n", "").unwrap();
        // A cycle either terminates via `seen` bookkeeping or is reported, never loops.
        let r = cyc.load_order(&["a"]);
        assert!(matches!(r, Err(ModulesError::TooDeep(_))), "{r:?}");
    }

    #[test]
    fn module_names_strip_dirs_and_suffixes() {
        assert_eq!(module_name("kernel/x/vsock.ko.xz"), "vsock");
        assert_eq!(module_name("kernel/x/a-b.ko"), "a_b");
        assert_eq!(module_name("kernel/x/z.ko.zst"), "z");
    }
}
