//! The in-flight journal: which files a running ingest has handed to a decoder and not yet
//! finished, so that the run after a crash knows which files were being decoded when the
//! process died.
//!
//! Each ingest appends `+ROOT\tPATH` when a thread starts decoding a file and `-ROOT\tPATH` when
//! it is done to `INDEX/runs/TAG.inflight`. Appends reach the kernel at once, so they survive
//! the process being killed (not a power cut, which a crashed decoder is not). A run that ends
//! normally removes its journal; a journal left behind is a crash, and its unmatched `+` lines
//! are the files in flight. The manifest keeps the count of such crashes per file
//! ([`crate::store::Manifest::suspects`]) once a later run has committed, and the journals
//! are then removed.
//!
//! An interruption (SIGINT, SIGTERM) is not a crash: [`mark_journals_interrupted`] appends
//! `!interrupted` to every open journal when the first signal arrives, and a journal that says
//! so blames no file, even if the process is then stopped at once (a second Ctrl-C, or the
//! scheduler's SIGKILL after its grace period).

use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{StoreError, io_error};

const SUFFIX: &str = ".inflight";
/// The line an interrupted run appends.
const INTERRUPTED: &str = "!interrupted";

/// Journals of this process that are open, for [`mark_journals_interrupted`].
static OPEN: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Marks every open journal of this process as interrupted: its files in flight are not to
/// blame, whatever happens to the process next. Called from the signal-handling thread.
pub fn mark_journals_interrupted() {
    let open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
    for path in open.iter() {
        if let Ok(mut file) = OpenOptions::new().append(true).open(path) {
            let _ = file.write_all(format!("{INTERRUPTED}\n").as_bytes());
        }
    }
}

/// This run's journal.
pub struct InFlightJournal {
    path: PathBuf,
    file: Mutex<File>,
}

impl InFlightJournal {
    pub fn create(index: &Path, tag: &str) -> Result<InFlightJournal, StoreError> {
        let folder = index.join("runs");
        std::fs::create_dir_all(&folder).map_err(io_error(&folder))?;
        let path = folder.join(format!("{tag}{SUFFIX}"));
        let file = OpenOptions::new().create(true).append(true).open(&path).map_err(io_error(&path))?;
        crate::interrupt::on_signal_call(mark_journals_interrupted);
        OPEN.lock().unwrap_or_else(|e| e.into_inner()).push(path.clone());
        // A signal that came before the action was registered is caught here.
        if crate::interrupt::requested().is_some() {
            mark_journals_interrupted();
        }
        Ok(InFlightJournal { path, file: Mutex::new(file) })
    }

    pub fn started(&self, root: &str, path: &str) {
        self.append('+', root, path);
    }

    pub fn finished(&self, root: &str, path: &str) {
        self.append('-', root, path);
    }

    /// Best effort: a journal that cannot be written loses only crash attribution, never data.
    fn append(&self, mark: char, root: &str, path: &str) {
        let line = format!("{mark}{root}\t{path}\n");
        if let Ok(mut file) = self.file.lock() {
            let _ = file.write_all(line.as_bytes());
        }
    }

    /// A run that ended without crashing leaves no journal.
    pub fn remove(self) {
        OPEN.lock().unwrap_or_else(|e| e.into_inner()).retain(|p| p != &self.path);
        let _ = std::fs::remove_file(&self.path);
    }
}

/// (root, path) → the number of crashes that file was in flight at.
pub type CrashCounts = BTreeMap<(String, String), u32>;

/// Journals left by runs that crashed: how many of them had each (root, path) in flight, and
/// the journal files (to remove once a commit has recorded the counts).
pub fn crashed_runs(index: &Path) -> Result<(CrashCounts, Vec<PathBuf>), StoreError> {
    let folder = index.join("runs");
    let mut counts = BTreeMap::new();
    let mut journals = Vec::new();
    let Ok(entries) = std::fs::read_dir(&folder) else { return Ok((counts, journals)) };
    for entry in entries {
        let entry = entry.map_err(io_error(&folder))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.ends_with(SUFFIX) && super::files::is_run_file_name(&name)) {
            continue;
        }
        let text = std::fs::read(&path).map_err(io_error(&path))?;
        let mut open: HashSet<(String, String)> = HashSet::new();
        // A torn last line (killed mid-append) has no newline and is ignored.
        for line in String::from_utf8_lossy(&text).split_inclusive('\n').filter(|l| l.ends_with('\n')) {
            let line = line.trim_end_matches('\n');
            let (mark, rest) = line.split_at(line.len().min(1));
            let Some((root, file)) = rest.split_once('\t') else { continue };
            let key = (root.to_string(), file.to_string());
            match mark {
                "+" => open.insert(key),
                "-" => open.remove(&key),
                _ => false,
            };
        }
        let interrupted = String::from_utf8_lossy(&text).lines().any(|line| line == INTERRUPTED);
        if !interrupted {
            for key in open {
                *counts.entry(key).or_insert(0) += 1;
            }
        }
        journals.push(path);
    }
    Ok((counts, journals))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unmatched_starts_of_left_journals_are_counted_once_per_crash() {
        let index = tempfile::tempdir().unwrap();
        for tag in ["1", "2"] {
            let journal = InFlightJournal::create(index.path(), tag).unwrap();
            journal.started("/v", "a.mp4");
            journal.started("/v", "b.mp4");
            journal.finished("/v", "b.mp4");
            if tag == "2" {
                journal.started("/v", "c.mp4");
            }
        }
        let clean = InFlightJournal::create(index.path(), "3").unwrap();
        clean.started("/v", "d.mp4");
        clean.remove();
        std::fs::write(index.path().join("runs/4.inflight"), "+/v\ttorn.mp").unwrap();
        // Interrupted, then killed: no file is blamed.
        std::fs::write(index.path().join("runs/5.inflight"), "+/v\te.mp4\n!interrupted\n").unwrap();
        // Not a journal of the index's.
        std::fs::write(index.path().join("runs/notes.inflight"), "+/v\tf.mp4\n").unwrap();
        let (counts, journals) = crashed_runs(index.path()).unwrap();
        assert_eq!(journals.len(), 4);
        let key = |p: &str| ("/v".to_string(), p.to_string());
        assert_eq!(counts.get(&key("a.mp4")), Some(&2));
        assert_eq!(counts.get(&key("c.mp4")), Some(&1));
        assert_eq!(counts.get(&key("b.mp4")), None);
        assert_eq!(counts.get(&key("d.mp4")), None);
        assert_eq!(counts.len(), 2);
    }
}
