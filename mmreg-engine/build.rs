//! Links libtorch (see `build/libtorch.rs`) and compiles the CUDA shim: the caching allocator's memory
//! statistics, CUDA graphs, the Kineto profiler and launching our own kernels, which tch does not expose.
//! Without CUDA headers the shim is left out: the statistics report themselves unavailable, decode steps
//! run without graphs and the fused kernels fall back to libtorch's ops. Also compiles the CPU emulator of
//! the fused kernels, for tests.

include!("../build/libtorch.rs");

fn main() {
    println!("cargo:rustc-check-cfg=cfg(mmreg_cuda_shim)");
    println!("cargo:rerun-if-changed=csrc/cuda_shim.cpp");
    // The CPU emulator of the fused kernels (tests without a GPU) needs only a C++20 compiler.
    println!("cargo:rerun-if-changed=csrc/kernel_emulator.cpp");
    println!("cargo:rerun-if-changed=csrc/fused_kernels.cu");
    cc::Build::new()
        .cpp(true)
        .file("csrc/kernel_emulator.cpp")
        .flag("-std=c++20")
        // Products and sums rounded one by one, as on the GPU (NVRTC runs with --fmad=false).
        .flag("-ffp-contract=off")
        // The CUDA source's `#pragma unroll` means nothing to the host compiler.
        .flag("-Wno-unknown-pragmas")
        .compile("mmreg_kernel_emulator");
    let Some(lib) = link_libtorch() else { return };
    // `lib` may go through the `.libtorch` link; the wheels sit next to its target.
    let lib = std::fs::canonicalize(&lib).unwrap_or(lib);
    let torch = lib
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    // pip's torch gets the CUDA runtime headers from the nvidia-* wheels beside it.
    let site = torch
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    let Some(cuda_include) = ["nvidia/cu13/include", "nvidia/cuda_runtime/include"]
        .iter()
        .map(|p| site.join(p))
        .find(|p| p.join("cuda_runtime_api.h").exists())
    else {
        println!("cargo:warning=no CUDA headers next to libtorch: CUDA memory statistics and graphs will be unavailable");
        return;
    };
    // The runtime wheel lacks nvcc's `crt/` headers that cuda_runtime.h includes; triton (a torch
    // dependency) ships them.
    let Some(crt_include) = [
        "nvidia/cu13/include",
        "nvidia/cuda_nvcc/include",
        "triton/backends/nvidia/include",
    ]
    .iter()
    .map(|p| site.join(p))
    .find(|p| p.join("crt/host_config.h").exists()) else {
        println!("cargo:warning=no CUDA crt/ headers next to libtorch: CUDA memory statistics and graphs will be unavailable");
        return;
    };
    cc::Build::new()
        .cpp(true)
        .file("csrc/cuda_shim.cpp")
        .include(torch.join("include"))
        .include(torch.join("include/torch/csrc/api/include"))
        .include(cuda_include)
        .include(crt_include)
        .flag("-std=c++17")
        .flag("-w")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .compile("mmreg_cuda_shim");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=c10_cuda");
    println!("cargo:rustc-link-lib=dylib=torch_cuda");
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-cfg=mmreg_cuda_shim");
}
