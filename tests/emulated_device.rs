//! The emulated CUDA device (`cuda-emulator/`) itself: each checker catches the defect it is for,
//! in a kernel kept beside the emulator (`cuda-emulator/checks.cu`), compiled by NVRTC and
//! launched through cudarc as the product's kernels are; a launch over a device's limits and an
//! allocation past its memory fail as on a card; a stale build is refused; the host code reads
//! the device's limits. Only `scripts/test-gpu-emulated.sh` runs these (`--ignored`), with the
//! stand-in on the library path, the devices it describes, and the sanitizer each test needs; on
//! a real GPU they would fail, since a card checks none of this.

use std::ffi::CStr;
use std::sync::Arc;

use cudarc::driver::sys::{CUdevice_attribute, CUresult};
use cudarc::driver::{CudaContext, CudaModule, CudaStream, DriverError, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;
use vtr_index::gpu;
use vtr_index::score::{DeviceInputs, Problem, Revision, ScoreOptions, score};

#[allow(dead_code)]
mod score_cases;
#[allow(dead_code)]
mod tolerance;
#[allow(dead_code)]
mod util;

const CHECKS: &str = include_str!("../cuda-emulator/checks.cu");

/// The devices the script describes (VTR_INDEX_EMULATED_DEVICES): a full one, a Turing card
/// with small limits whose driver takes no cubin, and one with little memory.
const FULL_DEVICE: usize = 0;
const SMALL_DEVICE: usize = 1;
/// An Ampere card with 7 MiB: a little more than the memory test's problem needs besides its
/// cosines.
const TIGHT_DEVICE: usize = 2;

/// The sanitizer the stand-in was built with, as the script says (`address` or `thread`).
fn sanitizer() -> String {
    std::env::var("VTR_INDEX_EMULATOR_SANITIZER").unwrap_or_default()
}

/// A context on an emulated device and the checks' module, compiled for its architecture.
fn open(ordinal: usize) -> (Arc<CudaContext>, Arc<CudaStream>, Arc<CudaModule>) {
    assert!(
        matches!(gpu::probe(), gpu::Probe::Ready { .. }),
        "no CUDA device: run these through scripts/test-gpu-emulated.sh"
    );
    let context = CudaContext::new(ordinal).unwrap();
    let name = context.name().unwrap();
    assert!(name.contains("emulated"), "device {ordinal} is {name}, not the emulated device");
    let (major, minor) = context.compute_capability().unwrap();
    let compiled = gpu::compile("checks.cu", CHECKS, &gpu::architecture((major as u32, minor as u32))).unwrap();
    let module = context.load_module(Ptx::from_src(compiled.ptx)).unwrap();
    (context.clone(), context.default_stream(), module)
}

/// What the stand-in said about the last launch it refused on this thread.
fn last_failure() -> String {
    // SAFETY: the stand-in is loaded (cudarc opened it by this name); the symbol is its own
    // function returning a C string it owns.
    unsafe {
        let library = libc::dlopen(c"libcuda.so".as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
        assert!(!library.is_null(), "the emulated libcuda.so is not loaded");
        let symbol = libc::dlsym(library, c"vtr_emulator_last_failure".as_ptr());
        assert!(!symbol.is_null(), "libcuda.so is not the emulated device's");
        let function: extern "C" fn() -> *const libc::c_char = std::mem::transmute(symbol);
        CStr::from_ptr(function()).to_string_lossy().into_owned()
    }
}

fn one_block(threads: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (1, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

/// Launches `kernel` with an output of `len` ints and the extra int arguments; the output, or the
/// launch's error.
fn launch(
    stream: &Arc<CudaStream>,
    module: &Arc<CudaModule>,
    kernel: &str,
    len: usize,
    extra: &[i32],
    config: LaunchConfig,
) -> Result<Vec<i32>, DriverError> {
    let function = module.load_function(kernel).unwrap();
    let mut out = stream.alloc_zeros::<i32>(len)?;
    let mut builder = stream.launch_builder(&function);
    builder.arg(&mut out);
    for value in extra {
        builder.arg(value);
    }
    // SAFETY: every kernel of checks.cu takes an int array and then ints, as given here.
    unsafe { builder.launch(config)? };
    stream.clone_dtoh(&out)
}

fn assert_fails(outcome: Result<Vec<i32>, DriverError>, code: CUresult, words: &[&str]) {
    let error = outcome.expect_err("the launch must fail");
    assert_eq!(error.0, code, "{error:?}");
    let message = last_failure();
    for word in words {
        assert!(message.contains(word), "{word:?} is missing from: {message}");
    }
}

#[test]
#[ignore = "needs the emulated CUDA device: run by scripts/test-gpu-emulated.sh"]
fn a_missing_barrier_changes_results() {
    let (_context, stream, module) = open(FULL_DEVICE);
    let expected: Vec<i32> = (0..256).map(|t| ((t + 1) % 256) * 3 + 11).collect();
    let with_barrier = launch(&stream, &module, "neighbour_exchange", 256, &[11, 1], one_block(256)).unwrap();
    assert_eq!(with_barrier, expected);
    // The same kernel without its barrier: threads run until they block, in a shuffled order, so
    // some read their neighbour's cell before it is written (it holds the salt of the launch
    // before, 11, not this one's 50).
    let expected: Vec<i32> = (0..256).map(|t| ((t + 1) % 256) * 3 + 50).collect();
    let without = launch(&stream, &module, "neighbour_exchange", 256, &[50, 0], one_block(256)).unwrap();
    let stale = without.iter().zip(&expected).filter(|(a, b)| a != b).count();
    eprintln!("without the barrier, {stale} of 256 threads read a stale value");
    assert!(stale > 0, "a missing barrier went unnoticed");
}

#[test]
#[ignore = "needs the emulated CUDA device: run by scripts/test-gpu-emulated.sh"]
fn a_divergent_barrier_fails_the_launch() {
    let (_context, stream, module) = open(FULL_DEVICE);
    assert_fails(
        launch(&stream, &module, "divergent_barrier", 256, &[1], one_block(256)),
        CUresult::CUDA_ERROR_LAUNCH_FAILED,
        &["kernel divergent_barrier", "block (0,0,0)", "divergent barrier", "checks.cu:20", "has exited"],
    );
    assert_fails(
        launch(&stream, &module, "divergent_barrier", 256, &[2], one_block(256)),
        CUresult::CUDA_ERROR_LAUNCH_FAILED,
        &["kernel divergent_barrier", "divergent barrier", "checks.cu:2"],
    );
    let message = last_failure();
    assert!(message.contains("checks.cu:22") && message.contains("checks.cu:24"), "{message}");
}

#[test]
#[ignore = "needs the emulated CUDA device: run by scripts/test-gpu-emulated.sh"]
fn a_mismatched_shuffle_mask_fails_the_launch() {
    let (_context, stream, module) = open(FULL_DEVICE);
    assert_fails(
        launch(&stream, &module, "mismatched_mask", 64, &[], one_block(64)),
        CUresult::CUDA_ERROR_LAUNCH_FAILED,
        &["kernel mismatched_mask", "block (0,0,0)", "__shfl_xor_sync at checks.cu:33", "mask 0xffffffff", "lane 16"],
    );
}

#[test]
#[ignore = "needs the emulated CUDA device built with AddressSanitizer: run by scripts/test-gpu-emulated.sh"]
fn an_out_of_bounds_store_is_caught() {
    assert_eq!(sanitizer(), "address", "this checker is AddressSanitizer's");
    let (_context, stream, module) = open(FULL_DEVICE);
    // 100 ints and 128 threads: threads 100 to 127 store past the allocation.
    assert_fails(
        launch(&stream, &module, "out_of_bounds_store", 100, &[100], one_block(128)),
        CUresult::CUDA_ERROR_ILLEGAL_ADDRESS,
        &["kernel out_of_bounds_store", "heap-buffer-overflow"],
    );
    let message = last_failure();
    let thread: u32 = message.split("thread (").nth(1).and_then(|s| s.split(',').next()?.parse().ok()).unwrap();
    assert!((100..128).contains(&thread), "the store of thread {thread} was in bounds: {message}");
    // In bounds, the same kernel runs.
    assert_eq!(launch(&stream, &module, "out_of_bounds_store", 128, &[128], one_block(128)).unwrap(), vec![128; 128]);
}

#[test]
#[ignore = "needs the emulated CUDA device built with ThreadSanitizer: run by scripts/test-gpu-emulated.sh"]
fn a_shared_memory_race_is_caught() {
    assert_eq!(sanitizer(), "thread", "this checker is ThreadSanitizer's");
    let (_context, stream, module) = open(FULL_DEVICE);
    assert_eq!(launch(&stream, &module, "shared_handoff", 1, &[], one_block(64)).unwrap(), vec![7]);
    assert_fails(
        launch(&stream, &module, "shared_race", 1, &[], one_block(64)),
        CUresult::CUDA_ERROR_LAUNCH_FAILED,
        &["kernel shared_race", "data race", "block (0,0,0), thread (0,0,0)", "block (0,0,0), thread (1,0,0)"],
    );
}

#[test]
#[ignore = "needs the emulated CUDA device: run by scripts/test-gpu-emulated.sh"]
fn a_launch_over_the_devices_limits_fails_as_on_a_card() {
    let (context, stream, module) = open(SMALL_DEVICE);
    let rows = context.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y).unwrap() as u32;
    assert!(rows < 65_535, "the small device has a grid of {rows} rows");
    let grid = |y: u32| LaunchConfig { grid_dim: (3, y, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 };
    let within = launch(&stream, &module, "block_numbers", 3 * rows as usize, &[], grid(rows)).unwrap();
    assert_eq!(within, (0..3 * rows as i32).collect::<Vec<_>>());
    assert_fails(
        launch(&stream, &module, "block_numbers", 3 * (rows as usize + 1), &[], grid(rows + 1)),
        CUresult::CUDA_ERROR_INVALID_VALUE,
        &["block_numbers", "grid"],
    );
    // The PTX declares 20 KiB of shared memory for this kernel; the small device has 16 KiB a
    // block, the full one 48.
    let expected: Vec<i32> = (0..32).map(|t| (t + 1) % 32).collect();
    let (_, full_stream, full_module) = open(FULL_DEVICE);
    assert_eq!(launch(&full_stream, &full_module, "large_shared", 32, &[], one_block(32)).unwrap(), expected);
    assert_fails(
        launch(&stream, &module, "large_shared", 32, &[], one_block(32)),
        CUresult::CUDA_ERROR_INVALID_VALUE,
        &["large_shared", "20480 bytes of shared memory"],
    );
    let too_wide = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (2048, 1, 1), shared_mem_bytes: 0 };
    assert_fails(
        launch(&stream, &module, "block_numbers", 1, &[], too_wide),
        CUresult::CUDA_ERROR_INVALID_VALUE,
        &["2048 threads"],
    );
}

#[test]
#[ignore = "needs the emulated CUDA device: run by scripts/test-gpu-emulated.sh"]
fn an_allocation_past_the_memory_fails_as_on_a_card() {
    let (context, stream, _module) = open(SMALL_DEVICE);
    let (free, total) = context.mem_get_info().unwrap();
    assert!(total <= 1 << 30 && free <= total, "{free} of {total}");
    let half = stream.alloc_zeros::<u8>(total / 2).unwrap();
    let (free_after, _) = context.mem_get_info().unwrap();
    assert_eq!(free - free_after, total / 2, "the allocation is counted");
    let error = stream.alloc_zeros::<u8>(total / 2 + 4096).expect_err("past the device's memory");
    assert_eq!(error.0, CUresult::CUDA_ERROR_OUT_OF_MEMORY);
    drop(half);
    assert_eq!(context.mem_get_info().unwrap().0, free, "freed memory is free again");
}

#[test]
#[ignore = "needs the emulated CUDA device: run by scripts/test-gpu-emulated.sh"]
fn a_module_the_emulator_was_not_built_with_is_refused() {
    let (context, _stream, _module) = open(FULL_DEVICE);
    let arch = {
        let (major, minor) = context.compute_capability().unwrap();
        gpu::architecture((major as u32, minor as u32))
    };
    // A kernel the host build lacks, and one whose parameters changed since the build: as PTX
    // and as a cubin.
    for source in [
        r#"extern "C" __global__ void added_since_the_build(int *out) { out[threadIdx.x] = 1; }"#,
        r#"extern "C" __global__ void block_numbers(int *out, double scale) { out[0] = (int)scale; }"#,
    ] {
        let compiled = gpu::compile("stale.cu", source, &arch).unwrap();
        for module in [Ptx::from_src(compiled.ptx), Ptx::from_binary(compiled.cubin.expect("NVRTC makes a cubin"))] {
            let error = context.load_module(module).expect_err("a stale build must be refused");
            assert_eq!(error.0, CUresult::CUDA_ERROR_INVALID_IMAGE, "{error:?}");
            assert!(last_failure().contains("older than the source"), "{}", last_failure());
        }
    }
}

/// The host code loads its kernels from the cubin NVRTC makes for the device's architecture,
/// and from the PTX where the driver takes no cubin; a cubin of another architecture is refused
/// as a card's driver refuses it.
#[test]
#[ignore = "needs the emulated CUDA device: run by scripts/test-gpu-emulated.sh"]
fn kernels_load_from_the_cubin_and_fall_back_to_ptx() {
    assert_eq!(gpu::Gpu::open(FULL_DEVICE).unwrap().kernels_from, "cubin");
    assert_eq!(gpu::Gpu::open(SMALL_DEVICE).unwrap().kernels_from, "PTX", "the small device refuses cubins");
    let (context, _stream, _module) = open(FULL_DEVICE);
    let cubin = |arch: &str| Ptx::from_binary(gpu::compile("checks.cu", CHECKS, arch).unwrap().cubin.unwrap());
    let error = context.load_module(cubin("sm_90")).expect_err("an sm_90 cubin on sm_80");
    assert_eq!(error.0, CUresult::CUDA_ERROR_NO_BINARY_FOR_GPU, "{error:?}");
    assert!(last_failure().contains("sm_90 does not run on sm_80"), "{}", last_failure());
    let module = context.load_module(cubin("sm_80")).unwrap();
    let stream = context.default_stream();
    let expected: Vec<i32> = (0..32).map(|t| (t + 1) % 32).collect();
    assert_eq!(launch(&stream, &module, "large_shared", 32, &[], one_block(32)).unwrap(), expected);
}

/// The host code on the small device: its grid limit cuts the f32 path's row blocks, column
/// parts and V2T chunks, and splits the GEMM of a block extended to the end of a large caption
/// group, and the outcome is the CPU's; f16 inputs are refused on Turing.
#[test]
#[ignore = "needs the emulated CUDA device: run by scripts/test-gpu-emulated.sh"]
fn the_host_code_follows_the_devices_limits() {
    let device = gpu::Gpu::open(SMALL_DEVICE).unwrap();
    assert_eq!(device.capability, (7, 5), "{}", device.name);
    assert!(device.max_grid_rows * 64 < 600, "{} grid rows", device.max_grid_rows);
    let dim = 16;
    let (texts, videos, _) = score_cases::synthetic(600, 600, dim, 9);
    let text_video: Vec<Option<u32>> = (0..600).map(|t| Some(t as u32)).collect();
    let problem = Problem { texts: &texts, videos: &videos, dim, text_video: &text_video, bank: None };
    let options = ScoreOptions { revision: Revision::DslSym, scale: 100.0, top_k: 5, ..ScoreOptions::default() };
    let on_device = gpu::score::score(&device, &problem, &options, None).unwrap();
    let on_cpu = score(&problem, &options, None).unwrap();
    assert_eq!(on_device.t2v_metrics(), on_cpu.t2v_metrics());
    assert_eq!(on_device.v2t_metrics(), on_cpu.v2t_metrics());
    let f16 = ScoreOptions { device_inputs: DeviceInputs::F16, ..options.clone() };
    let error = gpu::score::score(&device, &problem, &f16, None).unwrap_err().to_string();
    assert!(error.contains("sm_75") && error.contains("need sm_80"), "{error}");
    // A caption group of 400 texts: the row block that starts it (at most a grid of rows, 256)
    // is extended to its end, past what one GEMM grid covers.
    let text_video: Vec<Option<u32>> = (0..600).map(|t| Some(if t < 400 { 0 } else { t as u32 - 399 })).collect();
    let problem = Problem { texts: &texts, videos: &videos, dim, text_video: &text_video, bank: None };
    let on_device = gpu::score::score(&device, &problem, &options, None).unwrap();
    let on_cpu = score(&problem, &options, None).unwrap();
    assert_eq!(on_device.t2v_metrics(), on_cpu.t2v_metrics());
    assert_eq!(on_device.v2t_metrics(), on_cpu.v2t_metrics());
}

/// The f32 path counts everything it allocates before it sizes its row blocks: on a device
/// with little more memory than the texts, videos, partial column sums and results take, it
/// scores in small blocks (a quarter of the free memory, taken before those, ran out).
#[test]
#[ignore = "needs the emulated CUDA device: run by scripts/test-gpu-emulated.sh"]
fn the_row_blocks_fit_beside_everything_else_the_score_allocates() {
    let device = gpu::Gpu::open(TIGHT_DEVICE).unwrap();
    let (free, total) = device.memory().unwrap();
    assert_eq!(total, 7 << 20, "the tight device has 7 MiB");
    let (n, m, dim) = (1000, 1000, 256);
    let (texts, videos, text_video) = score_cases::synthetic(n, m, dim, 4);
    let problem = Problem { texts: &texts, videos: &videos, dim, text_video: &text_video, bank: None };
    assert!(4 * n * m > free / 4, "the cosines do not fit in one block");
    let options = ScoreOptions { revision: Revision::Dsl, scale: 100.0, top_k: 10, ..ScoreOptions::default() };
    let on_device = gpu::score::score(&device, &problem, &options, None).unwrap();
    let on_cpu = score(&problem, &options, None).unwrap();
    assert_eq!(on_device.t2v_metrics(), on_cpu.t2v_metrics());
    assert_eq!(on_device.v2t_metrics(), on_cpu.v2t_metrics());
    assert_eq!(device.memory().unwrap().0, free, "every allocation is freed");
    // Four times the texts do not leave room for one row of cosines: refused, saying why.
    let many = [texts.as_slice(); 4].concat();
    let many_videos: Vec<Option<u32>> = text_video.iter().cycle().take(4 * n).copied().collect();
    let problem = Problem { texts: &many, videos: &videos, dim, text_video: &many_videos, bank: None };
    let error = gpu::score::score(&device, &problem, &options, None).unwrap_err().to_string();
    assert!(error.contains("4000 texts against 1000 videos") && error.contains("score on the CPU"), "{error}");
}

/// `info --gpu` names the device as emulated, with the paths its architecture gets.
#[test]
#[ignore = "needs the emulated CUDA device: run by scripts/test-gpu-emulated.sh"]
fn info_names_the_device_as_emulated() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_vtr-index")).args(["info", "--gpu"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.lines().any(|l| l.starts_with("cuda:") && l.contains("ready (3 devices)")), "{stdout}");
    let line = |ordinal: usize| stdout.lines().find(|l| l.starts_with(&format!("cuda:{ordinal}:"))).unwrap_or_default();
    assert!(line(0).contains("emulated CUDA device, on the CPU (sm_80, kernels loaded from cubin)"), "{stdout}");
    assert!(line(0).ends_with("f32 and f16"), "{stdout}");
    assert!(line(1).contains("emulated CUDA device, on the CPU (sm_75, kernels loaded from PTX)"), "{stdout}");
    assert!(line(1).contains("f32 only"), "{stdout}");
}
