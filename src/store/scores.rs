//! What scoring reads from an index (video and text embeddings, only the columns it needs)
//! and the outputs it writes (contract §4): `topk.parquet` (`text_id`, `rank`, `video_id`,
//! `score`), the ranks of every query (`t2v_ranks.parquet`, `v2t_ranks.parquet`) and the record
//! of the run (`run.json`), all carrying one run id; and the reading of such a folder, which a
//! left-over output of another run makes mixed, whole or by row position (the explorer's pages,
//! with the texts of a text set).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, Float64Array, RecordBatch, StringArray, UInt32Array, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::ArrowWriter;
use parquet::file::metadata::KeyValue;

use super::shard::{for_each_batch, for_each_batch_in, read_rows_at};
use super::tables::{FrameRow, TableRows, embedding_values, f64_column, string_column, u32_column, u64_column};
use super::{ShardInfo, StoreError, corrupt, io_error};

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

/// The key under which each Parquet output of a score records its run's id (as `run.json` and
/// `metrics.json` do in their `run_id`).
pub const RUN_ID_KEY: &str = "vtr_index.run_id";
/// Rows a score output's record batch holds.
const OUTPUT_BATCH: usize = 64 * 1024;

/// Writes `topk.parquet` for `path` in batches, under its temporary name, synced; returns that
/// temporary path for [`super::publish`].
pub fn write_topk<'a>(
    path: &Path,
    run_id: &str,
    rows: impl Iterator<Item = TopKRow<'a>>,
) -> Result<PathBuf, StoreError> {
    write_output(path, run_id, topk_schema(), rows, |chunk: &[TopKRow]| {
        vec![
            Arc::new(UInt64Array::from_iter_values(chunk.iter().map(|r| r.text_id))) as ArrayRef,
            Arc::new(UInt32Array::from_iter_values(chunk.iter().map(|r| r.rank))),
            Arc::new(StringArray::from_iter_values(chunk.iter().map(|r| r.video_id))),
            Arc::new(Float64Array::from_iter_values(chunk.iter().map(|r| r.score))),
        ]
    })
}

/// One text's T2V rank: of its own video among all (contract §5); none when the text is not a
/// query (no `video_id`, or one the index does not hold).
#[derive(Debug, Clone, Copy)]
pub struct T2vRankRow<'a> {
    pub text_id: u64,
    pub video_id: Option<&'a str>,
    pub rank: Option<u32>,
}

/// One video's V2T rank: of its caption group among all groups (contract §5).
#[derive(Debug, Clone, Copy)]
pub struct V2tRankRow<'a> {
    pub video_id: &'a str,
    pub rank: u32,
}

pub fn t2v_ranks_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("text_id", DataType::UInt64, false),
        Field::new("video_id", DataType::Utf8, true),
        Field::new("rank", DataType::UInt32, true),
    ]))
}

pub fn v2t_ranks_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("video_id", DataType::Utf8, false),
        Field::new("rank", DataType::UInt32, false),
    ]))
}

/// Writes `t2v_ranks.parquet` (every text, in `text_id` order) like [`write_topk`].
pub fn write_t2v_ranks<'a>(
    path: &Path,
    run_id: &str,
    rows: impl Iterator<Item = T2vRankRow<'a>>,
) -> Result<PathBuf, StoreError> {
    write_output(path, run_id, t2v_ranks_schema(), rows, |chunk: &[T2vRankRow]| {
        vec![
            Arc::new(UInt64Array::from_iter_values(chunk.iter().map(|r| r.text_id))) as ArrayRef,
            Arc::new(chunk.iter().map(|r| r.video_id).collect::<StringArray>()),
            Arc::new(chunk.iter().map(|r| r.rank).collect::<UInt32Array>()),
        ]
    })
}

/// Writes `v2t_ranks.parquet` (every V2T query, in the videos' order) like [`write_topk`].
pub fn write_v2t_ranks<'a>(
    path: &Path,
    run_id: &str,
    rows: impl Iterator<Item = V2tRankRow<'a>>,
) -> Result<PathBuf, StoreError> {
    write_output(path, run_id, v2t_ranks_schema(), rows, |chunk: &[V2tRankRow]| {
        vec![
            Arc::new(StringArray::from_iter_values(chunk.iter().map(|r| r.video_id))) as ArrayRef,
            Arc::new(UInt32Array::from_iter_values(chunk.iter().map(|r| r.rank))),
        ]
    })
}

/// Writes one Parquet output of a score under its temporary name, `columns` turning each
/// chunk of rows into a record batch, its metadata recording `run_id`; returns the temporary
/// path for [`super::publish`].
fn write_output<R>(
    path: &Path,
    run_id: &str,
    schema: SchemaRef,
    rows: impl Iterator<Item = R>,
    columns: impl Fn(&[R]) -> Vec<ArrayRef>,
) -> Result<PathBuf, StoreError> {
    let tmp = super::temporary_path(path);
    write_output_to(path, &tmp, run_id, schema, rows, columns).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    Ok(tmp)
}

fn write_output_to<R>(
    path: &Path,
    tmp: &Path,
    run_id: &str,
    schema: SchemaRef,
    rows: impl Iterator<Item = R>,
    columns: impl Fn(&[R]) -> Vec<ArrayRef>,
) -> Result<(), StoreError> {
    let parquet_error =
        |e: &dyn std::fmt::Display| StoreError::Parquet { path: path.to_path_buf(), message: e.to_string() };
    let file = super::create_temporary(tmp).map_err(io_error(tmp))?;
    let properties =
        super::shard::writer_properties_recording(vec![KeyValue::new(RUN_ID_KEY.to_string(), run_id.to_string())]);
    let mut writer =
        ArrowWriter::try_new(file, Arc::clone(&schema), Some(properties)).map_err(|e| parquet_error(&e))?;
    let mut pending: Vec<R> = Vec::with_capacity(OUTPUT_BATCH);
    let flush = |pending: &mut Vec<R>, writer: &mut ArrowWriter<File>| -> Result<(), StoreError> {
        let batch = RecordBatch::try_new(Arc::clone(&schema), columns(pending)).map_err(|e| parquet_error(&e))?;
        writer.write(&batch).map_err(|e| parquet_error(&e))?;
        pending.clear();
        Ok(())
    };
    for row in rows {
        pending.push(row);
        if pending.len() == OUTPUT_BATCH {
            flush(&mut pending, &mut writer)?;
        }
    }
    if !pending.is_empty() {
        flush(&mut pending, &mut writer)?;
    }
    let file = writer.into_inner().map_err(|e| parquet_error(&e))?;
    super::sync_temporary(&file).map_err(io_error(tmp))
}

/// The run id a score's Parquet output, open as `file` (named `path` in errors), records; none
/// in one written before outputs had them.
fn run_id_in(file: File, path: &Path) -> Result<Option<String>, StoreError> {
    let reader = parquet::file::reader::SerializedFileReader::new(file)
        .map_err(|e| StoreError::Corrupt { path: path.to_path_buf(), message: format!("not a Parquet file: {e}") })?;
    use parquet::file::reader::FileReader;
    let metadata = reader.metadata().file_metadata().key_value_metadata();
    Ok(metadata.and_then(|kv| kv.iter().find(|k| k.key == RUN_ID_KEY).and_then(|k| k.value.clone())))
}

/// The `text_id` and `rank` (none for a text that is not a query) of every row of a
/// `t2v_ranks.parquet` open as `file` (named `path` in errors), in its order.
pub fn read_t2v_ranks(file: File, path: &Path) -> Result<(Vec<u64>, Vec<Option<u32>>), StoreError> {
    let (mut text_ids, mut ranks) = (Vec::new(), Vec::new());
    for_each_batch_in(file, path, &["text_id", "rank"], |batch| {
        text_ids.extend(u64_column(batch, "text_id")?.values());
        ranks.extend(u32_column(batch, "rank")?.iter());
        Ok(())
    })?;
    Ok((text_ids, ranks))
}

/// Calls `f` with the `text_id` of every row of a `topk.parquet` open as `file`, in its order.
pub fn for_each_topk_text_id(
    file: File,
    path: &Path,
    mut f: impl FnMut(u64) -> Result<(), String>,
) -> Result<(), StoreError> {
    for_each_batch_in(file, path, &["text_id"], |batch| {
        u64_column(batch, "text_id")?.values().iter().try_for_each(|&id| f(id))
    })
}

/// The `video_id` (none where the text has none) of the rows at `positions` (ascending) of a
/// `t2v_ranks.parquet` open as `file`.
pub fn read_true_videos_at(file: File, path: &Path, positions: &[u64]) -> Result<Vec<Option<String>>, StoreError> {
    let mut videos = Vec::with_capacity(positions.len());
    for batch in read_rows_at(file, path, &["video_id"], positions)? {
        let ids = string_column(&batch, "video_id").map_err(corrupt(path))?;
        videos.extend(ids.iter().map(|id| id.map(str::to_string)));
    }
    Ok(videos)
}

/// One row of `topk.parquet` as read back: a text's `rank`-th video and its score.
#[derive(Debug, Clone, PartialEq)]
pub struct TopKEntry {
    pub rank: u32,
    pub video_id: String,
    pub score: f64,
}

/// The rows at `positions` (ascending) of a `topk.parquet` open as `file`.
pub fn read_topk_at(file: File, path: &Path, positions: &[u64]) -> Result<Vec<TopKEntry>, StoreError> {
    let mut entries = Vec::with_capacity(positions.len());
    for batch in read_rows_at(file, path, &["rank", "video_id", "score"], positions)? {
        let (ranks, ids, scores) =
            (u32_column(&batch, "rank"), string_column(&batch, "video_id"), f64_column(&batch, "score"));
        let (Ok(ranks), Ok(ids), Ok(scores)) = (ranks, ids, scores) else {
            return Err(corrupt(path)("not the columns of a top k".into()));
        };
        entries.extend((0..batch.num_rows()).map(|i| TopKEntry {
            rank: ranks.value(i),
            video_id: ids.value(i).to_string(),
            score: scores.value(i),
        }));
    }
    Ok(entries)
}

/// A text of a text set as read back by position: its id, text and embedding.
#[derive(Debug, Clone, PartialEq)]
pub struct TextAt {
    pub text_id: u64,
    pub text: String,
    pub embedding: Vec<f32>,
}

/// The rows at `positions` (ascending) of a text set's shard open as `file`.
pub fn read_texts_at(file: File, path: &Path, positions: &[u64]) -> Result<Vec<TextAt>, StoreError> {
    let mut texts = Vec::with_capacity(positions.len());
    for batch in read_rows_at(file, path, &["text_id", "text", "embedding"], positions)? {
        let (ids, text) = (u64_column(&batch, "text_id"), string_column(&batch, "text"));
        let (Ok(ids), Ok(text), Ok((values, dim))) = (ids, text, embedding_values(&batch)) else {
            return Err(corrupt(path)("not the columns of a text set".into()));
        };
        texts.extend((0..batch.num_rows()).map(|i| TextAt {
            text_id: ids.value(i),
            text: text.value(i).to_string(),
            embedding: values[i * dim..(i + 1) * dim].to_vec(),
        }));
    }
    Ok(texts)
}

/// The record every score writes beside its outputs.
pub const SCORE_RECORD: &str = "run.json";
/// The Parquet outputs of a score that carry its run id.
pub const SCORE_TABLES: [&str; 3] = ["topk.parquet", "t2v_ranks.parquet", "v2t_ranks.parquet"];

/// `run.json`: what one score scored, identified by content, and how; its `run_id` is in every
/// output of the run.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ScoreRecord {
    /// What the rest of the record identifies ([`ScoreRecord::identify`]): two runs that score
    /// the same texts against the same videos the same way share it, and write the same files.
    pub run_id: String,
    pub revise: String,
    pub temperature: f64,
    pub beta: Option<f64>,
    pub scale: f64,
    pub top_k: usize,
    /// The text set scored, by name, and its shards' SHA-256s in manifest order.
    pub texts: String,
    pub texts_sha256: Vec<String>,
    /// The `videos` shards' SHA-256s in manifest order: the videos scored, by content (a
    /// manifest changes at every commit; these only when the videos do).
    pub videos_sha256: Vec<String>,
    pub bank: Option<String>,
    pub bank_sha256: Vec<String>,
    pub n_texts: usize,
    pub n_videos: usize,
    /// The files of the run, `run.json` included.
    pub outputs: Vec<String>,
}

impl ScoreRecord {
    /// Sets `run_id` to the SHA-256 (its first 128 bits, as hex) of the record's other fields:
    /// outputs stay a function of their inputs, and a file of any other score differs in it.
    pub fn identify(&mut self) {
        self.run_id = String::new();
        let json = serde_json::to_vec(self).expect("a record always serialises");
        self.run_id = crate::checksum::sha256_bytes(&json)[..32].to_string();
    }
}

/// The record of the score in `dir`, once every output there is checked to be of its run (see
/// [`open_score_folder`]).
pub fn read_score_folder(dir: &Path) -> Result<ScoreRecord, StoreError> {
    Ok(open_score_folder(dir)?.record)
}

/// A score folder checked to be one run's outputs: its record, its metrics (none where the run
/// wrote none) and its Parquet outputs, each open on the file that was checked, so that a later
/// score into the folder does not change what is read through them.
#[derive(Debug)]
pub struct ScoreFolderFiles {
    pub record: ScoreRecord,
    pub metrics: Option<serde_json::Value>,
    /// The [`SCORE_TABLES`] the folder holds, by name.
    pub tables: Vec<(&'static str, File)>,
}

impl ScoreFolderFiles {
    /// Takes the open output `name` (one of [`SCORE_TABLES`]), if the run wrote it.
    pub fn take(&mut self, name: &str) -> Option<File> {
        let at = self.tables.iter().position(|(n, _)| *n == name)?;
        Some(self.tables.swap_remove(at).1)
    }
}

/// Opens the score in `dir` and checks every output there to be of the run `run.json` records:
/// a file of another run (an earlier score's `metrics.json` left beside a later one that had no
/// queries), or a listed output that is missing, makes the folder mixed, an error.
pub fn open_score_folder(dir: &Path) -> Result<ScoreFolderFiles, StoreError> {
    let path = dir.join(SCORE_RECORD);
    let text = std::fs::read_to_string(&path).map_err(io_error(&path))?;
    let record: ScoreRecord = serde_json::from_str(&text)
        .map_err(|e| StoreError::Corrupt { path: path.clone(), message: format!("not a score record: {e}") })?;
    let mixed = |file: &str, why: String| StoreError::Corrupt {
        path: dir.to_path_buf(),
        message: format!("mixed outputs: {file} {why}, where run.json is of run {}", record.run_id),
    };
    for name in &record.outputs {
        if !dir.join(name).exists() {
            return Err(mixed(name, "is missing".into()));
        }
    }
    let mut tables = Vec::new();
    for name in SCORE_TABLES {
        let table = dir.join(name);
        let file = match File::open(&table) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_error(&table)(e)),
        };
        let id = run_id_in(file.try_clone().map_err(io_error(&table))?, &table)?;
        if id.as_deref() != Some(record.run_id.as_str()) {
            return Err(mixed(name, format!("is of run {}", id.as_deref().unwrap_or("none"))));
        }
        tables.push((name, file));
    }
    let metrics_path = dir.join("metrics.json");
    let metrics = match std::fs::read(&metrics_path) {
        Ok(bytes) => {
            let value: serde_json::Value =
                serde_json::from_slice(&bytes).map_err(|e| corrupt(&metrics_path)(e.to_string()))?;
            let id = value.get("run_id").and_then(serde_json::Value::as_str);
            if id != Some(record.run_id.as_str()) {
                return Err(mixed("metrics.json", format!("is of run {}", id.unwrap_or("none"))));
            }
            Some(value)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_error(&metrics_path)(e)),
    };
    Ok(ScoreFolderFiles { record, metrics, tables })
}
