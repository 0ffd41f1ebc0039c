//! The repository's root, the example policies shipped in its
//! `policies/`, and the Python interpreter the tests run scripts with.

use std::path::PathBuf;

use anyhow::Context;

/// The repository's root (the workspace directory).
pub fn workspace() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The Python interpreter for the tests' scripts: `AGENTMESH_PYTHON`, else
/// the virtual environment `scripts/install-deps.sh` makes
/// (`.agentmesh/venv`, with nats-py, nkeys and the SDK's test
/// dependencies), else `python3`.
pub fn python() -> String {
    if let Ok(python) = std::env::var("AGENTMESH_PYTHON") {
        return python;
    }
    let venv = workspace().join(".agentmesh/venv/bin/python");
    if venv.exists() {
        return venv.display().to_string();
    }
    "python3".into()
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
