//! The demo model, embedded in the binary: a 1M-parameter LLaVA trained to describe shapes
//! (`assets/shapes-llava`, docs/demo-model.md). `mmreg generate` without `--model` runs it, from any
//! directory and without the source tree: the files are written once to the per-user cache.

use std::path::PathBuf;

use anyhow::{Context, Result};

/// The checkpoint's files, as `include_bytes!` embeds them.
const FILES: &[(&str, &[u8])] = &[
    (
        "config.json",
        include_bytes!("../../assets/shapes-llava/config.json"),
    ),
    (
        "generation_config.json",
        include_bytes!("../../assets/shapes-llava/generation_config.json"),
    ),
    (
        "model.safetensors",
        include_bytes!("../../assets/shapes-llava/model.safetensors"),
    ),
    (
        "preprocessor_config.json",
        include_bytes!("../../assets/shapes-llava/preprocessor_config.json"),
    ),
    (
        "processor_config.json",
        include_bytes!("../../assets/shapes-llava/processor_config.json"),
    ),
    (
        "tokenizer.json",
        include_bytes!("../../assets/shapes-llava/tokenizer.json"),
    ),
    (
        "tokenizer_config.json",
        include_bytes!("../../assets/shapes-llava/tokenizer_config.json"),
    ),
];

/// The per-user cache mmreg uses for libtorch too ([`mmreg_engine::cache_dir`]).
fn cache_dir() -> Result<PathBuf> {
    mmreg_engine::cache_dir().context("no $HOME, $XDG_CACHE_HOME or $MMREG_CACHE")
}

/// The embedded checkpoint as a directory: written on first use (each file replaced if it differs from
/// the binary's, so a newer binary never reads an older model), then reused.
pub fn demo_model() -> Result<PathBuf> {
    let dir = cache_dir()?.join(concat!("shapes-llava-", env!("CARGO_PKG_VERSION")));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, bytes) in FILES {
        let path = dir.join(name);
        if std::fs::read(&path).is_ok_and(|on_disk| on_disk == *bytes) {
            continue;
        }
        // Written beside, then renamed: a concurrent run never reads half a file.
        let partial = dir.join(format!("{name}.{}.partial", std::process::id()));
        std::fs::write(&partial, bytes)
            .with_context(|| format!("writing {}", partial.display()))?;
        std::fs::rename(&partial, &path).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(dir)
}
