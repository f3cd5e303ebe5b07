//! Shared by every test of this crate: where the repository's `fixtures/` are.

use std::path::{Path, PathBuf};

/// `fixtures/<name>` of the repository. On the GPU machine the staged test binaries run outside the
/// checkout, and `MMREG_REPO` points back at it.
pub fn fixture(name: &str) -> PathBuf {
    let repo = std::env::var("MMREG_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join(".."));
    repo.join("fixtures").join(name)
}
