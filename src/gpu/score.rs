//! Scoring on a CUDA device with the kernels of `kernels/score.cu`: the same problem, options and
//! outcome as the CPU path ([`crate::score::score`]), which is its reference.
//!
//! Texts go up in the CPU path's order (grouped by video, unmatched last). Two paths share the
//! run's statistics, per-position results and outcome here: the f32 path (`stored.rs`: row
//! blocks of stored cosines, bounded by the free device memory) and the f16 path (`fused.rs`:
//! tensor-core tiles consumed where they are computed). Pass one gathers the column softmax
//! statistics (and, for the symmetric form, each row's) and each text's own cosine; pass two
//! revises, keeps each row's top-k, counts T2V ranks and the caption groups that beat each
//! video's own.

mod fused;
mod stored;

use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};

use super::{Gpu, GpuError, launch};

pub use stored::{cosines, dual_softmax_stored};

use crate::score::{DeviceInputs, Outcome, Problem, Revision, RowSink, ScoreOptions, StripLayout, check, v2t_ranks};

/// Threads per block in every kernel (`THREADS` in the source).
pub(super) const THREADS: u32 = 256;
/// Rows and columns of one GEMM tile (`TILE`).
const TILE: usize = 64;
/// The most top-k entries a row keeps on the device (`TOPK_MAX`).
pub const TOP_K_MAX: usize = 32;
/// Rows and columns of one tile of the fused path (`F_BM`, `F_BN`), and the multiple its
/// embedding width is padded to (`F_BK`).
const FUSED_ROWS: usize = 64;
const FUSED_COLUMNS: usize = 128;
const FUSED_DEPTH: usize = 32;

/// Thread blocks worth launching at once for the column kernels: enough to fill a large GPU.
const COLUMN_KERNEL_BLOCKS: usize = 1024;
/// Device memory for the revised rows of `--dense`, per batch.
const DENSE_BATCH_BYTES: usize = 256 << 20;

/// A constant the kernels are compiled with.
#[derive(Debug, Clone, Copy)]
pub enum KernelConstant {
    Int(i64),
    Double(f64),
}

/// Every constant the kernels share with this file, defined here once and handed to the kernel
/// compilers as `-DNAME=VALUE` by [`kernel_defines`] (NVRTC, `gpu::compile`; the emulated
/// device's g++, through `examples/kernel_constants.rs`) with the revision codes, which are each
/// revision's [`Needs::kernel_code`](crate::score::Needs): `kernels/score.cu` defines none.
pub const KERNEL_CONSTANTS: &[(&str, KernelConstant)] = &[
    ("THREADS", KernelConstant::Int(THREADS as i64)),
    ("TILE", KernelConstant::Int(TILE as i64)),
    ("TOPK_MAX", KernelConstant::Int(TOP_K_MAX as i64)),
    ("F_BM", KernelConstant::Int(FUSED_ROWS as i64)),
    ("F_BN", KernelConstant::Int(FUSED_COLUMNS as i64)),
    ("F_BK", KernelConstant::Int(FUSED_DEPTH as i64)),
    ("EXP_MIN", KernelConstant::Double(crate::simd::EXP_F64_ZERO_BELOW)),
];

/// The compiler options that define [`KERNEL_CONSTANTS`], and `REVISE_<NAME>` for each revision
/// the kernels implement (`REVISE_DSL_SYM` for `dsl-sym`).
pub fn kernel_defines() -> Vec<String> {
    let constants = KERNEL_CONSTANTS.iter().map(|(name, value)| match value {
        KernelConstant::Int(v) => format!("-D{name}={v}"),
        KernelConstant::Double(v) => format!("-D{name}={v:?}"),
    });
    let revisions = Revision::ALL.into_iter().filter_map(|revision| {
        let code = revision.needs().kernel_code?;
        Some(format!("-DREVISE_{}={code}", revision.name().to_uppercase().replace('-', "_")))
    });
    constants.chain(revisions).collect()
}

/// The revision code the kernels take (`REVISE_*`), or why the device cannot score it.
fn revision_code(revision: Revision) -> Result<i32, GpuError> {
    revision.needs().kernel_code.ok_or_else(|| {
        GpuError::Unsupported(format!(
            "--revise {} is scored on the CPU only: leave out --device or give --device cpu",
            revision.name()
        ))
    })
}

fn blocks_for(items: usize) -> usize {
    items.div_ceil(THREADS as usize).max(1)
}

fn int(value: usize, what: &str) -> Result<i32, GpuError> {
    i32::try_from(value).map_err(|_| GpuError::Unsupported(format!("{what} ({value}) exceeds what the kernels index")))
}

fn zeros<T: DeviceRepr + ValidAsZeroBits>(
    stream: &std::sync::Arc<CudaStream>,
    len: usize,
) -> Result<CudaSlice<T>, GpuError> {
    Ok(stream.alloc_zeros::<T>(len.max(1))?)
}

/// What every revision kernel reads besides the cosines.
struct Statistics {
    /// The revision's kernel code, and whether V2T is revised by the rows' own statistics.
    mode: i32,
    row_stats: bool,
    scale: f64,
    inv_tau: f64,
    col_max: CudaSlice<f64>,
    col_inv_sum: CudaSlice<f64>,
    row_max: CudaSlice<f64>,
    row_inv_sum: CudaSlice<f64>,
}

/// Scores every text against every video on `gpu`. `sink` receives every revised row (`--dense`).
pub fn score(
    gpu: &Gpu,
    problem: &Problem,
    options: &ScoreOptions,
    sink: Option<&dyn RowSink>,
) -> Result<Outcome, GpuError> {
    let (n, columns, _) = check(problem, options)?;
    let mode = revision_code(options.revision)?;
    let top_k = options.top_k.min(columns);
    if top_k > TOP_K_MAX {
        return Err(GpuError::Unsupported(format!(
            "--top-k {top_k} is above the {TOP_K_MAX} the GPU keeps per row; score with --device cpu"
        )));
    }
    int(n, "the number of texts")?;
    int(columns, "the number of videos")?;
    int(problem.dim, "the embedding width")?;
    if n == 0 || columns == 0 {
        return Ok(Outcome { top: vec![Vec::new(); n], t2v_ranks: Vec::new(), v2t_ranks: Vec::new() });
    }
    // Texts in the CPU path's order; the blocks are cut by each path.
    let layout = StripLayout::with_strip_rows(problem.text_video, n.max(1));
    let run = DeviceRun { gpu, problem, options, layout, n, columns, mode, top_k };
    match (options.device_inputs, sink) {
        (DeviceInputs::F32, sink) => run.stored(sink),
        (DeviceInputs::F16, None) => {
            gpu.check_fused_path()?;
            run.fused()
        }
        (DeviceInputs::F16, Some(_)) => Err(GpuError::Unsupported(
            "--dense writes the matrix, which f16 inputs never store: use --gpu-inputs f32".into(),
        )),
    }
}

/// What pass two leaves on the device, by position.
struct Results {
    top_value: CudaSlice<f64>,
    top_column: CudaSlice<i32>,
    rank: CudaSlice<u32>,
    beaten: CudaSlice<u32>,
}

/// One scoring problem on one device.
struct DeviceRun<'a> {
    gpu: &'a Gpu,
    problem: &'a Problem<'a>,
    options: &'a ScoreOptions,
    layout: StripLayout,
    n: usize,
    columns: usize,
    mode: i32,
    top_k: usize,
}

impl DeviceRun<'_> {
    fn stream(&self) -> &std::sync::Arc<CudaStream> {
        &self.gpu.stream
    }

    fn statistics(&self) -> Result<Statistics, GpuError> {
        let stream = self.stream();
        Ok(Statistics {
            mode: self.mode,
            row_stats: self.options.revision.needs().row_stats,
            scale: self.options.scale,
            inv_tau: 1.0 / self.options.temperature,
            col_max: zeros(stream, self.columns)?,
            col_inv_sum: zeros(stream, self.columns)?,
            row_max: zeros(stream, self.n)?,
            row_inv_sum: zeros(stream, self.n)?,
        })
    }

    fn results(&self) -> Result<Results, GpuError> {
        let stream = self.stream();
        Ok(Results {
            top_value: zeros(stream, self.n * self.top_k)?,
            top_column: zeros(stream, self.n * self.top_k)?,
            rank: zeros(stream, self.n)?,
            beaten: zeros(stream, self.columns)?,
        })
    }

    /// Each position's video column, −1 for none.
    fn groups(&self) -> Result<CudaSlice<i32>, GpuError> {
        let group: Vec<i32> = self.layout.group.iter().map(|g| g.map_or(-1, |c| c as i32)).collect();
        Ok(self.stream().clone_htod(&group)?)
    }

    /// The texts' embeddings in position order, each row converted by `convert` and padded with
    /// zeros to `width`.
    fn ordered_texts<T: Copy + Default>(&self, width: usize, convert: impl Fn(f32) -> T) -> Vec<T> {
        let dim = self.problem.dim;
        let mut rows = Vec::with_capacity(self.n * width);
        for &text in &self.layout.order {
            rows.extend(self.problem.texts[text * dim..(text + 1) * dim].iter().map(|&x| convert(x)));
            rows.resize(rows.len() + width - dim, T::default());
        }
        rows
    }

    /// Merges `parts` partial column statistics (parts × columns), in their order, into `stats`.
    fn merge_column_stats(
        &self,
        part_max: &CudaSlice<f64>,
        part_sum: &CudaSlice<f64>,
        parts: usize,
        stats: &mut Statistics,
    ) -> Result<(), GpuError> {
        let (parts, cols) = (int(parts, "parts")?, self.columns as i32);
        launch::column_stats_merge(
            self.gpu,
            (blocks_for(self.columns), 1),
            &part_max.as_view(),
            &part_sum.as_view(),
            parts,
            cols,
            &mut stats.col_max.as_view_mut(),
            &mut stats.col_inv_sum.as_view_mut(),
        )
    }

    /// Each video's best own caption under V2T, from the own cosines.
    fn own_v2t(&self, own_cosine: &CudaSlice<f32>, stats: &Statistics) -> Result<CudaSlice<f64>, GpuError> {
        let (stream, layout) = (self.stream(), &self.layout);
        let (mut group_start, mut group_end) = (vec![0i32; self.columns], vec![0i32; self.columns]);
        for (pos, g) in layout.group.iter().enumerate() {
            if let Some(c) = *g {
                if layout.starts_group(pos) {
                    group_start[c as usize] = pos as i32;
                }
                group_end[c as usize] = pos as i32 + 1;
            }
        }
        let mut own_v2t = zeros::<f64>(stream, self.columns)?;
        let (starts, ends) = (stream.clone_htod(&group_start)?, stream.clone_htod(&group_end)?);
        launch::v2t_own(
            self.gpu,
            (blocks_for(self.columns), 1),
            &own_cosine.as_view(),
            &starts.as_view(),
            &ends.as_view(),
            self.columns as i32,
            stats.mode,
            stats.scale,
            stats.inv_tau,
            &stats.col_max.as_view(),
            &stats.col_inv_sum.as_view(),
            &stats.row_max.as_view(),
            &stats.row_inv_sum.as_view(),
            &mut own_v2t.as_view_mut(),
        )?;
        stream.synchronize()?; // `starts` and `ends` are freed on return
        Ok(own_v2t)
    }

    /// The outcome from the device's per-position results.
    fn outcome(&self, results: Results) -> Result<Outcome, GpuError> {
        let stream = self.stream();
        let top_value = stream.clone_dtoh(&results.top_value)?;
        let top_column = stream.clone_dtoh(&results.top_column)?;
        let rank = stream.clone_dtoh(&results.rank)?;
        let beaten = stream.clone_dtoh(&results.beaten)?;
        let top_k = self.top_k;
        let mut top = vec![Vec::new(); self.n];
        let mut t2v_ranks = Vec::new();
        for (pos, &text) in self.layout.order.iter().enumerate() {
            let entries = pos * top_k..(pos + 1) * top_k;
            top[text] = top_column[entries.clone()]
                .iter()
                .zip(&top_value[entries])
                .filter(|(c, _)| **c >= 0)
                .map(|(&c, &v)| (c as u32, v))
                .collect();
            if self.layout.group[pos].is_some() {
                t2v_ranks.push((text, rank[pos]));
            }
        }
        t2v_ranks.sort_unstable();
        Ok(Outcome { top, t2v_ranks, v2t_ranks: v2t_ranks(&self.layout.group, &beaten[..self.columns]) })
    }
}

/// Row offsets within `rows` (relative to its start) cutting its matched rows into at most
/// `chunks` pieces that begin on group boundaries, followed by the end of the matched rows.
fn group_chunks(layout: &StripLayout, rows: std::ops::Range<usize>, chunks: usize) -> Vec<i32> {
    let matched_end = rows.clone().take_while(|&p| layout.group[p].is_some()).last().map_or(rows.start, |p| p + 1);
    if matched_end == rows.start {
        return Vec::new();
    }
    let target = (matched_end - rows.start).div_ceil(chunks.max(1)).max(1);
    let mut starts = vec![0i32];
    let mut next = rows.start + target;
    for pos in rows.start + 1..matched_end {
        if pos >= next && layout.starts_group(pos) {
            starts.push((pos - rows.start) as i32);
            next = pos + target;
        }
    }
    starts.push((matched_end - rows.start) as i32);
    starts
}
