//! What the CPU hot loops of scoring and of the model share: running a loop compiled for AVX2/FMA
//! when the CPU has them, and a branch-free `exp` and a fixed-order reduction
//! ([`fold_in_lanes`]) that vectorise inside such loops. (Their matrix
//! products go through [`crate::matmul`].)

/// Runs `f` compiled for AVX2 and FMA when the CPU has them, as it is otherwise.
///
/// The row loops are plain Rust that the compiler vectorises; built for the x86-64 baseline
/// they get 2-lane SSE2, inside this wrapper 4-lane AVX2 (everything `f` calls is
/// `#[inline(always)]`, so it is compiled in the wrapper's context). The results are the same
/// bits either way: Rust never fuses a multiply and an add on its own, so enabling FMA changes
/// no rounding, and each lane does exactly the scalar operations.
#[inline(always)]
pub fn with_wide_vectors<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        fn wide<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has the features `wide` is compiled for (checked just above).
            return unsafe { wide(f) };
        }
    }
    f()
}

/// Lanes of [`fold_in_lanes`]: two AVX2 vectors, so a row waits on a sixteenth of the dependent
/// adds of one running sum; more lanes would leave attention's short rows (50 values for a
/// ViT-B/32) mostly to the remainder.
const FOLD_LANES: usize = 16;

/// Folds `term(v)` of each of `values` with `combine` in 16 lanes (value i into lane i mod 16,
/// each lane from `start`), then the lanes pairwise with `combine` (lane j with lane j + 8, then
/// j + 4, j + 2, j + 1). The order is fixed by this definition, so the result has the same bits
/// on every CPU, SIMD width and thread count; and the loop vectorises, which one running sum
/// cannot (the compiler may not reorder float additions, so a plain `sum()` waits out an add's
/// latency at every value).
#[inline(always)]
pub fn fold_in_lanes(values: &[f32], start: f32, term: impl Fn(f32) -> f32, combine: impl Fn(f32, f32) -> f32) -> f32 {
    let mut lanes = [start; FOLD_LANES];
    let mut chunks = values.chunks_exact(FOLD_LANES);
    for chunk in &mut chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = combine(*lane, term(v));
        }
    }
    for (lane, &v) in lanes.iter_mut().zip(chunks.remainder()) {
        *lane = combine(*lane, term(v));
    }
    let mut live = FOLD_LANES;
    while live > 1 {
        live /= 2;
        for j in 0..live {
            lanes[j] = combine(lanes[j], lanes[j + live]);
        }
    }
    lanes[0]
}

/// Defines a branch-free `e^x` for one float type, so loops over it vectorise (libm's `exp` is a
/// call per element) and it gives the same bits in a vector loop as on one value. Cody and
/// Waite's reduction: `x = n·ln2 + r` with `|r| ≤ ln2/2` (ln 2 split in two so that `n·LN2_HI`
/// is exact), `e^r` by its Taylor series, `2^n` built from the exponent bits. `x` is clamped to
/// the range where the result is a finite normal number; below that range the result is either
/// the range's bottom value (`below: clamp`) or 0 (`below: zero`).
///
/// The series is evaluated by Estrin's scheme (pairs `c₂ₖ + c₂ₖ₊₁·r`, then pairs of those with
/// `r²`, with `r⁴`, …): its dependency chain is a third of Horner's, so a vector loop runs at the
/// throughput of the multipliers rather than the latency of one long chain, which made Horner's
/// form the scoring passes' bottleneck. Plain multiplies and adds (no FMA) keep scalar and
/// vector results identical whatever the target features.
macro_rules! branch_free_exp {
    (
        $(#[$doc:meta])*
        fn $name:ident($float:ident as $bits:ident, $signed:ident);
        shift: $shift:expr, log2_e: $log2_e:expr, ln2: ($ln2_hi:expr, $ln2_lo:expr),
        range: ($min:expr, $max:expr), below: $below:ident, exponent: (bias $bias:expr, shift $mantissa_bits:expr),
        series: $series:ident
    ) => {
        $(#[$doc])*
        #[inline(always)]
        pub fn $name(x: $float) -> $float {
            // Adding `shift` (1.5 · 2^mantissa bits) rounds to an integer held in the low bits.
            const SHIFT: $float = $shift;
            let clamped = x.clamp($min, $max);
            let k = clamped * $log2_e + SHIFT;
            let n = k - SHIFT;
            let r = clamped - n * $ln2_hi - n * $ln2_lo;
            let p = $series(r);
            let exponent = (k.to_bits().wrapping_sub(SHIFT.to_bits()) as $signed).wrapping_add($bias);
            let value = p * $float::from_bits((exponent as $bits) << $mantissa_bits);
            branch_free_exp!(@below $below, x < $min, value)
        }
    };
    // A select, not a branch: the loops still vectorise (a compare and a blend per lane).
    (@below zero, $underflows:expr, $value:expr) => {
        if $underflows { 0.0 } else { $value }
    };
    (@below clamp, $underflows:expr, $value:expr) => {
        $value
    };
}

/// `e^r` for `|r| ≤ ln2/2` by its Taylor series to degree 13 (the remainder is below 1e-17).
#[inline(always)]
fn exp_series_f64(r: f64) -> f64 {
    const C: [f64; 14] = [
        1.0,
        1.0,
        0.5,
        1.0 / 6.0,
        1.0 / 24.0,
        1.0 / 120.0,
        1.0 / 720.0,
        1.0 / 5_040.0,
        1.0 / 40_320.0,
        1.0 / 362_880.0,
        1.0 / 3_628_800.0,
        1.0 / 39_916_800.0,
        1.0 / 479_001_600.0,
        1.0 / 6_227_020_800.0,
    ];
    let (r2, r4) = (r * r, (r * r) * (r * r));
    let r8 = r4 * r4;
    let pair = |i: usize| C[i] + C[i + 1] * r;
    let low = (pair(0) + pair(2) * r2) + (pair(4) + pair(6) * r2) * r4;
    let high = (pair(8) + pair(10) * r2) + pair(12) * r4;
    low + high * r8
}

/// `e^r` for `|r| ≤ ln2/2` by its Taylor series to degree 7 (the remainder is below 1e-9).
#[inline(always)]
fn exp_series_f32(r: f32) -> f32 {
    const C: [f32; 8] = [1.0, 1.0, 0.5, 1.0 / 6.0, 1.0 / 24.0, 1.0 / 120.0, 1.0 / 720.0, 1.0 / 5_040.0];
    let (r2, r4) = (r * r, (r * r) * (r * r));
    let pair = |i: usize| C[i] + C[i + 1] * r;
    (pair(0) + pair(2) * r2) + (pair(4) + pair(6) * r2) * r4
}

/// Below this exponent `exp_f64` is exactly 0 (and so is the GPU kernels' `exp_flushed`, which
/// receive it as `EXP_MIN`, `gpu::score::KERNEL_CONSTANTS`).
pub const EXP_F64_ZERO_BELOW: f64 = -708.0;

branch_free_exp! {
    /// e^x in f64 to within a few units in the last place, and exactly 0 for x below −708 (where
    /// e^x leaves f64's normal range: numpy and PyTorch give subnormals down to −745, then 0).
    /// Scoring's revisions use it; the GPU kernels follow the same rule (`exp_flushed` in
    /// `kernels/score.cu`), so both paths give 0, and ties, for the same values (contract §1).
    fn exp_f64(f64 as u64, i64);
    shift: 6755399441055744.0, log2_e: std::f64::consts::LOG2_E,
    ln2: (6.931_471_803_691_238e-1, 1.908_214_929_270_587_7e-10),
    range: (EXP_F64_ZERO_BELOW, 709.0), below: zero, exponent: (bias 1023, shift 52),
    series: exp_series_f64
}

branch_free_exp! {
    /// e^x in f32 to within about 2 units in the last place, and e^−87 for any x below −87. The
    /// model's softmax and quick_gelu use it, and scoring's f32 bounds, which rely on a value
    /// there that is positive (`score::kernels::dual_softmax_bounds`).
    fn exp_f32(f32 as u32, i32);
    shift: 12_582_912.0, log2_e: std::f32::consts::LOG2_E,
    ln2: (0.693_359_4, -2.121_944_4e-4),
    range: (-87.0, 88.0), below: clamp, exponent: (bias 127, shift 23),
    series: exp_series_f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fold_in_lanes_takes_the_documented_order_and_sums_accurately() {
        // The order written out (a sum of squares): lane sums by index mod 16, then halves folded
        // onto the front, the terms squared once each.
        for len in [0, 1, 5, 15, 16, 17, 50, 77, 768, 3073] {
            let values: Vec<f32> = (0..len).map(|i| ((i * 7919 % 1000) as f32 - 499.5) * 1.37e-3).collect();
            let mut lanes = [0f32; 16];
            for (i, &v) in values.iter().enumerate() {
                lanes[i % 16] += v * v;
            }
            let [a, b, c, d, e, f, g, h, i, j, k, l, m, n, o, p] = lanes;
            let halves = [a + i, b + j, c + k, d + l, e + m, f + n, g + o, h + p];
            let quarters = [halves[0] + halves[4], halves[1] + halves[5], halves[2] + halves[6], halves[3] + halves[7]];
            let want = (quarters[0] + quarters[2]) + (quarters[1] + quarters[3]);
            let sum = fold_in_lanes(&values, 0.0, |v| v * v, |a, b| a + b);
            assert_eq!(sum.to_bits(), want.to_bits(), "{len} values");
            let exact: f64 = values.iter().map(|&v| v as f64 * v as f64).sum();
            assert!((sum as f64 - exact).abs() <= 1e-6 * exact.max(1e-30), "{len} values");
            let max = fold_in_lanes(&values, f32::NEG_INFINITY, |v| v, f32::max);
            assert_eq!(max, values.iter().copied().fold(f32::NEG_INFINITY, f32::max), "{len} values");
        }
    }

    #[test]
    fn exp_f64_is_accurate_over_the_range_used() {
        let mut worst = 0f64;
        let mut x: f64 = -745.0;
        while x < 700.0 {
            let want = x.exp();
            if want > 1e-300 {
                worst = worst.max(((exp_f64(x) - want) / want).abs());
            }
            x += 0.0137;
        }
        assert!(worst < 1e-15, "relative error {worst}");
        assert_eq!(exp_f64(0.0), 1.0);
        assert!(exp_f64(-708.0) > 0.0 && exp_f64(-708.0).is_normal());
        assert_eq!((exp_f64(-708.0001), exp_f64(-1e9)), (0.0, 0.0));
    }

    #[test]
    fn exp_f32_is_accurate_over_the_range_used() {
        let mut worst = 0f64;
        for i in -8700..=8800 {
            let x = i as f32 * 0.01;
            let exact = (x as f64).exp();
            worst = worst.max(((exp_f32(x) as f64) - exact).abs() / exact);
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        assert_eq!(exp_f32(0.0), 1.0);
    }
}
