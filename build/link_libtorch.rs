//! Build script of the packages that only need libtorch's link flags (see `libtorch.rs`).

include!("libtorch.rs");

fn main() {
    link_libtorch();
}
