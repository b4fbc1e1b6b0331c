//! `merge`: the parts of a sharded ingest joined into one index (contract §7), without
//! rewriting a row. Each part's shard files are hard-linked into the merged index (copied where
//! the file system cannot link), so the cost grows with the number of files, not of rows; the
//! merged manifest lists them and is committed as any other (atomic replace), so a merge that
//! dies leaves the index as its last commit. The merged index's videos, frames and failures are
//! the merge's alone; every other table (`texts/*`, encoded on the merged index) is carried over
//! untouched, so a nightly re-merge keeps them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::segment::{SEGMENTS, SegmentInfo, segment_path_of};
use super::{
    FORMAT_VERSION, Manifest, Merged, MergedPart, ShardInfo, StoreError, WriterLock, collect_garbage, create_temporary,
    io_error, now_us, publish, sync_dir, sync_temporary, temporary_path,
};

/// The tables a merge owns; the parts' shards of these make the merged index's.
pub const MERGED_TABLES: [&str; 3] = ["videos", "frames", "failures"];

#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a merge did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MergeReport {
    pub parts: u32,
    pub videos: u64,
    pub frames: u64,
    pub failures: u64,
    /// Shard and segment files newly linked, copied (where no link could be made), and already
    /// present.
    pub linked: usize,
    pub copied: usize,
    pub kept: usize,
    /// Files of earlier merges no longer listed, removed.
    pub removed: usize,
}

/// A part as read: its folder (canonical) and manifest.
struct Part {
    path: PathBuf,
    manifest: Manifest,
}

/// Merges the indexes `parts` (each made by `ingest --shard I/N`, together covering every
/// `I` of one `N` once) into `out`. Refuses, leaving `out` untouched, when a part is missing
/// or doubled or the parts disagree on what they were made with.
pub fn merge(parts: &[PathBuf], out: &Path) -> Result<MergeReport, MergeError> {
    let parts = read_parts(parts)?;
    let count = check_parts(&parts)?;
    let first = &parts[0].manifest;
    // Lock before reading OUT's manifest, so no other merge commits between our read and ours.
    std::fs::create_dir_all(out).map_err(io_error(out))?;
    let _lock = WriterLock::acquire(out, "merge")?;
    let previous = Manifest::load(out)?;
    if let Some(previous) = &previous {
        if previous.merged.is_none() {
            return Err(MergeError::Refused(format!(
                "{}: an index that `ingest` writes, not a merged one: give merge a new folder",
                out.display()
            )));
        }
        if previous.model.sha256 != first.model.sha256 {
            return Err(MergeError::Refused(format!(
                "{}: merged from parts of another model (sha256 {}…); its texts would not match: give merge a new folder",
                out.display(),
                &previous.model.sha256[..12.min(previous.model.sha256.len())]
            )));
        }
    }
    collect_garbage(out, previous.as_ref())?;

    let mut report = MergeReport { parts: count, ..Default::default() };
    let mut tables: BTreeMap<String, Vec<ShardInfo>> = previous
        .as_ref()
        .map(|m| m.tables.iter().filter(|(name, _)| !MERGED_TABLES.contains(&name.as_str())).map(clone_entry).collect())
        .unwrap_or_default();
    for table in MERGED_TABLES {
        std::fs::create_dir_all(out.join(table)).map_err(io_error(&out.join(table)))?;
        let mut listed = Vec::new();
        for part in &parts {
            let shard = part.manifest.shard.expect("checked: every part has its shard");
            for (k, info) in part.manifest.shards(table).iter().enumerate() {
                let name = format!("{table}/part-{}-{}-{k:05}.parquet", part.manifest.committed_at_us, shard.index);
                let mut placed = vec![place(&part.path.join(&info.path), &out.join(&name), info.bytes)?];
                // A videos shard's search segment goes with it, named after its new name.
                let segment = match &info.segment {
                    Some(segment) => {
                        let path = segment_path_of(&name);
                        let folder = out.join(SEGMENTS);
                        std::fs::create_dir_all(&folder).map_err(io_error(&folder))?;
                        placed.push(place(&part.path.join(&segment.path), &out.join(&path), segment.bytes)?);
                        Some(SegmentInfo { path, ..segment.clone() })
                    }
                    None => None,
                };
                for placed in placed {
                    match placed {
                        Placed::Linked => report.linked += 1,
                        Placed::Copied => report.copied += 1,
                        Placed::Present => report.kept += 1,
                    }
                }
                listed.push(ShardInfo { path: name, segment, ..info.clone() });
            }
        }
        sync_dir(&out.join(table))?;
        if table == "videos" && listed.iter().any(|s| s.segment.is_some()) {
            sync_dir(&out.join(SEGMENTS))?;
        }
        tables.insert(table.to_string(), listed);
    }
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        model: first.model.clone(),
        sampling: first.sampling.clone(),
        preprocess: first.preprocess.clone(),
        roots: first.roots.clone(),
        tables,
        committed_at_us: now_us(),
        last_run: None,
        suspects: Vec::new(),
        shard: None,
        merged: Some(Merged {
            count,
            parts: parts
                .iter()
                .map(|p| MergedPart {
                    shard: p.manifest.shard.expect("checked").index,
                    path: p.path.to_string_lossy().into_owned(),
                    committed_at_us: p.manifest.committed_at_us,
                })
                .collect(),
        }),
    };
    manifest.commit(out)?;
    report.removed = collect_garbage(out, Some(&manifest))?;
    report.videos = manifest.rows("videos");
    report.frames = manifest.rows("frames");
    report.failures = manifest.rows("failures");
    Ok(report)
}

fn clone_entry((name, shards): (&String, &Vec<ShardInfo>)) -> (String, Vec<ShardInfo>) {
    (name.clone(), shards.clone())
}

fn read_parts(paths: &[PathBuf]) -> Result<Vec<Part>, MergeError> {
    let mut parts = Vec::new();
    for path in paths {
        let manifest = Manifest::load(path)?
            .ok_or_else(|| MergeError::Refused(format!("{}: not an index (no manifest.json)", path.display())))?;
        if manifest.shard.is_none() {
            return Err(MergeError::Refused(format!(
                "{}: not a part of a sharded ingest (made without --shard I/N)",
                path.display()
            )));
        }
        if manifest.format_version != FORMAT_VERSION {
            return Err(MergeError::Refused(format!(
                "{}: format {} (this merge reads parts of format {FORMAT_VERSION}): upgrade it first by running its `ingest --shard` again (the next writer upgrades an index in place)",
                path.display(),
                manifest.format_version
            )));
        }
        let path = std::fs::canonicalize(path).map_err(io_error(path))?;
        parts.push(Part { path, manifest });
    }
    if parts.is_empty() {
        return Err(MergeError::Refused("merge needs the parts to merge".into()));
    }
    parts.sort_by_key(|p| p.manifest.shard.map(|s| s.index));
    Ok(parts)
}

/// Checks that the parts are one sharded ingest's: one `N`, each part once, the same model,
/// head, dtype, sampling, preprocessing and roots. Returns `N`.
fn check_parts(parts: &[Part]) -> Result<u32, MergeError> {
    let shard = |p: &Part| p.manifest.shard.expect("read_parts checked it");
    let count = shard(&parts[0]).count;
    if let Some(other) = parts.iter().find(|p| shard(p).count != count) {
        return Err(MergeError::Refused(format!(
            "{} is part {} but {} is part {}: the parts of one merge share N",
            parts[0].path.display(),
            shard(&parts[0]),
            other.path.display(),
            shard(other)
        )));
    }
    let mut by_index: BTreeMap<u32, Vec<&Path>> = BTreeMap::new();
    for part in parts {
        by_index.entry(shard(part).index).or_default().push(&part.path);
    }
    let doubled: Vec<String> = by_index
        .iter()
        .filter(|(_, paths)| paths.len() > 1)
        .map(|(i, paths)| {
            format!(
                "part {i}/{count} is given twice ({})",
                paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            )
        })
        .collect();
    let missing: Vec<String> =
        (0..count).filter(|i| !by_index.contains_key(i)).map(|i| format!("{i}/{count}")).collect();
    if !doubled.is_empty() || !missing.is_empty() {
        let mut problems = doubled;
        if !missing.is_empty() {
            problems.push(format!("missing part{} {}", if missing.len() == 1 { "" } else { "s" }, missing.join(", ")));
        }
        return Err(MergeError::Refused(format!(
            "the parts do not cover 0…{} once: {}",
            count - 1,
            problems.join("; ")
        )));
    }
    let first = &parts[0].manifest;
    let sorted_roots = |m: &Manifest| {
        let mut roots = m.roots.clone();
        roots.sort();
        roots
    };
    for part in &parts[1..] {
        let m = &part.manifest;
        let differs = [
            ("model", m.model.sha256 != first.model.sha256),
            ("head", m.model.head.unwrap_or_default() != first.model.head.unwrap_or_default()),
            ("dtype", m.model.dtype != first.model.dtype),
            ("sampling", m.sampling != first.sampling),
            ("preprocessing", m.preprocess != first.preprocess),
            ("roots", sorted_roots(m) != sorted_roots(first)),
        ];
        if let Some((what, _)) = differs.iter().find(|(_, differs)| *differs) {
            return Err(MergeError::Refused(format!(
                "{} (part {}) and {} (part {}) were made with another {what}: the parts of one merge are one ingest's",
                part.path.display(),
                m.shard.expect("checked"),
                parts[0].path.display(),
                first.shard.expect("checked")
            )));
        }
    }
    Ok(count)
}

enum Placed {
    Linked,
    Copied,
    Present,
}

/// Puts the shard file `from` at `to`: already there (a shard name is never reused for other
/// bytes, and `to`'s size is checked), a hard link, or where linking fails (another file
/// system, one without links) a copy, written under a temporary name, synced and renamed.
fn place(from: &Path, to: &Path, bytes: u64) -> Result<Placed, StoreError> {
    if std::fs::metadata(to).is_ok_and(|m| m.len() == bytes) {
        return Ok(Placed::Present);
    }
    let _ = std::fs::remove_file(to);
    if std::fs::hard_link(from, to).is_ok() {
        return Ok(Placed::Linked);
    }
    let tmp = temporary_path(to);
    let copied = create_temporary(&tmp).and_then(|mut file| {
        std::io::copy(&mut std::fs::File::open(from)?, &mut file)?;
        sync_temporary(&file)
    });
    if let Err(e) = copied {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_error(from)(e));
    }
    publish(&[(tmp, to.to_path_buf())])?;
    Ok(Placed::Copied)
}
