//! One ingest run's failure bookkeeping, from its plan to its last commit: the failures the index
//! held before the run, those the next commit lists, the old failures of files being retried
//! (listed until their retry ends, so an interrupted retry keeps its record), and the suspects,
//! files in flight when earlier runs died (contract §4's `crashed_decoder`).

use std::collections::{BTreeMap, HashMap};

use crate::failure::{Failure, Rejection};
use crate::walk::VideoFile;

/// A file as failures and suspects name it: (root, path).
pub(super) type FileKey = (String, String);

pub(super) struct FailureBook {
    started_at_us: i64,
    /// The index's failures before this run, and where each file's is.
    old: Vec<Failure>,
    old_at: HashMap<FileKey, usize>,
    /// Every failure the next commit lists, but the old failures of files being retried…
    listed: Vec<Failure>,
    /// …which stay listed until their retry ends.
    retried: HashMap<FileKey, Failure>,
    /// Crashes per file in flight: as the run found them, and now.
    suspects_before: BTreeMap<FileKey, u32>,
    suspects: BTreeMap<FileKey, u32>,
}

/// What the last commit lists, and whether it or the suspects differ from what the run found
/// (the index's failures; its suspects with the crash journals' counts).
pub(super) struct ClosedBook {
    /// Sorted by (root, path).
    pub(super) failures: Vec<Failure>,
    pub(super) suspects: BTreeMap<FileKey, u32>,
    pub(super) changed: bool,
}

impl FailureBook {
    /// `old`: the index's failures; `listed`: those this run lists without decoding the file
    /// again; `retrying`: the files this run decodes again; the suspects as the run found them
    /// (`before`) and after the plan set crashing files aside.
    pub(super) fn new(
        started_at_us: i64,
        old: Vec<Failure>,
        listed: Vec<Failure>,
        retrying: &[VideoFile],
        suspects_before: BTreeMap<FileKey, u32>,
        suspects: BTreeMap<FileKey, u32>,
    ) -> FailureBook {
        let old_at: HashMap<FileKey, usize> =
            old.iter().enumerate().map(|(i, f)| ((f.root.clone(), f.path.clone()), i)).collect();
        let retried = retrying
            .iter()
            .filter_map(|file| old_at.get(&(file.root.clone(), file.path.clone())))
            .map(|&i| ((old[i].root.clone(), old[i].path.clone()), old[i].clone()))
            .collect();
        FailureBook { started_at_us, old, old_at, listed, retried, suspects_before, suspects }
    }

    /// The failures this run lists without decoding their files again.
    pub(super) fn listed(&self) -> &[Failure] {
        &self.listed
    }

    /// The files earlier runs died on, with their crashes.
    pub(super) fn suspects(&self) -> &BTreeMap<FileKey, u32> {
        &self.suspects
    }

    /// Records a file's failure, counting the attempts of an earlier failure of the same file.
    pub(super) fn record(&mut self, file: VideoFile, rejection: Rejection) -> &Failure {
        let at = self.old_at.get(&(file.root.clone(), file.path.clone()));
        let previous = at.map(|&i| &self.old[i]);
        self.listed.push(Failure {
            first_seen_us: previous.map_or(self.started_at_us, |f| f.first_seen_us),
            attempts: previous.map_or(1, |f| f.attempts + 1),
            root: file.root,
            path: file.path,
            stage: rejection.stage,
            kind: rejection.kind,
            message: rejection.message,
            size_bytes: file.size_bytes,
            mtime_ns: file.mtime_ns,
        });
        self.listed.last().expect("just pushed")
    }

    /// A file's outcome is in (its rows or its failure): its old failure and its crashes end.
    pub(super) fn settle(&mut self, file: &FileKey) {
        self.retried.remove(file);
        self.suspects.remove(file);
    }

    /// Every failure a commit made now lists.
    pub(super) fn to_commit(&self) -> Vec<Failure> {
        self.listed.iter().chain(self.retried.values()).cloned().collect()
    }

    /// At the run's end: failed files whose retry never ran (the run was interrupted first)
    /// keep their record.
    pub(super) fn close(self) -> ClosedBook {
        let mut failures = self.listed;
        failures.extend(self.retried.into_values());
        let key = |f: &Failure| (f.root.clone(), f.path.clone(), f.kind, f.size_bytes, f.mtime_ns, f.attempts);
        let old: std::collections::HashSet<_> = self.old.iter().map(key).collect();
        let new: std::collections::HashSet<_> = failures.iter().map(key).collect();
        let changed = old != new || self.suspects != self.suspects_before;
        failures.sort_by(|a, b| (&a.root, &a.path).cmp(&(&b.root, &b.path)));
        ClosedBook { failures, suspects: self.suspects, changed }
    }
}
