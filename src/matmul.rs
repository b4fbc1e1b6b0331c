//! The one f32 matrix product front that the CPU model layers and the score strips call.
//!
//! With the `openblas` feature (on by default) the model's products run OpenBLAS's `sgemm`,
//! linked statically from the system's library: on this project's reference machine (2-core
//! Zen 3, AVX2 + FMA) it multiplies the tower's shapes 20–30 % faster than the `gemm` crate that
//! candle uses. OpenBLAS's bits for an element depend on the shape of the call, though, and
//! scoring needs a row's logits to be the same in any strip ([`Rounding::RowIndependent`]), so
//! its strips, and any view BLAS cannot describe or a build without the feature, go to the `gemm`
//! crate. OpenBLAS runs on the calling thread only (its own pool is set to one thread once);
//! spreading a product over cores is done here with rayon, so the process has one pool working
//! and no core is oversubscribed. [`choose_blas_kernels`] corrects OpenBLAS's choice of kernels
//! on CPUs newer than the library.

/// The OpenBLAS kernels a CPU's features allow, best first: what [`choose_blas_kernels`] asks
/// for where OpenBLAS itself fell back to its generic ones. `None` below AVX2 + FMA, where the
/// generic kernels are what there is.
pub fn blas_kernels_for(avx512_bf16: bool, avx512: bool, avx2_fma: bool) -> Option<&'static str> {
    match (avx512_bf16, avx512, avx2_fma) {
        (true, true, _) => Some("Cooperlake"),
        (_, true, _) => Some("SkylakeX"),
        (_, _, true) => Some("Haswell"),
        _ => None,
    }
}

/// Debian 12's OpenBLAS (0.3.21) chooses its kernels when the process starts, from the CPU's
/// model number, and on a CPU it does not know (Intel's Sapphire Rapids, for one) falls back to
/// its generic `Prescott` kernels: the image tower then runs 4.6 frames/s where the right ones
/// give 20.9 (`benchmarks/RESULTS.md`). Where that happened and the user set no
/// `OPENBLAS_CORETYPE`, this asks OpenBLAS to choose again with the kernels the CPU's features
/// allow, and returns their name. Call it first thing in `main`, before any other thread reads
/// the environment and before any product. A no-op without the `openblas` feature.
pub fn choose_blas_kernels() -> Option<&'static str> {
    #[cfg(all(feature = "openblas", target_arch = "x86_64"))]
    {
        blas::choose_kernels()
    }
    #[cfg(not(all(feature = "openblas", target_arch = "x86_64")))]
    {
        None
    }
}

/// A matrix in memory for [`gemm_f32`]: its first element and the distances, in elements,
/// from one row to the next and from one column to the next.
#[derive(Clone, Copy)]
pub struct Strided<P> {
    pub ptr: P,
    pub row_stride: isize,
    pub col_stride: isize,
}

impl<P> Strided<P> {
    /// Row-major with rows `row_stride` apart (a view into wider rows when it exceeds the width).
    pub fn rows(ptr: P, row_stride: usize) -> Self {
        Strided { ptr, row_stride: row_stride as isize, col_stride: 1 }
    }

    /// The transpose of a row-major matrix whose rows are `row_stride` apart.
    pub fn transposed(ptr: P, row_stride: usize) -> Self {
        Strided { ptr, row_stride: 1, col_stride: row_stride as isize }
    }
}

/// Where a product runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Threads {
    /// On the calling thread alone (the caller is already one of many parallel tasks).
    Caller,
    /// Split by rows of the result over rayon's pool.
    Pool,
}

/// Whether an element's bits may depend on the shape of the call it is computed in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rounding {
    /// The fastest product (OpenBLAS where linked), whose kernels take different paths, which
    /// round differently, for different shapes and positions in the call.
    Fastest,
    /// A row of the result has the same bits whichever other rows the call computes with it
    /// (the `gemm` crate, whose microkernel sums every element in one order, with a single row
    /// computed as two, since the crate takes another path for one row): scoring's tiled and
    /// whole runs must rank on the same logits.
    RowIndependent,
}

/// `dst[m × n] = scale · lhs[m × k] · rhs[k × n]`, added to what `dst` holds when `accumulate`.
///
/// # Safety
/// Each view must describe memory valid for its whole shape, and `dst` must not overlap the
/// inputs or be written by anyone else during the call.
// sgemm's own arguments, named, plus where and how it runs: grouping them would only rename them.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_f32(
    (m, n, k): (usize, usize, usize),
    dst: Strided<*mut f32>,
    accumulate: bool,
    lhs: Strided<*const f32>,
    rhs: Strided<*const f32>,
    scale: f32,
    threads: Threads,
    rounding: Rounding,
) {
    if m == 0 || n == 0 {
        return;
    }
    if m == 1 && rounding == Rounding::RowIndependent {
        // SAFETY: forwarded from the caller's contract.
        unsafe { one_row_as_two((n, k), dst, accumulate, lhs, rhs, scale) };
        return;
    }
    #[cfg(feature = "openblas")]
    if rounding == Rounding::Fastest
        && let Some(product) = blas::Product::describe((m, n, k), dst, lhs, rhs)
    {
        // SAFETY: forwarded from the caller's contract; `describe` checked the layout.
        unsafe { product.run(accumulate, scale, threads) };
        return;
    }
    let parallelism = match (threads, rayon::current_num_threads()) {
        (Threads::Pool, n) if n > 1 => gemm::Parallelism::Rayon(n),
        _ => gemm::Parallelism::None,
    };
    let keep = if accumulate { 1.0 } else { 0.0 };
    // SAFETY: forwarded from the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.ptr,
            dst.col_stride,
            dst.row_stride,
            accumulate,
            lhs.ptr,
            lhs.col_stride,
            lhs.row_stride,
            rhs.ptr,
            rhs.col_stride,
            rhs.row_stride,
            keep,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// A one-row product computed as two identical rows, so that it takes the path of every other
/// row count.
///
/// # Safety
/// As [`gemm_f32`] with `m = 1`.
unsafe fn one_row_as_two(
    (n, k): (usize, usize),
    dst: Strided<*mut f32>,
    accumulate: bool,
    lhs: Strided<*const f32>,
    rhs: Strided<*const f32>,
    scale: f32,
) {
    // SAFETY: the caller vouches for one row of `k` elements of `lhs` and of `n` of `dst`; `dst`
    // is read only when the product adds to it.
    let (row, out) = unsafe {
        let row: Vec<f32> = (0..k).map(|j| *lhs.ptr.offset(j as isize * lhs.col_stride)).collect();
        let out: Vec<f32> = match accumulate {
            true => (0..n).map(|j| *dst.ptr.offset(j as isize * dst.col_stride)).collect(),
            false => vec![0.0; n],
        };
        (row, out)
    };
    let twice = [row.as_slice(), row.as_slice()].concat();
    let mut both = [out.as_slice(), out.as_slice()].concat();
    // SAFETY: `twice` is 2 × k and `both` 2 × n, row-major, ours alone.
    unsafe {
        gemm_f32(
            (2, n, k),
            Strided::rows(both.as_mut_ptr(), n),
            accumulate,
            Strided::rows(twice.as_ptr(), k),
            rhs,
            scale,
            Threads::Caller,
            Rounding::RowIndependent,
        );
        for (j, value) in both[..n].iter().enumerate() {
            *dst.ptr.offset(j as isize * dst.col_stride) = *value;
        }
    }
}

#[cfg(feature = "openblas")]
mod blas {
    use super::{Strided, Threads};
    use cblas_sys::{CBLAS_LAYOUT, CBLAS_TRANSPOSE, cblas_sgemm};
    use rayon::prelude::*;
    use std::sync::Once;

    unsafe extern "C" {
        /// OpenBLAS's own (not part of CBLAS): the size of its thread pool.
        fn openblas_set_num_threads(threads: std::ffi::c_int);
        /// OpenBLAS's own: the name of the kernels it runs.
        fn openblas_get_corename() -> *const std::ffi::c_char;
        /// OpenBLAS's dynamic-architecture start-up and shutdown (exported by builds with
        /// `DYNAMIC_ARCH`, as Debian's): the choice of kernels, from `OPENBLAS_CORETYPE` if set.
        fn gotoblas_dynamic_init();
        fn gotoblas_dynamic_quit();
    }

    /// See [`super::choose_blas_kernels`].
    #[cfg(target_arch = "x86_64")]
    pub(super) fn choose_kernels() -> Option<&'static str> {
        if std::env::var_os("OPENBLAS_CORETYPE").is_some() {
            return None; // the user's choice
        }
        // SAFETY: returns a pointer to a static, NUL-terminated name.
        let current = unsafe { std::ffi::CStr::from_ptr(openblas_get_corename()) }.to_string_lossy().to_lowercase();
        if current != "prescott" {
            return None;
        }
        let wanted = super::blas_kernels_for(
            std::arch::is_x86_feature_detected!("avx512bf16"),
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512dq")
                && std::arch::is_x86_feature_detected!("avx512vl"),
            std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"),
        )?;
        // SAFETY: the caller runs this before any other thread of the program reads the
        // environment; OpenBLAS has run no product yet, so no buffer was sized for the old
        // kernels, and its own threads only wait for work.
        unsafe {
            std::env::set_var("OPENBLAS_CORETYPE", wanted);
            gotoblas_dynamic_quit();
            gotoblas_dynamic_init();
            std::env::remove_var("OPENBLAS_CORETYPE");
        }
        Some(wanted)
    }

    /// Rows of the result below which splitting over the pool costs more than it gives.
    const MIN_ROWS_PER_TASK: usize = 32;

    /// An operand as BLAS takes it: row-major, possibly transposed, with its leading dimension.
    #[derive(Clone, Copy)]
    struct Operand {
        ptr: *const f32,
        transpose: CBLAS_TRANSPOSE,
        leading: usize,
        /// Elements from one row of the logical matrix to the next.
        row_step: usize,
    }

    impl Operand {
        /// The view of a `rows × cols` matrix, if one of its strides is 1 and the other leaves
        /// room for a whole row (or column) as BLAS requires.
        fn describe(view: Strided<*const f32>, rows: usize, cols: usize) -> Option<Operand> {
            let (row, col) = (view.row_stride, view.col_stride);
            if col == 1 && (rows == 1 || row >= cols.max(1) as isize) {
                let leading = if rows == 1 { cols.max(1) } else { row as usize };
                return Some(Operand {
                    ptr: view.ptr,
                    transpose: CBLAS_TRANSPOSE::CblasNoTrans,
                    leading,
                    row_step: leading,
                });
            }
            if row == 1 && (cols == 1 || col >= rows.max(1) as isize) {
                let leading = if cols == 1 { rows.max(1) } else { col as usize };
                return Some(Operand { ptr: view.ptr, transpose: CBLAS_TRANSPOSE::CblasTrans, leading, row_step: 1 });
            }
            None
        }
    }

    /// A product whose three views BLAS can take.
    pub(super) struct Product {
        m: usize,
        n: usize,
        k: usize,
        dst: *mut f32,
        dst_leading: usize,
        lhs: Operand,
        rhs: Operand,
    }

    // SAFETY: the pointers are only read (inputs) or written in disjoint row ranges (the
    // result), per `gemm_f32`'s contract, while the call that owns them waits for every task.
    unsafe impl Sync for Product {}

    impl Product {
        pub(super) fn describe(
            (m, n, k): (usize, usize, usize),
            dst: Strided<*mut f32>,
            lhs: Strided<*const f32>,
            rhs: Strided<*const f32>,
        ) -> Option<Product> {
            let dst_leading = match (dst.col_stride, m) {
                (1, 1) => n,
                (1, _) if dst.row_stride >= n as isize => dst.row_stride as usize,
                _ => return None,
            };
            let lhs = Operand::describe(lhs, m, k)?;
            let rhs = Operand::describe(rhs, k, n)?;
            let all_fit_in_c_int =
                [m, n, k, dst_leading, lhs.leading, rhs.leading].iter().all(|&v| v <= i32::MAX as usize);
            all_fit_in_c_int.then_some(Product { m, n, k, dst: dst.ptr, dst_leading, lhs, rhs })
        }

        /// # Safety
        /// As [`super::gemm_f32`].
        pub(super) unsafe fn run(&self, accumulate: bool, scale: f32, threads: Threads) {
            static ONE_THREAD: Once = Once::new();
            // SAFETY: sets an integer inside OpenBLAS; called once, before any product.
            ONE_THREAD.call_once(|| unsafe { openblas_set_num_threads(1) });
            let tasks = match threads {
                Threads::Caller => 1,
                Threads::Pool => rayon::current_num_threads().min(self.m / MIN_ROWS_PER_TASK).max(1),
            };
            if tasks == 1 {
                // SAFETY: forwarded.
                unsafe { self.rows(0, self.m, accumulate, scale) };
                return;
            }
            let per_task = self.m.div_ceil(tasks);
            (0..tasks).into_par_iter().for_each(|task| {
                let first = task * per_task;
                let count = per_task.min(self.m - first.min(self.m));
                if count > 0 {
                    // SAFETY: each task writes its own rows of the result.
                    unsafe { self.rows(first, count, accumulate, scale) };
                }
            });
        }

        /// The product for `count` rows of the result starting at `first`.
        unsafe fn rows(&self, first: usize, count: usize, accumulate: bool, scale: f32) {
            // SAFETY: the offsets stay inside the views the caller vouched for.
            unsafe {
                cblas_sgemm(
                    CBLAS_LAYOUT::CblasRowMajor,
                    self.lhs.transpose,
                    self.rhs.transpose,
                    count as i32,
                    self.n as i32,
                    self.k as i32,
                    scale,
                    self.lhs.ptr.add(first * self.lhs.row_step),
                    self.lhs.leading as i32,
                    self.rhs.ptr,
                    self.rhs.leading as i32,
                    if accumulate { 1.0 } else { 0.0 },
                    self.dst.add(first * self.dst_leading),
                    self.dst_leading as i32,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn blas_kernels_follow_the_cpu_features() {
        use super::blas_kernels_for;
        assert_eq!(blas_kernels_for(true, true, true), Some("Cooperlake"));
        assert_eq!(blas_kernels_for(false, true, true), Some("SkylakeX"));
        assert_eq!(blas_kernels_for(false, false, true), Some("Haswell"));
        assert_eq!(blas_kernels_for(false, false, false), None);
    }

    use super::*;

    /// The product by its definition, in f64.
    fn reference(
        m: usize,
        n: usize,
        k: usize,
        a: impl Fn(usize, usize) -> f32,
        b: impl Fn(usize, usize) -> f32,
    ) -> Vec<f64> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|l| a(i, l) as f64 * b(l, j) as f64).sum();
            }
        }
        out
    }

    #[test]
    fn every_layout_and_split_is_the_matrix_product() {
        let (m, n, k) = (97, 33, 70);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 53 % 89) as f32 - 44.0) / 44.0).collect();
        // The same matrices stored transposed, to take the `transposed` views.
        let a_t: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
        let b_t: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        let want = reference(m, n, k, |i, l| a[i * k + l], |l, j| b[l * n + j]);
        let lhs_views = [Strided::rows(a.as_ptr(), k), Strided::transposed(a_t.as_ptr(), m)];
        let rhs_views = [Strided::rows(b.as_ptr(), n), Strided::transposed(b_t.as_ptr(), k)];
        for lhs in lhs_views {
            for rhs in rhs_views {
                for (threads, rounding) in [Threads::Caller, Threads::Pool]
                    .into_iter()
                    .flat_map(|t| [(t, Rounding::Fastest), (t, Rounding::RowIndependent)])
                {
                    for accumulate in [false, true] {
                        // A result view into wider rows, starting from ones when accumulating.
                        let width = n + 5;
                        let mut dst = vec![1.0f32; m * width];
                        // SAFETY: every view covers its whole shape; dst is ours alone.
                        unsafe {
                            gemm_f32(
                                (m, n, k),
                                Strided::rows(dst.as_mut_ptr(), width),
                                accumulate,
                                lhs,
                                rhs,
                                2.0,
                                threads,
                                rounding,
                            )
                        };
                        for i in 0..m {
                            for j in 0..width {
                                let got = dst[i * width + j] as f64;
                                let expected = if j >= n {
                                    1.0
                                } else {
                                    2.0 * want[i * n + j] + if accumulate { 1.0 } else { 0.0 }
                                };
                                assert!(
                                    (got - expected).abs() < 1e-4,
                                    "({i}, {j}) {got} vs {expected} ({threads:?}, {rounding:?})"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn row_independent_products_give_a_row_the_same_bits_in_any_call() {
        let (rows, cols, dim) = (300, 700, 48);
        let a: Vec<f32> = (0..rows * dim).map(|i| ((i * 7919 % 1009) as f32 - 504.0) / 504.0).collect();
        let v: Vec<f32> = (0..cols * dim).map(|i| ((i * 104729 % 997) as f32 - 498.0) / 498.0).collect();
        let product = |first: usize, count: usize| {
            let mut out = vec![0.0f32; count * cols];
            // SAFETY: the views cover rows first..first + count of `a`, all of `v`, and `out`.
            unsafe {
                gemm_f32(
                    (count, cols, dim),
                    Strided::rows(out.as_mut_ptr(), cols),
                    false,
                    Strided::rows(a[first * dim..].as_ptr(), dim),
                    Strided::transposed(v.as_ptr(), dim),
                    1.0,
                    Threads::Caller,
                    Rounding::RowIndependent,
                )
            };
            out
        };
        let whole = product(0, rows);
        for (first, count) in [(0, 64), (5, 64), (8, 61), (100, 3), (298, 2), (299, 1), (0, 1), (17, 200)] {
            let part = product(first, count);
            assert!(part == whole[first * cols..(first + count) * cols], "rows {first}..{}", first + count);
        }
    }
}
