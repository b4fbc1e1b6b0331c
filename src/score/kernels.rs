//! The CPU kernels of scoring: the tile GEMM and the per-row loops of the two passes.
//!
//! Revised values are computed in f64. They are products of logits and softmax weights whose
//! exponents reach −100 and below on real matrices, where f32 underflows and would turn distinct
//! scores into ties; the references are computed in f64 too. (The terms of the column sums are
//! the exception: see `ColumnStats::add_strip`.)
//! [`exp`] is branch-free, so the row loops vectorise, and it gives bit-identical results
//! whether it runs in a vector loop or on one value: a row's own (true) score is computed once
//! on its own and compared with the same value recomputed inside the row, and the two must
//! be equal for ranks to count correctly.

use crate::matmul::{Rounding, Strided, Threads, gemm_f32};
pub use crate::simd::exp_f64 as exp;

/// `dst[rows × M] = a[rows × D] · videos[M × D]ᵀ`, row-major, on the calling thread.
///
/// A row's products are the same bits in any strip, at any position
/// ([`Rounding::RowIndependent`]): tiled and whole scoring rank on the same logits, and the second
/// pass, recomputing a strip, sees the first pass's.
pub fn strip_gemm(a: &[f32], videos: &[f32], dim: usize, dst: &mut [f32]) {
    let rows = a.len() / dim;
    let cols = videos.len() / dim;
    assert_eq!(dst.len(), rows * cols);
    if rows == 0 || cols == 0 {
        return;
    }
    // SAFETY: the pointers and strides describe exactly the three slices above, whose lengths
    // were checked; `dst` does not alias the inputs.
    unsafe {
        gemm_f32(
            (rows, cols, dim),
            Strided::rows(dst.as_mut_ptr(), cols),
            false,
            Strided::rows(a.as_ptr(), dim),
            Strided::transposed(videos.as_ptr(), dim),
            1.0,
            Threads::Caller,
            Rounding::RowIndependent,
        );
    }
}

/// Running softmax statistics of one axis: the maximum and the sum of `exp(x − max)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SoftmaxStats {
    pub max: f64,
    pub sum: f64,
}

impl SoftmaxStats {
    pub const EMPTY: SoftmaxStats = SoftmaxStats { max: f64::NEG_INFINITY, sum: 0.0 };

    pub fn merge(self, other: SoftmaxStats) -> SoftmaxStats {
        if other.sum == 0.0 {
            return self;
        }
        if self.sum == 0.0 {
            return other;
        }
        let max = self.max.max(other.max);
        SoftmaxStats { max, sum: self.sum * exp(self.max - max) + other.sum * exp(other.max - max) }
    }

    /// The softmax weight of `x` is `exp(x − max) · inverse_sum`.
    pub fn inverse_sum(self) -> f64 {
        1.0 / self.sum
    }
}

/// `dst[j] = scale · s[j]` (the logits of one row).
#[inline(always)]
pub fn logits(s: &[f32], scale: f64, dst: &mut [f64]) {
    for (d, &v) in dst.iter_mut().zip(s) {
        *d = scale * v as f64;
    }
}

/// The dual-softmax value of one logit `l` with the softmax statistics of its column (T2V)
/// or row (symmetric V2T): `l · exp(l/τ − max) / sum`.
#[inline(always)]
pub fn dual_softmax(l: f64, inv_tau: f64, max: f64, inv_sum: f64) -> f64 {
    l * exp(l * inv_tau - max) * inv_sum
}

/// QB-Norm's dynamic inverted softmax of one cosine: `exp(β·c − max) / sum` over the bank.
#[inline(always)]
pub fn inverted_softmax(cosine: f64, beta: f64, max: f64, inv_sum: f64) -> f64 {
    exp(beta * cosine - max) * inv_sum
}

/// Softmax statistics of one row of `l / τ`.
#[inline(always)]
pub fn row_stats(row: &[f64], inv_tau: f64) -> SoftmaxStats {
    let max = row.iter().fold(f64::NEG_INFINITY, |m, &l| m.max(l * inv_tau));
    let sum: f64 = row.iter().map(|&l| exp(l * inv_tau - max)).sum();
    SoftmaxStats { max, sum }
}

/// How many values of `row` are strictly greater than `truth`.
#[inline(always)]
pub fn count_greater(row: &[f64], truth: f64) -> u32 {
    row.iter().map(|&v| u32::from(v > truth)).sum()
}

/// Index of the largest value, the lowest index among equals.
#[inline(always)]
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (j, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = j;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_statistics_equal_one_pass() {
        let values = [3.0, -1.0, 40.0, 2.5, -80.0, 39.0];
        let whole = row_stats(&values, 1.0);
        let parts = row_stats(&values[..2], 1.0).merge(row_stats(&values[2..], 1.0));
        assert!((whole.max - parts.max).abs() == 0.0 && ((whole.sum - parts.sum) / whole.sum).abs() < 1e-15);
        assert_eq!(SoftmaxStats::EMPTY.merge(whole), whole);
    }

    #[test]
    fn strip_gemm_is_the_matrix_product() {
        let (a, v) = ([1.0, 2.0, 3.0, 4.0], [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
        let mut dst = [0.0; 6];
        strip_gemm(&a, &v, 2, &mut dst);
        assert_eq!(dst, [1.0, 2.0, 3.0, 3.0, 4.0, 7.0]);
    }
}
