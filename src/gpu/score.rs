//! Scoring on a CUDA device with the kernels of `kernels/score.cu`: the same problem, options and
//! outcome as the CPU path ([`crate::score::score`]), which is its reference.
//!
//! Texts go up in the CPU path's order (grouped by video, unmatched last) and are cut into row
//! blocks that end on group boundaries and whose cosines fit in device memory. Pass one computes
//! each block's cosines (an f32 GEMM), the column softmax statistics (and, for the symmetric
//! form, each row's), and each text's own cosine; pass two revises each block, keeps each row's
//! top-k, counts T2V ranks and the caption groups that beat each video's own. A matrix that fits
//! in one block is computed once; otherwise each block is computed in both passes, and device
//! memory stays bounded by one block whatever the corpus.

use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits};

use super::{Gpu, GpuError};
use crate::score::{Layout, Outcome, Problem, Revision, RowSink, ScoreError, ScoreOptions, check, v2t_ranks};

/// Threads per block in every kernel (`THREADS` in the source).
const THREADS: u32 = 256;
/// Rows and columns of one GEMM tile (`TILE`).
const TILE: usize = 64;
/// The most top-k entries a row keeps on the device (`TOPK_MAX`).
pub const TOP_K_MAX: usize = 32;
/// Thread blocks worth launching at once for the column kernels: enough to fill a large GPU.
const COLUMN_KERNEL_BLOCKS: usize = 1024;
/// Device memory for the revised rows of `--dense`, per batch.
const DENSE_BATCH_BYTES: usize = 256 << 20;

/// The revision code the kernels take (`REVISE_*`).
fn revision_code(revision: Revision) -> Result<i32, GpuError> {
    match revision {
        Revision::None => Ok(0),
        Revision::Dsl => Ok(1),
        Revision::DslSym => Ok(2),
        Revision::Qbnorm => Err(GpuError::Unsupported(
            "QB-Norm is scored on the CPU only: leave out --device or give --device cpu".into(),
        )),
    }
}

fn launch_config(grid: (usize, usize)) -> LaunchConfig {
    LaunchConfig { grid_dim: (grid.0 as u32, grid.1 as u32, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
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
    let dim = problem.dim;
    let stream = &gpu.stream;
    let (cols, dim_i) = (int(columns, "the number of videos")?, int(dim, "the embedding width")?);
    int(n, "the number of texts")?;

    // Row blocks whose cosines take at most a quarter of the free memory, or what the caller set.
    let block_bytes = match options.device_block_bytes {
        0 => gpu.memory()?.0 / 4,
        bytes => bytes,
    };
    let block_rows = (block_bytes / (4 * columns.max(1))).max(1);
    let layout = Layout::with_strip_rows(problem.text_video, block_rows);
    let largest_block = layout.strips.iter().map(|s| s.len()).max().unwrap_or(0);
    let single_block = layout.strips.len() == 1;

    let mut ordered_texts = Vec::with_capacity(n * dim);
    for &text in &layout.order {
        ordered_texts.extend_from_slice(&problem.texts[text * dim..(text + 1) * dim]);
    }
    let texts = stream.clone_htod(&ordered_texts)?;
    drop(ordered_texts);
    let videos = stream.clone_htod(problem.videos)?;
    let group: Vec<i32> = layout.group.iter().map(|g| g.map_or(-1, |c| c as i32)).collect();
    let group_dev = stream.clone_htod(&group)?;
    let (mut group_start, mut group_end) = (vec![0i32; columns], vec![0i32; columns]);
    for (pos, g) in layout.group.iter().enumerate() {
        if let Some(c) = *g {
            if layout.starts_group(pos) {
                group_start[c as usize] = pos as i32;
            }
            group_end[c as usize] = pos as i32 + 1;
        }
    }

    let mut cosines = zeros::<f32>(stream, largest_block * columns)?;
    let mut own_cosine = zeros::<f32>(stream, n)?;
    let mut stats = Statistics {
        mode,
        scale: options.scale,
        inv_tau: 1.0 / options.temperature,
        col_max: zeros(stream, columns)?,
        col_inv_sum: zeros(stream, columns)?,
        row_max: zeros(stream, n)?,
        row_inv_sum: zeros(stream, n)?,
    };
    let column_blocks = blocks_for(columns);
    let parts_per_block: Vec<usize> =
        layout.strips.iter().map(|s| COLUMN_KERNEL_BLOCKS.div_ceil(column_blocks).clamp(1, s.len().max(1))).collect();
    let total_parts: usize = parts_per_block.iter().sum();
    let needs_column_stats = mode != 0;
    let (mut part_max, mut part_sum) = if needs_column_stats {
        (zeros::<f64>(stream, total_parts * columns)?, zeros::<f64>(stream, total_parts * columns)?)
    } else {
        (zeros::<f64>(stream, 1)?, zeros::<f64>(stream, 1)?)
    };

    let cosines_kernel = gpu.score_kernel("cosines_f32")?;
    let compute_block = |cosines: &mut CudaSlice<f32>, rows: std::ops::Range<usize>| -> Result<(), GpuError> {
        let a = texts.slice(rows.start * dim..rows.end * dim);
        let row_count = int(rows.len(), "a block's rows")?;
        let mut launch = stream.launch_builder(&cosines_kernel);
        launch.arg(&a).arg(&videos).arg(cosines).arg(&row_count).arg(&cols).arg(&dim_i);
        // SAFETY: the arguments match cosines_f32's signature; `cosines` holds rows × cols.
        unsafe { launch.launch(launch_config((columns.div_ceil(TILE), rows.len().div_ceil(TILE).max(1))))? };
        Ok(())
    };

    // Pass one: statistics and own cosines, block by block.
    let partial_kernel = gpu.score_kernel("column_stats_partial")?;
    let row_stats_kernel = gpu.score_kernel("row_stats")?;
    let gather_kernel = gpu.score_kernel("gather_own")?;
    let mut part_offset = 0;
    for (rows, &parts) in layout.strips.iter().zip(&parts_per_block) {
        compute_block(&mut cosines, rows.clone())?;
        let (row0, row_count) = (int(rows.start, "a row")?, int(rows.len(), "a block's rows")?);
        if needs_column_stats {
            let rows_per_part = int(rows.len().div_ceil(parts), "rows per part")?;
            let offset = int(part_offset, "a part")?;
            let mut launch = stream.launch_builder(&partial_kernel);
            launch.arg(&cosines).arg(&row_count).arg(&cols).arg(&rows_per_part).arg(&stats.scale).arg(&stats.inv_tau);
            launch.arg(&mut part_max).arg(&mut part_sum).arg(&offset);
            // SAFETY: matches column_stats_partial; parts are laid out total_parts × columns.
            unsafe { launch.launch(launch_config((column_blocks, parts)))? };
        }
        if options.revision == Revision::DslSym && !rows.is_empty() {
            let mut launch = stream.launch_builder(&row_stats_kernel);
            launch.arg(&cosines).arg(&cols).arg(&row0).arg(&stats.scale).arg(&stats.inv_tau);
            launch.arg(&mut stats.row_max).arg(&mut stats.row_inv_sum);
            // SAFETY: matches row_stats; one block per row of this block.
            unsafe { launch.launch(launch_config((rows.len(), 1)))? };
        }
        let mut launch = stream.launch_builder(&gather_kernel);
        launch.arg(&cosines).arg(&row_count).arg(&cols).arg(&row0).arg(&group_dev).arg(&mut own_cosine);
        // SAFETY: matches gather_own.
        unsafe { launch.launch(launch_config((blocks_for(rows.len()), 1)))? };
        part_offset += parts;
    }
    if needs_column_stats {
        let merge = gpu.score_kernel("column_stats_merge")?;
        let parts = int(total_parts, "parts")?;
        let mut launch = stream.launch_builder(&merge);
        launch.arg(&part_max).arg(&part_sum).arg(&parts).arg(&cols).arg(&mut stats.col_max).arg(&mut stats.col_inv_sum);
        // SAFETY: matches column_stats_merge.
        unsafe { launch.launch(launch_config((column_blocks, 1)))? };
    }
    drop((part_max, part_sum));
    let mut own_v2t = zeros::<f64>(stream, columns)?;
    {
        let kernel = gpu.score_kernel("v2t_own")?;
        let (starts, ends) = (stream.clone_htod(&group_start)?, stream.clone_htod(&group_end)?);
        let mut launch = stream.launch_builder(&kernel);
        launch
            .arg(&own_cosine)
            .arg(&starts)
            .arg(&ends)
            .arg(&cols)
            .arg(&stats.mode)
            .arg(&stats.scale)
            .arg(&stats.inv_tau);
        launch
            .arg(&stats.col_max)
            .arg(&stats.col_inv_sum)
            .arg(&stats.row_max)
            .arg(&stats.row_inv_sum)
            .arg(&mut own_v2t);
        // SAFETY: matches v2t_own.
        unsafe { launch.launch(launch_config((column_blocks, 1)))? };
        stream.synchronize()?;
    }

    // Pass two: revise, rank, keep the top-k, count the groups that beat each video's own.
    let apply = gpu.score_kernel("t2v_apply")?;
    let count = gpu.score_kernel("v2t_count")?;
    let k = int(top_k, "top-k")?;
    let mut top_value = zeros::<f64>(stream, n * top_k)?;
    let mut top_column = zeros::<i32>(stream, n * top_k)?;
    let mut rank = zeros::<u32>(stream, n)?;
    let mut beaten = zeros::<u32>(stream, columns)?;
    for rows in &layout.strips {
        if !single_block {
            compute_block(&mut cosines, rows.clone())?;
        }
        if rows.is_empty() {
            continue;
        }
        let row0 = int(rows.start, "a row")?;
        let mut launch = stream.launch_builder(&apply);
        launch.arg(&cosines).arg(&cols).arg(&row0).arg(&group_dev).arg(&own_cosine).arg(&stats.mode);
        launch.arg(&stats.scale).arg(&stats.inv_tau).arg(&stats.col_max).arg(&stats.col_inv_sum).arg(&k);
        launch.arg(&mut top_value).arg(&mut top_column).arg(&mut rank);
        // SAFETY: matches t2v_apply; one block per row, k ≤ TOPK_MAX.
        unsafe { launch.launch(launch_config((rows.len(), 1)))? };

        let chunks = group_chunks(&layout, rows.clone(), COLUMN_KERNEL_BLOCKS.div_ceil(column_blocks));
        if chunks.len() > 1 {
            let chunk_start = stream.clone_htod(&chunks)?;
            let mut launch = stream.launch_builder(&count);
            launch.arg(&cosines).arg(&cols).arg(&row0).arg(&group_dev).arg(&chunk_start).arg(&stats.mode);
            launch.arg(&stats.scale).arg(&stats.inv_tau).arg(&stats.col_max).arg(&stats.col_inv_sum);
            launch.arg(&stats.row_max).arg(&stats.row_inv_sum).arg(&own_v2t).arg(&mut beaten);
            // SAFETY: matches v2t_count; chunk_start has chunks + 1 entries on group boundaries.
            unsafe { launch.launch(launch_config((column_blocks, chunks.len() - 1)))? };
            stream.synchronize()?; // chunk_start is freed at the end of this iteration
        }
        if let Some(sink) = sink {
            dense_rows(gpu, &cosines, rows.clone(), columns, &stats, &layout, sink)?;
        }
    }

    let top_value = stream.clone_dtoh(&top_value)?;
    let top_column = stream.clone_dtoh(&top_column)?;
    let rank = stream.clone_dtoh(&rank)?;
    let beaten = stream.clone_dtoh(&beaten)?;
    let mut top = vec![Vec::new(); n];
    let mut t2v_ranks = Vec::new();
    for (pos, &text) in layout.order.iter().enumerate() {
        let entries = pos * top_k..(pos + 1) * top_k;
        top[text] = top_column[entries.clone()]
            .iter()
            .zip(&top_value[entries])
            .filter(|(c, _)| **c >= 0)
            .map(|(&c, &v)| (c as u32, v))
            .collect();
        if layout.group[pos].is_some() {
            t2v_ranks.push((text, rank[pos]));
        }
    }
    t2v_ranks.sort_unstable();
    Ok(Outcome { top, t2v_ranks, v2t_ranks: v2t_ranks(&layout.group, &beaten[..columns]) })
}

/// Row offsets within `rows` (relative to its start) cutting its matched rows into at most about
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
    let kernel = gpu.score_kernel("revise_rows")?;
    let batch = (DENSE_BATCH_BYTES / (8 * columns.max(1))).max(1);
    let symmetric = stats.mode == 2;
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
            let out = if direction == 0 { &mut t2v } else { &mut v2t };
            let mut launch = stream.launch_builder(&kernel);
            launch.arg(&block).arg(&count).arg(&cols).arg(&row0).arg(&direction).arg(&stats.mode);
            launch.arg(&stats.scale).arg(&stats.inv_tau).arg(&stats.col_max).arg(&stats.col_inv_sum);
            launch.arg(&stats.row_max).arg(&stats.row_inv_sum).arg(out);
            // SAFETY: matches revise_rows; `out` holds at least count × cols values.
            unsafe { launch.launch(launch_config((blocks_for((last - first) * columns), 1)))? };
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
