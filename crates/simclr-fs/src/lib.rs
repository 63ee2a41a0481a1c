//! Durable, atomic file writes: the one way simclr-rs writes a file that a reader, a later
//! stage or a resumed run relies on (checkpoints, reports, split files, embeddings, TF bundles,
//! the rendezvous id).
//!
//! A write goes to a temporary file in the destination's folder (`.<name>.<pid>-<n>.tmp`), is
//! synced to disk, renamed over the destination, and the folder is synced, so after a crash at
//! any point the destination holds either the old contents or the new ones, never a mix, and a
//! finished write survives a power cut. A destination that is a symbolic link, a device node, a
//! socket or a FIFO is refused: a rename would replace the link or the node by a plain file.
//!
//! This crate owns nothing but that (no serialisation, no formats), the folder checks writers
//! need, and [`manifest_dir`], where a test or tool finds its package's files; errors are
//! [`std::io::Error`]s for the caller to attach its path and purpose to.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A file being written atomically: write through [`AtomicFile::file`], then
/// [`AtomicFile::commit`]. Dropped without a commit, the temporary file is removed and the
/// destination is untouched.
pub struct AtomicFile {
    path: PathBuf,
    tmp: PathBuf,
    file: Option<File>,
}

impl AtomicFile {
    /// Starts a write of `path`; refuses a destination that is not a regular file.
    pub fn create(path: impl AsRef<Path>) -> std::io::Result<Self> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let path = path.as_ref().to_path_buf();
        refuse_special_target(&path)?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = folder_of(&path).join(temporary_name(&name, std::process::id(), n));
        let file = File::create(&tmp)?;
        Ok(AtomicFile {
            path,
            tmp,
            file: Some(file),
        })
    }

    /// The temporary file, to write the contents into.
    pub fn file(&mut self) -> &mut File {
        self.file
            .as_mut()
            .expect("an AtomicFile is used only until its commit")
    }

    /// Syncs the contents, renames them over the destination and syncs the folder.
    pub fn commit(mut self) -> std::io::Result<()> {
        let file = self.file.take().expect("committed once");
        file.sync_all()?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path)?;
        // The rename itself is durable once the folder is synced (where the platform allows).
        if let Ok(dir) = File::open(folder_of(&self.path)) {
            let _ = dir.sync_all();
        }
        Ok(())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// The temporary file name of the `n`-th write of `name` by process `pid`.
fn temporary_name(name: &str, pid: u32, n: u64) -> String {
    format!(".{name}.{pid}-{n}.tmp")
}

/// Whether `file_name` is a temporary file that an [`AtomicFile`] writing `target` (a file
/// name) creates: what a write killed before its commit leaves behind. Only a caller that
/// knows no writer is alive (a lock) may remove one.
pub fn is_temporary_of(file_name: &str, target: &str) -> bool {
    let Some(middle) = file_name
        .strip_prefix('.')
        .and_then(|r| r.strip_prefix(target))
        .and_then(|r| r.strip_prefix('.'))
        .and_then(|r| r.strip_suffix(".tmp"))
    else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    middle
        .split_once('-')
        .is_some_and(|(pid, n)| digits(pid) && digits(n))
}

/// Writes `bytes` to `path` atomically and durably ([`AtomicFile`]).
pub fn write_atomic(path: impl AsRef<Path>, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = AtomicFile::create(path)?;
    f.file().write_all(bytes)?;
    f.commit()
}

/// An atomic write replaces what is at `path` by a rename: right for a regular file, wrong for
/// a symlink (the link would become a file and its target keep the old contents) or a device
/// node (`/dev/full` would become a file). Those are refused; a missing path or a regular file
/// is fine.
pub fn refuse_special_target(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "is a symbolic link; refusing to replace it (write to the file it points to)",
        )),
        Ok(m) if !m.is_file() => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "is not a regular file; refusing to replace it",
        )),
        _ => Ok(()),
    }
}

/// Creates `dir` if needed and checks that a file can be created in it, before any work whose
/// result would go there is started.
pub fn ensure_writable_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let probe = dir.join(format!(".write-test.{}", std::process::id()));
    File::create(&probe)?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}

fn folder_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// The folder of the running package: `CARGO_MANIFEST_DIR` as cargo sets it for the process
/// (`cargo test`, `cargo run`), else `compiled`, the caller's `env!("CARGO_MANIFEST_DIR")`. The
/// run-time value comes first because a target folder shared between checkouts (as CI's is)
/// can hold a binary compiled in a checkout that no longer exists.
pub fn manifest_dir(compiled: &str) -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(compiled))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_package_folder_is_the_one_cargo_runs_the_tests_in() {
        // cargo sets CARGO_MANIFEST_DIR for the test process: it wins over the compiled value.
        let dir = manifest_dir("/a/checkout/that/is/gone");
        assert!(dir.join("Cargo.toml").is_file(), "{}", dir.display());
        assert!(dir.ends_with("simclr-fs"), "{}", dir.display());
    }

    #[test]
    fn a_write_replaces_the_file_whole_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("report.json");
        write_atomic(&p, b"first").unwrap();
        write_atomic(&p, b"second, longer").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second, longer");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["report.json"]);
    }

    #[test]
    fn temporaries_are_recognised_by_their_target() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("checkpoint.safetensors");
        let f = AtomicFile::create(&target).unwrap();
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 1);
        assert!(
            is_temporary_of(&names[0], "checkpoint.safetensors"),
            "{names:?}"
        );
        assert!(!is_temporary_of(&names[0], "checkpoint.safetensor"));
        assert!(!is_temporary_of(&names[0], "metrics.jsonl"));
        drop(f);
        for other in [
            "checkpoint.safetensors",
            ".checkpoint.safetensors.tmp",
            ".checkpoint.safetensors.12-x.tmp",
            ".checkpoint.safetensors.-3.tmp",
            "checkpoint.safetensors.12-3.tmp",
            ".checkpoint-7.safetensors.12-3.tmp",
        ] {
            assert!(!is_temporary_of(other, "checkpoint.safetensors"), "{other}");
        }
        assert!(is_temporary_of(
            ".checkpoint.safetensors.12-3.tmp",
            "checkpoint.safetensors"
        ));
    }

    #[test]
    fn an_abandoned_write_leaves_the_old_contents_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("checkpoint.safetensors");
        write_atomic(&p, b"old").unwrap();
        {
            let mut f = AtomicFile::create(&p).unwrap();
            f.file().write_all(b"half of the new").unwrap();
            // Dropped without a commit: an error part-way through the caller's writing.
        }
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[cfg(unix)]
    #[test]
    fn links_and_special_files_are_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, b"keep").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = write_atomic(&link, b"new").unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        let e = write_atomic(Path::new("/dev/null"), b"x").unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let e = write_atomic(dir.path(), b"x").unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }

    #[test]
    fn writable_dir_check_creates_and_probes() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("a/b");
        ensure_writable_dir(&out).unwrap();
        assert!(out.is_dir());
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(ensure_writable_dir(&file.join("sub")).is_err());
    }
}
