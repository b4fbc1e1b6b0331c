//! CPU feature dispatch shared by the hot loops of scoring and of the model's CPU kernels.

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
