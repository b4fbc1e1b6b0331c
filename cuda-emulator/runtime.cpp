// Running a launch on the emulated device: each block in turn, its threads as fibers on the
// launching host thread, switched at every barrier and warp collective in an order drawn from a
// seed, so that a missing barrier changes results. Barriers and collectives check that the
// threads meeting there are the ones that must (a divergent barrier, a mask that does not match
// the lanes that reach it, fail the launch, naming the kernel, block and thread). The fibers are
// announced to AddressSanitizer and ThreadSanitizer in the sanitizer builds, and barriers and
// __syncwarp to ThreadSanitizer as synchronisation, so that it reports what races between them.
#include <pthread.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <mutex>

#include "emulator.h"

// The Makefile defines VTR_EMU_ASAN or VTR_EMU_TSAN for the sanitizer builds. This file is not
// instrumented (the kernels are): its bookkeeping is shared by fibers that switch without
// synchronising, by design, which ThreadSanitizer would report.
#ifdef VTR_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
#ifdef VTR_EMU_TSAN
#include <sanitizer/tsan_interface.h>
#endif

#if !defined(__x86_64__)
#error "the emulated device switches fibers with x86-64 code (vtr_emu_switch)"
#endif

// Saves the callee-saved registers and the stack pointer of the running context in *save and
// resumes the context whose stack pointer is `load` (System V x86-64).
extern "C" void vtr_emu_switch(void **save, void *load);
asm(R"(
    .text
    .globl vtr_emu_switch
    .hidden vtr_emu_switch
    .type vtr_emu_switch, @function
vtr_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size vtr_emu_switch, .-vtr_emu_switch
)");

namespace vtr_emu {

std::vector<KernelEntry> &kernel_registry() {
    static std::vector<KernelEntry> registry;
    return registry;
}

// One launch runs at a time (launch_mutex), so what the running thread is can be global.
ThreadState *current_thread = nullptr;
Dim3 current_block_idx, current_block_dim, current_grid_dim;

namespace {

constexpr size_t STACK_BYTES = 256 << 10;
constexpr unsigned WARP = 32;

enum class Wait { Runnable, Barrier, Collective, Done };

struct Fiber {
    ThreadState state;
    unsigned linear = 0;
    void *sp = nullptr;
    char *stack = nullptr;  // STACK_BYTES, its lowest page a guard
    Wait wait = Wait::Runnable;
    Site site{nullptr, 0};
    Collective kind = Collective::SyncWarp;
    unsigned mask = 0;
    uint64_t value = 0, result = 0;
    int argument = 0;
    float mma_c[4];
    unsigned mma_a[4], mma_b[2];
#ifdef VTR_EMU_TSAN
    void *tsan_fiber = nullptr;
#endif
};

// Lanes of one warp on their way into one collective.
struct PendingGroup {
    Site site;
    Collective kind;
    unsigned mask;
    unsigned arrived, needed;
};

// One block's run, on the launching thread.
struct BlockRun {
    const KernelEntry *kernel = nullptr;
    void **params = nullptr;
    Fiber *fibers = nullptr;
    unsigned count = 0;
    std::vector<unsigned> runnable;
    std::vector<PendingGroup> pending[32];  // by warp
    uint64_t rng = 0;
    void *host_sp = nullptr;
    LaunchFailure failure;
};

BlockRun *block_run = nullptr;
Fiber *running = nullptr;  // null while the host runs
pthread_t launching_thread;
// What the sanitizers synchronise on: the host's hand-over of a block to its threads and back,
// each barrier, each warp's collectives.
[[maybe_unused]] char launch_sync, done_sync, barrier_sync, warp_sync[32];

// Launches run one at a time: their blocks' shared memory is the kernels' statics.
std::mutex launch_mutex;
std::vector<Fiber> fiber_pool;

uint64_t next_random(uint64_t &state) {
    state += 0x9e3779b97f4a7c15ull;
    uint64_t z = state;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

uint64_t hash_name(const char *name) {
    uint64_t h = 1469598103934665603ull;
    for (; *name; ++name) h = (h ^ (unsigned char)*name) * 1099511628211ull;
    return h;
}

const char *base_name(const char *path) {
    const char *slash = std::strrchr(path, '/');
    return slash ? slash + 1 : path;
}

std::string format(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char *fmt, ...) {
    char buffer[1024];
    va_list args;
    va_start(args, fmt);
    vsnprintf(buffer, sizeof buffer, fmt, args);
    va_end(args);
    return buffer;
}

std::string where(const Fiber &f) {
    const Dim3 &b = current_block_idx, &t = f.state.thread_idx;
    return format("kernel %s, block (%u,%u,%u), thread (%u,%u,%u)", block_run->kernel->name, b.x, b.y, b.z, t.x, t.y,
                  t.z);
}

const char *collective_name(Collective kind) {
    switch (kind) {
        case Collective::ShflXor: return "__shfl_xor_sync";
        case Collective::ShflIdx: return "__shfl_sync";
        case Collective::Ballot: return "__ballot_sync";
        case Collective::SyncWarp: return "__syncwarp";
        case Collective::Mma: return "mma.sync";
    }
    return "?";
}

std::string what_it_waits_at(const Fiber &f) {
    switch (f.wait) {
        case Wait::Done: return "has exited";
        case Wait::Runnable: return "is running";
        case Wait::Barrier: return format("waits at the barrier at %s:%d", base_name(f.site.file), f.site.line);
        case Wait::Collective:
            return format("waits at %s at %s:%d with mask 0x%08x", collective_name(f.kind), base_name(f.site.file),
                          f.site.line, f.mask);
    }
    return "?";
}

// The host thread's stack, for AddressSanitizer's switches back to it.
void host_stack(const void **bottom, size_t *size) {
    static thread_local const void *host_bottom = nullptr;
    static thread_local size_t host_size = 0;
    if (!host_bottom) {
        pthread_attr_t attr;
        pthread_getattr_np(pthread_self(), &attr);
        void *addr;
        pthread_attr_getstack(&attr, &addr, &host_size);
        pthread_attr_destroy(&attr);
        host_bottom = addr;
    }
    *bottom = host_bottom;
    *size = host_size;
}

// Switches from the running context to `to` (a fiber, or the host where null). A fiber that has
// exited passes `dying`, so AddressSanitizer frees its fake stack.
void switch_to(void **save, Fiber *to, bool dying) {
#ifdef VTR_EMU_ASAN
    void *fake = nullptr;
    const void *bottom;
    size_t size;
    if (to) {
        bottom = to->stack;
        size = STACK_BYTES;
    } else {
        host_stack(&bottom, &size);
    }
    __sanitizer_start_switch_fiber(dying ? nullptr : &fake, bottom, size);
#else
    (void)dying;
#endif
#ifdef VTR_EMU_TSAN
    static void *host_fiber = nullptr;
    if (!running) host_fiber = __tsan_get_current_fiber();
    __tsan_switch_to_fiber(to ? to->tsan_fiber : host_fiber, __tsan_switch_to_fiber_no_sync);
#endif
    Fiber *from = running;
    running = to;
    if (to) current_thread = &to->state;
    vtr_emu_switch(save, to ? to->sp : block_run->host_sp);
    // Resumed.
    running = from;
    if (from) current_thread = &from->state;
#ifdef VTR_EMU_ASAN
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

// The running fiber cannot go on: another runnable one runs, chosen at random, or the host
// when none is (to release a barrier or to find the launch stuck).
void yield(bool dying) {
    Fiber *self = running;
    BlockRun &run = *block_run;
    Fiber *next = nullptr;
    if (!run.runnable.empty() && run.failure.code == SUCCESS) {
        size_t pick = next_random(run.rng) % run.runnable.size();
        next = &run.fibers[run.runnable[pick]];
        run.runnable[pick] = run.runnable.back();
        run.runnable.pop_back();
    }
    if (next == self) return;
    void *discard;
    switch_to(dying ? &discard : &self->sp, next, dying);
}

// A checker's verdict from inside a fiber: the launch fails, and this fiber never runs again.
[[noreturn]] __attribute__((noinline, cold)) void fail_in_fiber(Result code, const std::string &message) {
    BlockRun &run = *block_run;
    if (run.failure.code == SUCCESS) run.failure = LaunchFailure{code, message};
    void *discard;
    switch_to(&discard, nullptr, false);
    std::abort();  // the host never resumes a fiber of a failed launch
}

void fiber_main() {
#ifdef VTR_EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
#ifdef VTR_EMU_TSAN
    __tsan_acquire(&launch_sync);
#endif
    BlockRun &run = *block_run;
    run.kernel->invoke(run.kernel->fn, run.params);
    running->wait = Wait::Done;
#ifdef VTR_EMU_TSAN
    __tsan_release(&done_sync);
#endif
    yield(true);
    std::abort();  // an exited fiber is never resumed
}

void prepare_fiber(Fiber &f) {
    if (!f.stack) {
        void *memory = mmap(nullptr, STACK_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                            -1, 0);
        if (memory == MAP_FAILED) {
            std::perror("emulated CUDA device: a fiber stack");
            std::abort();
        }
        mprotect(memory, 4096, PROT_NONE);  // a stack overflow faults instead of corrupting
        f.stack = static_cast<char *>(memory);
#ifdef VTR_EMU_TSAN
        f.tsan_fiber = __tsan_create_fiber(0);
#endif
    }
#ifdef VTR_EMU_ASAN
    // Frames of a fiber abandoned by a failed launch left their redzones poisoned.
    // (This file is not instrumented, so the call, not ASan's macro, which would be empty.)
    __asan_unpoison_memory_region(f.stack + 4096, STACK_BYTES - 4096);
#endif
    // The first switch to the fiber pops six callee-saved registers, then returns into
    // fiber_main with the stack aligned as after a call.
    // Each stack's top is offset by a different number of cache lines: tops STACK_BYTES apart
    // would all fall in the same cache sets, and every switch would miss.
    const size_t offset = (size_t)f.linear * 17 * 64 % (64 << 10);
    uint64_t *sp = reinterpret_cast<uint64_t *>(f.stack + STACK_BYTES - offset);
    *--sp = 0;
    *--sp = reinterpret_cast<uint64_t>(&fiber_main);
    for (int i = 0; i < 6; ++i) *--sp = 0;
    f.sp = sp;
    f.wait = Wait::Runnable;
}

// No fiber can run: either every thread waits at the same barrier (release it) or has exited
// (the block is done), or the block is stuck, which names who waits where.
bool resolve(BlockRun &run) {
    const Fiber *at_barrier = nullptr, *collective = nullptr;
    bool all_done = true;
    for (unsigned i = 0; i < run.count; ++i) {
        const Fiber &f = run.fibers[i];
        if (f.wait != Wait::Done) all_done = false;
        if (f.wait == Wait::Barrier && !at_barrier) at_barrier = &f;
        if (f.wait == Wait::Collective && !collective) collective = &f;
    }
    if (all_done) return false;
    for (unsigned i = 0; collective && i < run.count; ++i) {
        const Fiber &f = run.fibers[i];
        if (f.wait != Wait::Collective) continue;
        const unsigned warp = f.linear / WARP;
        for (unsigned lane = 0; lane < WARP; ++lane) {
            if (!(f.mask >> lane & 1)) continue;
            const Fiber &g = run.fibers[warp * WARP + lane];
            if (g.wait != Wait::Collective || g.site.line != f.site.line || g.site.file != f.site.file ||
                g.kind != f.kind || g.mask != f.mask) {
                run.failure = LaunchFailure{
                    LAUNCH_FAILED,
                    format("%s: %s at %s:%d with mask 0x%08x does not match the lanes that reach it: lane %u %s",
                           where(f).c_str(), collective_name(f.kind), base_name(f.site.file), f.site.line, f.mask,
                           lane, what_it_waits_at(g).c_str())};
                return false;
            }
        }
    }
    if (!at_barrier) {
        run.failure = LaunchFailure{LAUNCH_FAILED, format("kernel %s: its threads are stuck", run.kernel->name)};
        return false;
    }
    for (unsigned i = 0; i < run.count; ++i) {
        const Fiber &g = run.fibers[i];
        if (g.wait == Wait::Barrier && g.site.line == at_barrier->site.line && g.site.file == at_barrier->site.file)
            continue;
        run.failure = LaunchFailure{LAUNCH_FAILED,
                                    format("%s: divergent barrier: it waits at the barrier at %s:%d, but thread "
                                           "(%u,%u,%u) %s",
                                           where(*at_barrier).c_str(), base_name(at_barrier->site.file),
                                           at_barrier->site.line, g.state.thread_idx.x, g.state.thread_idx.y,
                                           g.state.thread_idx.z, what_it_waits_at(g).c_str())};
        return false;
    }
    for (unsigned i = 0; i < run.count; ++i) {
        run.fibers[i].wait = Wait::Runnable;
        run.runnable.push_back(i);
    }
    return true;
}

void run_block(BlockRun &run) {
    run.runnable.clear();
    for (auto &pending : run.pending) pending.clear();
    for (unsigned i = 0; i < run.count; ++i) {
        prepare_fiber(run.fibers[i]);
        run.runnable.push_back(i);
#ifdef VTR_EMU_TSAN
        const Dim3 &b = current_block_idx, &t = run.fibers[i].state.thread_idx;
        std::string name = format("kernel %s, block (%u,%u,%u), thread (%u,%u,%u)", run.kernel->name, b.x, b.y, b.z,
                                  t.x, t.y, t.z);
        __tsan_set_fiber_name(run.fibers[i].tsan_fiber, name.c_str());
#endif
    }
#ifdef VTR_EMU_TSAN
    __tsan_release(&launch_sync);
#endif
    for (;;) {
        if (run.runnable.empty() && !resolve(run)) break;
        if (run.failure.code != SUCCESS) break;
        size_t pick = next_random(run.rng) % run.runnable.size();
        Fiber *next = &run.fibers[run.runnable[pick]];
        run.runnable[pick] = run.runnable.back();
        run.runnable.pop_back();
        switch_to(&run.host_sp, next, false);
        if (run.failure.code != SUCCESS) break;
    }
#ifdef VTR_EMU_TSAN
    __tsan_acquire(&done_sync);
#endif
}

void half_to_floats(unsigned pair, float *low, float *high) {
    auto convert = [](unsigned h) -> float {
        unsigned sign = (h >> 15) & 1, exponent = (h >> 10) & 31, mantissa = h & 1023;
        float magnitude;
        if (exponent == 0) magnitude = std::ldexp((float)mantissa, -24);
        else if (exponent == 31) magnitude = mantissa ? NAN : HUGE_VALF;
        else magnitude = std::ldexp((float)(mantissa | 1024), (int)exponent - 25);
        return sign ? -magnitude : magnitude;
    };
    *low = convert(pair & 0xffff);
    *high = convert(pair >> 16);
}

// mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 for the whole warp, each lane's fragments
// where the PTX ISA puts them (groupID = lane / 4, threadID_in_group = lane % 4): A's registers
// hold rows g and g + 8 at columns 2t, 2t + 1 and those + 8; B's rows 2t, 2t + 1 (+ 8) of column
// g; C's and D's rows g and g + 8 at columns 2t, 2t + 1. Products of f16 are exact in f32; each
// sum is accumulated over k in order with fused multiply-adds (a tensor core's rounding of the
// sum is its own; contract §6 bounds what f16 inputs change).
__attribute__((noinline)) void execute_mma(Fiber *lanes) {
    float a[16][16], b[16][8], c[16][8];
    for (unsigned lane = 0; lane < WARP; ++lane) {
        const Fiber &f = lanes[lane];
        const unsigned g = lane / 4, t = lane % 4;
        half_to_floats(f.mma_a[0], &a[g][2 * t], &a[g][2 * t + 1]);
        half_to_floats(f.mma_a[1], &a[g + 8][2 * t], &a[g + 8][2 * t + 1]);
        half_to_floats(f.mma_a[2], &a[g][2 * t + 8], &a[g][2 * t + 9]);
        half_to_floats(f.mma_a[3], &a[g + 8][2 * t + 8], &a[g + 8][2 * t + 9]);
        half_to_floats(f.mma_b[0], &b[2 * t][g], &b[2 * t + 1][g]);
        half_to_floats(f.mma_b[1], &b[2 * t + 8][g], &b[2 * t + 9][g]);
        c[g][2 * t] = f.mma_c[0];
        c[g][2 * t + 1] = f.mma_c[1];
        c[g + 8][2 * t] = f.mma_c[2];
        c[g + 8][2 * t + 1] = f.mma_c[3];
    }
    for (int m = 0; m < 16; ++m)
        for (int n = 0; n < 8; ++n) {
            float acc = c[m][n];
            for (int k = 0; k < 16; ++k) acc = std::fmaf(a[m][k], b[k][n], acc);
            c[m][n] = acc;
        }
    for (unsigned lane = 0; lane < WARP; ++lane) {
        Fiber &f = lanes[lane];
        const unsigned g = lane / 4, t = lane % 4;
        f.mma_c[0] = c[g][2 * t];
        f.mma_c[1] = c[g][2 * t + 1];
        f.mma_c[2] = c[g + 8][2 * t];
        f.mma_c[3] = c[g + 8][2 * t + 1];
    }
}

// Every lane of the mask has arrived: each gets its result.
__attribute__((noinline)) void execute(BlockRun &run, Fiber &self) {
    const unsigned warp = self.linear / WARP, mask = self.mask;
    Fiber *lanes = &run.fibers[warp * WARP];
    switch (self.kind) {
        case Collective::ShflXor:
        case Collective::ShflIdx:
            for (unsigned lane = 0; lane < WARP; ++lane) {
                if (!(mask >> lane & 1)) continue;
                Fiber &f = lanes[lane];
                unsigned source = self.kind == Collective::ShflXor ? (lane ^ (unsigned)f.argument) % WARP
                                                                   : (unsigned)f.argument % WARP;
                if (!(mask >> source & 1)) {
                    fail_in_fiber(LAUNCH_FAILED, format("%s: %s at %s:%d reads lane %u, outside its mask 0x%08x",
                                                        where(f).c_str(), collective_name(f.kind),
                                                        base_name(f.site.file), f.site.line, source, mask));
                }
                f.result = lanes[source].value;
            }
            break;
        case Collective::Ballot: {
            uint64_t bits = 0;
            for (unsigned lane = 0; lane < WARP; ++lane)
                if (mask >> lane & 1 && lanes[lane].value) bits |= 1ull << lane;
            for (unsigned lane = 0; lane < WARP; ++lane)
                if (mask >> lane & 1) lanes[lane].result = bits;
            break;
        }
        case Collective::SyncWarp: break;
        case Collective::Mma: execute_mma(lanes); break;
    }
}

uint64_t arrive(Site site, Collective kind, unsigned mask, uint64_t value, int argument) {
    BlockRun &run = *block_run;
    Fiber &self = *running;
    const unsigned warp = self.linear / WARP, lane = self.linear % WARP;
    if (!(mask >> lane & 1)) {
        fail_in_fiber(LAUNCH_FAILED, format("%s: %s at %s:%d with mask 0x%08x, which leaves out its own lane %u",
                                            where(self).c_str(), collective_name(kind), base_name(site.file),
                                            site.line, mask, lane));
    }
    if (kind == Collective::Mma && mask != 0xffffffffu) {
        fail_in_fiber(LAUNCH_FAILED, format("%s: mma.sync at %s:%d needs the whole warp", where(self).c_str(),
                                            base_name(site.file), site.line));
    }
    const unsigned lanes_in_warp = std::min(WARP, run.count - warp * WARP);
    if (lanes_in_warp < WARP && (mask >> lanes_in_warp) != 0) {
        fail_in_fiber(LAUNCH_FAILED, format("%s: %s at %s:%d with mask 0x%08x names lanes past the block's %u threads",
                                            where(self).c_str(), collective_name(kind), base_name(site.file),
                                            site.line, mask, run.count));
    }
    self.wait = Wait::Collective;
    self.site = site;
    self.kind = kind;
    self.mask = mask;
    self.value = value;
    self.argument = argument;
#ifdef VTR_EMU_TSAN
    // __syncwarp orders memory among its lanes; shuffles, ballots and mma exchange registers
    // and order nothing (CUDA's memory model), so code that relies on them for memory is a race.
    if (kind == Collective::SyncWarp) __tsan_release(&warp_sync[warp]);
#endif
    // Lanes that meet at another site, or with another mask, never complete a group: the block
    // is then stuck, and resolve() names them.
    std::vector<PendingGroup> &pending = run.pending[warp];
    auto group = std::find_if(pending.begin(), pending.end(), [&](const PendingGroup &g) {
        return g.site.line == site.line && g.site.file == site.file && g.kind == kind && g.mask == mask;
    });
    if (group == pending.end()) {
        group = pending.insert(pending.end(), PendingGroup{site, kind, mask, 0, (unsigned)__builtin_popcount(mask)});
    }
    const bool complete = ++group->arrived == group->needed;
    if (complete) {
        pending.erase(group);
        execute(run, self);
        for (unsigned l = 0; l < WARP; ++l) {
            if (!(mask >> l & 1)) continue;
            unsigned i = warp * WARP + l;
            run.fibers[i].wait = Wait::Runnable;
            if (i != self.linear) run.runnable.push_back(i);
        }
    } else {
        yield(false);
    }
#ifdef VTR_EMU_TSAN
    if (kind == Collective::SyncWarp) __tsan_acquire(&warp_sync[warp]);
#endif
    return self.result;
}

}  // namespace

void barrier(Site site) {
    Fiber &self = *running;
    self.wait = Wait::Barrier;
    self.site = site;
#ifdef VTR_EMU_TSAN
    __tsan_release(&barrier_sync);
#endif
    yield(false);
#ifdef VTR_EMU_TSAN
    __tsan_acquire(&barrier_sync);
#endif
}

uint64_t collective(Site site, Collective kind, unsigned mask, uint64_t value, int argument) {
    return arrive(site, kind, mask, value, argument);
}

void mma_m16n8k16(Site site, float *c, const unsigned *a, const unsigned *b) {
    Fiber &self = *running;
    std::memcpy(self.mma_a, a, sizeof self.mma_a);
    std::memcpy(self.mma_b, b, sizeof self.mma_b);
    std::memcpy(self.mma_c, c, sizeof self.mma_c);
    arrive(site, Collective::Mma, 0xffffffffu, 0, 0);
    std::memcpy(c, self.mma_c, sizeof self.mma_c);
}

void record_sanitizer_failure(Result code, const std::string &report) {
    if (!block_run || !pthread_equal(pthread_self(), launching_thread) || block_run->failure.code != SUCCESS) return;
    std::string place = running ? where(*running) + ": " : std::string(block_run->kernel->name) + ": ";
    block_run->failure = LaunchFailure{code, place + report};
}

LaunchFailure run_launch(const KernelEntry &kernel, void **params, Dim3 grid, Dim3 block, uint64_t seed) {
    std::lock_guard<std::mutex> lock(launch_mutex);
    const unsigned count = block.x * block.y * block.z;
    if (fiber_pool.size() < count) fiber_pool.resize(count);
    for (unsigned i = 0; i < count; ++i) {
        Fiber &f = fiber_pool[i];
        f.linear = i;
        f.state.thread_idx = Dim3{i % block.x, i / block.x % block.y, i / (block.x * block.y)};
    }
    BlockRun run;
    run.kernel = &kernel;
    run.params = params;
    run.fibers = fiber_pool.data();
    run.count = count;
    block_run = &run;
    launching_thread = pthread_self();
    current_block_dim = block;
    current_grid_dim = grid;
    const uint64_t kernel_seed = seed ^ hash_name(kernel.name);
    for (unsigned z = 0; z < grid.z && run.failure.code == SUCCESS; ++z)
        for (unsigned y = 0; y < grid.y && run.failure.code == SUCCESS; ++y)
            for (unsigned x = 0; x < grid.x && run.failure.code == SUCCESS; ++x) {
                current_block_idx = Dim3{x, y, z};
                uint64_t block_seed = kernel_seed ^ (((uint64_t)z * grid.y + y) * grid.x + x) * 0x2545f4914f6cdd1dull;
                run.rng = block_seed;
                run_block(run);
            }
    block_run = nullptr;
    current_thread = nullptr;
    return run.failure;
}

}  // namespace vtr_emu
