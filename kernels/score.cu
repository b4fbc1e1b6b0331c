// Scoring kernels of vtr-index (contract §1, §5), compiled at run time by NVRTC (src/gpu).
//
// S is the cosine matrix, row-major, texts × videos, its rows ("positions") in group order:
// the captions of one video are adjacent and texts without a video come last, as on the CPU
// (src/score/mod.rs). Revised values are computed in f64 by one function per direction with
// explicitly rounded operations, so the same cosine and statistics give the same bits wherever
// a value is recomputed: a text's own score, computed once, is compared with the same value
// recomputed inside its row, and the two must be equal for ranks to count correctly.
//
// The file is header-free: NVRTC ships no headers, and the few definitions needed are here.

// THREADS, TILE, TOPK_MAX, F_BM, F_BN, F_BK, the REVISE_* codes and EXP_MIN are the host's
// (src/gpu/score.rs: KERNEL_CONSTANTS, and each revision's code from Revision::needs), passed as
// -D options (kernel_defines) to every compiler of this file.
#if !defined(THREADS) || !defined(TILE) || !defined(TOPK_MAX) || !defined(F_BM) || !defined(F_BN) || \
    !defined(F_BK) || !defined(REVISE_NONE) || !defined(REVISE_DSL) || !defined(REVISE_DSL_SYM) || !defined(EXP_MIN)
#error "compile with the host's constants: gpu::compile passes them (src/gpu/score.rs, KERNEL_CONSTANTS, kernel_defines)"
#endif
// The fused path's tiles are shared by the block's threads: two per column of a tile in pass
// one, four per row in fused_row_stats.
static_assert(THREADS == 2 * F_BN && THREADS == 4 * F_BM, "the fused kernels' thread layout");
static_assert(THREADS % 32 == 0 && TILE == 64 && THREADS == 256, "cosines_f32's 4 × 4 per thread over 64 × 64");

#define WARPS (THREADS / 32)
#define INT_MAX_ 2147483647
#define FULL_MASK 0xffffffffu
// No <math_constants.h> without headers: +∞ from its bits.
#define INFINITY __longlong_as_double(0x7ff0000000000000LL)

// ---------------------------------------------------------------------------------------------
// Values

// e^x, and 0 where x is below −708, where e^x leaves f64's normal range: the underflow rule of
// contract §1, which the CPU's exp_f64 (src/simd.rs) follows too, so both paths tie the same
// values at 0 (CUDA's exp would give subnormals down to −745, which the CPU does not).
__device__ __forceinline__ double exp_flushed(double x) {
    return x < EXP_MIN ? 0.0 : exp(x);
}

__device__ __forceinline__ double logit(float cosine, double scale) {
    return __dmul_rn(scale, (double)cosine);
}

// CAMoE's dual softmax of one logit with the statistics of its column (or row):
// l · exp(l/τ − max) / sum, rounded step by step exactly as the CPU computes it.
__device__ __forceinline__ double dual_softmax(double l, double inv_tau, double max, double inv_sum) {
    return __dmul_rn(__dmul_rn(l, exp_flushed(__dsub_rn(__dmul_rn(l, inv_tau), max))), inv_sum);
}

__device__ __forceinline__ double t2v_value(int mode, float cosine, double scale, double inv_tau,
                                            double col_max, double col_inv_sum) {
    double l = logit(cosine, scale);
    return mode == REVISE_NONE ? l : dual_softmax(l, inv_tau, col_max, col_inv_sum);
}

// The symmetric form ranks V2T with each row's prior; the others rank V2T on the T2V value.
__device__ __forceinline__ double v2t_value(int mode, float cosine, double scale, double inv_tau,
                                            double col_max, double col_inv_sum, double row_max,
                                            double row_inv_sum) {
    if (mode == REVISE_DSL_SYM) return dual_softmax(logit(cosine, scale), inv_tau, row_max, row_inv_sum);
    return t2v_value(mode, cosine, scale, inv_tau, col_max, col_inv_sum);
}

// Online softmax statistics: the maximum and the sum of exp(x − max).
__device__ __forceinline__ void stats_add(double &max, double &sum, double x) {
    if (x > max) {
        sum = sum * exp_flushed(max - x) + 1.0;
        max = x;
    } else {
        sum += exp_flushed(x - max);
    }
}

__device__ __forceinline__ void stats_merge(double &max, double &sum, double other_max, double other_sum) {
    if (other_sum == 0.0) return;
    if (sum == 0.0) {
        max = other_max;
        sum = other_sum;
        return;
    }
    double m = fmax(max, other_max);
    sum = sum * exp_flushed(max - m) + other_sum * exp_flushed(other_max - m);
    max = m;
}

// (v, i) ranks before (w, j): a greater score, or an equal score at a lower column.
__device__ __forceinline__ bool ranks_before(double v, int i, double w, int j) {
    return v > w || (v == w && i < j);
}

// ---------------------------------------------------------------------------------------------
// The stored-matrix path: S (or a block of its rows) in GPU memory.

#define TILE_K 16

// c[rows × cols] = a[rows × dim] · b[cols × dim]ᵀ in f32: the cosines of a block of texts
// (a, already offset to the block) against every video. 64 × 64 tiles, 4 × 4 per thread.
extern "C" __global__ void __launch_bounds__(THREADS)
cosines_f32(const float *__restrict__ a, const float *__restrict__ b, float *__restrict__ c,
            int rows, int cols, int dim) {
    __shared__ float a_tile[TILE_K][TILE + 4];
    __shared__ float b_tile[TILE_K][TILE + 4];
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const int row0 = blockIdx.y * TILE, col0 = blockIdx.x * TILE;
    const int load_row = tid / 4, load_k = (tid % 4) * 4;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
    for (int k0 = 0; k0 < dim; k0 += TILE_K) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            int k = k0 + load_k + q;
            int ra = row0 + load_row, rb = col0 + load_row;
            a_tile[load_k + q][load_row] = (ra < rows && k < dim) ? a[(long long)ra * dim + k] : 0.f;
            b_tile[load_k + q][load_row] = (rb < cols && k < dim) ? b[(long long)rb * dim + k] : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < TILE_K; ++k) {
            float av[4], bv[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) av[i] = a_tile[k][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < 4; ++j) bv[j] = b_tile[k][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        int r = row0 + ty + 16 * i;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            int col = col0 + tx + 16 * j;
            if (r < rows && col < cols) c[(long long)r * cols + col] = acc[i][j];
        }
    }
}

// Column statistics of S·scale/τ over parts of the rows fixed for the whole matrix: part p is
// rows [p·rows_per_part, (p + 1)·rows_per_part), wherever the row blocks are cut. A block holds
// rows [row0, row0 + rows) of S (row r of the block is row row0 + r) and meets parts first_part,
// first_part + 1, … (grid.y); a part that began in an earlier block continues from the partial
// that block stored. Each part's rows are thus added in the same order, one after another,
// however the matrix is cut into blocks, and the blocking changes no bit (src/gpu/score.rs,
// `ColumnParts`, whose unit test runs this arithmetic on the CPU).
extern "C" __global__ void __launch_bounds__(THREADS)
column_stats_partial(const float *__restrict__ s, int row0, int rows, int cols, int rows_per_part,
                     int first_part, double scale, double inv_tau, double *__restrict__ part_max,
                     double *__restrict__ part_sum) {
    const int col = blockIdx.x * THREADS + threadIdx.x;
    if (col >= cols) return;
    const int part = first_part + blockIdx.y;
    const long long part_start = (long long)part * rows_per_part, part_end = part_start + rows_per_part;
    const long long block_end = (long long)row0 + rows;
    const int first = (int)((part_start > row0 ? part_start : row0) - row0);
    const int last = (int)((part_end < block_end ? part_end : block_end) - row0);
    const long long at = (long long)part * cols + col;
    double max = -INFINITY, sum = 0.0;
    if (part_start < row0) {
        max = part_max[at];
        sum = part_sum[at];
    }
    for (int r = first; r < last; ++r) {
        stats_add(max, sum, __dmul_rn(logit(s[(long long)r * cols + col], scale), inv_tau));
    }
    part_max[at] = max;
    part_sum[at] = sum;
}

// Merges the parts of every column into (max, 1/sum).
extern "C" __global__ void __launch_bounds__(THREADS)
column_stats_merge(const double *__restrict__ part_max, const double *__restrict__ part_sum, int parts,
                   int cols, double *__restrict__ col_max, double *__restrict__ col_inv_sum) {
    const int col = blockIdx.x * THREADS + threadIdx.x;
    if (col >= cols) return;
    double max = -INFINITY, sum = 0.0;
    for (int p = 0; p < parts; ++p) {
        stats_merge(max, sum, part_max[(long long)p * cols + col], part_sum[(long long)p * cols + col]);
    }
    col_max[col] = max;
    col_inv_sum[col] = 1.0 / sum;
}

// Sums `value` over the block; every thread gets the total.
__device__ __forceinline__ unsigned block_sum(unsigned value, unsigned *shared) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(FULL_MASK, value, offset);
    if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = value;
    __syncthreads();
    unsigned total = 0;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) total += shared[w];
    __syncthreads();
    return total;
}

// Row statistics of S·scale/τ over the videos (the symmetric form's V2T prior): one block per
// row of this block; written at row0 + row as (max, 1/sum).
extern "C" __global__ void __launch_bounds__(THREADS)
row_stats(const float *__restrict__ s, int cols, int row0, double scale, double inv_tau,
          double *__restrict__ row_max, double *__restrict__ row_inv_sum) {
    __shared__ double maxes[THREADS];
    __shared__ double sums[THREADS];
    const float *row = s + (long long)blockIdx.x * cols;
    double max = -INFINITY, sum = 0.0;
    for (int col = threadIdx.x; col < cols; col += THREADS) {
        stats_add(max, sum, __dmul_rn(logit(row[col], scale), inv_tau));
    }
    maxes[threadIdx.x] = max;
    sums[threadIdx.x] = sum;
    __syncthreads();
    for (int half = THREADS / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) {
            double m = maxes[threadIdx.x], t = sums[threadIdx.x];
            stats_merge(m, t, maxes[threadIdx.x + half], sums[threadIdx.x + half]);
            maxes[threadIdx.x] = m;
            sums[threadIdx.x] = t;
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        row_max[row0 + blockIdx.x] = maxes[0];
        row_inv_sum[row0 + blockIdx.x] = 1.0 / sums[0];
    }
}

// Each matched row's own cosine, S[row, group[row]], kept for the truths.
extern "C" __global__ void __launch_bounds__(THREADS)
gather_own(const float *__restrict__ s, int rows, int cols, int row0, const int *__restrict__ group,
           float *__restrict__ own_cosine) {
    const int r = blockIdx.x * THREADS + threadIdx.x;
    if (r >= rows) return;
    const int g = group[row0 + r];
    if (g >= 0) own_cosine[row0 + r] = s[(long long)r * cols + g];
}

// Each video's best own caption under V2T: the maximum over its group's rows of the V2T
// value of their own cosines; +∞ for a video without captions, which nothing beats.
extern "C" __global__ void __launch_bounds__(THREADS)
v2t_own(const float *__restrict__ own_cosine, const int *__restrict__ group_start,
        const int *__restrict__ group_end, int cols, int mode, double scale, double inv_tau,
        const double *__restrict__ col_max, const double *__restrict__ col_inv_sum,
        const double *__restrict__ row_max, const double *__restrict__ row_inv_sum,
        double *__restrict__ own_v2t) {
    const int col = blockIdx.x * THREADS + threadIdx.x;
    if (col >= cols) return;
    double best = INFINITY;
    for (int p = group_start[col]; p < group_end[col]; ++p) {
        double v = v2t_value(mode, own_cosine[p], scale, inv_tau, col_max[col], col_inv_sum[col],
                             row_max[p], row_inv_sum[p]);
        best = p == group_start[col] ? v : fmax(best, v);
    }
    own_v2t[col] = best;
}

// Inserts (value, column) into a sorted list of the k best (in a thread's local memory or a
// row's list in global memory), after equal values, which have lower columns since columns
// arrive in ascending order; returns the value a new entry must now beat.
__device__ double insert_top(double value, int column, double *values, int *columns, int k, int &held) {
    int at = held < k ? held : k - 1;
    while (at > 0 && values[at - 1] < value) {
        values[at] = values[at - 1];
        columns[at] = columns[at - 1];
        --at;
    }
    values[at] = value;
    columns[at] = column;
    if (held < k) ++held;
    return held == k ? values[k - 1] : -INFINITY;
}

// V2T for one column over rows in group order: the best value of the current caption group,
// and how many finished groups beat the column's own captions. The column's own group is never
// counted (its best is the own value itself, or, on the fused path, a recomputation of it).
struct GroupCount {
    int current;
    double best;
    unsigned beaten;
};

__device__ __forceinline__ GroupCount group_count_start() { return GroupCount{-1, 0.0, 0u}; }

__device__ __forceinline__ void group_count_end(GroupCount &gc, double own, int column) {
    if (gc.current >= 0 && gc.current != column) gc.beaten += gc.best > own;
}

__device__ __forceinline__ void group_count_add(GroupCount &gc, int group, double value, double own, int column) {
    if (group != gc.current) {
        group_count_end(gc, own, column);
        gc.current = group;
        gc.best = value;
    } else {
        gc.best = fmax(gc.best, value);
    }
}

// One round of a warp-wide merge of sorted lists: every lane offers its list's head, all lanes
// learn the best offer, and the lane that offered it moves its head on.
__device__ __forceinline__ void warp_best(double head_value, int head_column, double &best_value,
                                          int &best_column) {
    best_value = head_value;
    best_column = head_column;
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
        double v = __shfl_xor_sync(FULL_MASK, best_value, offset);
        int i = __shfl_xor_sync(FULL_MASK, best_column, offset);
        if (ranks_before(v, i, best_value, best_column)) {
            best_value = v;
            best_column = i;
        }
    }
}

// The T2V pass over a block of rows, one thread block per row: revise each value, count those
// above the row's own (its rank) and keep the row's k best (k ≤ TOPK_MAX). Missing top-k
// entries get column −1; rows without a video get rank 0.
extern "C" __global__ void __launch_bounds__(THREADS)
t2v_apply(const float *__restrict__ s, int cols, int row0, const int *__restrict__ group,
          const float *__restrict__ own_cosine, int mode, double scale, double inv_tau,
          const double *__restrict__ col_max, const double *__restrict__ col_inv_sum, int k,
          double *__restrict__ top_value, int *__restrict__ top_column, unsigned *__restrict__ rank) {
    __shared__ double warp_values[WARPS][TOPK_MAX];
    __shared__ int warp_columns[WARPS][TOPK_MAX];
    __shared__ int warp_held[WARPS];
    __shared__ unsigned partial[WARPS];
    const int position = row0 + blockIdx.x;
    const float *row = s + (long long)blockIdx.x * cols;
    const int own = group[position];
    const double truth = own >= 0 ? t2v_value(mode, own_cosine[position], scale, inv_tau, col_max[own],
                                              col_inv_sum[own])
                                  : INFINITY;
    double values[TOPK_MAX];
    int columns[TOPK_MAX];
    int held = 0;
    // With k = 0 nothing may enter the list (insert_top would write values[-1]).
    double bar = k > 0 ? -INFINITY : INFINITY;
    unsigned greater = 0;
    for (int col = threadIdx.x; col < cols; col += THREADS) {
        double v = t2v_value(mode, row[col], scale, inv_tau, col_max[col], col_inv_sum[col]);
        greater += v > truth;
        if (v > bar) bar = insert_top(v, col, values, columns, k, held);
    }
    const unsigned total = block_sum(greater, partial);

    // Merge the 32 lists of each warp, then the warps' lists.
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    int head = 0, merged = 0;
    for (; merged < k; ++merged) {
        double v;
        int i;
        warp_best(head < held ? values[head] : -INFINITY, head < held ? columns[head] : INT_MAX_, v, i);
        if (i == INT_MAX_) break;
        if (head < held && columns[head] == i) ++head;
        if (lane == 0) {
            warp_values[warp][merged] = v;
            warp_columns[warp][merged] = i;
        }
    }
    if (lane == 0) warp_held[warp] = merged;
    __syncthreads();
    if (warp == 0) {
        const int list = lane < WARPS ? lane : 0;
        const int list_held = lane < WARPS ? warp_held[list] : 0;
        head = 0;
        for (int out = 0; out < k; ++out) {
            double v;
            int i;
            warp_best(head < list_held ? warp_values[list][head] : -INFINITY,
                      head < list_held ? warp_columns[list][head] : INT_MAX_, v, i);
            if (head < list_held && warp_columns[list][head] == i) ++head;
            if (lane == 0) {
                const long long at = (long long)position * k + out;
                top_value[at] = i == INT_MAX_ ? -INFINITY : v;
                top_column[at] = i == INT_MAX_ ? -1 : i;
            }
        }
        if (lane == 0) rank[position] = own >= 0 ? 1 + total : 0;
    }
}

// The V2T count over a block of rows: for each video, how many caption groups beat its own
// captions (their best V2T value above its best own). Grid (column blocks, chunks); chunk c
// covers rows [chunk_start[c], chunk_start[c + 1]) of this block, which start and end on
// group boundaries, so every group is seen whole by one thread per column.
extern "C" __global__ void __launch_bounds__(THREADS)
v2t_count(const float *__restrict__ s, int cols, int row0, const int *__restrict__ group,
          const int *__restrict__ chunk_start, int mode, double scale, double inv_tau,
          const double *__restrict__ col_max, const double *__restrict__ col_inv_sum,
          const double *__restrict__ row_max, const double *__restrict__ row_inv_sum,
          const double *__restrict__ own_v2t, unsigned *__restrict__ beaten) {
    const int col = blockIdx.x * THREADS + threadIdx.x;
    if (col >= cols) return;
    const double own = own_v2t[col], c_max = col_max[col], c_inv_sum = col_inv_sum[col];
    GroupCount gc = group_count_start();
    for (int r = chunk_start[blockIdx.y]; r < chunk_start[blockIdx.y + 1]; ++r) {
        const int position = row0 + r;
        const int g = group[position];
        if (g < 0) break;
        double v = v2t_value(mode, s[(long long)r * cols + col], scale, inv_tau, c_max, c_inv_sum,
                             row_max[position], row_inv_sum[position]);
        group_count_add(gc, g, v, own, col);
    }
    group_count_end(gc, own, col);
    if (gc.beaten > 0) atomicAdd(&beaten[col], gc.beaten);
}

// Revised values of a block of rows, for `--dense`: T2V (direction 0) or V2T (direction 1).
extern "C" __global__ void __launch_bounds__(THREADS)
revise_rows(const float *__restrict__ s, int rows, int cols, int row0, int direction, int mode,
            double scale, double inv_tau, const double *__restrict__ col_max,
            const double *__restrict__ col_inv_sum, const double *__restrict__ row_max,
            const double *__restrict__ row_inv_sum, double *__restrict__ out) {
    const long long at = (long long)blockIdx.x * THREADS + threadIdx.x;
    if (at >= (long long)rows * cols) return;
    const int r = (int)(at / cols), col = (int)(at % cols), position = row0 + r;
    out[at] = direction == 0
                  ? t2v_value(mode, s[at], scale, inv_tau, col_max[col], col_inv_sum[col])
                  : v2t_value(mode, s[at], scale, inv_tau, col_max[col], col_inv_sum[col],
                              row_max[position], row_inv_sum[position]);
}

// ---------------------------------------------------------------------------------------------
// The fused path: tiles of S = T · Vᵀ computed on the fly from f16 embeddings with tensor-core
// mma.sync (f32 accumulation) and consumed in place, so S is never stored and device memory
// grows only with N + M. Each element's products are accumulated in the same order in every
// pass, so a recomputed tile has the same bits as the first. The embeddings' width is padded
// with zeros to a multiple of F_BK by the host.
//
// mma.sync.m16n8k16 with f16 operands needs sm_80: on sm_75 (Turing) these kernels are left
// out, the module still builds, and the host offers only the f32 path there (src/gpu/mod.rs,
// `FUSED_MIN_CAPABILITY`). NVRTC defines __CUDA_ARCH__ as the architecture it compiles for.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800

#define F_STRIDE (F_BK + 8)  // halves per shared row: 80 bytes, so fragment loads miss no bank twice
#define S_STRIDE (F_BN + 4)

// The shared memory of one tile: the f16 operands while the product runs, then the f32 tile.
// Operands are stored 16 bytes (a uint4) at a time, so the union and every operand row start
// on 16 bytes: the alignment is explicit, and the row strides are checked to keep it.
union __align__(16) FusedShared {
    struct {
        unsigned short a[F_BM][F_STRIDE];
        unsigned short b[F_BN][F_STRIDE];
    } operands;
    float s[F_BM][S_STRIDE];
};
static_assert(alignof(FusedShared) >= 16, "uint4 stores need 16-byte alignment");
static_assert(F_STRIDE * sizeof(unsigned short) % 16 == 0, "each operand row must start on 16 bytes");
static_assert(F_BM * F_STRIDE * sizeof(unsigned short) % 16 == 0, "operands.b must start on 16 bytes");
static_assert(F_BK % 8 == 0, "a row's F_BK halves are copied 8 (16 bytes) at a time");

// On the emulated device (cuda-emulator/) a software mma.sync with the same fragment layouts.
__device__ __forceinline__ void mma_16816(float *c, const unsigned *a, const unsigned *b) {
#ifdef VTR_INDEX_EMULATED_DEVICE
    VTR_EMU_MMA_M16N8K16(c, a, b);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// Copies rows [first, first + count) of a (rows × dim) f16 matrix, columns [k0, k0 + F_BK), into
// a shared tile, zero past `limit` rows; 16 bytes per thread and step.
__device__ __forceinline__ void load_operand(unsigned short (*tile)[F_STRIDE], int count,
                                             const unsigned short *__restrict__ matrix, int first,
                                             int limit, int dim, int k0) {
    for (int v = threadIdx.x; v < count * (F_BK / 8); v += THREADS) {
        const int r = v / (F_BK / 8), part = (v % (F_BK / 8)) * 8;
        uint4 value = make_uint4(0, 0, 0, 0);
        if (first + r < limit) value = *(const uint4 *)(matrix + (long long)(first + r) * dim + k0 + part);
        *(uint4 *)&tile[r][part] = value;
    }
}

// The f32 tile S[row0.., col0..] (F_BM × F_BN) into shared.s. Rows at or past row_limit and
// columns at or past cols are zero. Ends synchronised, with shared.s complete.
__device__ void product_tile(const unsigned short *__restrict__ t, const unsigned short *__restrict__ v,
                             int row0, int row_limit, int col0, int cols, int dim, FusedShared &shared) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int group_id = lane / 4, in_group = lane % 4;
    const int warp_row = (warp / 4) * 32, warp_col = (warp % 4) * 32;
    float acc[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
    for (int k0 = 0; k0 < dim; k0 += F_BK) {
        load_operand(shared.operands.a, F_BM, t, row0, row_limit, dim, k0);
        load_operand(shared.operands.b, F_BN, v, col0, cols, dim, k0);
        __syncthreads();
#pragma unroll
        for (int ks = 0; ks < F_BK; ks += 16) {
            unsigned a[2][4], b[4][2];
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                const int r = warp_row + i * 16 + group_id, k = ks + in_group * 2;
                a[i][0] = *(const unsigned *)&shared.operands.a[r][k];
                a[i][1] = *(const unsigned *)&shared.operands.a[r + 8][k];
                a[i][2] = *(const unsigned *)&shared.operands.a[r][k + 8];
                a[i][3] = *(const unsigned *)&shared.operands.a[r + 8][k + 8];
            }
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int c = warp_col + j * 8 + group_id, k = ks + in_group * 2;
                b[j][0] = *(const unsigned *)&shared.operands.b[c][k];
                b[j][1] = *(const unsigned *)&shared.operands.b[c][k + 8];
            }
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) mma_16816(acc[i][j], a[i], b[j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int r = warp_row + i * 16 + group_id, c = warp_col + j * 8 + in_group * 2;
            shared.s[r][c] = acc[i][j][0];
            shared.s[r][c + 1] = acc[i][j][1];
            shared.s[r + 8][c] = acc[i][j][2];
            shared.s[r + 8][c + 1] = acc[i][j][3];
        }
    __syncthreads();
}

// Pass one of the fused path: per column block (grid.x) and part of the rows (grid.y), the
// column statistics of S·scale/τ (when `mode` needs them) and each row's own cosine.
extern "C" __global__ void __launch_bounds__(THREADS)
fused_column_stats(const unsigned short *__restrict__ t, const unsigned short *__restrict__ v, int rows,
                   int cols, int dim, int rows_per_part, const int *__restrict__ group, int mode,
                   double scale, double inv_tau, double *__restrict__ part_max,
                   double *__restrict__ part_sum, float *__restrict__ own_cosine) {
    __shared__ FusedShared shared;
    __shared__ double half_max[F_BN], half_sum[F_BN];
    const int col0 = blockIdx.x * F_BN;
    const int first = blockIdx.y * rows_per_part, last = min(rows, first + rows_per_part);
    // Two threads per column, each over half of every tile's rows.
    const int c = threadIdx.x % F_BN, half = threadIdx.x / F_BN;
    double max = -INFINITY, sum = 0.0;
    for (int row0 = first; row0 < last; row0 += F_BM) {
        product_tile(t, v, row0, last, col0, cols, dim, shared);
        const int valid = min(F_BM, last - row0);
        if (mode != REVISE_NONE && col0 + c < cols) {
            for (int r = half * (F_BM / 2); r < min(valid, (half + 1) * (F_BM / 2)); ++r) {
                stats_add(max, sum, __dmul_rn(logit(shared.s[r][c], scale), inv_tau));
            }
        }
        if (threadIdx.x < valid) {
            const int g = group[row0 + threadIdx.x];
            if (g >= col0 && g < col0 + F_BN) own_cosine[row0 + threadIdx.x] = shared.s[threadIdx.x][g - col0];
        }
        __syncthreads();
    }
    if (mode == REVISE_NONE) return;
    if (half == 1) {
        half_max[c] = max;
        half_sum[c] = sum;
    }
    __syncthreads();
    if (half == 0 && col0 + c < cols) {
        stats_merge(max, sum, half_max[c], half_sum[c]);
        const long long at = (long long)blockIdx.y * cols + col0 + c;
        part_max[at] = max;
        part_sum[at] = sum;
    }
}

// The symmetric form's row statistics on the fused path: one block per row block
// (block_start[b] .. block_start[b + 1], at most F_BM rows), over every column tile.
extern "C" __global__ void __launch_bounds__(THREADS)
fused_row_stats(const unsigned short *__restrict__ t, const unsigned short *__restrict__ v, int cols,
                int dim, const int *__restrict__ block_start, double scale, double inv_tau,
                double *__restrict__ row_max, double *__restrict__ row_inv_sum) {
    __shared__ FusedShared shared;
    __shared__ double maxes[F_BM][4], sums[F_BM][4];
    const int row0 = block_start[blockIdx.x], valid = block_start[blockIdx.x + 1] - row0;
    // Four threads per row, each over a quarter of every tile's columns.
    const int r = threadIdx.x / 4, quarter = threadIdx.x % 4;
    double max = -INFINITY, sum = 0.0;
    for (int col0 = 0; col0 < cols; col0 += F_BN) {
        product_tile(t, v, row0, row0 + valid, col0, cols, dim, shared);
        if (r < valid) {
            for (int c = quarter; c < min(F_BN, cols - col0); c += 4) {
                stats_add(max, sum, __dmul_rn(logit(shared.s[r][c], scale), inv_tau));
            }
        }
        __syncthreads();
    }
    maxes[r][quarter] = max;
    sums[r][quarter] = sum;
    __syncthreads();
    if (quarter == 0 && r < valid) {
        for (int q = 1; q < 4; ++q) stats_merge(max, sum, maxes[r][q], sums[r][q]);
        row_max[row0 + r] = max;
        row_inv_sum[row0 + r] = 1.0 / sum;
    }
}

// Pass two of the fused path: one block per row block (block_start, whole caption groups, at most
// F_BM rows), over every column tile. Warps 0–3 rank the rows (T2V count and top-k, kept in the
// output arrays, which this block alone writes); warps 4–7 count, per column, the caption groups
// that beat the column's own.
extern "C" __global__ void __launch_bounds__(THREADS)
fused_apply(const unsigned short *__restrict__ t, const unsigned short *__restrict__ v, int cols, int dim,
            const int *__restrict__ block_start, const int *__restrict__ group,
            const float *__restrict__ own_cosine, int mode, double scale, double inv_tau,
            const double *__restrict__ col_max, const double *__restrict__ col_inv_sum,
            const double *__restrict__ row_max, const double *__restrict__ row_inv_sum,
            const double *__restrict__ own_v2t, int k, double *__restrict__ top_value,
            int *__restrict__ top_column, unsigned *__restrict__ rank, unsigned *__restrict__ beaten) {
    __shared__ FusedShared shared;
    __shared__ double bar[F_BM], truth[F_BM];
    __shared__ int held[F_BM], groups[F_BM];
    __shared__ unsigned greater[F_BM];
    const int row0 = block_start[blockIdx.x], valid = block_start[blockIdx.x + 1] - row0;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (threadIdx.x < F_BM) {
        const int r = threadIdx.x;
        const int g = r < valid ? group[row0 + r] : -1;
        groups[r] = g;
        truth[r] = g >= 0 ? t2v_value(mode, own_cosine[row0 + r], scale, inv_tau, col_max[g], col_inv_sum[g])
                          : INFINITY;
        bar[r] = k > 0 ? -INFINITY : INFINITY;
        held[r] = 0;
        greater[r] = 0;
    }
    for (int col0 = 0; col0 < cols; col0 += F_BN) {
        product_tile(t, v, row0, row0 + valid, col0, cols, dim, shared);
        if (warp < 4) {
            for (int r = warp; r < valid; r += 4) {
                const long long list = (long long)(row0 + r) * k;
                unsigned count = 0;
#pragma unroll
                for (int q = 0; q < F_BN / 32; ++q) {
                    const int c = col0 + q * 32 + lane;
                    const double value = c < cols ? t2v_value(mode, shared.s[r][q * 32 + lane], scale, inv_tau,
                                                              col_max[c], col_inv_sum[c])
                                                  : -INFINITY;
                    // The own column is never counted: its recomputed value may differ from the
                    // first pass's in the last bit if the tensor cores round by tile position.
                    count += c < cols && c != groups[r] && value > truth[r];
                    // Offer values above the row's bar in ascending column order.
                    unsigned offers = __ballot_sync(FULL_MASK, value > bar[r]);
                    while (offers) {
                        const int from = __ffs(offers) - 1;
                        const double offered = __shfl_sync(FULL_MASK, value, from);
                        // Every lane has read bar[r] (for the ballot) before lane 0 writes it: a
                        // ballot or shuffle orders no memory (the emulator's race build found it).
                        __syncwarp();
                        if (lane == 0) {
                            int h = held[r];
                            bar[r] = insert_top(offered, col0 + q * 32 + from, top_value + list, top_column + list, k, h);
                            held[r] = h;
                        }
                        __syncwarp();
                        offers &= ~(1u << from);
                        offers &= __ballot_sync(FULL_MASK, value > bar[r]);
                    }
                }
#pragma unroll
                for (int offset = 16; offset > 0; offset /= 2) count += __shfl_xor_sync(FULL_MASK, count, offset);
                if (lane == 0) greater[r] += count;
            }
        } else {
            const int c = col0 + threadIdx.x - 128;
            if (c < cols) {
                const double own = own_v2t[c], c_max = col_max[c], c_inv_sum = col_inv_sum[c];
                GroupCount gc = group_count_start();
                for (int r = 0; r < valid && groups[r] >= 0; ++r) {
                    const double value = v2t_value(mode, shared.s[r][threadIdx.x - 128], scale, inv_tau, c_max,
                                                   c_inv_sum, row_max[row0 + r], row_inv_sum[row0 + r]);
                    group_count_add(gc, groups[r], value, own, c);
                }
                group_count_end(gc, own, c);
                if (gc.beaten > 0) atomicAdd(&beaten[c], gc.beaten);
            }
        }
        __syncthreads();
    }
    if (threadIdx.x < valid) {
        const int r = threadIdx.x;
        const long long list = (long long)(row0 + r) * k;
        for (int e = held[r]; e < k; ++e) {
            top_value[list + e] = -INFINITY;
            top_column[list + e] = -1;
        }
        rank[row0 + r] = groups[r] >= 0 ? 1 + greater[r] : 0;
    }
}

#endif  // __CUDA_ARCH__ >= 800: the fused path
