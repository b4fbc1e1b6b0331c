//! `manifest.json`: the only source of truth about what an index holds.
//!
//! A table's rows are exactly those of the shards its manifest entry lists; anything else in
//! the index folder is invisible. The manifest is replaced atomically (temporary file in the
//! same folder, synced, renamed, folder synced), so a crash leaves either the old or the new.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::segment::SegmentInfo;
use super::{StoreError, atomic_write_with};
use crate::partition::Shard;
use crate::types::ModelIdentity;

pub const MANIFEST: &str = "manifest.json";
/// The format this build writes. 2 added `stream_index` to `videos`; 3 made recorded paths
/// canonical; 4 added the failure kind `memory_limit`, which older builds cannot read; 5 added
/// a search segment beside each `videos` shard (`segment.rs`).
pub const FORMAT_VERSION: u32 = 5;
/// The oldest format this build reads; a writer upgrades it ([`crate::store::upgrade`]).
pub const OLDEST_FORMAT_VERSION: u32 = 1;

/// One immutable Parquet file of a table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// Relative to the index folder, `/`-separated.
    pub path: String,
    pub rows: u64,
    pub bytes: u64,
    pub sha256: String,
    /// The search segment written with a `videos` shard (format 5 on; none in other tables).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segment: Option<SegmentInfo>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingRecord {
    pub fps: f64,
    pub max_frames: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreprocessRecord {
    /// The resampling filter, always `bicubic-antialias` (Pillow's).
    pub resize: String,
    pub shortest_edge: u32,
    pub crop: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub model: ModelIdentity,
    pub sampling: SamplingRecord,
    pub preprocess: PreprocessRecord,
    /// Every root an ingest has walked, as given.
    pub roots: Vec<String>,
    /// Table name (`videos`, `frames`, `failures`, `texts/NAME`) → its shards.
    pub tables: BTreeMap<String, Vec<ShardInfo>>,
    /// Unix time in microseconds of the commit that wrote this manifest.
    #[serde(default)]
    pub committed_at_us: i64,
    /// The report of the run that made this commit (`runs/…json`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run: Option<String>,
    /// Files that were being decoded when an ingest died, with how many times: at two, the
    /// file is recorded as a `crashed_decoder` failure instead of being tried again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub suspects: Vec<Suspect>,
    /// The part of a sharded ingest this index is (`ingest --shard I/N`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<Shard>,
    /// The parts `merge` made this index of; only `merge` writes its videos, frames and failures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged: Option<Merged>,
}

/// What a merged index was made of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Merged {
    /// N: the number of parts.
    pub count: u32,
    pub parts: Vec<MergedPart>,
}

/// One part as `merge` found it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergedPart {
    pub shard: u32,
    /// The part's canonical absolute path.
    pub path: String,
    /// Its manifest's `committed_at_us` when merged.
    pub committed_at_us: i64,
}

/// A file in flight when an ingest process died.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suspect {
    pub root: String,
    pub path: String,
    pub crashes: u32,
}

impl Manifest {
    pub fn shards(&self, table: &str) -> &[ShardInfo] {
        self.tables.get(table).map_or(&[], Vec::as_slice)
    }

    pub fn rows(&self, table: &str) -> u64 {
        self.shards(table).iter().map(|s| s.rows).sum()
    }

    /// Names of the text sets (`texts/NAME` → `NAME`).
    pub fn text_sets(&self) -> Vec<&str> {
        self.tables.keys().filter_map(|k| k.strip_prefix("texts/")).collect()
    }

    /// Reads `INDEX/manifest.json`; `Ok(None)` when the index does not exist yet.
    pub fn load(index: &Path) -> Result<Option<Manifest>, StoreError> {
        let path = index.join(MANIFEST);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StoreError::Io { path, source }),
        };
        Manifest::parse(&path, &text).map(Some)
    }

    /// A manifest's text, read from `path`, checked to be of a format this build reads.
    pub fn parse(path: &Path, text: &str) -> Result<Manifest, StoreError> {
        let path = path.to_path_buf();
        let manifest: Manifest = serde_json::from_str(text).map_err(|e| StoreError::Corrupt {
            path: path.clone(),
            message: format!("not a vtr-index manifest: {e}"),
        })?;
        if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&manifest.format_version) {
            return Err(StoreError::Corrupt {
                path,
                message: format!(
                    "format_version {} is not supported by this vtr-index (it reads versions {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION})",
                    manifest.format_version
                ),
            });
        }
        Ok(manifest)
    }

    /// Publishes this manifest: the commit point of every change to the index.
    pub fn commit(&self, index: &Path) -> Result<(), StoreError> {
        let mut text = serde_json::to_string_pretty(self).expect("a manifest always serialises");
        text.push('\n');
        atomic_write_with(&index.join(MANIFEST), text.as_bytes(), "manifest-written")?;
        crate::fault::point("committed");
        Ok(())
    }
}
