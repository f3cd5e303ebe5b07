//! Helpers shared by the parity tests.

use std::path::{Path, PathBuf};

use mmreg_image::PassOrder;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

/// The workspace's `fixtures/` directory.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

/// Parses a JSON file under `fixtures/`, panicking with its path.
pub fn read_json<T: DeserializeOwned>(relative: &str) -> T {
    let path = fixtures().join(relative);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The pass order of the Pillow release that produced a set of goldens.
pub fn pass_order(pillow: &str) -> PassOrder {
    match pillow
        .split('.')
        .next()
        .and_then(|major| major.parse::<u32>().ok())
    {
        Some(major) if major < 13 => PassOrder::Pillow12,
        _ => PassOrder::Pillow13,
    }
}

/// SHA-256 of the values as little-endian `f32` bytes (numpy's `<f4`), in hex.
pub fn sha256_hex(values: &[f32]) -> String {
    let mut hasher = Sha256::new();
    for v in values {
        hasher.update(v.to_le_bytes());
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
