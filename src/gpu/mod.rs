//! The GPU (feature `cuda`): whether CUDA can be used here, our kernels (`kernels/*.cu`)
//! compiled by NVRTC at run time and loaded once per device, and scoring on the device
//! ([`score`]). Only this module knows cudarc.
//!
//! Both CUDA libraries are loaded at run time, so the build needs no CUDA installed. cudarc
//! panics on its first call when a library is absent, so [`probe`] and [`Gpu::open`] check that
//! the libraries load before making any other cudarc call.

pub mod launch;
pub mod score;

use std::ffi::{CStr, CString};
use std::fmt;
use std::sync::Arc;

use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, DriverError};
use cudarc::nvrtc::{self, Ptx};

/// The scoring kernels' CUDA C source.
pub const SCORE_KERNELS: &str = include_str!("../../kernels/score.cu");

/// Every kernel source, by file name: what the tests compile for each architecture.
pub const KERNEL_SOURCES: &[(&str, &str)] = &[("score.cu", SCORE_KERNELS)];

/// A device's compute capability, (major, minor): sm_75 is (7, 5).
pub type Capability = (u32, u32);

/// The oldest architecture CUDA 13, whose NVRTC compiles our kernels, still supports: Turing
/// (sm_75). CUDA 13 dropped Maxwell, Pascal and Volta.
pub const MIN_CAPABILITY: Capability = (7, 5);

/// The f16 path's `mma.sync.m16n8k16` with f16 operands needs Ampere (sm_80); its kernels are
/// compiled only from there (`#if __CUDA_ARCH__ >= 800` in `kernels/score.cu`).
pub const FUSED_MIN_CAPABILITY: Capability = (8, 0);

/// The architecture name NVRTC takes: `sm_75`, `sm_90`, `sm_120`.
pub fn architecture((major, minor): Capability) -> String {
    format!("sm_{major}{minor}")
}

/// Which scoring paths a device of this capability gets, in words (`info --gpu`).
pub fn paths(capability: Capability) -> String {
    if capability < MIN_CAPABILITY {
        format!("none: CUDA 13 supports {} and newer", architecture(MIN_CAPABILITY))
    } else if capability < FUSED_MIN_CAPABILITY {
        format!("--gpu-inputs f32 only (f16 needs {})", architecture(FUSED_MIN_CAPABILITY))
    } else {
        "--gpu-inputs f32 and f16".to_string()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("no CUDA driver: libcuda could not be loaded (is the NVIDIA driver installed?)")]
    NoDriver,
    #[error("no CUDA device {0}: this machine has {1}")]
    NoDevice(usize, usize),
    #[error(
        "NVRTC, which compiles our kernels, could not be loaded: put the lib folder of CUDA 13.0 \
         or of the nvidia-cuda-nvrtc 13.0 wheel on LD_LIBRARY_PATH (scripts/fetch-nvrtc.sh fetches it)"
    )]
    NoNvrtc,
    #[error(
        "{name} is {arch}: CUDA 13, which compiles our kernels, supports sm_75 (Turing) and newer \
         (it dropped Maxwell, Pascal and Volta); score on the CPU: leave out --device"
    )]
    TooOld { name: String, arch: String },
    #[error(
        "--gpu-inputs f16 runs on tensor-core instructions (mma.sync m16n8k16 with f16 operands) \
         that need sm_80 (Ampere) or newer; {name} is {arch}: use --gpu-inputs f32"
    )]
    NoFusedPath { name: String, arch: String },
    #[error("{name} does not compile for {arch}:\n{log}")]
    Compile { name: String, arch: String, log: String },
    #[error("CUDA: {0}")]
    Driver(#[from] DriverError),
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Score(#[from] crate::score::ScoreError),
}

/// What CUDA offers on this machine, found without a call that could panic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    NoDriver,
    NoDevice,
    Ready { devices: usize },
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Probe::NoDriver => write!(f, "no CUDA driver"),
            Probe::NoDevice => write!(f, "no device"),
            Probe::Ready { devices } => write!(f, "ready ({devices} device{})", if *devices == 1 { "" } else { "s" }),
        }
    }
}

/// Whether CUDA can be used here: the driver library loads and sees at least one device.
pub fn probe() -> Probe {
    if !driver_present() {
        return Probe::NoDriver;
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => Probe::Ready { devices: n as usize },
        _ => Probe::NoDevice,
    }
}

/// What `vtr-index info --gpu` prints, one line each: the driver, NVRTC, and every device with
/// its architecture, where its kernels loaded from and the paths it scores on. Also printed by
/// the GStreamer-free `gpu_score probe` (examples/), which GPU machines without GStreamer run.
pub fn report() -> String {
    use std::fmt::Write;
    let probe = probe();
    let mut out = format!("cuda:      {probe}\n");
    let nvrtc = if nvrtc_present() { "loads" } else { "not found (LD_LIBRARY_PATH)" };
    writeln!(out, "nvrtc:     {nvrtc}").unwrap();
    if let Probe::Ready { devices } = probe {
        for ordinal in 0..devices {
            match Gpu::open(ordinal) {
                Ok(device) => writeln!(
                    out,
                    "cuda:{ordinal}:    {} ({}, kernels loaded from {}): {}",
                    device.name,
                    architecture(device.capability),
                    device.kernels_from,
                    paths(device.capability)
                ),
                Err(e) => writeln!(out, "cuda:{ordinal}:    {e}"),
            }
            .unwrap();
        }
    }
    out
}

/// Whether libcuda loads. With `cuda-encoder`, candle links cudarc to the CUDA libraries at build
/// time, so a process that runs has them; otherwise they are loaded on first use.
#[cfg(not(feature = "cuda-encoder"))]
fn driver_present() -> bool {
    // SAFETY: only tries to load the library, which has no side effects beyond loading it.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

#[cfg(feature = "cuda-encoder")]
fn driver_present() -> bool {
    true
}

/// Whether NVRTC loads.
#[cfg(not(feature = "cuda-encoder"))]
pub fn nvrtc_present() -> bool {
    // SAFETY: as in `driver_present`.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

#[cfg(feature = "cuda-encoder")]
pub fn nvrtc_present() -> bool {
    true
}

/// Refuses the f16 path below [`FUSED_MIN_CAPABILITY`], naming the device and the reason.
fn fused_path(name: &str, capability: Capability) -> Result<(), GpuError> {
    if capability < FUSED_MIN_CAPABILITY {
        return Err(GpuError::NoFusedPath { name: name.to_string(), arch: architecture(capability) });
    }
    Ok(())
}

/// A compiled kernel source and what ptxas said about it.
pub struct Compiled {
    pub ptx: String,
    /// The machine code for the architecture compiled for, which the driver loads without
    /// compiling the PTX again; none where NVRTC made none.
    pub cubin: Option<Vec<u8>>,
    /// NVRTC's log, with ptxas's report (`--ptxas-options=-v`) of each kernel's registers,
    /// stack, spills and shared memory.
    pub log: String,
}

/// Compiles one kernel source for `arch` (such as `sm_90`), with the constants the kernels
/// share with the host defined (`score::KERNEL_CONSTANTS`). A real architecture makes NVRTC run
/// ptxas, so too much shared memory is an error here and spills show in the log.
pub fn compile(name: &str, source: &str, arch: &str) -> Result<Compiled, GpuError> {
    if !nvrtc_present() {
        return Err(GpuError::NoNvrtc);
    }
    let failed = |log: String| GpuError::Compile { name: name.to_string(), arch: arch.to_string(), log };
    let c_source = CString::new(source).map_err(|_| failed("the source holds a NUL byte".into()))?;
    let c_name = CString::new(name).map_err(|_| failed("the name holds a NUL byte".into()))?;
    let program = nvrtc::result::create_program(&c_source, Some(&c_name)).map_err(|e| failed(format!("{e:?}")))?;
    let mut options =
        vec![format!("--gpu-architecture={arch}"), "--ptxas-options=-v".to_string(), "--std=c++17".to_string()];
    options.extend(score::kernel_defines());
    // SAFETY: `program` was just created and is destroyed below, after its last use.
    let outcome = unsafe { nvrtc::result::compile_program(program, &options) };
    let log = unsafe { nvrtc::result::get_program_log(program) }.map(|raw| c_text(&raw)).unwrap_or_default();
    let ptx = match outcome {
        Ok(()) => {
            unsafe { nvrtc::result::get_ptx(program) }.map(|raw| c_text(&raw)).map_err(|e| failed(format!("{e:?}")))
        }
        Err(e) => Err(failed(format!("{e:?}\n{log}"))),
    };
    // SAFETY: `program` compiled (or `ptx` is the error, and the cubin is not used).
    let cubin = unsafe { cubin_of(program) };
    // SAFETY: nothing uses `program` after this.
    let _ = unsafe { nvrtc::result::destroy_program(program) };
    Ok(Compiled { ptx: ptx?, cubin, log })
}

/// The cubin NVRTC made for a real architecture, if it made one.
///
/// # Safety
/// `program` is a live NVRTC program.
unsafe fn cubin_of(program: nvrtc::sys::nvrtcProgram) -> Option<Vec<u8>> {
    use nvrtc::sys::{nvrtcGetCUBIN, nvrtcGetCUBINSize, nvrtcResult};
    let mut size = 0usize;
    // SAFETY: the caller's program; the buffer holds the size NVRTC reported.
    unsafe {
        if nvrtcGetCUBINSize(program, &mut size) != nvrtcResult::NVRTC_SUCCESS || size == 0 {
            return None;
        }
        let mut cubin = vec![0u8; size];
        (nvrtcGetCUBIN(program, cubin.as_mut_ptr().cast()) == nvrtcResult::NVRTC_SUCCESS).then_some(cubin)
    }
}

fn c_text(raw: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = raw.iter().map(|&c| c as u8).collect();
    CStr::from_bytes_until_nul(&bytes)
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned())
}

/// What ptxas reported for one kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelResources {
    pub kernel: String,
    pub registers: u32,
    pub spill_store_bytes: u32,
    pub spill_load_bytes: u32,
    pub stack_bytes: u32,
    pub shared_bytes: u32,
}

/// Reads ptxas's verbose report out of an NVRTC log: one entry per kernel.
pub fn kernel_resources(log: &str) -> Vec<KernelResources> {
    let number_before = |line: &str, unit: &str| -> Option<u32> {
        let end = line.find(unit)?;
        line[..end].trim_end().rsplit([' ', ',']).next()?.parse().ok()
    };
    let mut kernels: Vec<KernelResources> = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let kernel = rest.split('\'').next().unwrap_or_default().to_string();
            kernels.push(KernelResources {
                kernel,
                registers: 0,
                spill_store_bytes: 0,
                spill_load_bytes: 0,
                stack_bytes: 0,
                shared_bytes: 0,
            });
        } else if let Some(current) = kernels.last_mut() {
            if line.contains("spill stores") {
                current.stack_bytes = number_before(line, "bytes stack frame").unwrap_or(0);
                current.spill_store_bytes = number_before(line, "bytes spill stores").unwrap_or(0);
                current.spill_load_bytes = number_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used") && line.contains("registers") {
                current.registers = number_before(line, "registers").unwrap_or(0);
                current.shared_bytes = number_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    kernels
}

/// One CUDA device with our kernels loaded.
pub struct Gpu {
    pub name: String,
    pub ordinal: usize,
    pub capability: Capability,
    /// The most blocks a launch's grid has down (`CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y`).
    pub max_grid_rows: usize,
    /// What the driver loaded the kernels from: `cubin`, or `PTX` where it took no cubin.
    pub kernels_from: &'static str,
    stream: Arc<CudaStream>,
    score_module: Arc<CudaModule>,
}

impl Gpu {
    /// Opens device `ordinal` and compiles the kernels for its architecture.
    pub fn open(ordinal: usize) -> Result<Gpu, GpuError> {
        match probe() {
            Probe::NoDriver => return Err(GpuError::NoDriver),
            Probe::NoDevice => return Err(GpuError::NoDevice(ordinal, 0)),
            Probe::Ready { devices } if ordinal >= devices => return Err(GpuError::NoDevice(ordinal, devices)),
            Probe::Ready { .. } => {}
        }
        let context = CudaContext::new(ordinal)?;
        let (major, minor) = context.compute_capability()?;
        let (name, capability) = (context.name()?, (major as u32, minor as u32));
        if capability < MIN_CAPABILITY {
            return Err(GpuError::TooOld { name, arch: architecture(capability) });
        }
        let max_grid_rows = context.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y)? as usize;
        let compiled = compile("score.cu", SCORE_KERNELS, &architecture(capability))?;
        // The cubin spares the driver compiling the PTX at every start; PTX where the driver
        // takes no cubin (or NVRTC made none).
        let from_cubin = compiled.cubin.and_then(|cubin| context.load_module(Ptx::from_binary(cubin)).ok());
        let (score_module, kernels_from) = match from_cubin {
            Some(module) => (module, "cubin"),
            None => (context.load_module(Ptx::from_src(compiled.ptx))?, "PTX"),
        };
        Ok(Gpu {
            name,
            ordinal,
            capability,
            max_grid_rows,
            kernels_from,
            stream: context.default_stream(),
            score_module,
        })
    }

    /// Whether this device runs the f16 path, and why not.
    pub fn check_fused_path(&self) -> Result<(), GpuError> {
        fused_path(&self.name, self.capability)
    }

    fn score_kernel(&self, name: &str) -> Result<CudaFunction, GpuError> {
        Ok(self.score_module.load_function(name)?)
    }

    /// The device's stream, on which every kernel of this module runs.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Free and total device memory, in bytes.
    pub fn memory(&self) -> Result<(usize, usize), GpuError> {
        Ok(self.stream.context().mem_get_info()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turing_gets_the_f32_path_and_ampere_on_both() {
        let t4 = fused_path("Tesla T4", (7, 5)).unwrap_err().to_string();
        assert!(t4.contains("Tesla T4 is sm_75") && t4.contains("sm_80") && t4.contains("--gpu-inputs f32"), "{t4}");
        for capability in [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)] {
            assert!(fused_path("device", capability).is_ok(), "{capability:?}");
        }
        assert_eq!(paths((7, 5)), "--gpu-inputs f32 only (f16 needs sm_80)");
        assert_eq!(paths((9, 0)), "--gpu-inputs f32 and f16");
        assert!(paths((7, 0)).starts_with("none"), "Volta is not supported by CUDA 13");
        assert_eq!((architecture((12, 0)), architecture((7, 5))), ("sm_120".to_string(), "sm_75".to_string()));
    }

    #[test]
    fn reads_ptxas_reports() {
        let log = "ptxas info    : 0 bytes gmem\n\
            ptxas info    : Compiling entry function 't2v_apply' for 'sm_90'\n\
            ptxas info    : Function properties for t2v_apply\n\
            \x20   384 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n\
            ptxas info    : Used 64 registers, used 1 barriers, 3104 bytes smem, 488 bytes cmem[0]\n\
            ptxas info    : Compiling entry function 'gather_own' for 'sm_90'\n\
            ptxas info    : Function properties for gather_own\n\
            \x20   0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
            ptxas info    : Used 10 registers, used 0 barriers, 380 bytes cmem[0]\n";
        let kernels = kernel_resources(log);
        assert_eq!(
            kernels[0],
            KernelResources {
                kernel: "t2v_apply".into(),
                registers: 64,
                spill_store_bytes: 8,
                spill_load_bytes: 12,
                stack_bytes: 384,
                shared_bytes: 3104
            }
        );
        assert_eq!(
            (kernels[1].kernel.as_str(), kernels[1].registers, kernels[1].spill_store_bytes),
            ("gather_own", 10, 0)
        );
    }
}
