//! Which walked files need work and what of the old index stays: files unchanged since the
//! last commit (same root, path, size and mtime) are kept, failed files are retried only when
//! they changed (or with `--retry-failed`), files gone from a walked root are dropped, files in
//! flight at two crashes are set aside as `crashed_decoder`, and a new or changed file whose
//! bytes an indexed video already has reuses that video's rows.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::checksum::blake3_file;
use crate::failure::{Failure, FailureKind, Stage};
use crate::store::VideoRow;
use crate::walk::VideoFile;

/// Which walked files need work, and what of the old index stays.
pub struct Plan {
    pub to_process: Vec<VideoFile>,
    /// Old videos kept as they are.
    pub keep_ids: HashSet<String>,
    /// (root, path) of old videos being re-embedded because the file changed.
    pub replaced: HashSet<(String, String)>,
    pub kept_failures: Vec<Failure>,
    pub unchanged: u64,
    pub removed: u64,
}

impl Plan {
    pub fn new(
        roots: &[String],
        walked: Vec<VideoFile>,
        old_videos: &[VideoRow],
        old_failures: &[Failure],
        retry_failed: bool,
    ) -> Plan {
        let old_by_location: HashMap<(&str, &str), &VideoRow> =
            old_videos.iter().map(|v| ((v.root.as_str(), v.path.as_str()), v)).collect();
        let failed_by_location: HashMap<(&str, &str), &Failure> =
            old_failures.iter().map(|f| ((f.root.as_str(), f.path.as_str()), f)).collect();
        let mut plan = Plan {
            to_process: Vec::new(),
            keep_ids: HashSet::new(),
            replaced: HashSet::new(),
            kept_failures: Vec::new(),
            unchanged: 0,
            removed: 0,
        };
        let mut seen: HashSet<(String, String)> = HashSet::new();
        for file in walked {
            seen.insert((file.root.clone(), file.path.clone()));
            let location = (file.root.as_str(), file.path.as_str());
            if let Some(old) = old_by_location.get(&location) {
                if old.size_bytes == file.size_bytes && old.mtime_ns == file.mtime_ns {
                    plan.keep_ids.insert(old.video_id.clone());
                    plan.unchanged += 1;
                    continue;
                }
                plan.replaced.insert((file.root.clone(), file.path.clone()));
            } else if let Some(failure) = failed_by_location.get(&location)
                && !retry_failed
                && failure.size_bytes == file.size_bytes
                && failure.mtime_ns == file.mtime_ns
            {
                plan.kept_failures.push((*failure).clone());
                continue;
            }
            plan.to_process.push(file);
        }
        // Old videos under roots not walked in this run are left alone; under walked roots
        // they stay only if their file is still there.
        for old in old_videos {
            let walked_root = roots.contains(&old.root);
            if !walked_root {
                plan.keep_ids.insert(old.video_id.clone());
            } else if !seen.contains(&(old.root.clone(), old.path.clone())) {
                plan.removed += 1;
            }
        }
        plan.kept_failures.extend(old_failures.iter().filter(|f| !roots.contains(&f.root)).cloned());
        plan
    }

    /// Takes every file out of the work, keeping what the index had of it (the old rows of a
    /// changed file, the old failure of one to be retried), for a run stopped before it began.
    /// Returns how many files were held back.
    pub fn hold_back(&mut self, old_failure_at: &HashMap<(&str, &str), &Failure>) -> usize {
        let files = std::mem::take(&mut self.to_process);
        for file in &files {
            if self.replaced.remove(&(file.root.clone(), file.path.clone())) {
                self.keep_ids.insert(file.video_id.clone());
            } else if let Some(failure) = old_failure_at.get(&(file.root.as_str(), file.path.as_str())) {
                self.kept_failures.push((*failure).clone());
            }
        }
        files.len()
    }

    /// Takes out of the work the files that were in flight at two or more crashes and returns
    /// their `crashed_decoder` failures (with `--retry-failed` they are tried once more).
    pub fn set_aside_crashing(
        &mut self,
        suspects: &mut BTreeMap<(String, String), u32>,
        retry_failed: bool,
        now_us: i64,
    ) -> Vec<Failure> {
        if retry_failed {
            return Vec::new();
        }
        let mut failures = Vec::new();
        self.to_process.retain(|file| {
            let key = (file.root.clone(), file.path.clone());
            let crashes = suspects.get(&key).copied().unwrap_or(0);
            if crashes < 2 {
                return true;
            }
            suspects.remove(&key);
            failures.push(Failure {
                root: file.root.clone(),
                path: file.path.clone(),
                stage: Stage::Decode,
                kind: FailureKind::CrashedDecoder,
                message: format!(
                    "the ingest process itself died while this file was in flight, in {crashes} runs; it is tried again when it changes or with --retry-failed"
                ),
                first_seen_us: now_us,
                attempts: crashes,
                size_bytes: file.size_bytes,
                mtime_ns: file.mtime_ns,
            });
            false
        });
        failures
    }

    /// Takes out of the work the files whose bytes an old video already had (a renamed,
    /// copied or touched file) and returns them with that video's row. Only files whose size
    /// equals an old video's are hashed (BLAKE3), so new content costs nothing here.
    pub fn find_reusable(&mut self, old_videos: &[VideoRow]) -> Vec<(VideoFile, VideoRow)> {
        let mut by_size: HashMap<u64, Vec<&VideoRow>> = HashMap::new();
        for old in old_videos {
            by_size.entry(old.size_bytes).or_default().push(old);
        }
        let mut reused = Vec::new();
        let mut rest = Vec::with_capacity(self.to_process.len());
        for file in std::mem::take(&mut self.to_process) {
            let same = by_size.get(&file.size_bytes).and_then(|candidates| {
                let hash = blake3_file(&file.abs_path).ok()?;
                candidates.iter().find(|old| old.content_hash == hash).map(|old| (*old).clone())
            });
            match same {
                Some(old) => reused.push((file, old)),
                None => rest.push(file),
            }
        }
        self.to_process = rest;
        reused
    }
}
