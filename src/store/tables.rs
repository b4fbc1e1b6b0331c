//! The Arrow schemas of the index's tables (contract §4) and the conversion of their rows to
//! and from record batches. Every embedding is an L2-normalised `FixedSizeList<Float32, D>`.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, FixedSizeListArray, Float32Array, Float64Array, Int32Array, Int64Array, ListArray,
    RecordBatch, StringArray, TimestampMicrosecondArray, UInt32Array, UInt64Array,
};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{
    DataType, Field, Float32Type, Float64Type, Int32Type, Int64Type, Schema, SchemaRef, TimeUnit, UInt32Type,
    UInt64Type,
};
use arrow::error::ArrowError;

use crate::failure::{Failure, FailureKind, Stage};

/// A row type of one table: its schema and its conversion to and from record batches.
pub trait TableRows: Sized {
    fn schema(dim: usize) -> SchemaRef;
    fn to_batch(rows: &[Self], dim: usize) -> Result<RecordBatch, ArrowError>;
    fn from_batch(batch: &RecordBatch) -> Result<Vec<Self>, String>;
}

/// Rows per shard: frames shards stay around 40 MB at D = 512.
pub const VIDEO_SHARD_ROWS: u64 = 100_000;
pub const FRAME_SHARD_ROWS: u64 = 20_000;

/// One row of `videos`.
#[derive(Debug, Clone, PartialEq)]
pub struct VideoRow {
    pub video_id: String,
    pub root: String,
    pub path: String,
    pub size_bytes: u64,
    pub mtime_ns: i64,
    pub content_hash: String,
    pub duration_s: f64,
    pub width: u32,
    pub height: u32,
    pub fps: f64,
    pub n_frames: u32,
    /// The container's stream that was indexed; null in rows indexed before format 2.
    pub stream_index: Option<u32>,
    pub embedding: Vec<f32>,
}

/// One row of `frames`.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameRow {
    pub video_id: String,
    pub frame_index: u32,
    pub pts_s: f64,
    pub embedding: Vec<f32>,
}

/// One row of `texts/NAME`.
#[derive(Debug, Clone, PartialEq)]
pub struct TextRow {
    pub text_id: u64,
    pub text: String,
    pub video_id: Option<String>,
    pub token_ids: Vec<i32>,
    pub embedding: Vec<f32>,
}

fn embedding_type(dim: usize) -> DataType {
    DataType::FixedSizeList(Arc::new(Field::new_list_field(DataType::Float32, false)), dim as i32)
}

fn utf8(name: &str) -> Field {
    Field::new(name, DataType::Utf8, false)
}

pub fn videos_schema(dim: usize) -> SchemaRef {
    Arc::new(Schema::new(vec![
        utf8("video_id"),
        utf8("root"),
        utf8("path"),
        Field::new("size_bytes", DataType::UInt64, false),
        Field::new("mtime_ns", DataType::Int64, false),
        utf8("content_hash"),
        Field::new("duration_s", DataType::Float64, false),
        Field::new("width", DataType::UInt32, false),
        Field::new("height", DataType::UInt32, false),
        Field::new("fps", DataType::Float64, false),
        Field::new("n_frames", DataType::UInt32, false),
        Field::new("stream_index", DataType::UInt32, true),
        Field::new("embedding", embedding_type(dim), false),
    ]))
}

pub fn frames_schema(dim: usize) -> SchemaRef {
    Arc::new(Schema::new(vec![
        utf8("video_id"),
        Field::new("frame_index", DataType::UInt32, false),
        Field::new("pts_s", DataType::Float64, false),
        Field::new("embedding", embedding_type(dim), false),
    ]))
}

pub fn failures_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        utf8("root"),
        utf8("path"),
        utf8("stage"),
        utf8("kind"),
        utf8("message"),
        Field::new("first_seen", DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), false),
        Field::new("attempts", DataType::UInt32, false),
        Field::new("size_bytes", DataType::UInt64, false),
        Field::new("mtime_ns", DataType::Int64, false),
    ]))
}

pub fn texts_schema(dim: usize) -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("text_id", DataType::UInt64, false),
        utf8("text"),
        Field::new("video_id", DataType::Utf8, true),
        Field::new("token_ids", DataType::List(Arc::new(Field::new_list_field(DataType::Int32, false))), false),
        Field::new("embedding", embedding_type(dim), false),
    ]))
}

fn embeddings_array<'a>(rows: impl Iterator<Item = &'a [f32]>, dim: usize) -> Result<ArrayRef, ArrowError> {
    let mut values = Vec::new();
    for e in rows {
        if e.len() != dim {
            return Err(ArrowError::InvalidArgumentError(format!(
                "embedding of width {} in a table of width {dim}",
                e.len()
            )));
        }
        values.extend_from_slice(e);
    }
    let field = Arc::new(Field::new_list_field(DataType::Float32, false));
    Ok(Arc::new(FixedSizeListArray::try_new(field, dim as i32, Arc::new(Float32Array::from(values)), None)?))
}

fn strings<'a>(values: impl Iterator<Item = &'a str>) -> ArrayRef {
    Arc::new(StringArray::from_iter_values(values))
}

pub(super) fn column<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a ArrayRef, String> {
    batch.column_by_name(name).ok_or_else(|| format!("column {name} is missing"))
}

pub(super) fn string_column<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a StringArray, String> {
    column(batch, name)?.as_string_opt::<i32>().ok_or_else(|| format!("column {name} is not utf8"))
}

macro_rules! primitive_column {
    ($fn_name:ident, $arrow_type:ty, $array:ty) => {
        pub(super) fn $fn_name<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a $array, String> {
            column(batch, name)?
                .as_primitive_opt::<$arrow_type>()
                .ok_or_else(|| format!("column {name} has type {}", column(batch, name).unwrap().data_type()))
        }
    };
}
primitive_column!(u64_column, UInt64Type, UInt64Array);
primitive_column!(u32_column, UInt32Type, UInt32Array);
primitive_column!(i64_column, Int64Type, Int64Array);
primitive_column!(f64_column, Float64Type, Float64Array);

/// The embeddings of a batch as one flat slice of `rows × dim` values, and `dim`.
pub fn embedding_values(batch: &RecordBatch) -> Result<(Vec<f32>, usize), String> {
    let list = column(batch, "embedding")?
        .as_fixed_size_list_opt()
        .ok_or_else(|| "column embedding is not a fixed-size list".to_string())?;
    let dim = list.value_length() as usize;
    let values = list
        .values()
        .as_primitive_opt::<Float32Type>()
        .ok_or_else(|| "embedding values are not float32".to_string())?;
    let start = list.offset() * dim;
    Ok((values.values()[start..start + list.len() * dim].to_vec(), dim))
}

fn split_embeddings(batch: &RecordBatch) -> Result<Vec<Vec<f32>>, String> {
    let (values, dim) = embedding_values(batch)?;
    Ok(values.chunks(dim.max(1)).map(<[f32]>::to_vec).collect())
}

impl TableRows for VideoRow {
    fn schema(dim: usize) -> SchemaRef {
        videos_schema(dim)
    }

    fn to_batch(rows: &[Self], dim: usize) -> Result<RecordBatch, ArrowError> {
        RecordBatch::try_new(
            videos_schema(dim),
            vec![
                strings(rows.iter().map(|r| r.video_id.as_str())),
                strings(rows.iter().map(|r| r.root.as_str())),
                strings(rows.iter().map(|r| r.path.as_str())),
                Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.size_bytes))),
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.mtime_ns))),
                strings(rows.iter().map(|r| r.content_hash.as_str())),
                Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.duration_s))),
                Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.width))),
                Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.height))),
                Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.fps))),
                Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.n_frames))),
                Arc::new(UInt32Array::from_iter(rows.iter().map(|r| r.stream_index))),
                embeddings_array(rows.iter().map(|r| r.embedding.as_slice()), dim)?,
            ],
        )
    }

    fn from_batch(batch: &RecordBatch) -> Result<Vec<Self>, String> {
        let (ids, roots, paths) =
            (string_column(batch, "video_id")?, string_column(batch, "root")?, string_column(batch, "path")?);
        let hashes = string_column(batch, "content_hash")?;
        let (sizes, mtimes) = (u64_column(batch, "size_bytes")?, i64_column(batch, "mtime_ns")?);
        let (durations, fps) = (f64_column(batch, "duration_s")?, f64_column(batch, "fps")?);
        let (widths, heights, frames) =
            (u32_column(batch, "width")?, u32_column(batch, "height")?, u32_column(batch, "n_frames")?);
        // Absent from shards written before format 2 (`store::upgrade` rewrites those).
        let streams = match batch.column_by_name("stream_index") {
            Some(_) => Some(u32_column(batch, "stream_index")?),
            None => None,
        };
        let embeddings = split_embeddings(batch)?;
        Ok((0..batch.num_rows())
            .zip(embeddings)
            .map(|(i, embedding)| VideoRow {
                video_id: ids.value(i).to_string(),
                root: roots.value(i).to_string(),
                path: paths.value(i).to_string(),
                size_bytes: sizes.value(i),
                mtime_ns: mtimes.value(i),
                content_hash: hashes.value(i).to_string(),
                duration_s: durations.value(i),
                width: widths.value(i),
                height: heights.value(i),
                fps: fps.value(i),
                n_frames: frames.value(i),
                stream_index: streams.filter(|s| s.is_valid(i)).map(|s| s.value(i)),
                embedding,
            })
            .collect())
    }
}

impl TableRows for FrameRow {
    fn schema(dim: usize) -> SchemaRef {
        frames_schema(dim)
    }

    fn to_batch(rows: &[Self], dim: usize) -> Result<RecordBatch, ArrowError> {
        RecordBatch::try_new(
            frames_schema(dim),
            vec![
                strings(rows.iter().map(|r| r.video_id.as_str())),
                Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.frame_index))),
                Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.pts_s))),
                embeddings_array(rows.iter().map(|r| r.embedding.as_slice()), dim)?,
            ],
        )
    }

    fn from_batch(batch: &RecordBatch) -> Result<Vec<Self>, String> {
        let ids = string_column(batch, "video_id")?;
        let (index, pts) = (u32_column(batch, "frame_index")?, f64_column(batch, "pts_s")?);
        let embeddings = split_embeddings(batch)?;
        Ok((0..batch.num_rows())
            .zip(embeddings)
            .map(|(i, embedding)| FrameRow {
                video_id: ids.value(i).to_string(),
                frame_index: index.value(i),
                pts_s: pts.value(i),
                embedding,
            })
            .collect())
    }
}

impl TableRows for Failure {
    fn schema(_dim: usize) -> SchemaRef {
        failures_schema()
    }

    fn to_batch(rows: &[Self], _dim: usize) -> Result<RecordBatch, ArrowError> {
        RecordBatch::try_new(
            failures_schema(),
            vec![
                strings(rows.iter().map(|r| r.root.as_str())),
                strings(rows.iter().map(|r| r.path.as_str())),
                strings(rows.iter().map(|r| r.stage.as_str())),
                strings(rows.iter().map(|r| r.kind.as_str())),
                strings(rows.iter().map(|r| r.message.as_str())),
                Arc::new(
                    TimestampMicrosecondArray::from_iter_values(rows.iter().map(|r| r.first_seen_us))
                        .with_timezone("UTC"),
                ),
                Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.attempts))),
                Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.size_bytes))),
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.mtime_ns))),
            ],
        )
    }

    fn from_batch(batch: &RecordBatch) -> Result<Vec<Self>, String> {
        let (roots, paths) = (string_column(batch, "root")?, string_column(batch, "path")?);
        let (stages, kinds, messages) =
            (string_column(batch, "stage")?, string_column(batch, "kind")?, string_column(batch, "message")?);
        let first_seen = column(batch, "first_seen")?
            .as_primitive_opt::<arrow::datatypes::TimestampMicrosecondType>()
            .ok_or("column first_seen is not a microsecond timestamp")?;
        let attempts = u32_column(batch, "attempts")?;
        let (sizes, mtimes) = (u64_column(batch, "size_bytes")?, i64_column(batch, "mtime_ns")?);
        (0..batch.num_rows())
            .map(|i| {
                let stage =
                    Stage::parse(stages.value(i)).ok_or_else(|| format!("unknown stage {:?}", stages.value(i)))?;
                let kind =
                    FailureKind::parse(kinds.value(i)).ok_or_else(|| format!("unknown kind {:?}", kinds.value(i)))?;
                Ok(Failure {
                    root: roots.value(i).to_string(),
                    path: paths.value(i).to_string(),
                    stage,
                    kind,
                    message: messages.value(i).to_string(),
                    first_seen_us: first_seen.value(i),
                    attempts: attempts.value(i),
                    size_bytes: sizes.value(i),
                    mtime_ns: mtimes.value(i),
                })
            })
            .collect()
    }
}

impl TableRows for TextRow {
    fn schema(dim: usize) -> SchemaRef {
        texts_schema(dim)
    }

    fn to_batch(rows: &[Self], dim: usize) -> Result<RecordBatch, ArrowError> {
        let offsets = OffsetBuffer::from_lengths(rows.iter().map(|r| r.token_ids.len()));
        let tokens = Int32Array::from_iter_values(rows.iter().flat_map(|r| r.token_ids.iter().copied()));
        let token_lists = ListArray::try_new(
            Arc::new(Field::new_list_field(DataType::Int32, false)),
            offsets,
            Arc::new(tokens),
            None,
        )?;
        RecordBatch::try_new(
            texts_schema(dim),
            vec![
                Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.text_id))),
                strings(rows.iter().map(|r| r.text.as_str())),
                Arc::new(StringArray::from_iter(rows.iter().map(|r| r.video_id.as_deref()))),
                Arc::new(token_lists),
                embeddings_array(rows.iter().map(|r| r.embedding.as_slice()), dim)?,
            ],
        )
    }

    fn from_batch(batch: &RecordBatch) -> Result<Vec<Self>, String> {
        let ids = u64_column(batch, "text_id")?;
        let texts = string_column(batch, "text")?;
        let videos = string_column(batch, "video_id")?;
        let tokens = column(batch, "token_ids")?.as_list_opt::<i32>().ok_or("column token_ids is not a list")?;
        let embeddings = split_embeddings(batch)?;
        (0..batch.num_rows())
            .zip(embeddings)
            .map(|(i, embedding)| {
                let list = tokens.value(i);
                let token_ids =
                    list.as_primitive_opt::<Int32Type>().ok_or("token_ids are not int32")?.values().to_vec();
                Ok(TextRow {
                    text_id: ids.value(i),
                    text: texts.value(i).to_string(),
                    video_id: videos.is_valid(i).then(|| videos.value(i).to_string()),
                    token_ids,
                    embedding,
                })
            })
            .collect()
    }
}
