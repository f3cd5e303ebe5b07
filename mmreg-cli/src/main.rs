//! The `mmreg` binary: the command line over every model in `mmreg-models`.

use std::process::ExitCode;

// Link the model crate: its registrations live in its object files.
use mmreg_models as _;

fn main() -> ExitCode {
    mmreg_cli::main()
}
