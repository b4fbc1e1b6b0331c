// Kernels with the defects the emulated device's checkers must catch, one each (tests/
// emulated_device.rs launches them); kept apart from the product's kernels (kernels/score.cu).
// Like score.cu, header-free: NVRTC compiles it too, and the emulator loads its PTX.

// Each thread stores its number in shared memory and reads its neighbour's: without the barrier
// (synchronise = 0), a thread can read before its neighbour has stored.
extern "C" __global__ void neighbour_exchange(int *out, int salt, int synchronise) {
    __shared__ int values[256];
    const int t = threadIdx.x;
    values[t] = t * 3 + salt;
    if (synchronise) __syncthreads();
    out[t] = values[(t + 1) % blockDim.x];
}

// mode 1: half of the block waits at a barrier the other half never reaches (it has exited);
// mode 2: the halves wait at two different barriers.
extern "C" __global__ void divergent_barrier(int *out, int mode) {
    const int t = threadIdx.x;
    if (mode == 1) {
        if (t < 128) __syncthreads();
    } else if (t % 2) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[t] = t;
}

// A full-warp shuffle that only the lower half of each warp reaches.
extern "C" __global__ void mismatched_mask(int *out) {
    const int t = threadIdx.x;
    int v = t;
    if (t % 32 < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
    out[t] = v;
}

// One store per thread into an array of `n` elements, n below the block's size.
extern "C" __global__ void out_of_bounds_store(int *out, int n) {
    out[threadIdx.x] = n;
}

// Thread 0 writes a shared cell that thread 1 reads, with no barrier between them.
extern "C" __global__ void shared_race(int *out) {
    __shared__ int cell;
    if (threadIdx.x == 0) cell = 7;
    if (threadIdx.x == 1) out[0] = cell;
}

// The same with the barrier: no race.
extern "C" __global__ void shared_handoff(int *out) {
    __shared__ int cell;
    if (threadIdx.x == 0) cell = 7;
    __syncthreads();
    if (threadIdx.x == 1) out[0] = cell;
}

// One value per block: how launches over the grid's limits are tried.
extern "C" __global__ void block_numbers(int *out) {
    if (threadIdx.x == 0) out[blockIdx.y * gridDim.x + blockIdx.x] = blockIdx.y * gridDim.x + blockIdx.x;
}

// 20 KiB of static shared memory: more than a device described with shared_kib=16 has.
extern "C" __global__ void large_shared(int *out) {
    __shared__ int table[5 * 1024];
    table[threadIdx.x] = threadIdx.x;
    __syncthreads();
    out[threadIdx.x] = table[(threadIdx.x + 1) % blockDim.x];
}
