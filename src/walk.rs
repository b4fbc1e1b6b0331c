//! Folders → video files: the recursive, sorted, deterministic walk of the ingest roots.
//!
//! Owns which files count as videos (by extension, case-insensitively), how a `video_id` is
//! derived from a path (bytes that are not UTF-8 written `%XX`, [`escape_path_bytes`]), which
//! folders are walked (each once: a real folder wins over links to it), and the walk-stage
//! failures (links back to an ancestor, unreadable folders, duplicate ids). It never opens a
//! file's contents.

use std::collections::{HashMap, HashSet};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::failure::{Failure, FailureKind, Stage};

/// File extensions recognised as video, compared case-insensitively (contract §3).
pub const VIDEO_EXTENSIONS: &[&str] = &[
    "mp4", "m4v", "mov", "mkv", "webm", "avi", "mpg", "mpeg", "m2v", "ts", "m2ts", "mts", "wmv", "asf", "flv", "ogv",
    "3gp", "3g2", "mxf",
];

/// An ingest root: the folder (any bytes), and the name the index stores it under: the
/// canonical absolute path ([`escape_path_bytes`] of it; the path itself wherever it is
/// UTF-8), so a root reached from any working folder, or through a link, is one root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Root {
    pub path: PathBuf,
    pub name: String,
}

impl Root {
    /// The root at `path`, canonicalised; a path that cannot be (a missing folder) keeps the
    /// name it was given, for the error that names it.
    pub fn new(path: impl Into<PathBuf>) -> Root {
        let path = path.into();
        let path = std::fs::canonicalize(&path).unwrap_or(path);
        let name = escape_path_bytes(path.as_os_str());
        Root { path, name }
    }
}

/// A root or model path recorded by an older writer as it was typed, resolved as the current
/// working folder sees it: its canonical absolute name, if it is there.
pub fn canonical_name(recorded: &str) -> Option<String> {
    std::fs::canonicalize(recorded).ok().map(|path| escape_path_bytes(path.as_os_str()))
}

/// A video file found under one of the roots.
#[derive(Debug, Clone, PartialEq)]
pub struct VideoFile {
    /// The root's name in the index ([`Root::name`]).
    pub root: String,
    /// Path relative to `root`, `/`-separated, with extension.
    pub path: String,
    /// `path` without its extension: the id the index knows the video by.
    pub video_id: String,
    /// Where to open it.
    pub abs_path: PathBuf,
    pub size_bytes: u64,
    pub mtime_ns: i64,
}

/// Everything one walk over the roots found.
#[derive(Debug, Default)]
pub struct WalkOutcome {
    pub videos: Vec<VideoFile>,
    pub failures: Vec<Failure>,
    /// Files without a video extension: skipped, counted, not failures.
    pub skipped: u64,
    /// Folders reached a second way (a link to a root, to a real folder, to a folder reached
    /// before; a root inside another root), `ROOT/PATH` each: skipped so every folder is
    /// walked once; not failures.
    pub repeated_folders: Vec<String>,
}

/// A root that cannot be walked: the run must stop before changing anything.
#[derive(Debug, thiserror::Error)]
pub enum WalkError {
    #[error("{root}: the folder does not exist (is the disk mounted?)")]
    Missing { root: String },
    #[error("{root}: not a folder")]
    NotAFolder { root: String },
    #[error("{root}: cannot read the folder: {source}")]
    Unreadable { root: String, source: std::io::Error },
    #[error("{list}: cannot read the list of files: {message}")]
    List { list: String, message: String },
}

pub fn is_video_path(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| VIDEO_EXTENSIONS.iter().any(|v| v.eq_ignore_ascii_case(e)))
}

/// Checks that every root exists and is a readable folder, before anything else happens.
pub fn check_roots(roots: &[Root]) -> Result<(), WalkError> {
    for Root { path, name } in roots {
        let root = name.clone();
        match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(WalkError::Missing { root }),
            Err(source) => return Err(WalkError::Unreadable { root, source }),
            Ok(m) if !m.is_dir() => return Err(WalkError::NotAFolder { root }),
            Ok(_) => {}
        }
        if let Err(source) = std::fs::read_dir(path) {
            return Err(WalkError::Unreadable { root, source });
        }
    }
    Ok(())
}

/// Walks every root recursively (following symlinks), in sorted order, leaving out the
/// folder `index` (an index kept inside a root, as in `ingest . --index .vtr-index`).
///
/// Every folder is walked once. The real folders under the roots are listed first; a link to
/// one of them, to a root, or to a folder reached before (through an earlier link, or under
/// another root that holds it) is skipped and reported in [`WalkOutcome::repeated_folders`].
/// A link to a folder that holds it (an ancestor, the roots' own included) is a
/// `symlink_loop` failure at the link.
///
/// A `video_id` seen twice (across roots, or `a.mp4` beside `a.mkv`) keeps its first file;
/// the others become `duplicate_id` failures.
pub fn walk_roots(roots: &[Root], index: &Path, now_us: i64) -> Result<WalkOutcome, WalkError> {
    check_roots(roots)?;
    let identity = |m: &std::fs::Metadata| (m.dev(), m.ino());
    let index_identity = std::fs::metadata(index).ok().map(|m| identity(&m));
    let real = real_folders(roots);
    let mut entered = HashSet::new();
    let mut outcome = WalkOutcome::default();
    let mut seen_ids: HashMap<String, (String, String)> = HashMap::new();
    for Root { path: root_path, name: root } in roots {
        let root_path = root_path.as_path();
        let failure = |path: &Path, kind: FailureKind, message: String| Failure {
            root: root.clone(),
            path: relative_path(root_path, path),
            stage: Stage::Walk,
            kind,
            message,
            first_seen_us: now_us,
            attempts: 1,
            size_bytes: 0,
            mtime_ns: 0,
        };
        let mut link_failures = Vec::new();
        let mut repeated = Vec::new();
        let walker =
            walkdir::WalkDir::new(root_path).follow_links(true).sort_by_file_name().into_iter().filter_entry(|entry| {
                if !entry.file_type().is_dir() {
                    return true;
                }
                let Ok(metadata) = entry.metadata() else { return true };
                if Some(identity(&metadata)) == index_identity {
                    return false;
                }
                if entry.path_is_symlink() && entry.depth() > 0 {
                    // A link to a folder that holds it: a loop.
                    let target = std::fs::canonicalize(entry.path());
                    let here = entry.path().parent().and_then(|p| std::fs::canonicalize(p).ok());
                    if let (Ok(target), Some(here)) = (&target, &here)
                        && here.starts_with(target)
                    {
                        let message = format!(
                            "symbolic link loop: leads back to {}, which holds it; the link was not followed",
                            target.display()
                        );
                        link_failures.push(failure(entry.path(), FailureKind::SymlinkLoop, message));
                        return false;
                    }
                }
                // A folder reached by another path than its real one, or reached before (a
                // second link to it, a root inside another root): walked once already, or
                // about to be under its real path.
                let id = identity(&metadata);
                let real_elsewhere = real.get(&id).is_some_and(|real_path| real_path.as_path() != entry.path());
                if real_elsewhere || !entered.insert(id) {
                    let rel = relative_path(root_path, entry.path());
                    repeated.push(if rel.is_empty() {
                        root.clone()
                    } else {
                        format!("{}/{rel}", root.trim_end_matches('/'))
                    });
                    return false;
                }
                true
            });
        for entry in walker {
            let entry = match entry {
                Ok(entry) => entry,
                Err(err) => {
                    let path = err.path().unwrap_or(root_path).to_path_buf();
                    if let Some(ancestor) = err.loop_ancestor() {
                        let message = format!(
                            "symbolic link loop: leads back to {}; the loop was not followed",
                            ancestor.display()
                        );
                        outcome.failures.push(failure(&path, FailureKind::SymlinkLoop, message));
                    } else {
                        let message = format!("cannot read: {err}");
                        outcome.failures.push(failure(&path, FailureKind::Io, message));
                    }
                    continue;
                }
            };
            if entry.file_type().is_dir() {
                continue;
            }
            let found = Found { root, root_path, path: entry.path(), now_us };
            found.add_to(&mut outcome, &mut seen_ids, entry.metadata().map_err(std::io::Error::from));
        }
        outcome.failures.extend(link_failures);
        outcome.repeated_folders.extend(repeated);
    }
    Ok(outcome)
}

/// The files a list names, one path per line relative to `root` (`ingest --files-from`), as
/// a walk of the root would have found them: the same video ids, skips and failures
/// (`duplicate_id` included), without walking the tree. A listed file that is gone is left out,
/// as a walk would leave it out; blank lines are skipped.
pub fn list_files(root: &Root, list: &Path, now_us: i64) -> Result<WalkOutcome, WalkError> {
    check_roots(std::slice::from_ref(root))?;
    let bytes = std::fs::read(list)
        .map_err(|e| WalkError::List { list: list.display().to_string(), message: e.to_string() })?;
    let mut outcome = WalkOutcome::default();
    let mut seen_ids = HashMap::new();
    let mut lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l)).collect();
    lines.retain(|l| !l.is_empty());
    lines.sort_unstable();
    lines.dedup();
    for line in lines {
        let path = root.path.join(std::ffi::OsStr::from_bytes(line));
        let metadata = match std::fs::metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            other => other,
        };
        let found = Found { root: &root.name, root_path: &root.path, path: &path, now_us };
        found.add_to(&mut outcome, &mut seen_ids, metadata);
    }
    Ok(outcome)
}

/// A file a walk or a list came upon.
struct Found<'a> {
    root: &'a str,
    root_path: &'a Path,
    path: &'a Path,
    now_us: i64,
}

impl Found<'_> {
    fn failure(&self, kind: FailureKind, message: String) -> Failure {
        Failure {
            root: self.root.to_string(),
            path: relative_path(self.root_path, self.path),
            stage: Stage::Walk,
            kind,
            message,
            first_seen_us: self.now_us,
            attempts: 1,
            size_bytes: 0,
            mtime_ns: 0,
        }
    }

    /// Adds the file to `outcome`: skipped (not a video by its extension), a failure (no
    /// metadata, not a regular file, an id already taken), or a video file.
    fn add_to(
        &self,
        outcome: &mut WalkOutcome,
        seen_ids: &mut HashMap<String, (String, String)>,
        metadata: std::io::Result<std::fs::Metadata>,
    ) {
        if !is_video_path(self.path) {
            outcome.skipped += 1;
            return;
        }
        let metadata = match metadata {
            Ok(m) => m,
            Err(err) => {
                outcome.failures.push(self.failure(FailureKind::Io, format!("cannot read file metadata: {err}")));
                return;
            }
        };
        if !metadata.is_file() {
            let message = "not a regular file (a named pipe, socket or device)".to_string();
            outcome.failures.push(self.failure(FailureKind::Io, message));
            return;
        }
        let rel = relative_path(self.root_path, self.path);
        let video_id = strip_extension(&rel).to_string();
        if let Some((first_root, first_path)) = seen_ids.get(&video_id) {
            let message = format!(
                "video_id {video_id:?} is already taken by {first_root}/{first_path}; rename one of the two files"
            );
            let mut duplicate = self.failure(FailureKind::DuplicateId, message);
            duplicate.size_bytes = metadata.len();
            duplicate.mtime_ns = mtime_ns(&metadata);
            outcome.failures.push(duplicate);
            return;
        }
        seen_ids.insert(video_id.clone(), (self.root.to_string(), rel.clone()));
        outcome.videos.push(VideoFile {
            root: self.root.to_string(),
            path: rel,
            video_id,
            abs_path: self.path.to_path_buf(),
            size_bytes: metadata.len(),
            mtime_ns: mtime_ns(&metadata),
        });
    }
}

/// (device, inode) → path of every folder under the roots reached without following a link,
/// the roots included (the first root's path where roots nest): the folders' real paths, which
/// every other way to them defers to.
fn real_folders(roots: &[Root]) -> HashMap<(u64, u64), PathBuf> {
    let mut folders = HashMap::new();
    for Root { path, .. } in roots {
        if let Ok(m) = std::fs::metadata(path) {
            folders.entry((m.dev(), m.ino())).or_insert_with(|| path.clone());
        }
        for entry in walkdir::WalkDir::new(path).follow_links(false).min_depth(1).into_iter().flatten() {
            if entry.file_type().is_dir()
                && let Ok(m) = entry.metadata()
            {
                folders.entry((m.dev(), m.ino())).or_insert_with(|| entry.path().to_path_buf());
            }
        }
    }
    folders
}

/// Modification time in nanoseconds since the Unix epoch (negative before it).
pub fn mtime_ns(metadata: &std::fs::Metadata) -> i64 {
    match metadata.modified() {
        Ok(t) => match t.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => d.as_nanos() as i64,
            Err(e) => -(e.duration().as_nanos() as i64),
        },
        Err(_) => 0,
    }
}

fn relative_path(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    let parts: Vec<String> = rel.components().map(|c| escape_path_bytes(c.as_os_str())).collect();
    parts.join("/")
}

/// A file name as the index stores it: valid UTF-8 as it is, and each byte that is not part of
/// valid UTF-8 written `%XX` (upper-case hex), so a Latin-1 name from an old file server keeps
/// a readable, distinct id while every UTF-8 name is unchanged.
pub fn escape_path_bytes(name: &std::ffi::OsStr) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut out = String::new();
    for chunk in name.as_bytes().utf8_chunks() {
        out.push_str(chunk.valid());
        for byte in chunk.invalid() {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The bytes a name that [`escape_path_bytes`] wrote may stand for: `%XX` of a byte that is
/// not ASCII (the only bytes it escapes) turned back into that byte. A name that holds such
/// `%XX` literally is also tried as it is, by the caller.
pub fn unescape_path_bytes(name: &str) -> std::ffi::OsString {
    use std::os::unix::ffi::OsStringExt;
    let bytes = name.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        // `escape_path_bytes` writes upper-case hex.
        let hex = bytes.get(i + 1..i + 3).filter(|h| h.iter().all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(b)));
        let escaped = match (bytes[i], hex) {
            (b'%', Some(hex)) => {
                u8::from_str_radix(std::str::from_utf8(hex).unwrap_or("00"), 16).ok().filter(|&b| b >= 0x80)
            }
            _ => None,
        };
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    std::ffi::OsString::from_vec(out)
}

fn strip_extension(rel: &str) -> &str {
    let file_start = rel.rfind('/').map_or(0, |i| i + 1);
    match rel[file_start..].rfind('.') {
        Some(dot) if dot > 0 => &rel[..file_start + dot],
        _ => rel,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extensions_are_case_insensitive() {
        assert!(is_video_path(Path::new("a/B.MP4")));
        assert!(is_video_path(Path::new("clip.WebM")));
        assert!(!is_video_path(Path::new("notes.txt")));
        assert!(!is_video_path(Path::new("mp4")));
    }

    #[test]
    fn an_escaped_name_turns_back_into_its_bytes() {
        use std::os::unix::ffi::OsStrExt;
        for bytes in [&b"caf\xe9 %41 100%.mp4"[..], b"\xff\xfe", b"plain/name.mp4", b"%E9 literal", b"%"] {
            let name = std::ffi::OsStr::from_bytes(bytes);
            let escaped = escape_path_bytes(name);
            if escaped.contains("%E9") && bytes.starts_with(b"%E9") {
                // A literal `%E9` reads back as the byte: the caller also tries the name as it is.
                continue;
            }
            assert_eq!(unescape_path_bytes(&escaped).as_bytes(), bytes, "{escaped}");
        }
    }

    #[test]
    fn bytes_that_are_not_utf8_are_escaped_and_nothing_else_changes() {
        use std::os::unix::ffi::OsStrExt;
        let name = |bytes: &[u8]| escape_path_bytes(std::ffi::OsStr::from_bytes(bytes));
        assert_eq!(name(b"caf\xe9 cr\xe8me.mp4"), "caf%E9 cr%E8me.mp4");
        assert_eq!(name("café 100%.mp4".as_bytes()), "café 100%.mp4");
        assert_eq!(name(b"\xff\xfe"), "%FF%FE");
    }

    #[test]
    fn video_id_drops_only_the_last_extension() {
        assert_eq!(strip_extension("nested/deeper/gradient_h264.mp4"), "nested/deeper/gradient_h264");
        assert_eq!(strip_extension("a.b/c.tar.mkv"), "a.b/c.tar");
        assert_eq!(strip_extension("dir.x/.hidden"), "dir.x/.hidden");
    }
}
