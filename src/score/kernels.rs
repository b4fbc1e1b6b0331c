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
//! Most comparisons need no f64 value, though: [`dual_softmax_bounds`] brackets it in f32, and
//! the second pass computes the f64 value only where the bracket cannot decide.

pub use crate::simd::exp_f64 as exp;

/// `dst[rows × M] = a[rows × D] · videos[M × D]ᵀ`, row-major, on the calling thread: each
/// cosine one FMA chain over the embedding ([`crate::matmul::fma_chain`]), so a cosine's bits
/// depend on its two vectors alone. Tiled and whole scoring rank on the same logits, the second
/// pass recomputing a strip sees the first pass's, the stages of a split score agree on any
/// machines, and the GPU's f32 cosines are the same bits.
pub fn strip_gemm(a: &[f32], videos: &[f32], dim: usize, dst: &mut [f32]) {
    crate::matmul::fma_chain::a_times_bt(a, videos, dim, dst);
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

/// How far [`dual_softmax_bounds`] may be from [`dual_softmax`], relative to the f32 value.
/// The f32 error is about 2e-5 at worst: `factor · (s − top)` is rounded three times and reaches
/// −87 (an absolute error of 1.6e-5 in the exponent), `exp_f32` adds 4e-7 and each product 6e-8.
const BOUNDS_RELATIVE: f32 = 1e-4;
/// An absolute margin that covers products rounded below f32's normal range (2^-125).
const BOUNDS_ABSOLUTE: f32 = 2.350_988_7e-38;

/// An interval in f32 that holds the f64 [`dual_softmax`] value of the cosine `s` in a column
/// whose softmax maximum is `to_x(top)` (`factor` = scale/τ, `inv_sum` ≤ 1 since the sum holds
/// the maximum's own term, 1). Eight lanes and one short `exp` per value, where the f64 value
/// takes four lanes and a long one: the second pass decides nearly every comparison on the
/// interval and computes the f64 value only where the interval straddles the other side.
///
/// Below an exponent of −86 the f32 `exp` is clamped (and the f64 one is 0 below −708), so there
/// the interval is widened to hold everything between 0 and the f32 value.
#[inline(always)]
pub fn dual_softmax_bounds(s: f32, scale: f32, factor: f32, top: f32, inv_sum: f32) -> (f32, f32) {
    let exponent = factor * (s - top);
    let value = (scale * s) * crate::simd::exp_f32(exponent) * inv_sum;
    let relative = if exponent < -86.0 { 1.0 + BOUNDS_RELATIVE } else { BOUNDS_RELATIVE };
    let margin = value.abs() * relative + BOUNDS_ABSOLUTE;
    (value - margin, value + margin)
}

/// Whether a value bounded by `[lower, upper]` in f32 is greater than `x`, given `x`'s f32
/// neighbours `below ≤ x ≤ above`: `Some` when the bounds decide it, `None` when they straddle
/// `x` (or are NaN) and only the f64 value can.
#[inline(always)]
pub fn greater_on_bounds(lower: f32, upper: f32, below: f32, above: f32) -> Option<bool> {
    let greater = lower > above;
    let not_greater = upper <= below;
    (greater | not_greater).then_some(greater)
}

/// The largest f32 not above `x` (for `v ≤ below(x)` ⇒ `v ≤ x`).
pub fn f32_below(x: f64) -> f32 {
    let r = x as f32;
    if f64::from(r) > x { r.next_down() } else { r }
}

/// The smallest f32 not below `x`.
pub fn f32_above(x: f64) -> f32 {
    let r = x as f32;
    if f64::from(r) < x { r.next_up() } else { r }
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
    fn dual_softmax_bounds_hold_the_f64_value() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut uniform = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut widest = 0f64;
        for _ in 0..200_000 {
            let (scale, inv_tau) = (1.0 + 999.0 * uniform(), 1.0 / (0.01 + 2.0 * uniform()));
            let (s, top) = ((2.0 * uniform() - 1.0) as f32, (2.0 * uniform() - 1.0) as f32);
            let top = top.max(s);
            let inv_sum = 1.0 / (1.0 + 1e6 * uniform().powi(4));
            let max = scale * f64::from(top) * inv_tau;
            let exact = dual_softmax(scale * f64::from(s), inv_tau, max, inv_sum);
            let factor = (scale * inv_tau) as f32;
            let (lo, hi) = dual_softmax_bounds(s, scale as f32, factor, top, inv_sum as f32);
            assert!(
                f64::from(lo) <= exact && exact <= f64::from(hi),
                "s {s} top {top} scale {scale} 1/τ {inv_tau}: {exact} outside [{lo}, {hi}]"
            );
            if factor * (s - top) > -80.0 && exact.abs() > 1e-30 {
                widest = widest.max(f64::from(hi - lo) / exact.abs());
            }
        }
        assert!(widest < 3e-4, "intervals as wide as {widest} of the value");
    }

    #[test]
    fn f32_neighbours_are_on_their_side() {
        for x in [0.1f64, -0.1, 1.0, 1e-40, -1e300, f64::INFINITY, 0.0] {
            assert!(f64::from(f32_below(x)) <= x && x <= f64::from(f32_above(x)), "{x}");
            assert!(f32_above(x) == f32_below(x) || f32_above(x) == f32_below(x).next_up(), "{x}");
        }
    }

    #[test]
    fn strip_gemm_is_the_matrix_product() {
        let (a, v) = ([1.0, 2.0, 3.0, 4.0], [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
        let mut dst = [0.0; 6];
        strip_gemm(&a, &v, 2, &mut dst);
        assert_eq!(dst, [1.0, 2.0, 3.0, 3.0, 4.0, 7.0]);
    }
}
