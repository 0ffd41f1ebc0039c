//! The repository's root, and the example policies shipped in its
//! `policies/`.

use std::path::PathBuf;

use anyhow::Context;

/// The repository's root (the workspace directory).
pub fn workspace() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The shipped `policies/` directory.
pub fn shipped_policies() -> PathBuf {
    workspace().join("policies")
}

/// A copy of the files of the shipped `policies/` in a fresh temporary
/// directory, which the caller may edit.
pub fn policies_copy() -> anyhow::Result<tempfile::TempDir> {
    let dir = tempfile::tempdir().context("creating a directory for the policies")?;
    let shipped = shipped_policies();
    for entry in
        std::fs::read_dir(&shipped).with_context(|| format!("reading {}", shipped.display()))?
    {
        let path = entry?.path();
        if let (true, Some(name)) = (path.is_file(), path.file_name()) {
            std::fs::copy(&path, dir.path().join(name))
                .with_context(|| format!("copying {}", path.display()))?;
        }
    }
    Ok(dir)
}
