//! The f16 path: the texts and videos as f16 on the tensor cores, each tile of the matrix
//! consumed where it is computed (column statistics, row statistics, revision, top-k, ranks) and
//! never stored, so device memory grows only with N + M.

use super::super::{GpuError, launch};
use super::{COLUMN_KERNEL_BLOCKS, DeviceRun, FUSED_COLUMNS, FUSED_DEPTH, FUSED_ROWS, zeros};
use crate::score::{Outcome, StripLayout};

impl DeviceRun<'_> {
    /// The f16 path: tiles computed on the tensor cores in every pass and never stored.
    pub(super) fn fused(&self) -> Result<Outcome, GpuError> {
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
        if self.options.revision.needs().column_stats {
            self.merge_column_stats(&part_max, &part_sum, parts, &mut stats)?;
        }
        if self.options.revision.needs().row_stats {
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

/// Row blocks for the fused path: at most `FUSED_ROWS` rows each, whole caption groups, so one
/// block sees every caption of its videos. Returns each block's first position, then the end.
fn fused_blocks(layout: &StripLayout) -> Result<Vec<i32>, GpuError> {
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
