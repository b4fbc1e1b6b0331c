// What the parts of the emulated device share: the kernels compiled for the host (registered by
// each kernel translation unit, kernels.cpp), and running one launch (runtime.cpp) for the
// driver stand-in (driver.cpp).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <type_traits>
#include <vector>

#include "cuda_builtins.h"

namespace vtr_emu {

// One host-compiled kernel: its name (extern "C", as in the PTX's .entry), the width of each
// parameter, and how to call it with cuLaunchKernel's array of pointers to the arguments.
struct KernelEntry {
    const char *name;
    std::vector<size_t> param_sizes;
    void (*invoke)(void *fn, void **params);
    void *fn;
};

template <typename... Args, size_t... I>
void call_with(void (*fn)(Args...), void **params, std::index_sequence<I...>) {
    fn(*static_cast<std::remove_cv_t<Args> *>(params[I])...);
}

template <typename... Args>
void invoke_kernel(void *fn, void **params) {
    call_with(reinterpret_cast<void (*)(Args...)>(fn), params, std::index_sequence_for<Args...>{});
}

template <typename... Args>
KernelEntry kernel_entry(const char *name, void (*fn)(Args...)) {
    return KernelEntry{name, {sizeof(Args)...}, &invoke_kernel<Args...>, reinterpret_cast<void *>(fn)};
}

// Every kernel compiled into this library, from every translation unit.
std::vector<KernelEntry> &kernel_registry();

struct Registrar {
    Registrar(const KernelEntry *entries, size_t count) {
        for (size_t i = 0; i < count; ++i) kernel_registry().push_back(entries[i]);
    }
};

// CUDA's own error codes, which the stand-in returns as a card's driver does.
enum Result : int {
    SUCCESS = 0,
    INVALID_VALUE = 1,
    OUT_OF_MEMORY = 2,
    NOT_INITIALIZED = 3,
    NO_DEVICE = 100,
    INVALID_DEVICE = 101,
    INVALID_IMAGE = 200,
    INVALID_CONTEXT = 201,
    NO_BINARY_FOR_GPU = 209,
    INVALID_PTX = 218,
    INVALID_HANDLE = 400,
    NOT_FOUND = 500,
    ILLEGAL_ADDRESS = 700,
    LAUNCH_OUT_OF_RESOURCES = 701,
    LAUNCH_FAILED = 719,
    NOT_SUPPORTED = 801,
};

struct LaunchFailure {
    Result code = SUCCESS;
    std::string message;
};

// Runs every block of a launch, one block at a time, each block's threads as fibers in an
// order shuffled by `seed`. Returns the first failure a checker found, or SUCCESS.
LaunchFailure run_launch(const KernelEntry &kernel, void **params, Dim3 grid, Dim3 block, uint64_t seed);

// What a sanitizer found during the current launch (the ASan callback, the TSan log).
void record_sanitizer_failure(Result code, const std::string &report);

}  // namespace vtr_emu
