//! Test kernels, fetched without installing them: Debian's `linux-image-cloud-amd64` for
//! bookworm (6.1, from the system's apt sources) and for bookworm-backports (6.12, from the
//! project's own list `vmtest/apt/bookworm-backports.list` with private apt state and cache
//! under `target/vmtest/`; /etc/apt is never touched). Each is `apt-get download`ed,
//! unpacked with `dpkg-deb -x` and indexed with `depmod -b`. A kernel whose `ready` file
//! exists in the cache is reused as is.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::tools::{capture, run, ToolsError};

/// Kernel labels the harness knows, in the order `--kernel all` boots them.
pub const KERNEL_LABELS: &[&str] = &["6.1", "6.12"];
/// Metapackage whose dependency names the current cloud kernel package.
const CLOUD_META: &str = "linux-image-cloud-amd64";

/// Errors of obtaining a kernel.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("unknown kernel {0:?}; expected one of 6.1, 6.12, all")]
    UnknownLabel(String),
    #[error(transparent)]
    Tool(#[from] ToolsError),
    #[error("{what} failed at {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no {CLOUD_META} dependency starting with {prefix} in the apt lists")]
    NoPackage { prefix: String },
    #[error("apt-get download left no .deb for {0}")]
    NoDeb(String),
    #[error("the unpacked kernel package has no {0}")]
    Missing(PathBuf),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> KernelError {
    let path = path.to_path_buf();
    move |source| KernelError::Io { what, path, source }
}

/// A kernel ready to boot.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// `uname -r` of the kernel, e.g. `6.1.0-41-cloud-amd64`.
    pub release: String,
    pub vmlinuz: PathBuf,
    /// `<root>/lib/modules/<release>` with a fresh modules.dep.
    pub modules_dir: PathBuf,
}

/// Expands `--kernel` into labels.
pub fn labels(arg: &str) -> Result<Vec<String>, KernelError> {
    match arg {
        "all" => Ok(KERNEL_LABELS.iter().map(|s| (*s).to_string()).collect()),
        l if KERNEL_LABELS.contains(&l) => Ok(vec![l.to_string()]),
        other => Err(KernelError::UnknownLabel(other.to_string())),
    }
}

/// apt options for a kernel label: none (system sources) for 6.1, the project list with
/// private state and cache for 6.12.
fn apt_options(label: &str, cache: &Path, project_list: &Path) -> Vec<String> {
    if label == "6.1" {
        return Vec::new();
    }
    vec![
        "-o".into(),
        format!("Dir::Etc::sourcelist={}", project_list.display()),
        "-o".into(),
        "Dir::Etc::sourceparts=-".into(),
        "-o".into(),
        format!("Dir::State={}", cache.join("apt-state").display()),
        "-o".into(),
        format!("Dir::Cache={}", cache.join("apt-cache").display()),
    ]
}

/// Picks the `linux-image-<prefix>…` dependency out of `apt-cache depends` output.
pub fn pick_dependency(depends_output: &str, prefix: &str) -> Option<String> {
    depends_output.lines().find_map(|l| {
        let dep = l.trim().strip_prefix("Depends:")?.trim();
        let dep = dep.trim_start_matches('|').trim();
        dep.starts_with(prefix).then(|| dep.to_string())
    })
}

fn resolve_package(label: &str, opts: &[String]) -> Option<String> {
    let out = capture(
        Command::new("apt-cache")
            .args(opts)
            .args(["depends", CLOUD_META]),
    );
    out.ok()
        .and_then(|o| pick_dependency(&o, &format!("linux-image-{label}.")))
}

/// Downloads, unpacks and indexes the kernel `label` under `cache` (reused when cached).
pub fn obtain(label: &str, cache: &Path, project_list: &Path) -> Result<Kernel, KernelError> {
    if !KERNEL_LABELS.contains(&label) {
        return Err(KernelError::UnknownLabel(label.to_string()));
    }
    let kdir = cache.join("kernels").join(label);
    let ready = kdir.join("ready");
    if let Ok(release) = std::fs::read_to_string(&ready) {
        let release = release.trim().to_string();
        let k = kernel_at(&kdir.join("root"), &release)?;
        println!("vmtest: kernel {label}: cached {release}");
        return Ok(k);
    }
    let opts = apt_options(label, cache, project_list);
    if label != "6.1" {
        for d in ["apt-state/lists/partial", "apt-cache/archives/partial"] {
            let p = cache.join(d);
            std::fs::create_dir_all(&p).map_err(io_err("creating apt dir", &p))?;
        }
        println!(
            "vmtest: kernel {label}: apt-get update with the project's list {}",
            project_list.display()
        );
        run(Command::new("apt-get").args(&opts).args(["update", "-q"]))?;
    }
    let pkg = match resolve_package(label, &opts) {
        Some(p) => p,
        None if label == "6.1" => {
            println!(
                "vmtest: kernel 6.1: no {CLOUD_META} in the apt lists; running apt-get update"
            );
            run(Command::new("apt-get").args(["update", "-q"]))?;
            resolve_package(label, &opts).ok_or_else(|| KernelError::NoPackage {
                prefix: format!("linux-image-{label}."),
            })?
        }
        None => {
            return Err(KernelError::NoPackage {
                prefix: format!("linux-image-{label}."),
            })
        }
    };
    let release = pkg.trim_start_matches("linux-image-").to_string();
    let debs = cache.join("debs");
    std::fs::create_dir_all(&debs).map_err(io_err("creating deb dir", &debs))?;
    println!("vmtest: kernel {label}: apt-get download {pkg}");
    run(Command::new("apt-get")
        .args(&opts)
        // Root downloads into a folder the `_apt` user cannot write; say so up front
        // instead of letting apt warn about running unsandboxed.
        .args(["-o", "APT::Sandbox::User=root", "download", "-q", &pkg])
        .current_dir(&debs))?;
    let deb = std::fs::read_dir(&debs)
        .map_err(io_err("listing debs", &debs))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                // apt may percent-encode `+` in the file name.
                n.starts_with(&format!("{pkg}_"))
                    || n.starts_with(&format!("{}_", pkg.replace('+', "%2b")))
            }) && p.extension().is_some_and(|e| e == "deb")
        })
        .max()
        .ok_or_else(|| KernelError::NoDeb(pkg.clone()))?;
    let root = kdir.join("root");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).map_err(io_err("creating kernel root", &root))?;
    println!("vmtest: kernel {label}: dpkg-deb -x {}", deb.display());
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    // depmod -b looks in <root>/lib/modules; merged-/usr packages ship usr/lib/modules.
    let lib = root.join("lib");
    if !lib.join("modules").is_dir() && root.join("usr/lib/modules").is_dir() {
        std::os::unix::fs::symlink("usr/lib", &lib).map_err(io_err("linking lib", &lib))?;
    }
    println!(
        "vmtest: kernel {label}: depmod -b {} {release}",
        root.display()
    );
    run(Command::new("depmod").arg("-b").arg(&root).arg(&release))?;
    let k = kernel_at(&root, &release)?;
    std::fs::write(&ready, &release).map_err(io_err("writing ready marker", &ready))?;
    Ok(k)
}

fn kernel_at(root: &Path, release: &str) -> Result<Kernel, KernelError> {
    let vmlinuz = root.join("boot").join(format!("vmlinuz-{release}"));
    let modules_dir = root.join("lib/modules").join(release);
    for p in [&vmlinuz, &modules_dir.join("modules.dep")] {
        if !p.exists() {
            return Err(KernelError::Missing(p.clone()));
        }
    }
    Ok(Kernel {
        release: release.to_string(),
        vmlinuz,
        modules_dir,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_versioned_image_dependency() {
        let out = "linux-image-cloud-amd64\n  Depends: linux-image-6.12.57+deb12-cloud-amd64\n";
        assert_eq!(
            pick_dependency(out, "linux-image-6.12."),
            Some("linux-image-6.12.57+deb12-cloud-amd64".into())
        );
        assert_eq!(pick_dependency(out, "linux-image-6.1."), None);
        let old = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-41-cloud-amd64\n";
        assert_eq!(
            pick_dependency(old, "linux-image-6.1."),
            Some("linux-image-6.1.0-41-cloud-amd64".into())
        );
    }

    #[test]
    fn labels_expand_and_reject_unknown() {
        assert_eq!(labels("all").unwrap(), ["6.1", "6.12"]);
        assert_eq!(labels("6.12").unwrap(), ["6.12"]);
        assert!(matches!(labels("5.10"), Err(KernelError::UnknownLabel(_))));
    }

    #[test]
    fn backports_options_keep_apt_state_private() {
        let o = apt_options("6.12", Path::new("/c"), Path::new("/p/list"));
        let joined = o.join(" ");
        assert!(joined.contains("Dir::Etc::sourcelist=/p/list"));
        assert!(joined.contains("Dir::Etc::sourceparts=-"));
        assert!(joined.contains("Dir::State=/c/apt-state"));
        assert!(joined.contains("Dir::Cache=/c/apt-cache"));
        assert!(apt_options("6.1", Path::new("/c"), Path::new("/p")).is_empty());
    }
}
