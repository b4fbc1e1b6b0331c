//! The transformer layer's operations, fused on the CPU in f32: a dense layer with its bias and
//! what follows it (quick_gelu, or the residual add), multi-head attention read straight from
//! the packed q|k|v rows, and the layer norm.
//!
//! Built from candle's separate ops, one encoder layer allocates and sweeps its activations a
//! dozen times (bias add, three passes for quick_gelu, head transposes and copies back, the
//! residual add) and runs the per-head attention products as hundreds of tiny multi-threaded
//! matrix products. Here each dense layer is one matrix product that accumulates onto its bias
//! (and residual) with the activation applied in one pass after it, and attention runs one task
//! per (image, head) on strided views, writing each head's output where the next layer reads it.
//! The layer norm and attention's softmax reduce each row in sixteen lanes in a fixed order
//! ([`crate::simd::fold_in_lanes`]), which vectorises where one running sum cannot.
//! None of them depends on the batch (contract §6): the dense product runs as calls of whole row
//! blocks ([`crate::matmul::accumulate_in_row_blocks`]), attention's products, whose shapes
//! follow the batch's longest caption, are FMA chains ([`crate::matmul::fma_chain`]), and the
//! reductions see one row each. They are candle custom ops, so the towers keep one code path:
//! on other devices and dtypes the same functions fall back to candle's ops. Under
//! `--dtype bf16` on AVX-512 BF16 the model stays f32 and a dense layer's weight is packed as
//! bf16 ([`Dense::pack_weight_bf16`]), its product taken by
//! [`crate::matmul::bf16::accumulate`] in the same fused op.

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Storage, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use crate::matmul::bf16::PackedBf16;
use crate::matmul::{Strided, fma_chain};
use crate::simd::{exp_f32, fold_in_lanes, with_wide_vectors};

/// What a [`Dense`] layer does after `x · Wᵀ + b`.
pub enum Epilogue<'a> {
    None,
    /// `h · sigmoid(1.702 h)`, CLIP's activation.
    QuickGelu,
    /// Adds this tensor, of the output's shape (the residual stream).
    Residual(&'a Tensor),
}

/// A linear layer with bias (a layer without one has a bias of zeros: `x·W + 0` is `x·W` to the
/// bit, so every product of the towers takes this path). The weight is kept transposed,
/// [in, out], as the product reads it: measured alone, `gemm` ran the fc2 shape
/// (1600 × 3072 → 768) 9 % faster this way than on the stored [out, in] read column-wise, and
/// the other shapes about the same.
pub struct Dense {
    weight: Weight,
    bias: Tensor,
}

/// A dense layer's weight, [in, out]: a tensor of the model's dtype, or rounded to bf16 and
/// packed for the AVX-512 BF16 products (`--dtype bf16` where the CPU has them).
enum Weight {
    Tensor(Tensor),
    PackedBf16(PackedBf16),
}

impl Dense {
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        Dense::with_names(vb, in_dim, out_dim, "weight", "bias")
    }

    /// A layer whose weight and bias are stored under other names (`nn.MultiheadAttention`'s
    /// `in_proj_weight` and `in_proj_bias`).
    pub fn with_names(vb: VarBuilder, in_dim: usize, out_dim: usize, weight: &str, bias: &str) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), weight)?;
        Ok(Dense { weight: Weight::Tensor(weight.t()?.contiguous()?), bias: vb.get(out_dim, bias)? })
    }

    /// A layer without bias, from its weight already transposed to [in, out].
    pub fn without_bias(weight_t: Tensor) -> Result<Self> {
        let out_dim = weight_t.dim(1)?;
        let bias = Tensor::zeros(out_dim, weight_t.dtype(), weight_t.device())?;
        Ok(Dense { weight: Weight::Tensor(weight_t), bias })
    }

    /// Several layers over the same input as one (their outputs side by side).
    pub fn concat(parts: &[Dense]) -> Result<Self> {
        let weights = parts.iter().map(Dense::weight_tensor).collect::<Result<Vec<_>>>()?;
        let biases: Vec<&Tensor> = parts.iter().map(|d| &d.bias).collect();
        Ok(Dense { weight: Weight::Tensor(Tensor::cat(&weights, 1)?), bias: Tensor::cat(&biases, 0)? })
    }

    /// Rounds the weight to bf16 and packs it for [`crate::matmul::bf16::accumulate`], which
    /// the layer's products use from then on; the f32 weight is dropped. For a model built in
    /// f32 on the CPU, on the `--dtype bf16` path of CPUs with AVX-512 BF16.
    pub fn pack_weight_bf16(&mut self) -> Result<()> {
        if let Weight::Tensor(weight_t) = &self.weight {
            let dims = weight_t.dims2()?;
            let packed = with_f32_slice(weight_t, |values| Ok(PackedBf16::pack(values, dims)))?;
            self.weight = Weight::PackedBf16(packed);
        }
        Ok(())
    }

    fn weight_tensor(&self) -> Result<&Tensor> {
        match &self.weight {
            Weight::Tensor(t) => Ok(t),
            Weight::PackedBf16(_) => candle_core::bail!("dense layer: the weight is already packed as bf16"),
        }
    }

    /// `x`: [.., in] → [.., out].
    pub fn forward(&self, x: &Tensor, epilogue: Epilogue) -> Result<Tensor> {
        let fused = match &self.weight {
            Weight::Tensor(weight_t) => on_cpu_f32(&[x, weight_t, &self.bias]),
            Weight::PackedBf16(_) => on_cpu_f32(&[x, &self.bias]),
        };
        if fused && residual_is_cpu_f32(&epilogue) {
            let x = x.contiguous()?;
            return x.apply_op1_no_bwd(&FusedDense { weight: &self.weight, bias: &self.bias, epilogue });
        }
        let h = x.broadcast_matmul(self.weight_tensor()?)?.broadcast_add(&self.bias)?;
        match epilogue {
            Epilogue::None => Ok(h),
            Epilogue::QuickGelu => &h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?,
            Epilogue::Residual(r) => r + h,
        }
    }
}

/// A layer norm over the last dimension with its weight and bias, as `nn.LayerNorm`:
/// `(x − mean) / √(var + ε) · w + b`. On the CPU in f32 the variance is taken about the mean
/// (two passes over the row: the one-pass `E[x²] − mean²` loses digits on the residual stream's
/// rows, whose mean can be large beside their spread); elsewhere candle's `layer_norm` computes
/// it, in one pass.
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

/// The layer norm stored under `vb` as `weight` and `bias` of `size` values.
pub fn layer_norm(size: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
    Ok(LayerNorm {
        weight: vb.get_with_hints(size, "weight", candle_nn::Init::Const(1.0))?,
        bias: vb.get_with_hints(size, "bias", candle_nn::Init::Const(0.0))?,
        eps,
    })
}

impl LayerNorm {
    /// `x`: [.., size] → the same shape, each row normalised.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        if on_cpu_f32(&[&x, &self.weight, &self.bias]) {
            return x.apply_op1_no_bwd(&FusedLayerNorm { norm: self });
        }
        candle_nn::ops::layer_norm(&x, &self.weight, &self.bias, self.eps as f32)
    }
}

struct FusedLayerNorm<'a> {
    norm: &'a LayerNorm,
}

impl CustomOp1 for FusedLayerNorm<'_> {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = input_f32(storage, layout)?;
        let size = self.norm.weight.dims1()?;
        if size == 0 || layout.dims().last() != Some(&size) {
            candle_core::bail!("a layer norm of {size} values given an input of shape {:?}", layout.dims());
        }
        let eps = self.norm.eps as f32;
        // Every value is written below, in parallel (as in `FusedDense`).
        let mut dst: Vec<f32> = Vec::with_capacity(x.len());
        let spare = &mut dst.spare_capacity_mut()[..x.len()];
        with_f32_slice(&self.norm.weight, |weight| {
            with_f32_slice(&self.norm.bias, |bias| {
                if weight.len() != size || bias.len() != size {
                    candle_core::bail!("layer norm: {} weights and {} biases for {size}", weight.len(), bias.len());
                }
                spare.par_chunks_mut(size * ROWS_PER_TASK).zip(x.par_chunks(size * ROWS_PER_TASK)).for_each(
                    |(d, x)| {
                        with_wide_vectors(|| {
                            for (d_row, x_row) in d.chunks_mut(size).zip(x.chunks(size)) {
                                let mean = fold_in_lanes(x_row, 0.0, |v| v, |a, b| a + b) / size as f32;
                                let squares = fold_in_lanes(x_row, 0.0, |v| (v - mean) * (v - mean), |a, b| a + b);
                                let inverse_std = 1.0 / (squares / size as f32 + eps).sqrt();
                                for (((d, &v), &w), &b) in d_row.iter_mut().zip(x_row).zip(weight).zip(bias) {
                                    d.write((v - mean) * inverse_std * w + b);
                                }
                            }
                        })
                    },
                );
                Ok(())
            })
        })?;
        // SAFETY: the loop above wrote every value: `x` and `spare` have the same length and are
        // cut alike, into whole rows of `size`, and each row's loop runs over all `size` values
        // (the weight and the bias hold `size` each, checked above).
        unsafe { dst.set_len(x.len()) };
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }
}

fn on_cpu_f32(tensors: &[&Tensor]) -> bool {
    tensors.iter().all(|t| t.dtype() == DType::F32 && matches!(t.device(), Device::Cpu))
}

fn residual_is_cpu_f32(epilogue: &Epilogue) -> bool {
    match epilogue {
        Epilogue::Residual(r) => on_cpu_f32(&[r]) && r.is_contiguous(),
        _ => true,
    }
}

/// Scaled dot-product attention over packed projections: `qkv` is [batch, tokens, 3 · width]
/// with each row `q | k | v` and each of those `heads` slices of `width / heads`; the result is
/// [batch, queries, width] with the heads side by side again, for the first `queries` tokens
/// as queries (all `tokens` for a whole layer; fewer where only those rows are read after
/// it). `causal` keeps each token from attending to later ones (the text tower).
pub fn attention(qkv: &Tensor, heads: usize, causal: bool, queries: usize) -> Result<Tensor> {
    let (batch, tokens, packed) = qkv.dims3()?;
    let width = packed / 3;
    if packed != 3 * width || width % heads != 0 {
        candle_core::bail!("attention: {packed} packed features do not split into q, k, v of {heads} heads");
    }
    if queries == 0 || queries > tokens {
        candle_core::bail!("attention: {queries} queries among {tokens} tokens");
    }
    let head_dim = width / heads;
    let scale = (head_dim as f64).powf(-0.5);
    if on_cpu_f32(&[qkv]) {
        let qkv = qkv.contiguous()?;
        return qkv.apply_op1_no_bwd(&FusedAttention { heads, causal, queries, scale: scale as f32 });
    }
    let split = |i: usize, rows: usize| -> Result<Tensor> {
        qkv.narrow(1, 0, rows)?
            .narrow(2, i * width, width)?
            .reshape((batch, rows, heads, head_dim))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (q, k, v) = ((split(0, queries)? * scale)?, split(1, tokens)?, split(2, tokens)?);
    let mut scores = q.matmul(&k.t()?)?;
    if causal {
        scores = scores.broadcast_add(&causal_mask(queries, tokens, scores.dtype(), qkv.device())?)?;
    }
    let weights = candle_nn::ops::softmax_last_dim(&scores)?;
    weights.matmul(&v)?.transpose(1, 2)?.reshape((batch, queries, width))
}

fn causal_mask(queries: usize, tokens: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let values: Vec<f32> =
        (0..queries).flat_map(|i| (0..tokens).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Tensor::from_vec(values, (queries, tokens), device)?.to_dtype(dtype)
}

struct FusedDense<'a> {
    weight: &'a Weight,
    bias: &'a Tensor,
    epilogue: Epilogue<'a>,
}

/// The f32 values of a CPU tensor, which must be contiguous.
fn with_f32_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => f(input_f32(cpu, layout)?),
        _ => candle_core::bail!("fused op: expected a CPU tensor"),
    }
}

fn input_f32<'s>(storage: &'s CpuStorage, layout: &Layout) -> Result<&'s [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(values), Some((start, end))) => Ok(&values[start..end]),
        _ => candle_core::bail!("fused op: expected a contiguous f32 input"),
    }
}

/// Rows handed to one rayon task in the element-wise passes: big enough to amortise the task,
/// small enough that both cores get work on a single image's activations.
const ROWS_PER_TASK: usize = 16;

impl CustomOp1 for FusedDense<'_> {
    fn name(&self) -> &'static str {
        "fused-dense"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = input_f32(storage, layout)?;
        let (in_dim, out_dim) = match self.weight {
            Weight::Tensor(weight_t) => weight_t.dims2()?,
            Weight::PackedBf16(packed) => packed.dims(),
        };
        let dims = layout.dims();
        if dims.last() != Some(&in_dim) {
            candle_core::bail!("fused-dense: input {dims:?} does not end in {in_dim}");
        }
        let rows = x.len() / in_dim;
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("checked above") = out_dim;
        // Every value is written below, in parallel: zeroing the buffer first would be one
        // more pass over it, on one thread while the others wait.
        let mut dst: Vec<f32> = Vec::with_capacity(rows * out_dim);
        let spare = &mut dst.spare_capacity_mut()[..rows * out_dim];
        with_f32_slice(self.bias, |bias| {
            if bias.len() != out_dim {
                candle_core::bail!("fused-dense: a bias of {} values for {out_dim} outputs", bias.len());
            }
            // The product accumulates onto what `dst` holds: the bias, or residual + bias.
            match &self.epilogue {
                Epilogue::Residual(r) => with_f32_slice(r, |residual| {
                    if residual.len() != spare.len() {
                        candle_core::bail!(
                            "fused-dense: residual of {} values for {} outputs",
                            residual.len(),
                            spare.len()
                        );
                    }
                    spare
                        .par_chunks_mut(out_dim * ROWS_PER_TASK)
                        .zip(residual.par_chunks(out_dim * ROWS_PER_TASK))
                        .for_each(|(d, r)| {
                            for (d_row, r_row) in d.chunks_mut(out_dim).zip(r.chunks(out_dim)) {
                                for ((d, &r), &b) in d_row.iter_mut().zip(r_row).zip(bias) {
                                    d.write(r + b);
                                }
                            }
                        });
                    Ok(())
                }),
                _ => {
                    spare.par_chunks_mut(out_dim * ROWS_PER_TASK).for_each(|d| {
                        for d_row in d.chunks_mut(out_dim) {
                            for (d, &b) in d_row.iter_mut().zip(bias) {
                                d.write(b);
                            }
                        }
                    });
                    Ok(())
                }
            }
        })?;
        // SAFETY: both branches above wrote every one of the `rows * out_dim` values (the bias
        // has `out_dim` values and the residual `rows * out_dim`, checked there).
        unsafe { dst.set_len(rows * out_dim) };
        match self.weight {
            Weight::Tensor(weight_t) => with_f32_slice(weight_t, |weight_t| {
                crate::matmul::accumulate_in_row_blocks(x, weight_t, (in_dim, out_dim), &mut dst);
                Ok(())
            })?,
            Weight::PackedBf16(packed) => crate::matmul::bf16::accumulate(x, packed, &mut dst),
        }
        if let Epilogue::QuickGelu = self.epilogue {
            dst.par_chunks_mut(out_dim * ROWS_PER_TASK)
                .for_each(|chunk| with_wide_vectors(|| quick_gelu_in_place(chunk)));
        }
        Ok((CpuStorage::F32(dst), Shape::from(out_dims)))
    }
}

#[inline(always)]
fn quick_gelu_in_place(values: &mut [f32]) {
    for h in values {
        *h /= 1.0 + exp_f32(-1.702 * *h);
    }
}

struct FusedAttention {
    heads: usize,
    causal: bool,
    /// The first this many tokens are the queries.
    queries: usize,
    scale: f32,
}

/// Lets rayon tasks write disjoint parts of one output buffer.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: every task writes only its own (image, head) block of rows × head_dim values.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl CustomOp1 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let qkv = input_f32(storage, layout)?;
        let (batch, tokens, packed) = layout.shape().dims3()?;
        let width = packed / 3;
        let head_dim = width / self.heads;
        let queries = self.queries;
        let mut out = vec![0f32; batch * queries * width];
        let shared = SharedOut(out.as_mut_ptr());
        (0..batch * self.heads).into_par_iter().for_each_init(
            || vec![0f32; queries * tokens],
            |scores, task| {
                let (image, head) = (task / self.heads, task % self.heads);
                let base = image * tokens * packed + head * head_dim;
                let (q, k, v) = (&qkv[base..], &qkv[base + width..], &qkv[base + 2 * width..]);
                // Bound whole: a closure that named only `shared.0` would capture the bare pointer.
                let out_block = shared;
                // SAFETY: q is a [queries, head_dim] view and k, v are [tokens, head_dim] views,
                // with row stride `packed`, inside `qkv`; `scores` is [queries, tokens]; this
                // task's output block, [queries, head_dim] with row stride `width`, is written by
                // no other task.
                unsafe {
                    fma_chain::product(
                        (queries, tokens, head_dim),
                        Strided::rows(scores.as_mut_ptr(), tokens),
                        Strided::rows(q.as_ptr(), packed),
                        Strided::transposed(k.as_ptr(), packed),
                        self.scale,
                    );
                }
                with_wide_vectors(|| softmax_rows(scores, tokens, self.causal));
                // SAFETY: as above; the weights in `scores` times `v` land in this task's block.
                unsafe {
                    fma_chain::product(
                        (queries, head_dim, tokens),
                        Strided::rows(out_block.0.add(image * queries * width + head * head_dim), width),
                        Strided::rows(scores.as_ptr(), tokens),
                        Strided::rows(v.as_ptr(), packed),
                        1.0,
                    );
                }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((batch, queries, width))))
    }
}

/// Softmax of each row of a [queries, tokens] score block in place; with `causal`, row i keeps
/// columns 0..=i and the rest become zero weights.
#[inline(always)]
fn softmax_rows(scores: &mut [f32], tokens: usize, causal: bool) {
    for (i, row) in scores.chunks_mut(tokens).enumerate() {
        let seen = if causal { i + 1 } else { tokens };
        let (kept, masked) = row.split_at_mut(seen);
        masked.fill(0.0);
        let max = fold_in_lanes(kept, f32::NEG_INFINITY, |s| s, f32::max);
        for s in kept.iter_mut() {
            *s = exp_f32(*s - max);
        }
        let inverse = 1.0 / fold_in_lanes(kept, 0.0, |s| s, |a, b| a + b);
        for s in kept.iter_mut() {
            *s *= inverse;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut state = seed;
        let values: Vec<f32> = (0..n)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    fn plain_dense(d: &Dense, x: &Tensor) -> Tensor {
        x.broadcast_matmul(d.weight_tensor().unwrap()).unwrap().broadcast_add(&d.bias).unwrap()
    }

    #[test]
    fn fused_dense_equals_the_plain_ops_for_every_epilogue() {
        let dense = Dense { weight: Weight::Tensor(random(&[40, 48], 1)), bias: random(&[48], 2) };
        let x = random(&[3, 37, 40], 3);
        let residual = random(&[3, 37, 48], 4);
        let plain = plain_dense(&dense, &x);
        assert!(max_abs_diff(&dense.forward(&x, Epilogue::None).unwrap(), &plain) < 1e-5);
        let gelu = (&plain * candle_nn::ops::sigmoid(&(&plain * 1.702).unwrap()).unwrap()).unwrap();
        assert!(max_abs_diff(&dense.forward(&x, Epilogue::QuickGelu).unwrap(), &gelu) < 1e-5);
        let added = (&residual + &plain).unwrap();
        assert!(max_abs_diff(&dense.forward(&x, Epilogue::Residual(&residual)).unwrap(), &added) < 1e-5);
    }

    #[test]
    fn fused_attention_equals_the_plain_ops_with_and_without_the_causal_mask() {
        let qkv = random(&[3, 11, 3 * 32], 5);
        let qkv_f64 = qkv.to_dtype(DType::F64).unwrap();
        for causal in [false, true] {
            let fused = attention(&qkv, 4, causal, 11).unwrap();
            // The plain path, taken by running in f64.
            let plain = attention(&qkv_f64, 4, causal, 11).unwrap().to_dtype(DType::F32).unwrap();
            assert_eq!(fused.dims(), &[3, 11, 32]);
            assert!(max_abs_diff(&fused, &plain) < 1e-5, "causal {causal}");
            // The first queries alone are the first rows of the whole, on both paths.
            for queries in [1, 4] {
                let first = attention(&qkv, 4, causal, queries).unwrap();
                let first_plain = attention(&qkv_f64, 4, causal, queries).unwrap().to_dtype(DType::F32).unwrap();
                let whole_first = fused.narrow(1, 0, queries).unwrap();
                assert_eq!(first.dims(), &[3, queries, 32]);
                assert!(max_abs_diff(&first, &whole_first) < 1e-6, "causal {causal}, {queries} queries");
                assert!(max_abs_diff(&first_plain, &whole_first) < 1e-5, "causal {causal}, {queries} queries");
            }
        }
        assert!(attention(&qkv, 4, false, 0).is_err());
        assert!(attention(&qkv, 4, false, 12).is_err());
    }

    #[test]
    fn the_layer_norm_matches_the_f64_formula_even_far_from_zero() {
        // Rows of 77, 512 and 768 values (a remainder past the lanes, the text width, the image
        // width), some centred and some at 300 with a spread of 1: there `E[x²] − mean²` in f32
        // keeps about two digits of the variance.
        for (size, offset) in [(77, 0.0), (512, 0.0), (768, 0.0), (768, 300.0)] {
            let x = (random(&[2, 19, size], 11) + offset).unwrap();
            let norm = LayerNorm { weight: random(&[size], 12), bias: random(&[size], 13), eps: 1e-5 };
            let ours = norm.forward(&x).unwrap();
            let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
            let mean = f64s(&x).mean_keepdim(2).unwrap();
            let centred = f64s(&x).broadcast_sub(&mean).unwrap();
            let var = centred.sqr().unwrap().mean_keepdim(2).unwrap();
            let exact = centred
                .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
                .unwrap()
                .broadcast_mul(&f64s(&norm.weight))
                .unwrap()
                .broadcast_add(&f64s(&norm.bias))
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            assert_eq!(ours.dims(), x.dims());
            let worst = max_abs_diff(&ours, &exact);
            assert!(worst < 2e-5 * (1.0 + offset as f32 / 10.0), "{size} values at {offset}: off by {worst}");
            // A row alone gives the same bits as inside the batch.
            let alone = norm.forward(&x.narrow(1, 7, 1).unwrap()).unwrap();
            assert_eq!(max_abs_diff(&alone, &ours.narrow(1, 7, 1).unwrap()), 0.0);
        }
    }

    #[test]
    fn a_layer_norm_refuses_an_input_or_a_bias_of_another_width() {
        let norm = LayerNorm { weight: random(&[8], 14), bias: random(&[8], 15), eps: 1e-5 };
        assert!(norm.forward(&random(&[3, 8], 16)).is_ok());
        assert!(norm.forward(&random(&[3, 9], 16)).is_err());
        let short_bias = LayerNorm { weight: random(&[8], 14), bias: random(&[7], 15), eps: 1e-5 };
        assert!(short_bias.forward(&random(&[3, 8], 16)).is_err());
    }

    #[test]
    fn concatenated_layers_give_the_parts_side_by_side() {
        let parts = [
            Dense { weight: Weight::Tensor(random(&[6, 8], 6)), bias: random(&[8], 7) },
            Dense { weight: Weight::Tensor(random(&[6, 8], 8)), bias: random(&[8], 9) },
        ];
        let x = random(&[5, 6], 10);
        let joined = Dense::concat(&parts).unwrap().forward(&x, Epilogue::None).unwrap();
        let expected = Tensor::cat(&[plain_dense(&parts[0], &x), plain_dense(&parts[1], &x)], 1).unwrap();
        assert!(max_abs_diff(&joined, &expected) < 1e-5);
    }
}
