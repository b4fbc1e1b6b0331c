// CUDA's built-ins for kernels compiled by the host C++ compiler, so that the emulated device
// (cuda-emulator/, README there) runs the same kernel source NVRTC compiles for a card: thread
// and block indices, __shared__, barriers, the warp collectives with their masks, atomics, the
// rounding intrinsics and the math the kernels use. Included before each kernel source
// (`-include`); the fibers, barriers and collectives behind it live in runtime.cpp.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

// The kernels' own +∞ (score.cu defines it from its bits; <cmath>'s would clash).
#undef INFINITY

// The emulated device's architecture: the f16 path is compiled (its kernels are offered only to
// devices whose PTX has them, so an emulated sm_75 still lacks them), and the source can tell it
// is built for the emulator where it must (mma.sync).
#define __CUDA_ARCH__ 800
#define VTR_INDEX_EMULATED_DEVICE 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// One block runs at a time on the emulator (runtime.cpp), so a kernel's block-wide memory is a
// static of the kernel: in the data segment, where AddressSanitizer puts a redzone around it.
#define __shared__ static

namespace vtr_emu {

struct Dim3 {
    unsigned x, y, z;
};

// Where a barrier or collective is in the source: threads meet only at the same one.
struct Site {
    const char *file;
    int line;
};

// What the running thread is: set by the runtime before each switch to a fiber.
struct ThreadState {
    Dim3 thread_idx;
};
extern ThreadState *current_thread;
extern Dim3 current_block_idx, current_block_dim, current_grid_dim;

void barrier(Site site);
// A warp collective: the lanes of `mask` meet at `site`; returns this lane's result.
enum class Collective { ShflXor, ShflIdx, Ballot, SyncWarp, Mma };
uint64_t collective(Site site, Collective kind, unsigned mask, uint64_t value, int argument);
// mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32, fragments as the PTX ISA lays them out.
void mma_m16n8k16(Site site, float *c, const unsigned *a, const unsigned *b);

template <typename T>
inline uint64_t to_bits(T value) {
    static_assert(sizeof(T) <= 8, "a shuffled value fits in 64 bits");
    uint64_t bits = 0;
    std::memcpy(&bits, &value, sizeof(T));
    return bits;
}

template <typename T>
inline T from_bits(uint64_t bits) {
    T value;
    std::memcpy(&value, &bits, sizeof(T));
    return value;
}

}  // namespace vtr_emu

struct uint3 {
    unsigned x, y, z;
};
struct uint4 {
    unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

#define threadIdx (vtr_emu::current_thread->thread_idx)
#define blockIdx (vtr_emu::current_block_idx)
#define blockDim (vtr_emu::current_block_dim)
#define gridDim (vtr_emu::current_grid_dim)

#define VTR_EMU_SITE (vtr_emu::Site{__FILE__, __LINE__})
#define __syncthreads() vtr_emu::barrier(VTR_EMU_SITE)
#define __syncwarp(...) vtr_emu::syncwarp(VTR_EMU_SITE, ##__VA_ARGS__)
#define __shfl_xor_sync(mask, value, lane_mask) vtr_emu::shfl(VTR_EMU_SITE, vtr_emu::Collective::ShflXor, mask, value, lane_mask)
#define __shfl_sync(mask, value, source) vtr_emu::shfl(VTR_EMU_SITE, vtr_emu::Collective::ShflIdx, mask, value, source)
#define __ballot_sync(mask, predicate) \
    ((unsigned)vtr_emu::collective(VTR_EMU_SITE, vtr_emu::Collective::Ballot, mask, (predicate) ? 1 : 0, 0))
#define VTR_EMU_MMA_M16N8K16(c, a, b) vtr_emu::mma_m16n8k16(VTR_EMU_SITE, c, a, b)

namespace vtr_emu {

inline void syncwarp(Site site, unsigned mask = 0xffffffffu) { collective(site, Collective::SyncWarp, mask, 0, 0); }

template <typename T>
inline T shfl(Site site, Collective kind, unsigned mask, T value, int argument) {
    return from_bits<T>(collective(site, kind, mask, to_bits(value), argument));
}

}  // namespace vtr_emu

inline int __ffs(unsigned x) { return __builtin_ffs((int)x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __longlong_as_double(long long bits) { return vtr_emu::from_bits<double>((uint64_t)bits); }
using std::exp;
using std::fmax;
using std::fmaf;

// Blocks run one at a time, but their threads are fibers that ThreadSanitizer (the race build)
// sees as threads: an atomic operation, so that it is not reported as a race.
inline unsigned atomicAdd(unsigned *address, unsigned value) {
    return __atomic_fetch_add(address, value, __ATOMIC_RELAXED);
}
inline int atomicAdd(int *address, int value) { return __atomic_fetch_add(address, value, __ATOMIC_RELAXED); }
