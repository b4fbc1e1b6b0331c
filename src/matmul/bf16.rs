//! The towers' dense products for `--dtype bf16` on CPUs that multiply bf16 in hardware
//! (AVX-512 BF16: AMD Zen 4 and later, Intel Cooper Lake, Sapphire Rapids and later), and the
//! choice between that path and candle's bf16 ops, which every other CPU keeps.
//!
//! On this path the model runs in f32 and only its dense layers' products take bf16 inputs:
//! the weights are rounded to bf16 once, when the model is built, and each activation row as it
//! is multiplied; `vdpbf16ps` multiplies pairs exactly and accumulates them in f32, onto the f32
//! bias (and residual) already in the output. Attention, layer norms and activations stay f32.
//! That is PyTorch's `torch.autocast("cpu", dtype=torch.bfloat16)` for its products, with f32
//! kept between the layers where autocast keeps bf16, so it is at least as close to f32.
//!
//! Each output element is one chain of `vdpbf16ps` over the input pairs in order, from the
//! value it started with (each instruction adds its pair's two products, as the CPU defines;
//! it treats subnormal bf16 inputs and f32 results as zero whatever MXCSR says): no blocking of
//! the inner dimension and no tail kernels, so a row's bits depend on its own values only,
//! whatever its batch, its place in a block, or the thread count (contract §6).

use half::bf16;
use rayon::prelude::*;

/// The environment variable that makes the choice of `--dtype bf16`'s path treat CPU features
/// as missing, to take (and test) the path a CPU without them gets: a comma-separated list of
/// feature names, of which [`FEATURES_THAT_CAN_BE_TURNED_OFF`] are known. Nothing else reads
/// it: OpenBLAS's f32 kernels are chosen from the CPU as it is.
pub const CPU_WITHOUT_VARIABLE: &str = "VTR_INDEX_CPU_WITHOUT";

/// The features [`CPU_WITHOUT_VARIABLE`] may name.
pub const FEATURES_THAT_CAN_BE_TURNED_OFF: &[&str] = &["avx512bf16"];

/// Columns of the output a kernel call computes: two vectors of 16 f32 lanes.
const PANEL_COLUMNS: usize = 32;
/// Rows of the output a kernel call computes: 8 rows × 2 vectors are 16 accumulators, which
/// with the two weight vectors and a broadcast stay in the 32 vector registers.
const KERNEL_ROWS: usize = 8;
/// About the bytes of packed activations one task keeps hot while it sweeps every weight
/// panel over them: a share of the core's L2 beside the panel being read.
const ACTIVATION_BLOCK_BYTES: usize = 256 * 1024;

/// How `--dtype bf16` multiplies on this machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Products {
    /// `vdpbf16ps` on AVX-512 BF16, f32 elsewhere in the model (this module).
    Avx512Bf16,
    /// The whole model in candle's bf16 tensors: every CPU without AVX-512 BF16.
    CandleBf16,
}

impl Bf16Products {
    /// The path this machine gets: AVX-512 BF16 where the CPU has it and
    /// [`CPU_WITHOUT_VARIABLE`] does not name it. An unknown name there is an error, so a typo
    /// cannot leave a test or a comparison on the path it meant to avoid.
    pub fn for_this_cpu() -> Result<Self, String> {
        let turned_off = features_turned_off()?;
        let has = cpu_has_avx512_bf16() && !turned_off.iter().any(|f| f == "avx512bf16");
        Ok(if has { Bf16Products::Avx512Bf16 } else { Bf16Products::CandleBf16 })
    }

    /// One line for `info --cpu`.
    pub fn describe(self) -> &'static str {
        match self {
            Bf16Products::Avx512Bf16 => {
                "AVX-512 BF16 (vdpbf16ps): bf16 inputs to the dense products, f32 accumulation, f32 elsewhere"
            }
            Bf16Products::CandleBf16 => "candle's bf16 ops for the whole model (no AVX-512 BF16 in use here)",
        }
    }
}

/// Whether the CPU itself has AVX-512 BF16 (with AVX-512F, which its registers need).
pub fn cpu_has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The names in [`CPU_WITHOUT_VARIABLE`], each one known.
pub fn features_turned_off() -> Result<Vec<String>, String> {
    parse_features_turned_off(&std::env::var_os(CPU_WITHOUT_VARIABLE).unwrap_or_default().to_string_lossy())
}

/// [`features_turned_off`] of the variable's value (empty where it is not set).
fn parse_features_turned_off(value: &str) -> Result<Vec<String>, String> {
    let names: Vec<String> =
        value.split(',').map(|name| name.trim().to_ascii_lowercase()).filter(|name| !name.is_empty()).collect();
    match names.iter().find(|name| !FEATURES_THAT_CAN_BE_TURNED_OFF.contains(&name.as_str())) {
        Some(unknown) => Err(format!(
            "{CPU_WITHOUT_VARIABLE} names {unknown:?}: the features it can turn off are {}",
            FEATURES_THAT_CAN_BE_TURNED_OFF.join(", ")
        )),
        None => Ok(names),
    }
}

/// A `k × n` weight matrix rounded to bf16 (round to nearest even) and laid out as the kernel
/// reads it: panels of [`PANEL_COLUMNS`] columns, each holding, for every pair of rows
/// `(2p, 2p + 1)`, one 32-bit word per column with row `2p` in its low half. Columns past `n`
/// and the row past an odd `k` are zeros, which add nothing.
pub struct PackedBf16 {
    k: usize,
    n: usize,
    words: Vec<u32>,
}

impl PackedBf16 {
    /// Packs `w`, row-major `k × n`.
    pub fn pack(w: &[f32], (k, n): (usize, usize)) -> Self {
        assert!(k > 0 && n > 0 && w.len() == k * n, "not a {k} × {n} matrix");
        let pairs = k.div_ceil(2);
        let panels = n.div_ceil(PANEL_COLUMNS);
        let at = |row: usize, col: usize| -> u32 {
            if row < k && col < n { u32::from(bf16::from_f32(w[row * n + col]).to_bits()) } else { 0 }
        };
        let mut words = vec![0u32; panels * pairs * PANEL_COLUMNS];
        words.par_chunks_mut(pairs * PANEL_COLUMNS).enumerate().for_each(|(panel, words)| {
            for (pair, words) in words.chunks_mut(PANEL_COLUMNS).enumerate() {
                for (c, word) in words.iter_mut().enumerate() {
                    let col = panel * PANEL_COLUMNS + c;
                    *word = at(2 * pair, col) | (at(2 * pair + 1, col) << 16);
                }
            }
        });
        PackedBf16 { k, n, words }
    }

    /// `(k, n)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.k, self.n)
    }
}

/// `dst[m × n] += bf16(x)[m × k] · w[k × n]`, row-major, accumulated in f32, over rayon's pool.
///
/// # Panics
/// Where the CPU lacks AVX-512 BF16 (the model takes this path only where
/// [`Bf16Products::for_this_cpu`] chose it), or the shapes disagree.
pub fn accumulate(x: &[f32], w: &PackedBf16, dst: &mut [f32]) {
    let (k, n) = (w.k, w.n);
    assert!(x.len().is_multiple_of(k) && dst.len() == x.len() / k * n, "{} inputs and {} outputs", x.len(), dst.len());
    assert!(cpu_has_avx512_bf16(), "bf16 products need AVX-512 BF16");
    let rows = x.len() / k;
    if rows == 0 {
        return;
    }
    let pairs = k.div_ceil(2);
    // Rows a task packs and sweeps the weights over at once: a multiple of the kernel's rows,
    // about `ACTIVATION_BLOCK_BYTES` of packed pairs, and no more than an even share.
    let block_rows = (ACTIVATION_BLOCK_BYTES / (pairs * 4)).max(KERNEL_ROWS) / KERNEL_ROWS * KERNEL_ROWS;
    let share = rows.div_ceil(rayon::current_num_threads().max(1)).next_multiple_of(KERNEL_ROWS);
    let task_rows = block_rows.min(share);
    dst.par_chunks_mut(task_rows * n).zip(x.par_chunks(task_rows * k)).for_each(|(dst, x)| {
        let mut packed = vec![0u32; task_rows.next_multiple_of(KERNEL_ROWS) * pairs];
        // SAFETY: the CPU has AVX-512F and AVX-512 BF16 (asserted above).
        unsafe {
            pack_rows(x, k, &mut packed);
            x86::sweep(&packed, x.len() / k, w, dst);
        }
    });
}

/// Rounds `x` (rows of `k`) to bf16, each row as `k.div_ceil(2)` pairs (an odd `k` padded
/// with a zero), rows back to back; `packed` has room for whole groups of [`KERNEL_ROWS`], and
/// the rows past the last stay zeros.
///
/// # Safety
/// The CPU has AVX-512F and AVX-512 BF16.
unsafe fn pack_rows(x: &[f32], k: usize, packed: &mut [u32]) {
    let pairs = k.div_ceil(2);
    for (row, out) in x.chunks(k).zip(packed.chunks_mut(pairs)) {
        // SAFETY: the caller's.
        unsafe { x86::round_row(row, out) };
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{KERNEL_ROWS, PANEL_COLUMNS, PackedBf16};
    use std::arch::x86_64::*;

    /// `row` rounded to bf16 (to nearest even) into `out`, two to a word, the first low.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn round_row(row: &[f32], out: &mut [u32]) {
        let mut values = row.chunks(16);
        let last = values.next_back().unwrap_or_default();
        for (values, words) in values.zip(out.chunks_exact_mut(8)) {
            words.copy_from_slice(&round_16(values.try_into().expect("chunks before the last hold 16")));
        }
        let mut padded = [0f32; 16];
        padded[..last.len()].copy_from_slice(last);
        let start = (row.len() - last.len()) / 2;
        let tail = last.len().div_ceil(2);
        out[start..start + tail].copy_from_slice(&round_16(&padded)[..tail]);
    }

    /// 16 values rounded to bf16 (to nearest even), two to a word, the first low.
    #[target_feature(enable = "avx512f,avx512bf16")]
    fn round_16(values: &[f32; 16]) -> [u32; 8] {
        // SAFETY: 16 values read; the 256 bits written back are plain data.
        unsafe {
            let rounded = _mm512_cvtneps_pbh(_mm512_loadu_ps(values.as_ptr()));
            std::mem::transmute::<__m256bh, [u32; 8]>(rounded)
        }
    }

    /// Every weight panel over the packed rows (`rows` of them, each `k.div_ceil(2)` words).
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn sweep(packed_rows: &[u32], rows: usize, w: &PackedBf16, dst: &mut [f32]) {
        let pairs = w.k.div_ceil(2);
        assert!(packed_rows.len() >= rows.next_multiple_of(KERNEL_ROWS) * pairs && dst.len() == rows * w.n);
        for (panel, panel_words) in w.words.chunks(pairs * PANEL_COLUMNS).enumerate() {
            let col = panel * PANEL_COLUMNS;
            let cols = (w.n - col).min(PANEL_COLUMNS);
            for (group, group_rows) in packed_rows.chunks(KERNEL_ROWS * pairs).enumerate() {
                let row = group * KERNEL_ROWS;
                if row >= rows {
                    break;
                }
                let kernel_rows = (rows - row).min(KERNEL_ROWS);
                // SAFETY: `group_rows` holds KERNEL_ROWS rows of `pairs` words and
                // `panel_words` `pairs` groups of PANEL_COLUMNS; the output block starts at
                // (row, col) of the `rows × n` output and spans `kernel_rows × cols` of it.
                unsafe {
                    kernel(
                        pairs,
                        group_rows.as_ptr(),
                        panel_words.as_ptr(),
                        dst.as_mut_ptr().add(row * w.n + col),
                        w.n,
                        kernel_rows,
                        cols,
                    )
                };
            }
        }
    }

    /// `c[rows × cols] += a · b` for one group of packed rows and one weight panel: each
    /// element one `vdpbf16ps` chain over the pairs in order. Rows and columns past `rows` and
    /// `cols` are computed from zeros and not stored.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[inline]
    unsafe fn kernel(pairs: usize, a: *const u32, b: *const u32, c: *mut f32, ldc: usize, rows: usize, cols: usize) {
        // Row r's pair p is a[r · pairs + p].
        let masks: [__mmask16; 2] = [lane_mask(cols), lane_mask(cols.saturating_sub(16))];
        let mut acc = [[_mm512_setzero_ps(); 2]; KERNEL_ROWS];
        for (r, acc) in acc.iter_mut().enumerate().take(rows) {
            for (half, acc) in acc.iter_mut().enumerate() {
                if masks[half] != 0 {
                    // SAFETY: row r < rows of the block, lanes masked to its columns (a half
                    // with no column is skipped, so the address is inside the output).
                    *acc = unsafe { _mm512_maskz_loadu_ps(masks[half], c.add(r * ldc + 16 * half)) };
                }
            }
        }
        for p in 0..pairs {
            // SAFETY: the panel holds PANEL_COLUMNS words per pair, the group KERNEL_ROWS rows.
            let (b0, b1) = unsafe {
                let b = b.add(p * PANEL_COLUMNS);
                (as_bf16_pairs(_mm512_loadu_si512(b.cast())), as_bf16_pairs(_mm512_loadu_si512(b.add(16).cast())))
            };
            for (r, acc) in acc.iter_mut().enumerate() {
                // SAFETY: as above.
                let a = as_bf16_pairs(_mm512_set1_epi32(unsafe { *a.add(r * pairs + p) } as i32));
                acc[0] = _mm512_dpbf16_ps(acc[0], a, b0);
                acc[1] = _mm512_dpbf16_ps(acc[1], a, b1);
            }
        }
        for (r, acc) in acc.iter().enumerate().take(rows) {
            for (half, &acc) in acc.iter().enumerate() {
                if masks[half] != 0 {
                    // SAFETY: as for the loads.
                    unsafe { _mm512_mask_storeu_ps(c.add(r * ldc + 16 * half), masks[half], acc) };
                }
            }
        }
    }

    fn lane_mask(lanes: usize) -> __mmask16 {
        if lanes >= 16 { 0xffff } else { ((1u32 << lanes) - 1) as __mmask16 }
    }

    #[inline(always)]
    fn as_bf16_pairs(v: __m512i) -> __m512bh {
        // SAFETY: both are 512 bits of plain data; the instruction reads each 32-bit lane as two
        // bf16 values, low half first.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    pub(super) unsafe fn round_row(_: &[f32], _: &mut [u32]) {
        unreachable!("AVX-512 BF16 exists on x86-64 only")
    }
    pub(super) unsafe fn sweep(_: &[u32], _: usize, _: &super::PackedBf16, _: &mut [f32]) {
        unreachable!("AVX-512 BF16 exists on x86-64 only")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matmul::fma_chain::tests::values as random;

    fn rounded(v: f32) -> f64 {
        f64::from(bf16::from_f32(v).to_f32())
    }

    /// Each element against the exact sum, in f64, of the bf16-rounded inputs' products onto
    /// its starting value: f32 accumulation of `k` terms may differ from it by at most
    /// `(k + 1) · 2⁻²⁴ · (|start| + Σ|a·b|)` (each product is exact in f32; each addition
    /// rounds once). Shapes with an odd `k`, columns that end inside a panel and inside a
    /// vector, and rows that end inside a kernel's group, on one and several tasks.
    #[test]
    #[cfg_attr(
        not(host_has_avx512bf16),
        ignore = "needs a CPU with AVX-512 BF16 (AMD Zen 4, Intel Cooper Lake or later)"
    )]
    fn products_equal_the_exact_sums_of_the_rounded_inputs_within_f32_accumulation() {
        for (m, k, n) in [(1, 1, 1), (3, 5, 7), (9, 33, 17), (17, 64, 32), (50, 768, 80), (803, 129, 45)] {
            let (x, w, start) = (random(m * k, 1), random(k * n, 2), random(m * n, 3));
            let packed = PackedBf16::pack(&w, (k, n));
            let mut dst = start.clone();
            accumulate(&x, &packed, &mut dst);
            for i in 0..m {
                for j in 0..n {
                    let terms: Vec<f64> = (0..k).map(|p| rounded(x[i * k + p]) * rounded(w[p * n + j])).collect();
                    let exact = f64::from(start[i * n + j]) + terms.iter().sum::<f64>();
                    let magnitude = f64::from(start[i * n + j].abs()) + terms.iter().map(|t| t.abs()).sum::<f64>();
                    let bound = (k as f64 + 1.0) * f64::from(f32::EPSILON) / 2.0 * magnitude;
                    let got = f64::from(dst[i * n + j]);
                    assert!((got - exact).abs() <= bound, "{m}×{k}×{n} at ({i}, {j}): {got} against {exact} ± {bound}");
                }
            }
        }
    }

    /// A row's bits do not depend on the rows beside it or the tasks they are cut into.
    #[test]
    #[cfg_attr(
        not(host_has_avx512bf16),
        ignore = "needs a CPU with AVX-512 BF16 (AMD Zen 4, Intel Cooper Lake or later)"
    )]
    fn a_row_has_the_same_bits_in_any_batch() {
        let (k, n) = (96, 40);
        let (x, w) = (random(300 * k, 4), random(k * n, 5));
        let packed = PackedBf16::pack(&w, (k, n));
        let mut all = vec![0.5f32; 300 * n];
        accumulate(&x, &packed, &mut all);
        for (first, count) in [(0, 1), (7, 3), (13, 250), (299, 1)] {
            let mut some = vec![0.5f32; count * n];
            accumulate(&x[first * k..(first + count) * k], &packed, &mut some);
            assert!(
                some.iter().zip(&all[first * n..]).all(|(a, b)| a.to_bits() == b.to_bits()),
                "rows {first}..{}",
                first + count
            );
        }
    }

    #[test]
    fn the_switch_reads_a_list_of_known_features_and_refuses_others() {
        assert_eq!(parse_features_turned_off(""), Ok(vec![]));
        assert_eq!(parse_features_turned_off(" AVX512BF16 ,"), Ok(vec!["avx512bf16".to_string()]));
        let error = parse_features_turned_off("avx512bf16,amx").unwrap_err();
        assert!(error.contains("\"amx\"") && error.contains(CPU_WITHOUT_VARIABLE), "{error}");
    }

    /// Packing rounds to nearest even and pairs rows `2p` (low half) and `2p + 1`.
    #[test]
    fn packing_pairs_rows_and_rounds_to_nearest_even() {
        // 1 + 2⁻⁸ is halfway between two bf16 values: even rounds it down to 1.
        let w = [1.0 + 1.0 / 256.0, 2.0, 3.0, -0.5, 5.0, 6.0];
        let packed = PackedBf16::pack(&w, (3, 2));
        assert_eq!(packed.dims(), (3, 2));
        let word = |pair: usize, col: usize| packed.words[pair * PANEL_COLUMNS + col];
        assert_eq!(word(0, 0), 0x3f80 | (0x4040 << 16)); // 1.0 and 3.0
        assert_eq!(word(0, 1), 0x4000 | (0xbf00 << 16)); // 2.0 and −0.5
        assert_eq!(word(1, 0), 0x40a0); // 5.0 and the zero past k
        assert_eq!(word(0, 2), 0); // past n
    }
}
