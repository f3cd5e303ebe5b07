//! Compiling the CUDA source with NVRTC, loading it on a device and launching, through the shim.

#[cfg(mmreg_cuda_shim)]
mod shim {
    use std::collections::HashMap;
    use std::ffi::{c_char, c_void, CString};
    use std::sync::Mutex;

    use super::super::launch::{
        ForKind, Function, Kernels, ATTENTION, ATTENTION_MMA_WIDE, ATTENTION_WARPS,
        ATTENTION_WIDE_WARPS, LINEAR, LINEAR_WARPS, NAMES, SUFFIXES,
    };
    use super::super::self_check::check_kernels;

    const SOURCE: &str = include_str!("../../csrc/fused_kernels.cu");

    extern "C" {
        fn mmreg_kernels_compile(
            source: *const c_char,
            major: i32,
            minor: i32,
            size: *mut usize,
            report: *mut c_char,
            report_capacity: usize,
            error: *mut c_char,
            capacity: usize,
        ) -> i32;
        fn mmreg_kernels_load(
            device: i32,
            source: *const c_char,
            module: *mut *mut c_void,
            error: *mut c_char,
            capacity: usize,
        ) -> i32;
        fn mmreg_kernels_function(module: *mut c_void, name: *const c_char) -> *mut c_void;
        fn mmreg_kernels_resident(
            function: *mut c_void,
            device: i32,
            block: u32,
            out: *mut i64,
        ) -> i32;
        fn mmreg_kernels_launch(
            function: *mut c_void,
            device: i32,
            grid_x: u32,
            grid_y: u32,
            block: u32,
            args: *mut *mut c_void,
            programmatic: i32,
        ) -> i32;
        fn mmreg_kernels_programmatic(device: i32) -> i32;
    }

    /// Compiled and checked once per device, or why not (logged once, the message kept for good).
    type Loaded = Result<&'static Kernels, &'static str>;
    static LOADED: Mutex<Option<HashMap<usize, Loaded>>> = Mutex::new(None);

    pub(in crate::kernels) fn kernels(device: usize) -> Loaded {
        let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
        let loaded = loaded.get_or_insert_with(HashMap::new);
        let entry = loaded.entry(device).or_insert_with(|| {
            let checked = load(device).and_then(|kernels| {
                let kernels: &'static Kernels = Box::leak(Box::new(kernels));
                check_kernels(kernels, tch::Device::Cuda(device))?;
                Ok(kernels)
            });
            match &checked {
                Ok(_) => tracing::debug!(device, "fused kernels compiled and checked"),
                Err(why) => {
                    tracing::warn!(
                        device,
                        "fused kernels unavailable, running unfused ops: {why}"
                    )
                }
            }
            checked.map_err(|why| &*Box::leak(why.into_boxed_str()))
        });
        *entry
    }

    /// Calls the shim with an error buffer; the message it wrote when it returned non-zero.
    fn with_error(call: impl FnOnce(*mut c_char, usize) -> i32) -> Result<(), String> {
        let mut error = vec![0u8; 16 * 1024];
        let status = call(error.as_mut_ptr().cast(), error.len());
        if status == 0 {
            return Ok(());
        }
        let end = error.iter().position(|&b| b == 0).unwrap_or(error.len());
        let message = String::from_utf8_lossy(&error[..end]);
        Err(format!("{message} (status {status})"))
    }

    pub(in crate::kernels) fn compile_for(
        major: i32,
        minor: i32,
        defines: &str,
    ) -> Result<(usize, String), String> {
        let source = CString::new(format!("{defines}{SOURCE}")).map_err(|e| e.to_string())?;
        let mut size = 0usize;
        let mut report = vec![0u8; 64 * 1024];
        // SAFETY: the shim writes the size and NUL-terminated texts of at most their capacities, and
        // catches every C++ exception.
        with_error(|error, capacity| unsafe {
            mmreg_kernels_compile(
                source.as_ptr(),
                major,
                minor,
                &mut size,
                report.as_mut_ptr().cast(),
                report.len(),
                error,
                capacity,
            )
        })?;
        let end = report.iter().position(|&b| b == 0).unwrap_or(report.len());
        Ok((size, String::from_utf8_lossy(&report[..end]).into_owned()))
    }

    /// The source's tuning constants set from the environment, for measurements: `#define` lines for
    /// the variables set to a number in range (the source's defaults otherwise).
    /// - `MMREG_LINEAR_PREFETCH_RUNS` (1 to 256): how much of its first rows the one-row linear kernel
    ///   prefetches before it waits for the kernel before it (4 runs of 16 bytes a lane by default).
    /// - `MMREG_ATTENTION_PIPELINE` (0 or 1): whether the tensor-core decode attention loads a tile
    ///   while it multiplies the one before (1, the default) or loads each tile and then multiplies it.
    /// - `MMREG_FEW_UNROLL_8` (1 to 8): the chunks of 32 a warp of the 8-row few-rows kernels loads at
    ///   once (4 by default).
    /// - `MMREG_EARLY_READS` (0 or 1): whether kernels read what kernels before the one just before them
    ///   wrote before they wait for it (the residual stream of RMSNorm, a step's slots, lengths, cos and
    ///   sin), and the few-rows kernels' rope epilogue reads its inputs before the tile's products (1, the
    ///   default), or after (0).
    fn tuning_defines() -> String {
        [
            ("MMREG_LINEAR_PREFETCH_RUNS", 1..=256),
            ("MMREG_ATTENTION_PIPELINE", 0..=1),
            ("MMREG_FEW_UNROLL_8", 1..=8),
            ("MMREG_EARLY_READS", 0..=1),
        ]
        .into_iter()
        .filter_map(|(name, range)| {
            let value = std::env::var(name).ok()?.parse::<u32>().ok()?;
            range
                .contains(&value)
                .then(|| format!("#define {name} {value}\n"))
        })
        .collect()
    }

    fn load(device: usize) -> Result<Kernels, String> {
        let source =
            CString::new(format!("{}{SOURCE}", tuning_defines())).map_err(|e| e.to_string())?;
        let mut module = std::ptr::null_mut();
        // SAFETY: as in `compile_for`; the shim sets `module` on success.
        with_error(|error, capacity| unsafe {
            mmreg_kernels_load(device as i32, source.as_ptr(), &mut module, error, capacity)
        })?;
        let function = |name: String| {
            let c_name = CString::new(name.clone()).map_err(|e| e.to_string())?;
            // SAFETY: `module` was loaded above; the shim returns null when the name is missing.
            let f = unsafe { mmreg_kernels_function(module, c_name.as_ptr()) };
            if f.is_null() {
                Err(format!("kernel {name} missing from the compiled module"))
            } else {
                Ok(Function::Cuda(f))
            }
        };
        let for_kind = |suffix: &str| -> Result<ForKind, String> {
            let functions = NAMES
                .iter()
                .map(|name| function(format!("{name}_{suffix}")))
                .collect::<Result<Vec<_>, _>>()?;
            let functions = functions
                .try_into()
                .map_err(|_| "one function per kernel name".to_string())?;
            Ok(ForKind(functions))
        };
        let [f32, bf16, f16] = SUFFIXES.map(for_kind);
        let (f32, bf16, f16) = (f32?, bf16?, f16?);
        // How many blocks of each attention variant, and of the one-row linear kernel, the device
        // holds at once (0 where the driver cannot say: the split then aims at a number of blocks, and
        // the linear kernel does not split k).
        let resident = |f: Function, threads: u32| -> i64 {
            let Function::Cuda(f) = f else { return 0 };
            let mut out = 0i64;
            // SAFETY: `f` is a function of the module loaded above for `device`.
            let status = unsafe { mmreg_kernels_resident(f, device as i32, threads, &mut out) };
            if status == 0 {
                out
            } else {
                0
            }
        };
        let attention_resident = [&f32, &bf16, &f16]
            .map(|k| std::array::from_fn(|v| resident(k.0[ATTENTION + v], ATTENTION_WARPS * 32)));
        let attention_wide_resident = [&f32, &bf16, &f16]
            .map(|k| resident(k.0[ATTENTION_MMA_WIDE], ATTENTION_WIDE_WARPS * 32));
        let linear_resident = [&f32, &bf16, &f16].map(|k| resident(k.0[LINEAR], LINEAR_WARPS * 32));
        Ok(Kernels {
            device: device as i32,
            max_grid: (8192, 65535),
            // The split by occupancy (measured in docs/benchmarks.md); MMREG_DECODE_ATTENTION_BLOCKS
            // aims at a number of blocks instead.
            target_blocks: std::env::var("MMREG_DECODE_ATTENTION_BLOCKS")
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|&blocks: &i64| blocks > 0),
            min_chunk: None,
            // SAFETY: a query of the device's attributes; the shim catches every C++ exception.
            programmatic: programmatic_enabled()
                && unsafe { mmreg_kernels_programmatic(device as i32) } == 1,
            attention_resident,
            attention_wide_resident,
            linear_resident,
            f32,
            bf16,
            f16,
        })
    }

    /// Programmatic dependent launches unless `MMREG_PDL=0` (read once per device load).
    fn programmatic_enabled() -> bool {
        crate::kernels::not_zero("MMREG_PDL")
    }

    pub(in crate::kernels) fn launch(
        function: *mut c_void,
        device: i32,
        (grid_x, grid_y): (u32, u32),
        block: u32,
        args: &mut [*mut c_void],
        programmatic: bool,
    ) -> i32 {
        // SAFETY: the caller passes arguments matching the kernel's parameters, every tensor pointer a
        // live contiguous CUDA buffer of the kernel's dtype and size; the shim catches every C++
        // exception.
        unsafe {
            mmreg_kernels_launch(
                function,
                device,
                grid_x,
                grid_y,
                block,
                args.as_mut_ptr(),
                programmatic as i32,
            )
        }
    }
}

#[cfg(not(mmreg_cuda_shim))]
mod shim {
    use std::ffi::c_void;

    use super::super::launch::Kernels;

    const NO_SHIM: &str = "this build has no CUDA shim (no CUDA headers next to libtorch)";

    pub(in crate::kernels) fn kernels(_device: usize) -> Result<&'static Kernels, &'static str> {
        Err(NO_SHIM)
    }

    pub(in crate::kernels) fn compile_for(
        _major: i32,
        _minor: i32,
        _defines: &str,
    ) -> Result<(usize, String), String> {
        Err(NO_SHIM.into())
    }

    pub(in crate::kernels) fn launch(
        _: *mut c_void,
        _: i32,
        _: (u32, u32),
        _: u32,
        _: &mut [*mut c_void],
        _: bool,
    ) -> i32 {
        unreachable!("no CUDA kernels are loaded without the shim")
    }
}

pub(super) use shim::{compile_for, kernels, launch};
