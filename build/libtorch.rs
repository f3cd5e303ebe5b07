// Shared by the build scripts (`include!`d): link flags every binary, test and example needs.
//
// rustc links with `--as-needed`, and nothing in Rust code references `libtorch_cuda.so` directly, so
// without these flags the CUDA backend is silently dropped and `tch::Cuda::is_available()` is false.
// The rpath lets binaries find libtorch without `LD_LIBRARY_PATH`: it names the per-user cache that
// `scripts/libtorch.sh` installs into (the clone's `.libtorch` link resolved), so a binary keeps working
// when copied out of the clone or after the clone is gone. `DEP_TCH_LIBTORCH_LIB` is exported by
// torch-sys (`links = "tch"`) to direct dependents.

/// Emits the link flags and returns libtorch's `lib` directory.
fn link_libtorch() -> Option<std::path::PathBuf> {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib_dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        println!("cargo:warning=DEP_TCH_LIBTORCH_LIB is unset: is torch-sys a direct dependency?");
        return None;
    };
    // `.libtorch/lib` inside the clone → the cache directory it links to.
    let lib_dir = std::fs::canonicalize(&lib_dir)
        .map(|p| p.display().to_string())
        .unwrap_or(lib_dir);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    if std::path::Path::new(&lib_dir).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-ltorch_cuda");
    }
    println!("cargo:rustc-link-arg=-ltorch");
    println!("cargo:rustc-link-arg=-Wl,--as-needed");
    Some(lib_dir.into())
}
