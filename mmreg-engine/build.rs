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
    let cuda = cuda_includes(&site);
    compile_dist_shim(&torch, &site, cuda.as_ref());
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    let Some((cuda_include, crt_include)) = cuda else {
        println!("cargo:warning=no CUDA headers next to libtorch: CUDA memory statistics and graphs will be unavailable");
        return;
    };
    cuda_cpp("csrc/cuda_shim.cpp", &torch, &cuda_include, &crt_include).compile("mmreg_cuda_shim");
    println!("cargo:rustc-link-lib=dylib=c10_cuda");
    println!("cargo:rustc-link-lib=dylib=torch_cuda");
    println!("cargo:rustc-cfg=mmreg_cuda_shim");
    compile_cudnn_attention(&torch, &site, &cuda_include, &crt_include);
    compile_tuned_gemm(&torch, &cuda_include, &crt_include);
}

/// A build of one C++ file against libtorch's headers and the CUDA runtime's (the shims' common setup).
fn cuda_cpp(
    file: &str,
    torch: &std::path::Path,
    cuda_include: &std::path::Path,
    crt_include: &std::path::Path,
) -> cc::Build {
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .file(file)
        .include(torch.join("include"))
        .include(torch.join("include/torch/csrc/api/include"))
        .include(cuda_include)
        .include(crt_include)
        .flag("-std=c++17")
        .flag("-w")
        .define("_GLIBCXX_USE_CXX11_ABI", "1");
    build
}

/// The tuned products through cuBLASLt (`csrc/tuned_gemm.cpp`), where cuBLASLt's header is beside the CUDA
/// runtime's (pip's nvidia wheels). Its tile ids' column counts are read from that header.
fn compile_tuned_gemm(
    torch: &std::path::Path,
    cuda_include: &std::path::Path,
    crt_include: &std::path::Path,
) {
    println!("cargo:rustc-check-cfg=cfg(mmreg_tuned_gemm)");
    println!("cargo:rerun-if-changed=csrc/tuned_gemm.cpp");
    let header = cuda_include.join("cublasLt.h");
    let Ok(text) = std::fs::read_to_string(&header) else {
        println!("cargo:warning=no cublasLt.h beside the CUDA headers: products stay libtorch's");
        return;
    };
    // `CUBLASLT_MATMUL_TILE_128x32 = 16,`: tile id 16 has 32 columns.
    let mut columns = vec![0u32; 1];
    for line in text.lines() {
        let Some(rest) = line.trim().strip_prefix("CUBLASLT_MATMUL_TILE_") else {
            continue;
        };
        let Some((name, id)) = rest.split_once(" = ") else {
            continue;
        };
        let (Some((_, cols)), Ok(id)) = (
            name.split_once('x'),
            id.trim_end_matches(',').parse::<usize>(),
        ) else {
            continue;
        };
        if let Ok(cols) = cols.parse::<u32>() {
            if columns.len() <= id {
                columns.resize(id + 1, 0);
            }
            columns[id] = cols;
        }
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let list: Vec<String> = columns.iter().map(u32::to_string).collect();
    let table = format!(
        "static const int kTileColumns[] = {{{}}};\n",
        list.join(", ")
    );
    std::fs::write(out.join("tile_columns.inc"), table).expect("OUT_DIR is writable");
    cuda_cpp("csrc/tuned_gemm.cpp", torch, cuda_include, crt_include)
        .include(&out)
        .compile("mmreg_tuned_gemm");
    println!("cargo:rustc-cfg=mmreg_tuned_gemm");
}

/// cuDNN's attention through cudnn-frontend (`csrc/cudnn_attention.cpp`), where its headers are there: the
/// nvidia-cudnn-frontend wheel's (scripts/libtorch.sh) and cuDNN's own from the wheel torch brings. Without
/// them attention stays libtorch's.
fn compile_cudnn_attention(
    torch: &std::path::Path,
    site: &std::path::Path,
    cuda_include: &std::path::Path,
    crt_include: &std::path::Path,
) {
    println!("cargo:rustc-check-cfg=cfg(mmreg_cudnn_attention)");
    println!("cargo:rerun-if-changed=csrc/cudnn_attention.cpp");
    let frontend = site.join("include");
    let cudnn = site.join("nvidia/cudnn/include");
    if !frontend.join("cudnn_frontend.h").exists() || !cudnn.join("cudnn.h").exists() {
        println!("cargo:warning=no cudnn-frontend or cuDNN headers beside torch: attention stays libtorch's; run scripts/libtorch.sh");
        return;
    }
    cuda_cpp("csrc/cudnn_attention.cpp", torch, cuda_include, crt_include)
        .include(cudnn)
        .include(frontend)
        .define("NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING", None)
        .compile("mmreg_cudnn_attention");
    println!("cargo:rustc-cfg=mmreg_cudnn_attention");
}

/// The CUDA runtime headers and nvcc's `crt/` headers that pip's torch has beside it, if any.
fn cuda_includes(site: &std::path::Path) -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    let cuda_include = ["nvidia/cu13/include", "nvidia/cuda_runtime/include"]
        .iter()
        .map(|p| site.join(p))
        .find(|p| p.join("cuda_runtime_api.h").exists())?;
    // The runtime wheel lacks nvcc's `crt/` headers that cuda_runtime.h includes; triton (a torch
    // dependency) ships them.
    let crt_include = [
        "nvidia/cu13/include",
        "nvidia/cuda_nvcc/include",
        "triton/backends/nvidia/include",
    ]
    .iter()
    .map(|p| site.join(p))
    .find(|p| p.join("crt/host_config.h").exists())?;
    Some((cuda_include, crt_include))
}

/// The c10d shim (tensor parallelism): Gloo always, NCCL where the CUDA and NCCL headers are there. The
/// wheel ships no Gloo headers: `csrc/third_party/gloo` has the ones c10d's Gloo header includes.
fn compile_dist_shim(
    torch: &std::path::Path,
    site: &std::path::Path,
    cuda: Option<&(std::path::PathBuf, std::path::PathBuf)>,
) {
    println!("cargo:rerun-if-changed=csrc/dist_shim.cpp");
    println!("cargo:rerun-if-changed=csrc/third_party");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .file("csrc/dist_shim.cpp")
        .include("csrc/third_party")
        .include(torch.join("include"))
        .include(torch.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-w")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("USE_C10D_GLOO", None);
    let nccl_include = site.join("nvidia/nccl/include");
    if let Some((cuda_include, crt_include)) = cuda {
        // CUDA's fp16 header includes CCCL's <nv/target> (the nvidia-cuda-cccl wheel, scripts/libtorch.sh).
        let cccl = cuda_include.join("nv/target").exists();
        if !cccl {
            println!("cargo:warning=no CCCL headers (nv/target) beside CUDA's: tensor parallelism gets Gloo only; run scripts/libtorch.sh");
        }
        if cccl && nccl_include.join("nccl.h").exists() {
            build
                .include(cuda_include)
                .include(crt_include)
                .include(nccl_include)
                .define("USE_C10D_NCCL", None)
                .define("USE_CUDA", None)
                .define("MMREG_NCCL", None);
        }
    }
    build.compile("mmreg_dist_shim");
}
