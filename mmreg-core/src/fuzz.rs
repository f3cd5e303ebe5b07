//! Entry points shared by the fuzz targets (`fuzz/`) and the regression tests that replay the cases they
//! found. Each must return normally for any input: errors are fine, panics and huge allocations are not.

use std::path::PathBuf;

use tch::{Device, Kind};

use crate::Weights;

/// `bytes` written as `name` in a fresh temporary directory (removed when the guard drops).
pub fn scratch_file(name: &str, bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("the temp dir is writable");
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).expect("the temp dir is writable");
    (dir, path)
}

/// Arbitrary bytes as model.safetensors: mapped by [`Weights::from_files`], then every tensor read at its
/// own shape, once as a float and once as an integer tensor. A tensor that reads has that shape and kind.
pub fn safetensors_file(bytes: &[u8]) {
    let (_dir, path) = scratch_file("model.safetensors", bytes);
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
