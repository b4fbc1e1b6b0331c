//! Prints the `-D` options that define the constants the CUDA kernels share with the host
//! (`gpu::score::KERNEL_CONSTANTS`), one per line, for the emulated device's host compiler
//! (`scripts/test-gpu-emulated.sh` passes them to `cuda-emulator/Makefile`): NVRTC gets the same
//! from `gpu::compile`, so the constants have one definition.

fn main() {
    for define in vtr_index::gpu::score::kernel_defines() {
        println!("{define}");
    }
}
