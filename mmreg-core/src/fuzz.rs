//! Entry points shared by the fuzz targets (`fuzz/`) and the regression tests that replay the cases they
//! found. Each must return normally for any input: errors are fine, panics and huge allocations are not.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use tch::{Device, Kind};

use crate::Weights;

/// A fresh directory under the system's temp dir, removed on drop. Unique per call, so regression tests
/// running on several threads do not share files.
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    pub fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("mmreg-fuzz-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&path).expect("the temp dir is writable");
        Self(path)
    }

    /// Writes `bytes` as `name` in the directory and returns the file's path.
    pub fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, bytes).expect("the temp dir is writable");
        path
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Default for ScratchDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Arbitrary bytes as model.safetensors: mapped by [`Weights::from_files`], then every tensor read at its
/// own shape, once as a float and once as an integer tensor. A tensor that reads has that shape and kind.
pub fn safetensors_file(bytes: &[u8]) {
    let dir = ScratchDir::new();
    let path = dir.write("model.safetensors", bytes);
    let Ok(weights) = Weights::from_files(&[path]) else {
        return;
    };
    let mut names: Vec<&str> = weights.names().collect();
    names.sort_unstable();
    for name in names {
        let shape = weights
            .shape(name)
            .expect("a listed tensor has a shape")
            .to_vec();
        for kind in [Kind::Float, Kind::Int64] {
            if let Ok(tensor) = weights.get(name, &shape, kind, Device::Cpu) {
                assert_eq!(tensor.size(), shape, "`{name}` read with another shape");
                assert_eq!(tensor.kind(), kind, "`{name}` read as another kind");
            }
        }
    }
    let _ = weights.check_all_used();
}
