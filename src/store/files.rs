//! Which files in an index folder the index wrote, and removing only those.
//!
//! The rule: no command removes or overwrites a file it did not write. The index writes
//! exactly these names, and nothing else is ever removed, whatever folder it sits in:
//!
//! - `manifest.json`, `lock` and `runs/<digits>.json` / `runs/<digits>.inflight` at their places;
//! - shards `part-<digits>[-<digits>…]-<5 digits>.parquet` in `videos/`, `frames/`,
//!   `failures/` and `texts/<NAME>/`, and search segments, the same names ending `.vseg`, in
//!   `segments/`;
//! - temporary files `.tmp-<pid>-<name>` ([`temporary_path`]) beside the file they become, in
//!   the table folders, at the top level and in `runs/` (and `.tmp-<shard name>`, the shard
//!   temporaries of older builds); a collection removes every one but this process's own.
//!
//! Anything else found in those folders (a user's `README.txt`, a folder of their captions,
//! their videos if they pointed `--index` at the wrong place) is *foreign*: left in place and
//! named once in a warning. [`foreign_entries`] is what `ingest` checks before it creates an
//! index in an existing folder.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{Manifest, StoreError, io_error};

/// Folders that hold table shards (`texts` one folder deeper, per text set) and segments.
const TABLE_DIRS: &[&str] = &["videos", "frames", "failures", "texts", super::segment::SEGMENTS];
/// Files and folders the index keeps at its top level.
const TOP_LEVEL: &[&str] =
    &["manifest.json", "lock", "runs", "videos", "frames", "failures", "texts", super::segment::SEGMENTS];

/// The temporary name `path` is written under before it is renamed into place:
/// `.tmp-<pid>-<name>` in the same folder (the rename is atomic only within one file system).
pub fn temporary_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".tmp-{}-{name}", std::process::id()))
}

/// `.tmp-<pid>-…`: a file some vtr-index process was writing; also `.tmp-<shard name>`, the
/// temporary shard name of builds before the pid was part of it.
pub fn is_temporary_name(name: &str) -> bool {
    name.strip_prefix(".tmp-").is_some_and(is_shard_name) || temporary_pid(name).is_some_and(is_digits)
}

/// A temporary name of this process's ([`temporary_path`]).
pub fn is_own_temporary_name(name: &str) -> bool {
    temporary_pid(name) == Some(std::process::id().to_string().as_str())
}

/// The `<pid>` of a `.tmp-<pid>-<name>` name (not checked to be digits).
fn temporary_pid(name: &str) -> Option<&str> {
    let (pid, rest) = name.strip_prefix(".tmp-")?.split_once('-')?;
    (!rest.is_empty()).then_some(pid)
}

/// `part-<digits>[-<digits>…]-<5 digits>.parquet`: a shard, listed or not.
pub fn is_shard_name(name: &str) -> bool {
    is_part_name(name, "parquet")
}

/// A shard's name ending `.vseg`: a search segment, listed or not.
pub fn is_segment_name(name: &str) -> bool {
    is_part_name(name, super::segment::SEGMENT_EXTENSION)
}

fn is_part_name(name: &str, extension: &str) -> bool {
    let Some(tag) = name.strip_prefix("part-").and_then(|n| n.strip_suffix(extension)?.strip_suffix('.')) else {
        return false;
    };
    let parts: Vec<&str> = tag.split('-').collect();
    parts.len() >= 2 && parts.iter().all(|p| is_digits(p)) && parts.last().is_some_and(|n| n.len() == 5)
}

/// `<digits>.json` and `<digits>.inflight` in `runs/`: run reports and crash journals.
pub fn is_run_file_name(name: &str) -> bool {
    [".json", ".inflight"].iter().any(|suffix| name.strip_suffix(suffix).is_some_and(is_digits))
}

fn is_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

fn name_of(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Entries of one folder, sorted; none when it does not exist.
fn entries(folder: &Path) -> Result<Vec<(PathBuf, bool)>, StoreError> {
    let read = match std::fs::read_dir(folder) {
        Ok(read) => read,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error(folder)(e)),
    };
    let mut out = Vec::new();
    for entry in read {
        let entry = entry.map_err(io_error(folder))?;
        let is_dir = entry.file_type().map_err(io_error(&entry.path()))?.is_dir();
        out.push((entry.path(), is_dir));
    }
    out.sort();
    Ok(out)
}

/// Files in the table folders the index wrote (shards and temporaries), and everything foreign
/// there, each as a path.
struct TableFiles {
    own: Vec<(PathBuf, String)>,
    foreign: Vec<PathBuf>,
}

fn table_files(index: &Path) -> Result<TableFiles, StoreError> {
    let mut files = TableFiles { own: Vec::new(), foreign: Vec::new() };
    // Sorts one folder's files into `files` (the index's own only where it keeps shards);
    // returns its sub-folders.
    fn look_at(
        folder: &Path,
        rel: &str,
        holds_shards: bool,
        files: &mut TableFiles,
    ) -> Result<Vec<PathBuf>, StoreError> {
        let is_own_name = if rel == super::segment::SEGMENTS { is_segment_name } else { is_shard_name };
        let mut folders = Vec::new();
        for (path, is_dir) in entries(folder)? {
            let name = name_of(&path);
            if is_dir {
                folders.push(path);
            } else if holds_shards && (is_own_name(&name) || is_temporary_name(&name)) {
                files.own.push((path, format!("{rel}/{name}")));
            } else {
                files.foreign.push(path);
            }
        }
        Ok(folders)
    }
    for dir in TABLE_DIRS {
        // `texts/` holds one folder per text set and no shard of its own.
        let folders = look_at(&index.join(dir), dir, *dir != "texts", &mut files)?;
        for folder in folders {
            if *dir == "texts" {
                // A text set's folder; anything deeper is not the index's.
                let rel = format!("texts/{}", name_of(&folder));
                let deeper = look_at(&folder, &rel, true, &mut files)?;
                files.foreign.extend(deeper);
            } else {
                files.foreign.push(folder);
            }
        }
    }
    Ok(files)
}

/// What in `index` the index did not write: unknown top-level entries, and anything in its
/// own folders that is not one of its file names. Empty for a new, an empty or a pure index
/// folder (including one whose first run died before its first commit).
pub fn foreign_entries(index: &Path) -> Result<Vec<PathBuf>, StoreError> {
    let mut foreign = Vec::new();
    for (path, is_dir) in entries(index)? {
        let name = name_of(&path);
        let own_kind = match name.as_str() {
            "manifest.json" | "lock" => !is_dir,
            _ if TOP_LEVEL.contains(&name.as_str()) => is_dir,
            _ => !is_dir && is_temporary_name(&name),
        };
        if !own_kind {
            foreign.push(path);
        }
    }
    for (path, is_dir) in entries(&index.join("runs"))? {
        if is_dir || !(is_run_file_name(&name_of(&path)) || is_temporary_name(&name_of(&path))) {
            foreign.push(path);
        }
    }
    foreign.extend(table_files(index)?.foreign);
    foreign.sort();
    Ok(foreign)
}

/// Removes the shards and temporary files in the table folders that `manifest` does not list
/// (left by runs that died before their commit, or replaced by later commits), and the
/// temporaries of dead writers' manifests and run reports, and nothing else: foreign files are
/// named once in a warning and left where they are. Runs under the writer lock, so every
/// temporary but this process's own is a dead writer's. Returns how many files were removed.
pub fn collect_garbage(index: &Path, manifest: Option<&Manifest>) -> Result<usize, StoreError> {
    let listed: HashSet<&str> = manifest
        .map(|m| {
            let shards = m.tables.values().flatten();
            shards
                .flat_map(|s| std::iter::once(s.path.as_str()).chain(s.segment.as_ref().map(|g| g.path.as_str())))
                .collect()
        })
        .unwrap_or_default();
    let files = table_files(index)?;
    warn_foreign(&files.foreign);
    let mut removed = 0;
    let mut emptied_sets = HashSet::new();
    for (path, rel) in files.own {
        if listed.contains(rel.as_str()) {
            continue;
        }
        std::fs::remove_file(&path).map_err(io_error(&path))?;
        removed += 1;
        if rel.starts_with("texts/")
            && let Some(folder) = path.parent()
        {
            emptied_sets.insert(folder.to_path_buf());
        }
    }
    for folder in [index.to_path_buf(), index.join("runs")] {
        for (path, is_dir) in entries(&folder)? {
            let name = name_of(&path);
            if !is_dir && is_temporary_name(&name) && !is_own_temporary_name(&name) {
                std::fs::remove_file(&path).map_err(io_error(&path))?;
                removed += 1;
            }
        }
    }
    // A text-set folder this collection emptied of the index's own files goes too; one that
    // still holds anything (a user's file) stays: `remove_dir` removes only empty folders.
    for folder in emptied_sets {
        let _ = std::fs::remove_dir(folder);
    }
    Ok(removed)
}

/// Names each foreign file on stderr, once per process however often the index is collected.
fn warn_foreign(foreign: &[PathBuf]) {
    static WARNED: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);
    let mut warned = WARNED.lock().unwrap_or_else(|e| e.into_inner());
    let warned = warned.get_or_insert_with(HashSet::new);
    for path in foreign {
        if warned.insert(path.clone()) {
            eprintln!("vtr-index: warning: {}: not a file of the index; left in place", path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_index_knows_its_own_names() {
        assert!(is_shard_name("part-1732000000000000-00000.parquet"));
        assert!(is_shard_name("part-1732000000000000-3-00012.parquet"));
        assert!(!is_shard_name("part-00000.parquet"));
        assert!(!is_shard_name("part-abc-00000.parquet"));
        assert!(!is_shard_name("part-1-0.parquet"));
        assert!(!is_shard_name("my-videos.parquet"));
        assert!(is_segment_name("part-1732000000000000-3-00012.vseg"));
        assert!(!is_segment_name("part-1732000000000000-00012.parquet") && !is_shard_name("part-1-00000.vseg"));
        assert!(!is_segment_name("part-1-00000vseg"));
        assert!(is_temporary_name(".tmp-4242-manifest.json"));
        assert!(is_temporary_name(&name_of(&temporary_path(Path::new("/x/t2v.npy")))));
        assert!(!is_temporary_name(".tmp-notes.txt"));
        assert!(is_temporary_name(".tmp-part-1796239295427034-00000.parquet"), "older builds' shard temporaries");
        assert!(is_own_temporary_name(&name_of(&temporary_path(Path::new("/x/t2v.npy")))));
        assert!(!is_own_temporary_name(".tmp-1-t2v.npy") || std::process::id() == 1);
        assert!(!is_temporary_name(".tmp-12-"));
        assert!(is_run_file_name("1732000000000000.json") && is_run_file_name("17.inflight"));
        assert!(!is_run_file_name("notes.json"));
    }

    #[test]
    fn garbage_collection_removes_only_unlisted_files_of_the_index() {
        let index = tempfile::tempdir().unwrap();
        let put = |rel: &str| {
            let path = index.path().join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, rel).unwrap();
            path
        };
        let stale = [
            put("videos/part-1-00000.parquet"),
            put("frames/.tmp-99-part-1-00000.parquet"),
            put("texts/old/part-1-00000.parquet"),
            // A dead writer's manifest and run report (no process has that pid), and an older
            // build's shard temporary.
            put(".tmp-4194305-manifest.json"),
            put("runs/.tmp-4194305-1.json"),
            put("videos/.tmp-part-1-00001.parquet"),
            put("segments/part-1-00000.vseg"),
            put("segments/.tmp-4194305-frames.spill"),
        ];
        let ours = put(&name_of(&temporary_path(Path::new("manifest.json"))));
        let foreign = [
            put("videos/a.mp4"),
            put("videos/README.txt"),
            put("texts/mine/captions.csv"),
            put("texts/mine/part-2-00000.parquet"),
            put("frames/sub/part-3-00000.parquet"),
            put("texts/notes.txt"),
            put("texts/part-4-00000.parquet"),
            put("segments/part-1-00000.parquet"),
            put("videos/part-1-00001.vseg"),
        ];
        let removed = collect_garbage(index.path(), None).unwrap();
        // The set folder a user keeps files in stays; its one index-named file went.
        assert_eq!(removed, 9);
        assert!(ours.exists(), "this process's own temporary is in use");
        for path in stale {
            assert!(!path.exists(), "{}", path.display());
        }
        assert!(!index.path().join("texts/old").exists(), "an emptied set folder goes");
        for path in foreign.iter().filter(|p| !p.ends_with("mine/part-2-00000.parquet")) {
            assert_eq!(
                std::fs::read_to_string(path).unwrap(),
                path.strip_prefix(index.path()).unwrap().to_str().unwrap()
            );
        }
        let left: Vec<PathBuf> = foreign_entries(index.path()).unwrap();
        assert!(left.contains(&index.path().join("videos/a.mp4")));
        assert!(left.contains(&index.path().join("frames/sub")));
    }
}
