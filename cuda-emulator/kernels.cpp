// One kernel source (KERNEL_SOURCE: kernels/score.cu, or checks.cu here) compiled for the host,
// and its kernels registered with the emulated device under their names. The list of kernels
// (REGISTRY) is generated from this same file compiled once without it (VTR_EMU_LIST_ONLY):
// every extern "C" function the source defines is a kernel (Makefile).
#include KERNEL_SOURCE

#ifndef VTR_EMU_LIST_ONLY
#include "emulator.h"

namespace {
#define VTR_EMU_KERNEL(name) vtr_emu::kernel_entry(#name, &name),
const vtr_emu::KernelEntry entries[] = {
#include REGISTRY
};
vtr_emu::Registrar registrar(entries, sizeof entries / sizeof entries[0]);
}  // namespace
#endif
