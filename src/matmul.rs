//! The f32 matrix products the CPU model layers and the score strips call.
//!
//! Two products, for two needs. The towers' dense layers want speed with one guarantee, that a
//! frame's bits do not depend on its batch: [`accumulate_in_row_blocks`] cuts them into calls
//! of whole row blocks, so no row meets a tail or small-matrix kernel. With the `openblas`
//! feature (on by default) each call is OpenBLAS's `sgemm`, linked statically from the system's
//! library: on this project's reference machine (2-core Zen 3, AVX2 + FMA) it multiplies the
//! tower's shapes 20–30 % faster than the `gemm` crate that candle uses, which does them
//! otherwise. Scoring (and attention) wants products with the same bits on every CPU, in any
//! strip, and on the GPU: [`fma_chain`] computes each element as a single FMA chain. OpenBLAS
//! runs on the calling thread only (its own pool is set to one thread once); spreading products
//! over cores is done with rayon, so the process has one pool working and no core is
//! oversubscribed. [`choose_blas_kernels`] corrects OpenBLAS's choice of kernels on CPUs newer
//! than the library.

pub mod bf16;
pub mod fma_chain;

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

/// What multiplies the towers' f32 dense layers here: OpenBLAS with the kernels it runs, or the
/// `gemm` crate (the build without OpenBLAS). For `info --cpu`.
pub fn f32_products() -> String {
    #[cfg(feature = "openblas")]
    {
        format!("OpenBLAS, {} kernels", blas::kernels_in_use())
    }
    #[cfg(not(feature = "openblas"))]
    {
        "the gemm crate (this build has no OpenBLAS)".to_string()
    }
}

/// The CPU's vector features that choose the products' kernels, as the CPU reports them (not
/// turned off by `VTR_INDEX_CPU_WITHOUT`, which changes the choice only).
pub fn vector_features() -> Vec<&'static str> {
    let mut features = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        for (name, present) in [
            ("AVX2", has!("avx2")),
            ("FMA", has!("fma")),
            ("F16C", has!("f16c")),
            ("AVX-512F", has!("avx512f")),
            ("AVX-512 BF16", has!("avx512bf16")),
        ] {
            if present {
                features.push(name);
            }
        }
    }
    if features.is_empty() {
        features.push("none of AVX2, FMA, F16C, AVX-512F, AVX-512 BF16");
    }
    features
}

/// The CPU's model name, from `/proc/cpuinfo` (Linux).
pub fn cpu_model_name() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("model name"))?;
    Some(line.split_once(':')?.1.trim().to_string())
}

/// A matrix in memory for [`fma_chain::product`]: its first element and the distances, in elements,
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

/// `dst[m × n] += x[m × k] · w[k × n]`, all row-major, on the calling thread, by the fastest
/// product there is (OpenBLAS where linked, else the `gemm` crate). Its kernels take different
/// paths, which round differently, for the tail rows of a call and for small calls
/// ([`accumulate_in_row_blocks`] avoids both).
fn add_product(x: &[f32], w: &[f32], (k, n): (usize, usize), dst: &mut [f32]) {
    let m = x.len() / k;
    assert!(x.len() == m * k && w.len() == k * n && dst.len() == m * n, "not an {m} × {k} · {k} × {n} product");
    if m == 0 {
        return;
    }
    #[cfg(feature = "openblas")]
    if [m, n, k].iter().all(|&v| v <= i32::MAX as usize) {
        blas::add_product((m, n, k), x, w, dst);
        return;
    }
    // SAFETY: the three slices are m × k, k × n and m × n, row-major (checked above), and `dst`,
    // borrowed mutably, overlaps neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            true,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            1,
            n as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// The row count every product of [`accumulate_in_row_blocks`] is a multiple of: a multiple of
/// the rows the BLAS microkernels take at a time (4, 8 or 16), so no call has a tail of rows;
/// small, so that a batch's rows split evenly over the threads (64 cost the ViT-B/32 tower 3 %
/// at batches of 32 on 2 cores, 25 blocks falling 13 and 12).
pub const ROW_BLOCK: usize = 32;

/// The least `m · n · k` of a call of [`accumulate_in_row_blocks`]: above the sizes where BLAS
/// takes small-matrix kernels (OpenBLAS's SkylakeX small `sgemm`: `m · n · k` ≤ 10⁶).
const LEAST_PRODUCT: usize = 1 << 20;

/// `dst[rows × n] += x[rows × k] · w[k × n]`, row-major, with `dst` holding the starting values
/// (a bias, or a residual plus bias): the towers' dense layers, over rayon's pool.
///
/// A frame's embedding must not depend on which frames share its batch, how many there are, or
/// how many threads run (contract §6). A BLAS product rounds a row by the path its call takes:
/// tail kernels for the last rows when the row count is not a multiple of the kernel's height,
/// small-matrix kernels below a size (the `gemm` crate: below 128 rows). Its inner blocking
/// follows `k` alone, and full tiles all run the same kernel. So each task's rows are cut at
/// [`ROW_BLOCK`]s: its whole blocks are one call if they make one big enough (at least
/// [`LEAST_PRODUCT`] multiply-adds, and 128 rows without OpenBLAS), and the rest is one call
/// padded with zero rows up to whole blocks and that size. A row's bits then depend on its own
/// values alone; `a_row_has_the_same_bits_in_any_batch_and_on_any_thread_count` holds it, with
/// and without OpenBLAS, on the machine that runs the tests. Calls of one fixed shape would not
/// rely on the kernels at all, but each call packs the whole weight matrix again: 64-row calls
/// cost the ViT-B/32 tower 20 % (`benchmarks/RESULTS.md`).
pub fn accumulate_in_row_blocks(x: &[f32], w: &[f32], (k, n): (usize, usize), dst: &mut [f32]) {
    assert!(k > 0 && n > 0, "a {k} × {n} product");
    assert_eq!(w.len(), k * n, "the matrix is not {k} × {n}");
    assert!(x.len().is_multiple_of(k) && dst.len() == x.len() / k * n, "{} inputs and {} outputs", x.len(), dst.len());
    use rayon::prelude::*;
    let least_rows = ROW_BLOCK * LEAST_PRODUCT.div_ceil(ROW_BLOCK * n * k).max(1);
    // The `gemm` crate takes other paths below 128 rows (rows of a 64-row and a 128-row call
    // differ at k = 768), so without OpenBLAS a call has at least 128.
    let least_rows = if cfg!(feature = "openblas") { least_rows } else { least_rows.max(4 * ROW_BLOCK) };
    let blocks = (x.len() / k).div_ceil(ROW_BLOCK);
    let task_rows = blocks.div_ceil(rayon::current_num_threads().max(1)).max(1) * ROW_BLOCK;
    dst.par_chunks_mut(task_rows * n).zip(x.par_chunks(task_rows * k)).for_each(|(dst, x)| {
        let rows = x.len() / k;
        let whole_rows = rows / ROW_BLOCK * ROW_BLOCK;
        // Whole blocks as one call where they make one big enough; the rest (the last, partial
        // block, or all of a task too small) as one call padded with zero rows.
        let direct_rows = if whole_rows >= least_rows { whole_rows } else { 0 };
        let (x_direct, x_rest) = x.split_at(direct_rows * k);
        let (dst_direct, dst_rest) = dst.split_at_mut(direct_rows * n);
        if direct_rows > 0 {
            add_product(x_direct, w, (k, n), dst_direct);
        }
        if !x_rest.is_empty() {
            let padded_rows = (x_rest.len() / k).next_multiple_of(ROW_BLOCK).max(least_rows);
            let mut padded_x = vec![0f32; padded_rows * k];
            padded_x[..x_rest.len()].copy_from_slice(x_rest);
            let mut padded_dst = vec![0f32; padded_rows * n];
            padded_dst[..dst_rest.len()].copy_from_slice(dst_rest);
            add_product(&padded_x, w, (k, n), &mut padded_dst);
            dst_rest.copy_from_slice(&padded_dst[..dst_rest.len()]);
        }
    });
}

#[cfg(feature = "openblas")]
mod blas {
    use cblas_sys::{CBLAS_LAYOUT, CBLAS_TRANSPOSE, cblas_sgemm};
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
        if kernels_in_use().to_lowercase() != "prescott" {
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

    /// The name of the kernels OpenBLAS runs (`Haswell`, `SkylakeX`, …).
    pub(super) fn kernels_in_use() -> String {
        // SAFETY: returns a pointer to a static, NUL-terminated name.
        unsafe { std::ffi::CStr::from_ptr(openblas_get_corename()) }.to_string_lossy().into_owned()
    }

    /// `dst[m × n] += x[m × k] · w[k × n]`, row-major, each dimension within a C `int`.
    pub(super) fn add_product((m, n, k): (usize, usize, usize), x: &[f32], w: &[f32], dst: &mut [f32]) {
        assert!(x.len() == m * k && w.len() == k * n && dst.len() == m * n);
        static ONE_THREAD: Once = Once::new();
        // SAFETY: sets an integer inside OpenBLAS; called once, before any product.
        ONE_THREAD.call_once(|| unsafe { openblas_set_num_threads(1) });
        let (m, n, k) = (m as i32, n as i32, k as i32);
        // SAFETY: the slices are m × k, k × n and m × n, row-major with rows k, n and n apart
        // (checked above; the caller checked that each dimension fits), and `dst`, borrowed
        // mutably, overlaps neither input.
        unsafe {
            cblas_sgemm(
                CBLAS_LAYOUT::CblasRowMajor,
                CBLAS_TRANSPOSE::CblasNoTrans,
                CBLAS_TRANSPOSE::CblasNoTrans,
                m,
                n,
                k,
                1.0,
                x.as_ptr(),
                k,
                w.as_ptr(),
                n,
                1.0,
                dst.as_mut_ptr(),
                n,
            );
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
    fn the_product_adds_the_matrix_product() {
        let (m, n, k) = (97, 33, 70);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 53 % 89) as f32 - 44.0) / 44.0).collect();
        let want = reference(m, n, k, |i, l| a[i * k + l], |l, j| b[l * n + j]);
        let mut dst = vec![1.0f32; m * n];
        add_product(&a, &b, (k, n), &mut dst);
        for (i, (&got, &want)) in dst.iter().zip(&want).enumerate() {
            let expected = want + 1.0;
            assert!((got as f64 - expected).abs() < 1e-4, "element {i}: {got} vs {expected}");
        }
    }

    /// A row's bits in [`accumulate_in_row_blocks`] are the same whatever rows share its call,
    /// however many there are and however many threads run (the towers' batch invariance).
    #[test]
    fn a_row_has_the_same_bits_in_any_batch_and_on_any_thread_count() {
        // The shapes of a ViT-B's fc2 (3072 → 768) made smaller, and an odd one.
        for (k, n) in [(384, 96), (77, 45), (768, 40)] {
            let w: Vec<f32> = (0..k * n).map(|i| ((i * 104_729 % 997) as f32 - 498.0) / 4980.0).collect();
            let rows = 1000;
            let x: Vec<f32> = (0..rows * k).map(|i| ((i * 7919 % 1009) as f32 - 504.0) / 504.0).collect();
            let start: Vec<f32> = (0..rows * n).map(|i| (i % 13) as f32 / 13.0).collect();
            let product = |first: usize, count: usize, threads: usize| {
                let mut out = start[first * n..(first + count) * n].to_vec();
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                pool.install(|| accumulate_in_row_blocks(&x[first * k..(first + count) * k], &w, (k, n), &mut out));
                out
            };
            let whole = product(0, rows, 2);
            let want = reference(rows, n, k, |i, l| x[i * k + l], |l, j| w[l * n + j]);
            for (i, (got, want)) in whole.iter().zip(&want).enumerate() {
                let expected = want + start[i] as f64;
                assert!((*got as f64 - expected).abs() < 1e-3, "element {i}: {got} vs {expected}");
            }
            for (first, count) in [
                (0, 1),
                (3, 7),
                (1, 64),
                (64, 64),
                (5, 130),
                (0, rows),
                (rows - 1, 1),
                (7, 300),
                (256, 512),
                (100, 700),
            ] {
                for threads in [1, 2] {
                    let part = product(first, count, threads);
                    let differing =
                        part.iter().zip(&whole[first * n..]).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
                    assert_eq!(differing, 0, "{k} → {n}: rows {first}..{} on {threads} threads", first + count);
                }
            }
        }
    }
}
