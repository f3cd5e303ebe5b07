//! The mmreg command line over the toy model alone: `cargo run -p toy-vlm -- models`.

use std::process::ExitCode;

use toy_vlm as _;

fn main() -> ExitCode {
    mmreg_cli::main()
}
