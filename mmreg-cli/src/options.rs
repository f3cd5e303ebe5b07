//! Command-line values shared by the subcommands.

use anyhow::{anyhow, bail, Result};
use tch::{Device, Kind};

/// Parses `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(text: &str) -> Result<Device> {
    match text {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        _ => text
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Device::Cuda)
            .ok_or_else(|| anyhow!("--device: `{text}`: expected cpu, cuda or cuda:N")),
    }
}

/// Parses `f32`, `bf16` or `f16`.
pub fn parse_dtype(text: &str) -> Result<Kind> {
    match text {
        "f32" | "float32" => Ok(Kind::Float),
        "bf16" | "bfloat16" => Ok(Kind::BFloat16),
        "f16" | "float16" => Ok(Kind::Half),
        _ => bail!("--dtype: `{text}`: expected f32, bf16 or f16"),
    }
}
