//! Scoring on a CUDA device with the kernels of `kernels/score.cu`: the same problem, options and
//! outcome as the CPU path ([`crate::score::score`]), which is its reference.
//!
//! Texts go up in the CPU path's order (grouped by video, unmatched last) and are cut into row
//! blocks that end on group boundaries and whose cosines fit in device memory. Pass one computes
//! each block's cosines (an f32 GEMM), the column softmax statistics over parts of the rows that
//! do not depend on the blocks ([`ColumnParts`]; and, for the symmetric form, each row's), and
//! each text's own cosine; pass two revises each block, keeps each row's
//! top-k, counts T2V ranks and the caption groups that beat each video's own. A matrix that fits
//! in one block is computed once; otherwise each block is computed in both passes, and device
//! memory stays bounded by one block whatever the corpus.

use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DeviceRepr, ValidAsZeroBits};

use super::{Gpu, GpuError, launch};

use crate::score::{
    DeviceInputs, Layout, Outcome, Problem, Revision, RowSink, ScoreError, ScoreOptions, check, v2t_ranks,
};

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
/// The revision codes the kernels take (`REVISE_*`).
const REVISE_NONE: i32 = 0;
const REVISE_DSL: i32 = 1;
const REVISE_DSL_SYM: i32 = 2;

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
/// compilers as `-DNAME=VALUE` (NVRTC, `gpu::compile`; the emulated device's g++, through
/// `examples/kernel_constants.rs`): `kernels/score.cu` defines none of them.
pub const KERNEL_CONSTANTS: &[(&str, KernelConstant)] = &[
    ("THREADS", KernelConstant::Int(THREADS as i64)),
    ("TILE", KernelConstant::Int(TILE as i64)),
    ("TOPK_MAX", KernelConstant::Int(TOP_K_MAX as i64)),
    ("F_BM", KernelConstant::Int(FUSED_ROWS as i64)),
    ("F_BN", KernelConstant::Int(FUSED_COLUMNS as i64)),
    ("F_BK", KernelConstant::Int(FUSED_DEPTH as i64)),
    ("REVISE_NONE", KernelConstant::Int(REVISE_NONE as i64)),
    ("REVISE_DSL", KernelConstant::Int(REVISE_DSL as i64)),
    ("REVISE_DSL_SYM", KernelConstant::Int(REVISE_DSL_SYM as i64)),
    ("EXP_MIN", KernelConstant::Double(crate::simd::EXP_F64_ZERO_BELOW)),
];

/// The compiler options that define [`KERNEL_CONSTANTS`].
pub fn kernel_defines() -> Vec<String> {
    KERNEL_CONSTANTS
        .iter()
        .map(|(name, value)| match value {
            KernelConstant::Int(v) => format!("-D{name}={v}"),
            KernelConstant::Double(v) => format!("-D{name}={v:?}"),
        })
        .collect()
}

/// The revision code the kernels take (`REVISE_*`).
fn revision_code(revision: Revision) -> Result<i32, GpuError> {
    match revision {
        Revision::None => Ok(REVISE_NONE),
        Revision::Dsl => Ok(REVISE_DSL),
        Revision::DslSym => Ok(REVISE_DSL_SYM),
        Revision::Qbnorm => Err(GpuError::Unsupported(
            "QB-Norm is scored on the CPU only: leave out --device or give --device cpu".into(),
        )),
    }
}

fn blocks_for(items: usize) -> usize {
    items.div_ceil(THREADS as usize).max(1)
}

/// Rows of the f32 path's row blocks for blocks of `block_bytes` of cosines: at least one, at
/// most the tiles a GEMM grid has down on this device (`max_grid_rows`, 65,535 on every card
/// so far).
fn block_rows(block_bytes: usize, columns: usize, max_grid_rows: usize) -> usize {
    (block_bytes / (4 * columns.max(1))).clamp(1, max_grid_rows.max(1) * TILE)
}

/// The parts of the rows over which `column_stats_partial` sums each column: fixed ranges of
/// `rows_per_part` rows over the whole matrix, chosen from its shape and the device's grid height
/// alone (enough parts to fill a large GPU, no more than a grid has rows), so where the row
/// blocks are cut, which follows the free device memory, changes no sum: a part that a block boundary cuts is continued by the next block from its stored
/// partial, and the parts are merged in their order.
#[derive(Debug, Clone, Copy, PartialEq)]
struct ColumnParts {
    rows_per_part: usize,
    count: usize,
}

impl ColumnParts {
    fn new(rows: usize, columns: usize, max_grid_rows: usize) -> ColumnParts {
        let parts = COLUMN_KERNEL_BLOCKS.div_ceil(blocks_for(columns)).min(max_grid_rows).clamp(1, rows.max(1));
        let rows_per_part = rows.div_ceil(parts).max(1);
        ColumnParts { rows_per_part, count: rows.div_ceil(rows_per_part).max(1) }
    }

    /// The parts that the rows `block` meet, in order: the launch's grid.y, from its first.
    fn meeting(&self, block: &std::ops::Range<usize>) -> std::ops::Range<usize> {
        if block.is_empty() {
            return 0..0;
        }
        block.start / self.rows_per_part..(block.end - 1) / self.rows_per_part + 1
    }
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
    mode: i32,
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
    let layout = Layout::with_strip_rows(problem.text_video, n.max(1));
    let run = Run { gpu, problem, options, layout, n, columns, mode, top_k };
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

/// The f32 path's inputs on the device and the cosines of the current row block.
struct StoredMatrix {
    texts: CudaSlice<f32>,
    videos: CudaSlice<f32>,
    cosines: CudaSlice<f32>,
}

impl StoredMatrix {
    /// The cosines of the texts at `rows` (positions in the run's order) with every video.
    fn compute(&mut self, run: &Run, rows: std::ops::Range<usize>) -> Result<(), GpuError> {
        let texts = self.texts.slice(rows.start * run.problem.dim..rows.end * run.problem.dim);
        let mut cosines = self.cosines.slice_mut(..rows.len() * run.columns);
        launch_cosines(run.gpu, &texts, &self.videos.as_view(), &mut cosines, run.problem.dim)
    }
}

/// `cosines_f32` over `texts · videosᵀ` into `cosines`, in launches of at most the grid's height
/// of row tiles: a row block extended to the end of a caption group may hold more rows than one
/// grid covers.
fn launch_cosines(
    gpu: &Gpu,
    texts: &CudaView<f32>,
    videos: &CudaView<f32>,
    cosines: &mut CudaViewMut<f32>,
    dim: usize,
) -> Result<(), GpuError> {
    let (rows, columns) = (texts.len() / dim.max(1), videos.len() / dim.max(1));
    let (cols, dim_i) = (int(columns, "the number of videos")?, int(dim, "the embedding width")?);
    let per_launch = gpu.max_grid_rows.max(1) * TILE;
    let mut first = 0;
    while first < rows {
        let last = (first + per_launch).min(rows);
        let a = texts.slice(first * dim..last * dim);
        let mut c = cosines.slice_mut(first * columns..last * columns);
        let (grid, row_count) = ((columns.div_ceil(TILE), (last - first).div_ceil(TILE)), int(last - first, "rows")?);
        launch::cosines_f32(gpu, grid, &a, videos, &mut c, row_count, cols, dim_i)?;
        first = last;
    }
    Ok(())
}

/// One scoring problem on one device.
struct Run<'a> {
    gpu: &'a Gpu,
    problem: &'a Problem<'a>,
    options: &'a ScoreOptions,
    layout: Layout,
    n: usize,
    columns: usize,
    mode: i32,
    top_k: usize,
}

impl Run<'_> {
    fn stream(&self) -> &std::sync::Arc<CudaStream> {
        &self.gpu.stream
    }

    fn statistics(&self) -> Result<Statistics, GpuError> {
        let stream = self.stream();
        Ok(Statistics {
            mode: self.mode,
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

    /// Device memory for the f32 path's row block of cosines: three quarters of what is free once
    /// everything else the path allocates is counted (the rest left to the allocator's rounding
    /// and the driver), so a large text set takes smaller blocks instead of running out.
    fn block_budget(&self, dense: bool) -> Result<usize, GpuError> {
        let (n, m, dim, k) = (self.n, self.columns, self.problem.dim, self.top_k);
        let parts = ColumnParts::new(n, m, self.gpu.max_grid_rows);
        let dense_rows = if dense { (DENSE_BATCH_BYTES / (8 * m.max(1))).clamp(1, n.max(1)) } else { 0 };
        let others = 4 * (n + m) * dim // texts, videos
            + 4 * n // each position's video
            + 8 * 2 * (m + n) // column and row statistics
            + 8 * 2 * parts.count * m // partial column statistics
            + 4 * n + 8 * m + 2 * 4 * m // own cosines, own V2T values, group bounds
            + (8 + 4) * n * k + 4 * n + 4 * m // top-k lists, ranks, beaten counts
            + 2 * 8 * dense_rows * m; // revised rows of --dense, both directions
        let free = self.gpu.memory()?.0;
        let budget = free.saturating_sub(others) / 4 * 3;
        if budget < 4 * m {
            let mib = |bytes: usize| bytes.div_ceil(1 << 20);
            return Err(GpuError::Unsupported(format!(
                "{n} texts against {m} videos need {} MiB of device memory before their cosines, and {} MiB are \
                 free on {}: score on the CPU (leave out --device)",
                mib(others),
                mib(free),
                self.gpu.name
            )));
        }
        Ok(budget)
    }

    /// The f32 path: the matrix computed and stored in row blocks.
    fn stored(&self, sink: Option<&dyn RowSink>) -> Result<Outcome, GpuError> {
        let (gpu, stream, columns) = (self.gpu, self.stream(), self.columns);
        let block_bytes = match self.options.device_block_bytes {
            0 => self.block_budget(sink.is_some())?,
            bytes => bytes,
        };
        let blocks =
            Layout::with_strip_rows(self.problem.text_video, block_rows(block_bytes, columns, gpu.max_grid_rows))
                .strips;
        let largest_block = blocks.iter().map(|s| s.len()).max().unwrap_or(0);
        let single_block = blocks.len() == 1;
        let mut matrix = StoredMatrix {
            texts: stream.clone_htod(&self.ordered_texts(self.problem.dim, |x| x))?,
            videos: stream.clone_htod(self.problem.videos)?,
            cosines: zeros::<f32>(stream, largest_block * columns)?,
        };
        let group = self.groups()?;
        let mut stats = self.statistics()?;
        let own_cosine = self.stored_first_pass(&mut matrix, &blocks, &group, &mut stats)?;
        let own_v2t = self.own_v2t(&own_cosine, &stats)?;

        // Pass two: revise, rank, keep the top-k, count the groups that beat each video's own.
        let (cols, k, column_blocks) = (columns as i32, self.top_k as i32, blocks_for(columns));
        let mut results = self.results()?;
        for rows in &blocks {
            if !single_block {
                matrix.compute(self, rows.clone())?;
            }
            if rows.is_empty() {
                continue;
            }
            let (cosines, row0) = (&matrix.cosines, rows.start as i32);
            // One block per row; k ≤ TOPK_MAX.
            launch::t2v_apply(
                gpu,
                (rows.len(), 1),
                &cosines.as_view(),
                cols,
                row0,
                &group.as_view(),
                &own_cosine.as_view(),
                stats.mode,
                stats.scale,
                stats.inv_tau,
                &stats.col_max.as_view(),
                &stats.col_inv_sum.as_view(),
                k,
                &mut results.top_value.as_view_mut(),
                &mut results.top_column.as_view_mut(),
                &mut results.rank.as_view_mut(),
            )?;

            let most = COLUMN_KERNEL_BLOCKS.div_ceil(column_blocks).min(gpu.max_grid_rows);
            let chunks = group_chunks(&self.layout, rows.clone(), most);
            if chunks.len() > 1 {
                // chunk_start has chunks + 1 entries, on group boundaries.
                let chunk_start = stream.clone_htod(&chunks)?;
                launch::v2t_count(
                    gpu,
                    (column_blocks, chunks.len() - 1),
                    &cosines.as_view(),
                    cols,
                    row0,
                    &group.as_view(),
                    &chunk_start.as_view(),
                    stats.mode,
                    stats.scale,
                    stats.inv_tau,
                    &stats.col_max.as_view(),
                    &stats.col_inv_sum.as_view(),
                    &stats.row_max.as_view(),
                    &stats.row_inv_sum.as_view(),
                    &own_v2t.as_view(),
                    &mut results.beaten.as_view_mut(),
                )?;
                stream.synchronize()?; // chunk_start is freed at the end of this iteration
            }
            if let Some(sink) = sink {
                dense_rows(gpu, cosines, rows.clone(), columns, &stats, &self.layout, sink)?;
            }
        }
        self.outcome(results)
    }

    /// The f32 path's first pass, block by block: the column statistics (partial sums over the
    /// fixed [`ColumnParts`], merged into `stats`), the row statistics of the symmetric form, and
    /// each row's own cosine, which it returns. Leaves the last block's cosines in `matrix`.
    fn stored_first_pass(
        &self,
        matrix: &mut StoredMatrix,
        blocks: &[std::ops::Range<usize>],
        group: &CudaSlice<i32>,
        stats: &mut Statistics,
    ) -> Result<CudaSlice<f32>, GpuError> {
        let (gpu, stream, columns) = (self.gpu, self.stream(), self.columns);
        let cols = columns as i32;
        let column_blocks = blocks_for(columns);
        let parts = ColumnParts::new(self.n, columns, gpu.max_grid_rows);
        let needs_column_stats = self.mode != REVISE_NONE;
        let part_len = if needs_column_stats { parts.count * columns } else { 1 };
        let (mut part_max, mut part_sum) = (zeros::<f64>(stream, part_len)?, zeros::<f64>(stream, part_len)?);
        let mut own_cosine = zeros::<f32>(stream, self.n)?;
        let rows_per_part = int(parts.rows_per_part, "rows per part")?;
        for rows in blocks {
            matrix.compute(self, rows.clone())?;
            let (cosines, row0, row_count) = (&matrix.cosines, rows.start as i32, rows.len() as i32);
            let meeting = parts.meeting(rows);
            if needs_column_stats && !meeting.is_empty() {
                // Parts are laid out parts.count × columns.
                launch::column_stats_partial(
                    gpu,
                    (column_blocks, meeting.len()),
                    &cosines.as_view(),
                    row0,
                    row_count,
                    cols,
                    rows_per_part,
                    int(meeting.start, "a part")?,
                    stats.scale,
                    stats.inv_tau,
                    &mut part_max.as_view_mut(),
                    &mut part_sum.as_view_mut(),
                )?;
            }
            if self.options.revision == Revision::DslSym && !rows.is_empty() {
                launch::row_stats(
                    gpu,
                    (rows.len(), 1),
                    &cosines.as_view(),
                    cols,
                    row0,
                    stats.scale,
                    stats.inv_tau,
                    &mut stats.row_max.as_view_mut(),
                    &mut stats.row_inv_sum.as_view_mut(),
                )?;
            }
            launch::gather_own(
                gpu,
                (blocks_for(rows.len()), 1),
                &cosines.as_view(),
                row_count,
                cols,
                row0,
                &group.as_view(),
                &mut own_cosine.as_view_mut(),
            )?;
        }
        if needs_column_stats {
            self.merge_column_stats(&part_max, &part_sum, parts.count, stats)?;
        }
        Ok(own_cosine)
    }

    /// The f16 path: tiles computed on the tensor cores in every pass and never stored.
    fn fused(&self) -> Result<Outcome, GpuError> {
        let (gpu, stream, columns, n) = (self.gpu, self.stream(), self.columns, self.n);
        let width = self.problem.dim.div_ceil(FUSED_DEPTH) * FUSED_DEPTH;
        let to_half = |x: f32| half::f16::from_f32(x).to_bits();
        let texts = stream.clone_htod(&self.ordered_texts(width, to_half))?;
        let mut video_rows = Vec::with_capacity(columns * width);
        for row in self.problem.videos.chunks_exact(self.problem.dim) {
            video_rows.extend(row.iter().map(|&x| to_half(x)));
            video_rows.resize(video_rows.len() + width - self.problem.dim, 0u16);
        }
        let videos = stream.clone_htod(&video_rows)?;
        drop(video_rows);
        let group = self.groups()?;
        let block_start = stream.clone_htod(&fused_blocks(&self.layout)?)?;
        let row_blocks = block_start.len() - 1;
        let (rows, cols, width_i) = (n as i32, columns as i32, width as i32);
        let mut stats = self.statistics()?;
        let mut own_cosine = zeros::<f32>(stream, n)?;

        // Pass one: column statistics and own cosines, over parts of the rows.
        let column_blocks = columns.div_ceil(FUSED_COLUMNS);
        let parts =
            COLUMN_KERNEL_BLOCKS.div_ceil(column_blocks).min(gpu.max_grid_rows).clamp(1, n.div_ceil(FUSED_ROWS).max(1));
        let rows_per_part = n.div_ceil(parts).div_ceil(FUSED_ROWS) * FUSED_ROWS;
        let parts = n.div_ceil(rows_per_part).max(1);
        let (mut part_max, mut part_sum) =
            (zeros::<f64>(stream, parts * columns)?, zeros::<f64>(stream, parts * columns)?);
        launch::fused_column_stats(
            gpu,
            (column_blocks, parts),
            &texts.as_view(),
            &videos.as_view(),
            rows,
            cols,
            width_i,
            rows_per_part as i32,
            &group.as_view(),
            stats.mode,
            stats.scale,
            stats.inv_tau,
            &mut part_max.as_view_mut(),
            &mut part_sum.as_view_mut(),
            &mut own_cosine.as_view_mut(),
        )?;
        if self.mode != REVISE_NONE {
            self.merge_column_stats(&part_max, &part_sum, parts, &mut stats)?;
        }
        if self.options.revision == Revision::DslSym {
            launch::fused_row_stats(
                gpu,
                (row_blocks, 1),
                &texts.as_view(),
                &videos.as_view(),
                cols,
                width_i,
                &block_start.as_view(),
                stats.scale,
                stats.inv_tau,
                &mut stats.row_max.as_view_mut(),
                &mut stats.row_inv_sum.as_view_mut(),
            )?;
        }
        let own_v2t = self.own_v2t(&own_cosine, &stats)?;
        drop((part_max, part_sum));

        // Pass two.
        // Each block owns the top-k lists of its rows.
        let mut results = self.results()?;
        launch::fused_apply(
            gpu,
            (row_blocks, 1),
            &texts.as_view(),
            &videos.as_view(),
            cols,
            width_i,
            &block_start.as_view(),
            &group.as_view(),
            &own_cosine.as_view(),
            stats.mode,
            stats.scale,
            stats.inv_tau,
            &stats.col_max.as_view(),
            &stats.col_inv_sum.as_view(),
            &stats.row_max.as_view(),
            &stats.row_inv_sum.as_view(),
            &own_v2t.as_view(),
            self.top_k as i32,
            &mut results.top_value.as_view_mut(),
            &mut results.top_column.as_view_mut(),
            &mut results.rank.as_view_mut(),
            &mut results.beaten.as_view_mut(),
        )?;
        self.outcome(results)
    }
}

/// The cosines `texts · videosᵀ` (row-major, `dim` wide) on the device, by the f32 GEMM the
/// stored path uses: the stored-matrix benchmark's input.
pub fn cosines(gpu: &Gpu, texts: &[f32], videos: &[f32], dim: usize) -> Result<CudaSlice<f32>, GpuError> {
    let stream = &gpu.stream;
    let (rows, cols) = (texts.len() / dim, videos.len() / dim);
    let (a, b) = (stream.clone_htod(texts)?, stream.clone_htod(videos)?);
    let mut c = zeros::<f32>(stream, rows * cols)?;
    launch_cosines(gpu, &a.as_view(), &b.as_view(), &mut c.as_view_mut(), dim)?;
    stream.synchronize()?;
    Ok(c)
}

/// CAMoE's dual softmax of a stored matrix of cosines (`rows × cols`, on the device) into `out`
/// (f64, the values `--dense` writes): the column statistics pass, then the element-wise
/// revision. What the stored-matrix benchmark times against PyTorch's `S * S.softmax(0)`.
pub fn dual_softmax_stored(
    gpu: &Gpu,
    cosines: &CudaSlice<f32>,
    rows: usize,
    cols: usize,
    scale: f64,
    temperature: f64,
    out: &mut CudaSlice<f64>,
) -> Result<(), GpuError> {
    assert!(cosines.len() >= rows * cols && out.len() >= rows * cols);
    let stream = &gpu.stream;
    let (rows_i, cols_i) = (int(rows, "rows")?, int(cols, "columns")?);
    let inv_tau = 1.0 / temperature;
    let column_blocks = blocks_for(cols);
    let parts = ColumnParts::new(rows, cols, gpu.max_grid_rows);
    let rows_per_part = int(parts.rows_per_part, "rows per part")?;
    let (mut part_max, mut part_sum) =
        (zeros::<f64>(stream, parts.count * cols)?, zeros::<f64>(stream, parts.count * cols)?);
    let (mut col_max, mut col_inv_sum) = (zeros::<f64>(stream, cols)?, zeros::<f64>(stream, cols)?);
    let unused = zeros::<f64>(stream, 1)?;
    // One block holding every row meets every part.
    launch::column_stats_partial(
        gpu,
        (column_blocks, parts.count),
        &cosines.as_view(),
        0,
        rows_i,
        cols_i,
        rows_per_part,
        0,
        scale,
        inv_tau,
        &mut part_max.as_view_mut(),
        &mut part_sum.as_view_mut(),
    )?;
    launch::column_stats_merge(
        gpu,
        (column_blocks, 1),
        &part_max.as_view(),
        &part_sum.as_view(),
        parts.count as i32,
        cols_i,
        &mut col_max.as_view_mut(),
        &mut col_inv_sum.as_view_mut(),
    )?;
    // T2V (direction 0) reads no row statistics.
    launch::revise_rows(
        gpu,
        (blocks_for(rows * cols), 1),
        &cosines.as_view(),
        rows_i,
        cols_i,
        0,
        0,
        REVISE_DSL,
        scale,
        inv_tau,
        &col_max.as_view(),
        &col_inv_sum.as_view(),
        &unused.as_view(),
        &unused.as_view(),
        &mut out.as_view_mut(),
    )?;
    stream.synchronize()?;
    Ok(())
}

/// Row blocks for the fused path: at most `FUSED_ROWS` rows each, whole caption groups, so one
/// block sees every caption of its videos. Returns each block's first position, then the end.
fn fused_blocks(layout: &Layout) -> Result<Vec<i32>, GpuError> {
    let n = layout.group.len();
    let (mut starts, mut start, mut pos) = (vec![0i32], 0, 0);
    while pos < n {
        let mut end = pos + 1;
        if layout.group[pos].is_some() {
            while end < n && layout.group[end] == layout.group[pos] {
                end += 1;
            }
        }
        if end - pos > FUSED_ROWS {
            return Err(GpuError::Unsupported(format!(
                "a video has {} captions; f16 inputs on the GPU take at most {FUSED_ROWS} per video: use --gpu-inputs f32",
                end - pos
            )));
        }
        if end - start > FUSED_ROWS {
            starts.push(pos as i32);
            start = pos;
        }
        pos = end;
    }
    if n > 0 {
        starts.push(n as i32);
    }
    Ok(starts)
}

/// Row offsets within `rows` (relative to its start) cutting its matched rows into at most
/// `chunks` pieces that begin on group boundaries, followed by the end of the matched rows.
fn group_chunks(layout: &Layout, rows: std::ops::Range<usize>, chunks: usize) -> Vec<i32> {
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

/// Revises the rows of one block in batches and hands each row, T2V and V2T, to `sink`.
fn dense_rows(
    gpu: &Gpu,
    cosines: &CudaSlice<f32>,
    rows: std::ops::Range<usize>,
    columns: usize,
    stats: &Statistics,
    layout: &Layout,
    sink: &dyn RowSink,
) -> Result<(), GpuError> {
    let stream = &gpu.stream;
    let batch = (DENSE_BATCH_BYTES / (8 * columns.max(1))).max(1);
    let symmetric = stats.mode == REVISE_DSL_SYM;
    let cols = int(columns, "the number of videos")?;
    let mut t2v = zeros::<f64>(stream, batch * columns)?;
    let mut v2t = zeros::<f64>(stream, if symmetric { batch * columns } else { 1 })?;
    let mut first = rows.start;
    while first < rows.end {
        let last = (first + batch).min(rows.end);
        let block = cosines.slice((first - rows.start) * columns..(last - rows.start) * columns);
        let (count, row0) = (int(last - first, "rows")?, int(first, "a row")?);
        let directions: &[i32] = if symmetric { &[0, 1] } else { &[0] };
        for &direction in directions {
            // `out` holds at least count × cols values.
            let out = if direction == 0 { &mut t2v } else { &mut v2t };
            launch::revise_rows(
                gpu,
                (blocks_for((last - first) * columns), 1),
                &block,
                count,
                cols,
                row0,
                direction,
                stats.mode,
                stats.scale,
                stats.inv_tau,
                &stats.col_max.as_view(),
                &stats.col_inv_sum.as_view(),
                &stats.row_max.as_view(),
                &stats.row_inv_sum.as_view(),
                &mut out.as_view_mut(),
            )?;
        }
        let t2v_host = stream.clone_dtoh(&t2v.slice(..(last - first) * columns))?;
        let v2t_host = if symmetric { stream.clone_dtoh(&v2t.slice(..(last - first) * columns))? } else { Vec::new() };
        for (i, pos) in (first..last).enumerate() {
            let t2v_row = &t2v_host[i * columns..(i + 1) * columns];
            let v2t_row = if symmetric { &v2t_host[i * columns..(i + 1) * columns] } else { t2v_row };
            sink.row(layout.order[pos], t2v_row, v2t_row).map_err(ScoreError::Dense)?;
        }
        first = last;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The host-side logic of the f32 path run on the CPU: the row blocks a device would cut, the
    //! fixed parts of the column statistics, and `column_stats_partial` / `column_stats_merge`
    //! emulated operation by operation (f64, the same order), so that a change that made the
    //! column sums depend on the blocking fails here, without a device.

    use super::*;

    fn exp_flushed(x: f64) -> f64 {
        if x < -708.0 { 0.0 } else { x.exp() }
    }

    fn stats_add((max, sum): &mut (f64, f64), x: f64) {
        if x > *max {
            *sum = *sum * exp_flushed(*max - x) + 1.0;
            *max = x;
        } else {
            *sum += exp_flushed(x - *max);
        }
    }

    fn stats_merge((max, sum): &mut (f64, f64), (other_max, other_sum): (f64, f64)) {
        if other_sum == 0.0 {
            return;
        }
        if *sum == 0.0 {
            (*max, *sum) = (other_max, other_sum);
            return;
        }
        let m = max.max(other_max);
        *sum = *sum * exp_flushed(*max - m) + other_sum * exp_flushed(other_max - m);
        *max = m;
    }

    /// What the f32 path's first pass leaves as each column's (max, sum) of `x` (rows × columns,
    /// by position), launching `column_stats_partial` per block as `stored_first_pass` does.
    fn column_statistics(x: &[f64], columns: usize, blocks: &[std::ops::Range<usize>]) -> Vec<(f64, f64)> {
        let parts = ColumnParts::new(x.len() / columns, columns, 65_535);
        let mut partial = vec![(0.0, 0.0); parts.count * columns];
        for block in blocks {
            for part in parts.meeting(block) {
                let (start, end) = (part * parts.rows_per_part, (part + 1) * parts.rows_per_part);
                for col in 0..columns {
                    let at = part * columns + col;
                    let mut stats = if start < block.start { partial[at] } else { (f64::NEG_INFINITY, 0.0) };
                    for row in start.max(block.start)..end.min(block.end) {
                        stats_add(&mut stats, x[row * columns + col]);
                    }
                    partial[at] = stats;
                }
            }
        }
        (0..columns)
            .map(|col| {
                let mut stats = (f64::NEG_INFINITY, 0.0);
                for part in 0..parts.count {
                    stats_merge(&mut stats, partial[part * columns + col]);
                }
                stats
            })
            .collect()
    }

    #[test]
    fn column_statistics_do_not_depend_on_the_row_blocks() {
        let (n, columns) = (3000, 300);
        let mut state = 7u64;
        let mut next = move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 33) as f64 / (1u64 << 31) as f64
        };
        // Cosines in [−0.3, 0.7] at scale 100 and τ 1; one to five captions per video.
        let x: Vec<f64> = (0..n * columns).map(|_| 100.0 * f64::from((next() - 0.3) as f32)).collect();
        let text_video: Vec<Option<u32>> =
            (0..n).map(|t| if t % 17 == 3 { None } else { Some(((t * 7) % columns) as u32) }).collect();
        let layout_blocks =
            |bytes: usize| Layout::with_strip_rows(&text_video, block_rows(bytes, columns, 65_535)).strips;
        let whole = column_statistics(&x, columns, &layout_blocks(usize::MAX / 8));
        assert_eq!(layout_blocks(usize::MAX / 8).len(), 1);
        // Blocks of 100 rows (the device test's), of one row, and of sizes that cut parts anywhere.
        for rows in [100, 1, 7, 37, 999, 2999] {
            let blocks = layout_blocks(rows * 4 * columns);
            assert!(blocks.len() > 1, "{rows}-row blocks");
            let blocked = column_statistics(&x, columns, &blocks);
            let differing = whole.iter().zip(&blocked).filter(|(a, b)| a != b).count();
            assert_eq!(differing, 0, "{rows}-row blocks change {differing} of {columns} columns' statistics");
        }
        // And they are the column softmax statistics: the f64 sums of exp(x − max).
        for (col, &(max, sum)) in whole.iter().enumerate() {
            let column: Vec<f64> = (0..n).map(|r| x[r * columns + col]).collect();
            let want_max = column.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let want_sum: f64 = column.iter().map(|v| exp_flushed(v - want_max)).sum();
            assert_eq!(max, want_max);
            assert!(((sum - want_sum) / want_sum).abs() < 1e-12, "column {col}: {sum} vs {want_sum}");
        }
    }

    #[test]
    fn parts_are_fixed_by_the_shape_and_cover_every_row_once() {
        for (n, columns) in [(1, 1), (5, 3), (3000, 300), (100_000, 100_000), (7, 1_000_000)] {
            let parts = ColumnParts::new(n, columns, 65_535);
            assert!(parts.count * parts.rows_per_part >= n && (parts.count - 1) * parts.rows_per_part < n);
            assert_eq!(parts.meeting(&(0..n)), 0..parts.count, "one block meets every part");
            assert_eq!(parts.meeting(&(n..n)), 0..0);
        }
    }

    /// The device's `cosines_f32` adds each cosine's products one after another with FMA, from
    /// zero (`acc = fmaf(a[k], b[k], acc)` for k = 0, 1, …); the CPU's strip GEMM rounds the
    /// same way, so both paths revise the same logits and differ only in their column sums
    /// (contract §6).
    #[test]
    fn the_cpu_gemm_rounds_as_the_device_gemm() {
        let mut state = 3u64;
        let mut next = move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 33) as f64 / (1u64 << 31) as f64 - 0.5) as f32
        };
        // The widths of CLIP's embeddings (ViT-B: 512, ViT-L: 768, ViT-H: 1024) and a small one.
        for (rows, columns, dim) in [(37, 53, 48), (37, 53, 512), (9, 70, 768), (9, 70, 1024)] {
            let a: Vec<f32> = (0..rows * dim).map(|_| next()).collect();
            let b: Vec<f32> = (0..columns * dim).map(|_| next()).collect();
            let mut cpu = vec![0f32; rows * columns];
            crate::score::kernels::strip_gemm(&a, &b, dim, &mut cpu);
            for r in 0..rows {
                for c in 0..columns {
                    let device = (0..dim).fold(0f32, |acc, k| a[r * dim + k].mul_add(b[c * dim + k], acc));
                    assert_eq!(cpu[r * columns + c].to_bits(), device.to_bits(), "width {dim}: row {r}, column {c}");
                }
            }
        }
    }
}
