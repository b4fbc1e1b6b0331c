//! The f32 path: each row block's cosines computed by an f32 GEMM and stored on the device,
//! the column statistics summed over fixed parts of the rows ([`ColumnParts`]) so the blocking
//! changes no bit, then each block revised in a second pass (`--dense` batches its revised rows
//! to the host). Also the stored-matrix functions the benchmark times against PyTorch.

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};

use super::super::{Gpu, GpuError, launch};
use super::{
    COLUMN_KERNEL_BLOCKS, DENSE_BATCH_BYTES, DeviceRun, Statistics, TILE, blocks_for, group_chunks, int, revision_code,
    zeros,
};
use crate::score::{Outcome, Revision, RowSink, ScoreError, StripLayout};

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

/// The f32 path's inputs on the device and the cosines of the current row block.
struct StoredMatrix {
    texts: CudaSlice<f32>,
    videos: CudaSlice<f32>,
    cosines: CudaSlice<f32>,
}

impl StoredMatrix {
    /// The cosines of the texts at `rows` (positions in the run's order) with every video.
    fn compute(&mut self, run: &DeviceRun, rows: std::ops::Range<usize>) -> Result<(), GpuError> {
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

impl DeviceRun<'_> {
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
    pub(super) fn stored(&self, sink: Option<&dyn RowSink>) -> Result<Outcome, GpuError> {
        let (gpu, stream, columns) = (self.gpu, self.stream(), self.columns);
        let block_bytes = match self.options.device_block_bytes {
            0 => self.block_budget(sink.is_some())?,
            bytes => bytes,
        };
        let blocks =
            StripLayout::with_strip_rows(self.problem.text_video, block_rows(block_bytes, columns, gpu.max_grid_rows))
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
        let needs_column_stats = self.options.revision.needs().column_stats;
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
            if self.options.revision.needs().row_stats && !rows.is_empty() {
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
        revision_code(Revision::Dsl)?,
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

/// Revises the rows of one block in batches and hands each row, T2V and V2T, to `sink`.
fn dense_rows(
    gpu: &Gpu,
    cosines: &CudaSlice<f32>,
    rows: std::ops::Range<usize>,
    columns: usize,
    stats: &Statistics,
    layout: &StripLayout,
    sink: &dyn RowSink,
) -> Result<(), GpuError> {
    let stream = &gpu.stream;
    let batch = (DENSE_BATCH_BYTES / (8 * columns.max(1))).max(1);
    let symmetric = stats.row_stats;
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
            |bytes: usize| StripLayout::with_strip_rows(&text_video, block_rows(bytes, columns, 65_535)).strips;
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
