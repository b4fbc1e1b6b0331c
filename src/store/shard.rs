//! Immutable Parquet shards: the rolling writer that makes them, the reader that checks them,
//! and the readers of any of the index's Parquet files, whole, by columns, or by row position.
//! Writer settings live in one place ([`writer_properties`]).

use std::fs::File;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use arrow::array::{AsArray, RecordBatch};
use parquet::arrow::arrow_reader::{ArrowReaderOptions, ParquetRecordBatchReaderBuilder, RowSelection, RowSelector};
use parquet::arrow::{ArrowWriter, ProjectionMask};
use parquet::basic::Compression;
use parquet::file::metadata::PageIndexPolicy;
use parquet::file::properties::WriterProperties;

use super::tables::TableRows;
use super::{ShardInfo, StoreError, io_error};

/// Rows buffered before they are handed to the Parquet writer as one record batch.
const BATCH_ROWS: usize = 1024;

/// Snappy: fast, and read by pyarrow, DuckDB, Polars and Spark without extra codecs.
pub(super) fn writer_properties() -> WriterProperties {
    writer_properties_recording(Vec::new())
}

/// [`writer_properties`], the file's metadata also recording `key_values`.
pub(super) fn writer_properties_recording(key_values: Vec<parquet::file::metadata::KeyValue>) -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(64 * 1024))
        .set_key_value_metadata((!key_values.is_empty()).then_some(key_values))
        .build()
}

/// An open shard: rows go to a temporary file until [`ShardWriter::finish`] publishes it.
struct OpenShard {
    writer: ArrowWriter<File>,
    tmp_path: PathBuf,
    final_rel: String,
    rows: u64,
}

/// The path, relative to the index, of the `n`-th shard a [`ShardWriter`] of `table` tagged
/// `tag` writes.
pub fn shard_path(table: &str, tag: &str, n: usize) -> String {
    format!("{table}/part-{tag}-{n:05}.parquet")
}

/// Writes rows of one table into shards of at most `max_rows` rows each, named
/// `TABLE/part-TAG-NNNNN.parquet`. Each finished shard is synced and renamed; it becomes part
/// of the index only when a manifest lists the [`ShardInfo`]s that `finish` returns.
pub struct ShardWriter<R: TableRows> {
    index: PathBuf,
    table: String,
    tag: String,
    dim: usize,
    max_rows: u64,
    pending: Vec<R>,
    open: Option<OpenShard>,
    done: Vec<ShardInfo>,
    _rows: PhantomData<R>,
}

impl<R: TableRows> ShardWriter<R> {
    pub fn new(index: &Path, table: &str, tag: &str, dim: usize, max_rows: u64) -> Result<Self, StoreError> {
        let folder = index.join(table);
        std::fs::create_dir_all(&folder).map_err(io_error(&folder))?;
        Ok(ShardWriter {
            index: index.to_path_buf(),
            table: table.to_string(),
            tag: tag.to_string(),
            dim,
            max_rows: max_rows.max(1),
            pending: Vec::new(),
            open: None,
            done: Vec::new(),
            _rows: PhantomData,
        })
    }

    /// The embedding width of the rows.
    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn push(&mut self, row: R) -> Result<(), StoreError> {
        self.pending.push(row);
        let open_rows = self.open.as_ref().map_or(0, |s| s.rows);
        if self.pending.len() >= BATCH_ROWS || open_rows + self.pending.len() as u64 >= self.max_rows {
            self.write_pending()?;
        }
        Ok(())
    }

    fn write_pending(&mut self) -> Result<(), StoreError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        if self.open.is_none() {
            self.open = Some(self.open_shard()?);
        }
        let shard = self.open.as_mut().expect("opened above");
        let parquet_error = |path: &Path, e: &dyn std::fmt::Display| StoreError::Parquet {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let batch = R::to_batch(&self.pending, self.dim).map_err(|e| parquet_error(&shard.tmp_path, &e))?;
        shard.writer.write(&batch).map_err(|e| parquet_error(&shard.tmp_path, &e))?;
        shard.rows += self.pending.len() as u64;
        self.pending.clear();
        if shard.rows >= self.max_rows {
            self.close_shard()?;
        }
        Ok(())
    }

    fn open_shard(&self) -> Result<OpenShard, StoreError> {
        let final_rel = shard_path(&self.table, &self.tag, self.done.len());
        let tmp_path = super::temporary_path(&self.index.join(&final_rel));
        let file = super::create_temporary(&tmp_path).map_err(io_error(&tmp_path))?;
        let writer = ArrowWriter::try_new(file, R::schema(self.dim), Some(writer_properties()))
            .map_err(|e| StoreError::Parquet { path: tmp_path.clone(), message: e.to_string() })?;
        Ok(OpenShard { writer, tmp_path, final_rel, rows: 0 })
    }

    fn close_shard(&mut self) -> Result<(), StoreError> {
        let Some(shard) = self.open.take() else { return Ok(()) };
        let final_path = self.index.join(&shard.final_rel);
        let tmp_path = shard.tmp_path.clone();
        let published = (|| {
            let file = shard
                .writer
                .into_inner()
                .map_err(|e| StoreError::Parquet { path: tmp_path.clone(), message: e.to_string() })?;
            super::sync_temporary(&file).map_err(io_error(&tmp_path))?;
            crate::fault::point("shard-written");
            drop(file);
            super::publish(&[(tmp_path.clone(), final_path.clone())])
        })();
        if let Err(e) = published {
            // A shard that failed to be written or renamed is never listed: remove it now.
            let _ = std::fs::remove_file(&tmp_path);
            return Err(e);
        }
        crate::fault::point("shard-renamed");
        let (bytes, sha256) = size_and_sha256(&final_path)?;
        self.done.push(ShardInfo { path: shard.final_rel, rows: shard.rows, bytes, sha256, segment: None });
        Ok(())
    }

    /// Writes what is left and returns every shard written, synced and renamed.
    pub fn finish(mut self) -> Result<Vec<ShardInfo>, StoreError> {
        self.write_pending()?;
        self.close_shard()?;
        Ok(std::mem::take(&mut self.done))
    }
}

impl<R: TableRows> Drop for ShardWriter<R> {
    fn drop(&mut self) {
        // An abandoned shard was never listed; remove its temporary file now rather than
        // leaving it to the next run's garbage collection.
        if let Some(shard) = self.open.take() {
            drop(shard.writer);
            let _ = std::fs::remove_file(&shard.tmp_path);
        }
    }
}

fn size_and_sha256(path: &Path) -> Result<(u64, String), StoreError> {
    crate::checksum::sha256_file(path).map_err(io_error(path))
}

/// Reads every row of a table's shards, in manifest order.
pub fn read_table<R: TableRows>(index: &Path, shards: &[ShardInfo]) -> Result<Vec<R>, StoreError> {
    let mut rows = Vec::new();
    for shard in shards {
        for_each_batch(index, shard, |batch| {
            rows.extend(R::from_batch(batch)?);
            Ok(())
        })?;
    }
    Ok(rows)
}

/// The `video_id` column of one shard, read alone (a frames shard's embeddings are most of its
/// bytes; deciding whether a shard must be rewritten needs only its ids).
pub fn read_video_ids(index: &Path, shard: &ShardInfo) -> Result<Vec<String>, StoreError> {
    let path = index.join(&shard.path);
    let corrupt = |message: String| StoreError::Corrupt { path: path.clone(), message };
    let file = File::open(&path).map_err(io_error(&path))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| corrupt(format!("not a readable Parquet shard: {e}")))?;
    let column = builder.schema().index_of("video_id").map_err(|_| corrupt("no video_id column".into()))?;
    let mask = parquet::arrow::ProjectionMask::roots(builder.parquet_schema(), [column]);
    let reader = builder.with_projection(mask).build().map_err(|e| corrupt(e.to_string()))?;
    let mut ids = Vec::with_capacity(shard.rows as usize);
    for batch in reader {
        let batch = batch.map_err(|e| corrupt(format!("unreadable row group: {e}")))?;
        let values =
            batch.column(0).as_string_opt::<i32>().ok_or_else(|| corrupt("video_id is not a string column".into()))?;
        ids.extend(values.iter().map(|v| v.unwrap_or_default().to_string()));
    }
    Ok(ids)
}

/// One `videos` row without its embedding: what the service shows of a video and checks its
/// file against before reading it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct VideoRecord {
    pub video_id: String,
    pub root: String,
    pub path: String,
    pub size_bytes: u64,
    pub mtime_ns: i64,
    pub duration_s: f64,
    pub width: u32,
    pub height: u32,
    pub fps: f64,
    pub n_frames: u32,
}

/// Row `row` of the `videos` shard open as `file` (read from `path`, named in errors): only its
/// row group, and of that only the columns [`VideoRecord`] holds.
pub fn read_video_record(file: File, path: &Path, row: usize) -> Result<VideoRecord, StoreError> {
    use arrow::datatypes::{Float64Type, Int64Type, UInt32Type, UInt64Type};
    use parquet::arrow::ProjectionMask;
    use parquet::arrow::arrow_reader::{RowSelection, RowSelector};

    let corrupt = |message: String| StoreError::Corrupt { path: path.to_path_buf(), message };
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| corrupt(format!("not a readable Parquet shard: {e}")))?;
    let mut first = 0;
    let mut group = None;
    for (g, meta) in builder.metadata().row_groups().iter().enumerate() {
        let rows = meta.num_rows() as usize;
        if row < first + rows {
            group = Some(g);
            break;
        }
        first += rows;
    }
    let group = group.ok_or_else(|| corrupt(format!("no row {row}")))?;
    const COLUMNS: [&str; 10] =
        ["video_id", "root", "path", "size_bytes", "mtime_ns", "duration_s", "width", "height", "fps", "n_frames"];
    let mut columns = Vec::new();
    for name in COLUMNS {
        columns.push(builder.schema().index_of(name).map_err(|_| corrupt(format!("no {name} column")))?);
    }
    let mask = ProjectionMask::roots(builder.parquet_schema(), columns);
    let selection = RowSelection::from(vec![RowSelector::skip(row - first), RowSelector::select(1)]);
    let mut reader = builder
        .with_row_groups(vec![group])
        .with_projection(mask)
        .with_row_selection(selection)
        .with_batch_size(1)
        .build()
        .map_err(|e| corrupt(e.to_string()))?;
    let batch = reader
        .next()
        .ok_or_else(|| corrupt(format!("no row {row}")))?
        .map_err(|e| corrupt(format!("unreadable row group: {e}")))?;
    let column = |name: &str| batch.column_by_name(name).ok_or_else(|| corrupt(format!("no {name} column")));
    let wrong = |name: &str| corrupt(format!("{name} is not of its type"));
    let text = |name: &str| -> Result<String, StoreError> {
        Ok(column(name)?.as_string_opt::<i32>().ok_or_else(|| wrong(name))?.value(0).to_string())
    };
    macro_rules! number {
        ($name:literal, $type:ty) => {
            column($name)?.as_primitive_opt::<$type>().ok_or_else(|| wrong($name))?.value(0)
        };
    }
    Ok(VideoRecord {
        video_id: text("video_id")?,
        root: text("root")?,
        path: text("path")?,
        size_bytes: number!("size_bytes", UInt64Type),
        mtime_ns: number!("mtime_ns", Int64Type),
        duration_s: number!("duration_s", Float64Type),
        width: number!("width", UInt32Type),
        height: number!("height", UInt32Type),
        fps: number!("fps", Float64Type),
        n_frames: number!("n_frames", UInt32Type),
    })
}

/// Calls `f` on each record batch of one shard.
pub fn for_each_batch(
    index: &Path,
    shard: &ShardInfo,
    f: impl FnMut(&RecordBatch) -> Result<(), String>,
) -> Result<(), StoreError> {
    let path = index.join(&shard.path);
    for_each_batch_in(File::open(&path).map_err(io_error(&path))?, &path, &[], f)
}

/// Reads the Parquet file open as `file` (named `path` in errors) batch by batch, only its
/// `columns` (every column when `columns` is empty), handing each batch to `f`; an error of `f`
/// names the file.
pub fn for_each_batch_in(
    file: File,
    path: &Path,
    columns: &[&str],
    mut f: impl FnMut(&RecordBatch) -> Result<(), String>,
) -> Result<(), StoreError> {
    let corrupt = |message: String| StoreError::Corrupt { path: path.to_path_buf(), message };
    let mut builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| corrupt(format!("not a readable Parquet file: {e}")))?;
    if !columns.is_empty() {
        let mask = ProjectionMask::columns(builder.parquet_schema(), columns.iter().copied());
        builder = builder.with_projection(mask);
    }
    let reader = builder.build().map_err(|e| corrupt(format!("not a readable Parquet file: {e}")))?;
    for batch in reader {
        let batch = batch.map_err(|e| corrupt(format!("unreadable row group: {e}")))?;
        f(&batch).map_err(corrupt)?;
    }
    Ok(())
}

/// The `columns` (every column when empty) of the rows at `positions` (ascending, distinct,
/// counted from the file's first row) of the Parquet file `file`, named `path` in errors, in
/// that order. Only the row groups that hold them are read, and within those, where the file
/// has a page index (the index's writer writes one), only the pages that hold them: a page of a
/// large table costs a few pages, never the whole file.
pub fn read_rows_at(
    file: File,
    path: &Path,
    columns: &[&str],
    positions: &[u64],
) -> Result<Vec<RecordBatch>, StoreError> {
    let corrupt = |message: String| StoreError::Corrupt { path: path.to_path_buf(), message };
    debug_assert!(positions.windows(2).all(|w| w[0] < w[1]), "positions ascend");
    let options = ArrowReaderOptions::new().with_page_index_policy(PageIndexPolicy::Optional);
    let builder = ParquetRecordBatchReaderBuilder::try_new_with_options(file, options)
        .map_err(|e| corrupt(format!("not a readable Parquet file: {e}")))?;
    let (mut groups, mut selectors) = (Vec::new(), Vec::new());
    let (mut group_start, mut next) = (0u64, 0usize);
    for (group, metadata) in builder.metadata().row_groups().iter().enumerate() {
        let end = group_start + metadata.num_rows() as u64;
        if positions.get(next).is_some_and(|&p| p < end) {
            groups.push(group);
            let mut cursor = group_start;
            while let Some(&at) = positions.get(next).filter(|&&p| p < end) {
                if at > cursor {
                    selectors.push(RowSelector::skip((at - cursor) as usize));
                }
                selectors.push(RowSelector::select(1));
                cursor = at + 1;
                next += 1;
            }
            if end > cursor {
                selectors.push(RowSelector::skip((end - cursor) as usize));
            }
        }
        group_start = end;
    }
    if let Some(beyond) = positions.get(next) {
        return Err(corrupt(format!("has {group_start} rows, not a row {beyond}")));
    }
    if groups.is_empty() {
        return Ok(Vec::new());
    }
    let mask = match columns {
        [] => ProjectionMask::all(),
        named => ProjectionMask::columns(builder.parquet_schema(), named.iter().copied()),
    };
    let reader = builder
        .with_projection(mask)
        .with_row_groups(groups)
        .with_row_selection(RowSelection::from(selectors))
        .build()
        .map_err(|e| corrupt(format!("not a readable Parquet file: {e}")))?;
    reader.map(|batch| batch.map_err(|e| corrupt(format!("unreadable row group: {e}")))).collect()
}

/// Checks that the file at `rel` in `index` is present with the size and SHA-256 its manifest
/// records.
pub(super) fn verify_recorded(
    index: &Path,
    rel: &str,
    recorded_bytes: u64,
    recorded_sha256: &str,
) -> Result<(), String> {
    let (bytes, sha256) = size_and_sha256(&index.join(rel)).map_err(|e| e.to_string())?;
    if bytes != recorded_bytes {
        return Err(format!("{rel}: {bytes} bytes, the manifest records {recorded_bytes}"));
    }
    if sha256 != recorded_sha256 {
        return Err(format!("{rel}: checksum differs from the manifest's"));
    }
    Ok(())
}

/// Checks one listed shard: present, the recorded size and SHA-256, readable, the recorded
/// row count. Returns what is wrong, if anything.
pub fn verify_shard(index: &Path, shard: &ShardInfo) -> Result<(), String> {
    verify_recorded(index, &shard.path, shard.bytes, &shard.sha256)?;
    let mut rows = 0u64;
    for_each_batch(index, shard, |batch| {
        rows += batch.num_rows() as u64;
        Ok(())
    })
    .map_err(|e| e.to_string())?;
    if rows != shard.rows {
        return Err(format!("{}: {rows} rows, the manifest records {}", shard.path, shard.rows));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{StringArray, UInt64Array};
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    /// 20 rows (`id` i, `text` "row i") in row groups of 3 and pages of 2, with a page index.
    fn small_groups(path: &Path) {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::UInt64, false),
            Field::new("text", DataType::Utf8, false),
        ]));
        let properties = WriterProperties::builder()
            .set_max_row_group_row_count(Some(3))
            .set_data_page_row_count_limit(2)
            .set_write_batch_size(1)
            .build();
        let mut writer = ArrowWriter::try_new(File::create(path).unwrap(), schema.clone(), Some(properties)).unwrap();
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(UInt64Array::from_iter_values(0..20)),
                Arc::new(StringArray::from_iter_values((0..20).map(|i| format!("row {i}")))),
            ],
        )
        .unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
    }

    fn read(path: &Path, columns: &[&str], positions: &[u64]) -> Result<Vec<(u64, String)>, StoreError> {
        let batches = read_rows_at(File::open(path).unwrap(), path, columns, positions)?;
        Ok(batches
            .iter()
            .flat_map(|b| {
                let ids = b.column_by_name("id").unwrap().as_primitive::<arrow::datatypes::UInt64Type>().clone();
                let texts = b.column_by_name("text").map(|t| t.as_string::<i32>().clone());
                (0..b.num_rows())
                    .map(move |i| (ids.value(i), texts.as_ref().map_or(String::new(), |t| t.value(i).to_string())))
            })
            .collect())
    }

    #[test]
    fn rows_are_read_by_position_across_row_groups_and_pages() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rows.parquet");
        small_groups(&path);
        let wanted = [0u64, 2, 3, 7, 8, 10, 19];
        let got = read(&path, &[], &wanted).unwrap();
        let want: Vec<(u64, String)> = wanted.iter().map(|&i| (i, format!("row {i}"))).collect();
        assert_eq!(got, want);
        // Groups skipped whole, one column, one row.
        assert_eq!(read(&path, &["id"], &[13]).unwrap(), vec![(13, String::new())]);
        assert!(read(&path, &[], &[]).unwrap().is_empty());
        let beyond = read(&path, &[], &[5, 20]).unwrap_err().to_string();
        assert!(beyond.contains("has 20 rows, not a row 20"), "{beyond}");
    }
}
