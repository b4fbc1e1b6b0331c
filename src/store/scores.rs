//! What scoring reads from an index (video and text embeddings, only the columns it needs)
//! and the score table it writes (`topk.parquet`: `text_id`, `rank`, `video_id`, `score`).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, Float64Array, RecordBatch, StringArray, UInt32Array, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::ArrowWriter;

use super::shard::for_each_batch;
use super::tables::{FrameRow, TableRows, embedding_values, string_column, u64_column};
use super::{ShardInfo, StoreError, io_error};

/// Embeddings of one table, row-major, in manifest order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Embeddings {
    pub values: Vec<f32>,
    pub dim: usize,
}

/// How far an embedding's L2 norm may be from 1 when scoring reads it (contract §4, §6): f32
/// normalisation leaves ~1e-7 · √D; a vector off by more was not normalised, or was damaged.
pub const UNIT_NORM_TOLERANCE: f64 = 1e-3;

/// Why a row is not the unit vector every embedding must be.
#[derive(Debug, Clone, PartialEq)]
pub enum NotUnit {
    /// A NaN or an infinity, at this position.
    NonFinite { position: usize, value: f32 },
    /// A finite vector whose norm is this far from 1.
    Norm(f64),
}

impl std::fmt::Display for NotUnit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotUnit::NonFinite { position, value } => write!(f, "holds {value} at position {position}"),
            NotUnit::Norm(norm) => {
                write!(f, "has norm {norm:.6}, not 1 within {UNIT_NORM_TOLERANCE} (an L2-normalised vector)")
            }
        }
    }
}

impl NotUnit {
    /// Why the vector of these values is not a unit vector, if it is not.
    pub fn of(values: impl IntoIterator<Item = f32>) -> Option<NotUnit> {
        let mut squares = 0.0f64;
        for (position, value) in values.into_iter().enumerate() {
            if !value.is_finite() {
                return Some(NotUnit::NonFinite { position, value });
            }
            squares += f64::from(value) * f64::from(value);
        }
        let norm = squares.sqrt();
        ((norm - 1.0).abs() > UNIT_NORM_TOLERANCE).then_some(NotUnit::Norm(norm))
    }
}

impl Embeddings {
    /// The first row that is not a unit vector, and why: scoring would rank a NaN row first
    /// (nothing is greater than NaN) and spread it into every column's sums.
    pub fn first_not_unit(&self) -> Option<(usize, NotUnit)> {
        let mut rows = self.values.chunks_exact(self.dim.max(1)).enumerate();
        rows.find_map(|(row, v)| NotUnit::of(v.iter().copied()).map(|why| (row, why)))
    }

    fn append(&mut self, values: Vec<f32>, dim: usize) -> Result<(), String> {
        if self.values.is_empty() {
            self.dim = dim;
        } else if dim != self.dim {
            return Err(format!("embedding width {dim} where earlier shards have {}", self.dim));
        }
        self.values.extend(values);
        Ok(())
    }
}

/// The videos table as the matrix every score and search ranks: `(ids, embeddings)` with the
/// rows sorted by `video_id`'s bytes, so a column's number is the same whatever the shards'
/// order (the column order of `--dense`'s matrices, contract §4).
pub fn read_video_embeddings(index: &Path, shards: &[ShardInfo]) -> Result<(Vec<String>, Embeddings), StoreError> {
    let mut ids = Vec::new();
    let mut embeddings = Embeddings::default();
    for shard in shards {
        for_each_batch(index, shard, |batch| {
            let column = string_column(batch, "video_id")?;
            ids.extend((0..batch.num_rows()).map(|i| column.value(i).to_string()));
            let (values, dim) = embedding_values(batch)?;
            embeddings.append(values, dim)
        })?;
    }
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by(|&a, &b| ids[a].as_bytes().cmp(ids[b].as_bytes()));
    let dim = embeddings.dim;
    let values = order.iter().flat_map(|&v| embeddings.values[v * dim..(v + 1) * dim].iter().copied()).collect();
    let ids = order.into_iter().map(|v| std::mem::take(&mut ids[v])).collect();
    Ok((ids, Embeddings { values, dim }))
}

/// The texts of a text set, for scoring: ids, optional video ids and embeddings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TextSet {
    pub text_ids: Vec<u64>,
    pub video_ids: Vec<Option<String>>,
    pub embeddings: Embeddings,
}

pub fn read_text_embeddings(index: &Path, shards: &[ShardInfo]) -> Result<TextSet, StoreError> {
    let mut set = TextSet::default();
    for shard in shards {
        for_each_batch(index, shard, |batch| {
            let ids = u64_column(batch, "text_id")?;
            let videos = string_column(batch, "video_id")?;
            set.text_ids.extend(ids.values().iter().copied());
            set.video_ids
                .extend((0..batch.num_rows()).map(|i| videos.is_valid(i).then(|| videos.value(i).to_string())));
            let (values, dim) = embedding_values(batch)?;
            set.embeddings.append(values, dim)
        })?;
    }
    Ok(set)
}

/// The frames of the videos in `wanted` (for `search`'s best-matching frame).
pub fn read_frames_of(
    index: &Path,
    shards: &[ShardInfo],
    wanted: &std::collections::HashSet<&str>,
) -> Result<Vec<FrameRow>, StoreError> {
    let mut rows = Vec::new();
    for shard in shards {
        for_each_batch(index, shard, |batch| {
            let ids = string_column(batch, "video_id")?;
            if (0..batch.num_rows()).any(|i| wanted.contains(ids.value(i))) {
                rows.extend(FrameRow::from_batch(batch)?.into_iter().filter(|r| wanted.contains(r.video_id.as_str())));
            }
            Ok(())
        })?;
    }
    Ok(rows)
}

/// One row of `topk.parquet`.
#[derive(Debug, Clone, PartialEq)]
pub struct TopKRow<'a> {
    pub text_id: u64,
    pub rank: u32,
    pub video_id: &'a str,
    pub score: f64,
}

pub fn topk_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("text_id", DataType::UInt64, false),
        Field::new("rank", DataType::UInt32, false),
        Field::new("video_id", DataType::Utf8, false),
        Field::new("score", DataType::Float64, false),
    ]))
}

/// Writes `topk.parquet` for `path` in batches, under its temporary name, synced; returns that
/// temporary path for [`super::publish`].
pub fn write_topk<'a>(path: &Path, rows: impl Iterator<Item = TopKRow<'a>>) -> Result<PathBuf, StoreError> {
    let tmp = super::temporary_path(path);
    write_topk_to(path, &tmp, rows).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    Ok(tmp)
}

fn write_topk_to<'a>(path: &Path, tmp: &Path, rows: impl Iterator<Item = TopKRow<'a>>) -> Result<(), StoreError> {
    const BATCH: usize = 64 * 1024;
    let parquet_error =
        |e: &dyn std::fmt::Display| StoreError::Parquet { path: path.to_path_buf(), message: e.to_string() };
    let file = super::create_temporary(tmp).map_err(io_error(tmp))?;
    let mut writer = ArrowWriter::try_new(file, topk_schema(), Some(super::shard::writer_properties()))
        .map_err(|e| parquet_error(&e))?;
    let mut pending: Vec<TopKRow> = Vec::with_capacity(BATCH);
    let flush = |pending: &mut Vec<TopKRow>, writer: &mut ArrowWriter<File>| -> Result<(), StoreError> {
        let batch = RecordBatch::try_new(
            topk_schema(),
            vec![
                Arc::new(UInt64Array::from_iter_values(pending.iter().map(|r| r.text_id))),
                Arc::new(UInt32Array::from_iter_values(pending.iter().map(|r| r.rank))),
                Arc::new(StringArray::from_iter_values(pending.iter().map(|r| r.video_id))),
                Arc::new(Float64Array::from_iter_values(pending.iter().map(|r| r.score))),
            ],
        )
        .map_err(|e| parquet_error(&e))?;
        writer.write(&batch).map_err(|e| parquet_error(&e))?;
        pending.clear();
        Ok(())
    };
    for row in rows {
        pending.push(row);
        if pending.len() == BATCH {
            flush(&mut pending, &mut writer)?;
        }
    }
    if !pending.is_empty() {
        flush(&mut pending, &mut writer)?;
    }
    let file = writer.into_inner().map_err(|e| parquet_error(&e))?;
    super::sync_temporary(&file).map_err(io_error(tmp))
}
