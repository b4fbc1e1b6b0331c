//! The index on disk: Arrow schemas, immutable Parquet shards and the manifest that
//! publishes them. The only module that knows Arrow and Parquet.
//!
//! Writes follow one rule: a shard is written under a temporary name in its table's folder,
//! synced and renamed, and becomes visible only when a new manifest naming it is committed
//! ([`Manifest::commit`]). [`collect_garbage`] removes the index's own files that no manifest
//! names, and never a file the index did not write (`files.rs`).

mod commit;
mod files;
mod journal;
mod lock;
mod manifest;
mod merge;
pub mod npy;
mod scores;
pub mod segment;
mod shard;
mod stage_files;
mod tables;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::failure::Failure;

pub use commit::{Committer, RowWriters, carry_over, merged_roots, write_reused, write_run_report};
pub use files::{collect_garbage, foreign_entries, is_own_temporary_name, temporary_path};
pub use journal::{InFlightJournal, crashed_runs, mark_journals_interrupted};
pub use lock::{LOCK_FILE, WriterLock};
pub use manifest::{
    FORMAT_VERSION, MANIFEST, Manifest, Merged, MergedPart, OLDEST_FORMAT_VERSION, PreprocessRecord, SamplingRecord,
    ShardInfo, Suspect,
};
pub use merge::{MERGED_TABLES, MergeError, MergeReport, merge};
pub use scores::{
    Embeddings, NotUnit, RUN_ID_KEY, SCORE_RECORD, SCORE_TABLES, ScoreFolderFiles, ScoreRecord, T2vRankRow, TextAt,
    TextSet, TopKEntry, TopKRow, UNIT_NORM_TOLERANCE, V2tRankRow, for_each_topk_text_id, open_score_folder,
    read_frames_of, read_score_folder, read_t2v_ranks, read_text_embeddings, read_texts_at, read_topk_at,
    read_true_videos_at, read_video_embeddings, t2v_ranks_schema, topk_schema, v2t_ranks_schema, write_t2v_ranks,
    write_topk, write_v2t_ranks,
};
pub use shard::{
    ShardWriter, VideoRecord, for_each_batch, read_rows_at, read_table, read_video_ids, read_video_record, verify_shard,
};
pub use stage_files::{StageFileError, StageFiles, StageHeader};
pub use tables::{
    FRAME_SHARD_ROWS, FrameRow, TableRows, TextRow, VIDEO_SHARD_ROWS, VideoRow, embedding_values, failures_schema,
    frames_schema, texts_schema, videos_schema,
};

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

pub fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

/// The error that says the file at `path` is not what it should be, and why.
pub fn corrupt(path: &Path) -> impl Fn(String) -> StoreError + '_ {
    move |message| StoreError::Corrupt { path: path.to_path_buf(), message }
}

/// Writes `bytes` to `path` atomically: temporary file in the same folder, synced, renamed,
/// and the folder synced so the rename itself survives a power cut.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    atomic_write_with(path, bytes, "")
}

/// [`atomic_write`], reaching the failure-injection point `before_rename` (see `fault`)
/// between the sync and the rename.
fn atomic_write_with(path: &Path, bytes: &[u8], before_rename: &str) -> Result<(), StoreError> {
    let tmp = write_temporary(path, bytes)?;
    crate::fault::point(before_rename);
    publish(&[(tmp, path.to_path_buf())])
}

/// The first half of an atomic write: `bytes` written to `path`'s temporary name and synced.
/// Returns the temporary path, for [`publish`].
pub fn write_temporary(path: &Path, bytes: &[u8]) -> Result<PathBuf, StoreError> {
    let tmp = temporary_path(path);
    let written = create_temporary(&tmp).and_then(|mut file| {
        file.write_all(bytes)?;
        sync_temporary(&file)
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_error(&tmp)(e));
    }
    Ok(tmp)
}

/// Creates the temporary file of an atomic write (the fault step `write`). Streamed outputs
/// (shards, `topk.parquet`, `.npy`) create theirs here, [`write_temporary`] its own.
pub fn create_temporary(tmp: &Path) -> std::io::Result<std::fs::File> {
    crate::fault::io_step("write")?;
    std::fs::File::create(tmp)
}

/// Syncs a finished temporary file before it is published (the fault step `sync`).
pub fn sync_temporary(file: &std::fs::File) -> std::io::Result<()> {
    crate::fault::io_step("sync")?;
    file.sync_all()
}

/// The second half: renames each synced temporary file to its final path, then syncs the
/// folders, so the renames survive a power cut. Several files are published all or none: each
/// one replaced is first linked to a backup name, and a rename that fails puts back the ones
/// already renamed (`score` also does it under one lock, see `interrupt`). Every rename of the
/// crate goes through here.
pub fn publish(renames: &[(PathBuf, PathBuf)]) -> Result<(), StoreError> {
    let mut done: Vec<(&Path, Option<PathBuf>)> = Vec::new();
    for (tmp, path) in renames {
        let backup = (renames.len() > 1).then(|| backup_of(path)).flatten();
        let renamed = crate::fault::io_step("rename").and_then(|()| std::fs::rename(tmp, path));
        if let Err(e) = renamed {
            for (path, backup) in done.iter().rev() {
                let _ = match backup {
                    Some(backup) => std::fs::rename(backup, path),
                    None => std::fs::remove_file(path),
                };
            }
            for (tmp, _) in renames {
                let _ = std::fs::remove_file(tmp);
            }
            if let Some(backup) = backup {
                let _ = std::fs::remove_file(backup);
            }
            return Err(io_error(path)(e));
        }
        done.push((path, backup));
    }
    for backup in done.iter().filter_map(|(_, backup)| backup.as_ref()) {
        let _ = std::fs::remove_file(backup);
    }
    let mut folders: Vec<&Path> = Vec::new();
    for (_, path) in renames {
        let folder = path.parent().unwrap_or(Path::new("."));
        if !folders.contains(&folder) {
            folders.push(folder);
        }
    }
    folders.iter().try_for_each(|folder| sync_dir(folder))
}

/// Whether a root recorded as typed, resolved from the working folder to `resolved`, is the
/// folder the index was built from: the first file recorded under it is there with its size
/// (a root with no file recorded is taken as resolved). A working folder that happens to hold
/// a folder of the same name elsewhere fails this, and the root keeps its recorded name.
fn holds_its_files<'a>(resolved: &str, mut files: impl Iterator<Item = &'a (&'a String, &'a String, u64)>) -> bool {
    match files.next() {
        Some((_, path, size)) => std::fs::metadata(Path::new(resolved).join(path)).is_ok_and(|m| m.len() == *size),
        None => true,
    }
}

/// A hard link to the file at `path` under a temporary name, if there is one to keep.
fn backup_of(path: &Path) -> Option<PathBuf> {
    let name = path.file_name()?.to_string_lossy();
    let backup = temporary_path(&path.with_file_name(format!("{name}.replaced")));
    std::fs::hard_link(path, &backup).ok().map(|()| backup)
}

pub fn sync_dir(folder: &Path) -> Result<(), StoreError> {
    crate::fault::io_step("sync-dir")
        .and_then(|()| std::fs::File::open(folder))
        .and_then(|f| f.sync_all())
        .map_err(io_error(folder))
}

/// Brings a manifest of an older format to [`FORMAT_VERSION`] for the writer about to commit
/// it, in that writer's commit:
/// - format 1 → 2: the `videos` shards are rewritten with the columns added since (null in the
///   old rows), so no table ever mixes two schemas;
/// - 2 → 3: roots and the model's path, recorded as typed, become the canonical absolute paths
///   `canonical` gives for them (`walk::canonical_name`: as the writer's working folder sees
///   them), in the manifest and in the rows of `videos` and `failures` that carry them, so the
///   plan matches them and nothing is embedded again. A root is resolved only where a file
///   recorded under it is found with its size; one that cannot be is kept as recorded;
/// - 3 → 4: nothing but the number: format 4 only adds a failure kind (`memory_limit`), so that
///   an older build refuses an index that may hold one instead of misreading it;
/// - 4 → 5: a search segment is written beside each `videos` shard
///   ([`segment::add_missing_segments`], which reads the frames table once).
///
/// The old shards stay until that commit's garbage collection. Returns whether anything
/// changed; the caller must then commit even if it has nothing else to do. The new shards are
/// tagged `TAG-0`, a tag the writer's own shards never take (`TAG`, then `TAG-1`, `TAG-2`… for
/// each periodic commit's new writers), so the two cannot clash.
pub fn upgrade(
    index: &Path,
    manifest: &mut Manifest,
    tag: &str,
    canonical: impl Fn(&str) -> Option<String>,
) -> Result<bool, StoreError> {
    if manifest.format_version == FORMAT_VERSION {
        return Ok(false);
    }
    if manifest.format_version >= 3 {
        segment::add_missing_segments(index, manifest)?;
        manifest.format_version = FORMAT_VERSION;
        return Ok(true);
    }
    let rows = read_table::<VideoRow>(index, manifest.shards("videos"))?;
    // Read once: what tells where a root is, and what is rewritten when one moves.
    let failures = if manifest.format_version < 3 {
        read_table::<Failure>(index, manifest.shards("failures"))?
    } else {
        Vec::new()
    };
    let renamed: HashMap<String, String> = if manifest.format_version < 3 {
        let files = rows
            .iter()
            .map(|v| (&v.root, &v.path, v.size_bytes))
            .chain(failures.iter().map(|f| (&f.root, &f.path, f.size_bytes)));
        let files: Vec<(&String, &String, u64)> = files.collect();
        manifest
            .roots
            .iter()
            .filter_map(|r| canonical(r).filter(|c| c != r).map(|c| (r.clone(), c)))
            .filter(|(root, resolved)| holds_its_files(resolved, files.iter().filter(|f| f.0 == root)))
            .collect()
    } else {
        HashMap::new()
    };
    let rename = |root: &mut String| {
        if let Some(name) = renamed.get(root.as_str()) {
            root.clone_from(name);
        }
    };
    let tag = format!("{tag}-0");
    let mut videos = ShardWriter::<VideoRow>::new(index, "videos", &tag, manifest.model.embed_dim, VIDEO_SHARD_ROWS)?;
    for mut row in rows {
        rename(&mut row.root);
        videos.push(row)?;
    }
    manifest.tables.insert("videos".to_string(), videos.finish()?);
    if !renamed.is_empty() {
        let mut writer = ShardWriter::<Failure>::new(index, "failures", &tag, 0, u64::MAX)?;
        for mut row in failures {
            rename(&mut row.root);
            writer.push(row)?;
        }
        manifest.tables.insert("failures".to_string(), writer.finish()?);
        manifest.suspects.iter_mut().for_each(|s| rename(&mut s.root));
        let mut roots: Vec<String> = Vec::new();
        for mut root in std::mem::take(&mut manifest.roots) {
            rename(&mut root);
            if !roots.contains(&root) {
                roots.push(root);
            }
        }
        manifest.roots = roots;
    }
    if manifest.format_version < 3
        && let Some(source) = canonical(&manifest.model.source)
    {
        manifest.model.source = source;
    }
    segment::add_missing_segments(index, manifest)?;
    manifest.format_version = FORMAT_VERSION;
    Ok(true)
}

/// Total bytes of the shards and segments a manifest lists.
pub fn index_bytes(manifest: &Manifest) -> u64 {
    manifest.tables.values().flatten().map(|s| s.bytes + s.segment.as_ref().map_or(0, |g| g.bytes)).sum()
}

/// Microseconds since the Unix epoch: run tags and commit times.
pub fn now_us() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}
