//! The index on disk: Arrow schemas, immutable Parquet shards and the manifest that
//! publishes them. The only module that knows Arrow and Parquet.
//!
//! Writes follow one rule: a shard is written under a temporary name in its table's folder,
//! synced and renamed, and becomes visible only when a new manifest naming it is committed
//! ([`Manifest::commit`]). [`collect_garbage`] removes what no manifest names.

mod journal;
mod lock;
mod manifest;
mod scores;
mod shard;
mod tables;

use std::io::Write;
use std::path::{Path, PathBuf};

pub use journal::{InFlightJournal, crashed_runs};
pub use lock::{LOCK_FILE, WriterLock};
pub use manifest::{FORMAT_VERSION, MANIFEST, Manifest, PreprocessRecord, SamplingRecord, ShardInfo, Suspect};
pub use scores::{
    Embeddings, TextSet, TopKRow, read_frames_of, read_text_embeddings, read_video_embeddings, topk_schema, write_topk,
};
pub use shard::{ShardWriter, for_each_batch, read_table, read_video_ids, verify_shard};
pub use tables::{
    FrameRow, TableRows, TextRow, VideoRow, embedding_values, failures_schema, frames_schema, texts_schema,
    videos_schema,
};

/// Folders that hold table shards; the only places garbage collection touches.
pub const TABLE_DIRS: &[&str] = &["videos", "frames", "failures", "texts"];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("{index}: another writer holds this index ({holder}); wait for it to finish")]
    Locked { index: PathBuf, holder: String },
    #[error("{path}: cannot write Parquet: {message}")]
    Parquet { path: PathBuf, message: String },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

/// Writes `bytes` to `path` atomically: temporary file in the same folder, synced, renamed,
/// and the folder synced so the rename itself survives a power cut.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    atomic_write_with(path, bytes, "")
}

/// [`atomic_write`], reaching the failure-injection point `before_rename` (see `fault`)
/// between the sync and the rename.
fn atomic_write_with(path: &Path, bytes: &[u8], before_rename: &str) -> Result<(), StoreError> {
    let folder = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = folder.join(format!(".tmp-{}-{name}", std::process::id()));
    {
        let mut file = std::fs::File::create(&tmp).map_err(io_error(&tmp))?;
        file.write_all(bytes).map_err(io_error(&tmp))?;
        file.sync_all().map_err(io_error(&tmp))?;
    }
    crate::fault::point(before_rename);
    std::fs::rename(&tmp, path).map_err(io_error(path))?;
    sync_dir(folder)
}

pub fn sync_dir(folder: &Path) -> Result<(), StoreError> {
    std::fs::File::open(folder).and_then(|f| f.sync_all()).map_err(io_error(folder))
}

/// Removes files in the table folders that the committed manifest does not name (shards of
/// runs that crashed before their commit, temporary files, shards replaced by later commits).
/// Returns how many files were removed.
pub fn collect_garbage(index: &Path, manifest: Option<&Manifest>) -> Result<usize, StoreError> {
    let listed: std::collections::HashSet<&str> =
        manifest.map(|m| m.tables.values().flatten().map(|s| s.path.as_str()).collect()).unwrap_or_default();
    let mut removed = 0;
    for dir in TABLE_DIRS {
        let root = index.join(dir);
        if !root.is_dir() {
            continue;
        }
        for entry in walkdir::WalkDir::new(&root).min_depth(1).contents_first(true) {
            let entry = entry.map_err(|e| StoreError::Io {
                path: root.clone(),
                source: e.into_io_error().unwrap_or_else(|| std::io::Error::other("walk failed")),
            })?;
            let rel = entry.path().strip_prefix(index).unwrap_or(entry.path());
            let rel = rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/");
            if entry.file_type().is_file() && !listed.contains(rel.as_str()) {
                std::fs::remove_file(entry.path()).map_err(io_error(entry.path()))?;
                removed += 1;
            } else if entry.file_type().is_dir() && *dir == "texts" {
                // An emptied text-set folder: remove it (fails harmlessly if not empty).
                let _ = std::fs::remove_dir(entry.path());
            }
        }
    }
    Ok(removed)
}

/// Total bytes of the shards a manifest lists.
pub fn index_bytes(manifest: &Manifest) -> u64 {
    manifest.tables.values().flatten().map(|s| s.bytes).sum()
}
