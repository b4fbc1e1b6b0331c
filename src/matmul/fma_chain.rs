//! The product whose every element is one fused multiply-add chain over the inner dimension,
//! from zero, in index order: `acc = fma(a[k], b[k], acc)` for k = 0, 1, …, as the CUDA kernel
//! `cosines_f32` computes it. Its bits depend on nothing but the element's own row and column:
//! not on the CPU's caches, SIMD width or thread count, nor on the other rows and columns of the
//! call. Scoring's logits come from here, so every machine (and the GPU) revises the same logits
//! and a split score's stages may run on different machines; so do the towers' attention
//! products, whose shapes follow the batch's longest caption (contract §6).
//!
//! BLAS-style products cut the inner dimension into blocks sized from the CPU's caches and add
//! the blocks' partial sums, which rounds differently on each CPU; this kernel never does. Its
//! SIMD lanes run across the outputs (sixteen columns of the right operand at a time, packed so
//! one vector load takes one step `k` of sixteen chains), never across the inner dimension, so
//! each lane is exactly the scalar chain. On a CPU without FMA the scalar chain (`f32::mul_add`,
//! a correct fused multiply-add in software) gives the same bits, slower.

use super::Strided;

/// Columns of the right operand packed side by side: two AVX2 vectors per step of the inner
/// dimension.
const PANEL_COLUMNS: usize = 16;
/// Rows of the left operand per register tile: 6 × 2 accumulators, two panel vectors and one
/// broadcast fill 15 of AVX2's 16 registers.
const TILE_ROWS: usize = 6;
/// Steps of the inner dimension per pass over a panel: 256 × 16 values (16 KiB) stay in L1
/// beside a tile's rows. A chain crosses passes exactly: its accumulator is stored as the f32 it
/// is and taken up again where it stopped, so the cut moves no bit (unlike adding the partial
/// sums of blocks, which is what BLAS does).
const STEPS_PER_PASS: usize = 256;

/// `dst[rows × cols] = a[rows × dim] · b[cols × dim]ᵀ`, all row-major and contiguous, each
/// element the FMA chain of its two rows (module doc), on the calling thread.
pub fn a_times_bt(a: &[f32], b: &[f32], dim: usize, dst: &mut [f32]) {
    assert!(dim > 0, "an inner dimension of 0");
    assert!(a.len().is_multiple_of(dim) && b.len().is_multiple_of(dim), "operands are not whole rows of {dim}");
    let (rows, cols) = (a.len() / dim, b.len() / dim);
    assert_eq!(dst.len(), rows * cols, "the result is not {rows} × {cols}");
    // SAFETY: the views describe exactly the three slices, whose lengths were checked; `dst` is
    // borrowed mutably, so it overlaps neither input.
    unsafe {
        product(
            (rows, cols, dim),
            Strided::rows(dst.as_mut_ptr(), cols),
            Strided::rows(a.as_ptr(), dim),
            Strided::transposed(b.as_ptr(), dim),
            1.0,
        )
    }
}

/// `dst[m × n] = scale · (lhs[m × k] · rhs[k × n])`, each element the FMA chain of its row of
/// `lhs` and column of `rhs` (module doc), then multiplied by `scale`; on the calling thread.
///
/// # Safety
/// Each view is valid for its whole shape, and `dst` overlaps neither input nor is written by
/// anyone else during the call.
pub unsafe fn product(
    (m, n, k): (usize, usize, usize),
    dst: Strided<*mut f32>,
    lhs: Strided<*const f32>,
    rhs: Strided<*const f32>,
    scale: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    // An empty inner dimension (no step to pack) takes the scalar path, which writes the zeros.
    #[cfg(target_arch = "x86_64")]
    if k > 0 && std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the kernel is compiled for (checked just above); the
        // views are the caller's.
        unsafe { avx2::product((m, n, k), dst, lhs, rhs, scale) };
        return;
    }
    // SAFETY: forwarded from the caller's contract.
    unsafe { scalar_chains((m, n, k), dst, lhs, rhs, scale) };
}

/// The same product one chain at a time: the definition, and the path where the CPU has no
/// vector FMA.
///
/// # Safety
/// As [`product`].
pub unsafe fn scalar_chains(
    (m, n, k): (usize, usize, usize),
    dst: Strided<*mut f32>,
    lhs: Strided<*const f32>,
    rhs: Strided<*const f32>,
    scale: f32,
) {
    for i in 0..m as isize {
        for j in 0..n as isize {
            let mut acc = 0f32;
            for l in 0..k as isize {
                // SAFETY: (i, l) and (l, j) lie inside the views the caller vouched for.
                let (x, y) = unsafe {
                    (
                        *lhs.ptr.offset(i * lhs.row_stride + l * lhs.col_stride),
                        *rhs.ptr.offset(l * rhs.row_stride + j * rhs.col_stride),
                    )
                };
                acc = x.mul_add(y, acc);
            }
            // SAFETY: (i, j) lies inside `dst`.
            unsafe { *dst.ptr.offset(i * dst.row_stride + j * dst.col_stride) = scale * acc };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{PANEL_COLUMNS, STEPS_PER_PASS, Strided, TILE_ROWS};
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU has AVX2 and FMA, and `k` > 0; otherwise as [`super::product`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn product(
        (m, n, k): (usize, usize, usize),
        dst: Strided<*mut f32>,
        lhs: Strided<*const f32>,
        rhs: Strided<*const f32>,
        scale: f32,
    ) {
        // The left operand's tiles, each packed step by step (`[l][r]`): a step's six values
        // lie side by side instead of on six rows a whole row apart.
        let tile_values = k * TILE_ROWS;
        let mut tiles = vec![0f32; m.div_ceil(TILE_ROWS) * tile_values];
        for (t, tile) in tiles.chunks_exact_mut(tile_values).enumerate() {
            for r in 0..TILE_ROWS.min(m - t * TILE_ROWS) {
                let row = lhs.ptr.wrapping_offset((t * TILE_ROWS + r) as isize * lhs.row_stride);
                for (l, step) in tile.chunks_exact_mut(TILE_ROWS).enumerate() {
                    // SAFETY: (t·6 + r, l) lies inside the caller's view of `lhs`.
                    step[r] = unsafe { *row.offset(l as isize * lhs.col_stride) };
                }
            }
        }
        let packed_lhs = Strided { ptr: tiles.as_ptr(), row_stride: 1, col_stride: TILE_ROWS as isize };
        let mut panel = vec![0f32; k * PANEL_COLUMNS];
        for first_col in (0..n).step_by(PANEL_COLUMNS) {
            let width = PANEL_COLUMNS.min(n - first_col);
            // SAFETY: columns first_col.. first_col + width of `rhs` lie inside its view.
            unsafe { pack_panel(rhs, k, first_col, width, &mut panel) };
            for first_step in (0..k).step_by(STEPS_PER_PASS) {
                let steps = &panel[first_step * PANEL_COLUMNS..(first_step + STEPS_PER_PASS).min(k) * PANEL_COLUMNS];
                let mut first_row = 0;
                while first_row < m {
                    let rows = TILE_ROWS.min(m - first_row);
                    let lhs_at = (first_row * k + first_step * TILE_ROWS) as isize;
                    let dst_at = first_row as isize * dst.row_stride + first_col as isize * dst.col_stride;
                    let tile = Tile {
                        lhs: Strided { ptr: packed_lhs.ptr.wrapping_offset(lhs_at), ..packed_lhs },
                        dst: Strided { ptr: dst.ptr.wrapping_offset(dst_at), ..dst },
                        width,
                        resume: first_step > 0,
                        scale: (first_step + STEPS_PER_PASS >= k).then_some(scale),
                    };
                    // SAFETY: the tile's rows of `lhs` from `first_step`, its rows of `dst` and
                    // their `width` columns lie inside the caller's views; `steps` holds whole
                    // steps of 16 values.
                    unsafe {
                        match rows {
                            6 => tile.run::<6>(steps),
                            5 => tile.run::<5>(steps),
                            4 => tile.run::<4>(steps),
                            3 => tile.run::<3>(steps),
                            2 => tile.run::<2>(steps),
                            _ => tile.run::<1>(steps),
                        }
                    }
                    first_row += rows;
                }
            }
        }
    }

    /// `panel[l × 16 + c] = rhs[l][first_col + c]` for the `width` columns, zero past them.
    ///
    /// # Safety
    /// Those columns lie inside `rhs`'s view of `k` rows.
    #[inline]
    unsafe fn pack_panel(rhs: Strided<*const f32>, k: usize, first_col: usize, width: usize, panel: &mut [f32]) {
        if width < PANEL_COLUMNS {
            panel.fill(0.0);
        }
        for c in 0..width {
            let column = rhs.ptr.wrapping_offset((first_col + c) as isize * rhs.col_stride);
            for (l, step) in panel.chunks_exact_mut(PANEL_COLUMNS).enumerate() {
                // SAFETY: (l, first_col + c) lies inside the view, l < k.
                step[c] = unsafe { *column.offset(l as isize * rhs.row_stride) };
            }
        }
        debug_assert_eq!(panel.len(), k * PANEL_COLUMNS);
    }

    /// Up to six rows of the left operand against one pass over a panel, and where their
    /// chains go.
    struct Tile {
        lhs: Strided<*const f32>,
        dst: Strided<*mut f32>,
        width: usize,
        /// Whether the chains carry on from the accumulators an earlier pass left in `dst`.
        resume: bool,
        /// On the last pass, the factor the finished chains are multiplied by.
        scale: Option<f32>,
    }

    impl Tile {
        /// # Safety
        /// `R` rows of `lhs` (each as long as the panel has steps) and `R` × `width` values of
        /// `dst` lie inside their views.
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn run<const R: usize>(&self, panel: &[f32]) {
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            let whole_rows = self.width == PANEL_COLUMNS && self.dst.col_stride == 1;
            if self.resume && whole_rows {
                for (r, acc) in acc.iter_mut().enumerate() {
                    // SAFETY: row r of the tile's output holds 16 contiguous values.
                    unsafe {
                        let row = self.dst.ptr.wrapping_offset(r as isize * self.dst.row_stride);
                        *acc = [_mm256_loadu_ps(row), _mm256_loadu_ps(row.add(8))];
                    }
                }
            } else if self.resume {
                for (r, acc) in acc.iter_mut().enumerate() {
                    let mut values = [0f32; PANEL_COLUMNS];
                    // SAFETY: row r of the tile's output holds `width` values, which the
                    // previous pass wrote.
                    unsafe {
                        let row = self.dst.ptr.wrapping_offset(r as isize * self.dst.row_stride);
                        for (c, value) in values[..self.width].iter_mut().enumerate() {
                            *value = *row.offset(c as isize * self.dst.col_stride);
                        }
                        *acc = [_mm256_loadu_ps(values.as_ptr()), _mm256_loadu_ps(values.as_ptr().add(8))];
                    }
                }
            }
            let step_of_row = self.lhs.col_stride;
            let rows: [*const f32; R] =
                std::array::from_fn(|r| self.lhs.ptr.wrapping_offset(r as isize * self.lhs.row_stride));
            for (l, step) in panel.chunks_exact(PANEL_COLUMNS).enumerate() {
                // SAFETY: `step` holds 16 values; (r, l) lies inside `lhs` (the caller's).
                unsafe {
                    let low = _mm256_loadu_ps(step.as_ptr());
                    let high = _mm256_loadu_ps(step.as_ptr().add(8));
                    for (acc, row) in acc.iter_mut().zip(rows) {
                        let x = _mm256_broadcast_ss(&*row.offset(l as isize * step_of_row));
                        acc[0] = _mm256_fmadd_ps(x, low, acc[0]);
                        acc[1] = _mm256_fmadd_ps(x, high, acc[1]);
                    }
                }
            }
            if let Some(scale) = self.scale {
                let scale = _mm256_set1_ps(scale);
                for acc in &mut acc {
                    *acc = [_mm256_mul_ps(scale, acc[0]), _mm256_mul_ps(scale, acc[1])];
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                let row = self.dst.ptr.wrapping_offset(r as isize * self.dst.row_stride);
                if whole_rows {
                    // SAFETY: row r of the tile's output holds 16 contiguous values.
                    unsafe {
                        _mm256_storeu_ps(row, acc[0]);
                        _mm256_storeu_ps(row.add(8), acc[1]);
                    }
                    continue;
                }
                let mut values = [0f32; PANEL_COLUMNS];
                // SAFETY: `values` holds 16; row r of the tile's output holds `width` values.
                unsafe {
                    _mm256_storeu_ps(values.as_mut_ptr(), acc[0]);
                    _mm256_storeu_ps(values.as_mut_ptr().add(8), acc[1]);
                    for (c, &value) in values[..self.width].iter().enumerate() {
                        *row.offset(c as isize * self.dst.col_stride) = value;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// `count` values in [−0.5, 0.5) from a seeded LCG (also the bf16 products' tests' inputs).
    pub(in crate::matmul) fn values(count: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        (0..count)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    /// The chain written out: what the CUDA kernel `cosines_f32` does for one cosine.
    fn chain(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = 0f32;
        for (&x, &y) in a.iter().zip(b) {
            acc = x.mul_add(y, acc);
        }
        acc
    }

    /// What a cache-blocked product computes: chains over blocks of `block`, then their sum.
    fn blocked(a: &[f32], b: &[f32], block: usize) -> f32 {
        a.chunks(block).zip(b.chunks(block)).map(|(a, b)| chain(a, b)).sum()
    }

    /// Every width CLIP's embeddings have (ViT-B 512, ViT-L 768, ViT-H 1024, ViT-bigG 1280, and
    /// the small ones), odd widths, and one-row, one-column and odd shapes: each element is the
    /// chain to the bit, on the vector path and on the scalar one. The inputs are such that a
    /// product blocking the inner dimension would differ (checked on each width), so the test
    /// fails for such a product whatever block size it picked from this CPU's caches.
    #[test]
    fn every_element_is_the_fma_chain_at_every_width_and_shape() {
        let shapes = [(1, 1), (1, 37), (37, 1), (6, 16), (7, 17), (13, 33), (2, 48), (19, 5)];
        let widths = [1, 3, 17, 32, 48, 64, 100, 256, 384, 512, 640, 768, 769, 1024, 1280];
        for (case, &dim) in widths.iter().enumerate() {
            let mut blocking_shows = dim < 16;
            for (shape, &(rows, cols)) in shapes.iter().enumerate() {
                let a = values(rows * dim, (case * 100 + shape) as u64 + 1);
                let b = values(cols * dim, (case * 100 + shape) as u64 + 7777);
                let mut fast = vec![f32::NAN; rows * cols];
                a_times_bt(&a, &b, dim, &mut fast);
                let mut scalar = vec![f32::NAN; rows * cols];
                // SAFETY: the views describe the three vectors exactly.
                unsafe {
                    scalar_chains(
                        (rows, cols, dim),
                        Strided::rows(scalar.as_mut_ptr(), cols),
                        Strided::rows(a.as_ptr(), dim),
                        Strided::transposed(b.as_ptr(), dim),
                        1.0,
                    )
                };
                for r in 0..rows {
                    for c in 0..cols {
                        let (a_row, b_row) = (&a[r * dim..(r + 1) * dim], &b[c * dim..(c + 1) * dim]);
                        let want = chain(a_row, b_row);
                        let at = r * cols + c;
                        assert_eq!(fast[at].to_bits(), want.to_bits(), "width {dim}, {rows} × {cols}: ({r}, {c})");
                        assert_eq!(scalar[at].to_bits(), want.to_bits(), "scalar, width {dim}: ({r}, {c})");
                        blocking_shows |= [8, dim / 2, dim.div_ceil(3)]
                            .iter()
                            .any(|&block| block > 0 && blocked(a_row, b_row, block).to_bits() != want.to_bits());
                    }
                }
            }
            assert!(blocking_shows, "width {dim}: no element tells a blocked sum from the chain");
        }
    }

    #[test]
    fn an_empty_inner_dimension_gives_zeros() {
        let mut dst = vec![f32::NAN; 6];
        // SAFETY: no input element is read when k = 0; `dst` is 2 × 3.
        unsafe {
            product(
                (2, 3, 0),
                Strided::rows(dst.as_mut_ptr(), 3),
                Strided::rows(std::ptr::null(), 0),
                Strided::rows(std::ptr::null(), 3),
                1.0,
            )
        };
        assert_eq!(dst, [0.0; 6]);
    }

    #[test]
    fn a_row_or_column_has_the_same_bits_in_any_call() {
        let (rows, cols, dim) = (40, 70, 512);
        let (a, b) = (values(rows * dim, 1), values(cols * dim, 2));
        let mut whole = vec![0f32; rows * cols];
        a_times_bt(&a, &b, dim, &mut whole);
        for (first, count) in [(0, 1), (5, 6), (7, 13), (39, 1), (0, 40)] {
            let mut part = vec![0f32; count * cols];
            a_times_bt(&a[first * dim..(first + count) * dim], &b, dim, &mut part);
            assert!(part == whole[first * cols..(first + count) * cols], "rows {first}..{}", first + count);
        }
        let mut one = vec![0f32; rows];
        a_times_bt(&a, &b[3 * dim..4 * dim], dim, &mut one);
        assert!(one.iter().enumerate().all(|(r, v)| v.to_bits() == whole[r * cols + 3].to_bits()));
    }

    /// Strided views (attention's: a right operand read down its columns, rows inside wider
    /// rows) and a scale: each element is `scale ·` its chain.
    #[test]
    fn strided_views_and_a_scale_give_the_scaled_chains() {
        let (m, n, k, wide) = (9, 21, 37, 50);
        let a = values(m * wide, 3);
        let b = values(k * wide, 4); // rhs[l][j] = b[l · wide + j]: row-major inside wider rows
        let mut dst = vec![0f32; m * wide];
        // SAFETY: every view stays inside its vector (rows `wide` apart, fewer columns used).
        unsafe {
            product(
                (m, n, k),
                Strided::rows(dst.as_mut_ptr(), wide),
                Strided::rows(a.as_ptr(), wide),
                Strided::rows(b.as_ptr(), wide),
                0.125,
            )
        };
        for i in 0..m {
            for j in 0..wide {
                let got = dst[i * wide + j];
                let want = if j < n {
                    let column: Vec<f32> = (0..k).map(|l| b[l * wide + j]).collect();
                    0.125 * chain(&a[i * wide..i * wide + k], &column)
                } else {
                    0.0
                };
                assert_eq!(got.to_bits(), want.to_bits(), "({i}, {j})");
            }
        }
    }
}
