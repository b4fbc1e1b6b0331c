//! What one ingest run did: the report written to `INDEX/runs/TAG.json` with each commit and
//! summarised on stderr, and the one line each failure is named by.

use std::collections::BTreeMap;

use serde::Serialize;

use super::timeline::TimelineReport;
use crate::failure::Failure;

/// What one run did; written to `INDEX/runs/` and summarised on stderr.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IngestReport {
    pub started_at_us: i64,
    pub roots: Vec<String>,
    pub new: u64,
    pub changed: u64,
    /// Renamed, copied or touched files whose bytes an indexed video already had: its rows
    /// were reused, nothing was decoded.
    pub reused: u64,
    pub unchanged: u64,
    pub removed: u64,
    /// Files that failed in this run or earlier and still fail, by kind.
    pub failed: BTreeMap<String, u64>,
    /// Failed files left alone because they did not change (retry with --retry-failed).
    pub failed_not_retried: u64,
    /// Files without a video extension.
    pub skipped: u64,
    /// Folders the walk reached a second way (a link to a root, to a real folder, to another
    /// link's target; a root inside another root): skipped so that each folder is walked once.
    pub repeated_folders: u64,
    pub frames: u64,
    pub video_seconds: f64,
    pub wall_s: f64,
    pub frames_per_s: f64,
    pub videos_per_s: f64,
    /// Wall time of each stage; decode, encode and write are busy time summed over threads.
    pub stage_seconds: StageSeconds,
    /// The same, and the process's CPU time, slot by slot from the start of the run: where
    /// the time went (`ingest/timeline.rs`).
    pub timeline: TimelineReport,
    /// Commits made, the periodic ones included.
    pub commits: u64,
    pub committed: bool,
    /// The signal that stopped the run early (`SIGINT`, `SIGTERM`); what was finished is committed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interrupted: Option<String>,
    /// Files left for the next run because the run was interrupted (or stopped by decoders
    /// that killed their workers on file after file).
    pub not_processed: u64,
    /// What the decode worker processes did.
    pub decode_workers: WorkersReport,
    pub memory: MemoryReport,
}

/// The decode worker processes of a run (`ingest/pool.rs`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct WorkersReport {
    /// Decode slots: `--decode-workers` at normal priority and one at the lowest.
    pub slots: usize,
    #[serde(flatten)]
    pub counts: super::pool::PoolCounts,
    /// Each slot's peak resident memory (its workers', read every 25 ms), MiB.
    pub peak_resident_mib: Vec<f64>,
}

impl WorkersReport {
    pub fn of(pool: &super::pool::Pool) -> WorkersReport {
        WorkersReport {
            slots: pool.slots(),
            counts: pool.counts(),
            peak_resident_mib: pool.peak_resident_bytes().into_iter().map(mib).collect(),
        }
    }
}

/// Peak resident memory of the run's processes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MemoryReport {
    /// The ingest process (the model, the encoder's batches, the writers), MiB.
    pub parent_peak_mib: f64,
    /// The parent's peak plus every decode slot's: a bound on the run's, MiB.
    pub total_peak_mib: f64,
}

impl MemoryReport {
    /// The ingest process's peak so far, and with the workers' peaks.
    pub fn of(workers: &WorkersReport) -> MemoryReport {
        let kib = super::timeline::rusage(libc::RUSAGE_SELF).ru_maxrss;
        let parent_peak_mib = mib(kib.max(0) as u64 * 1024);
        let total = parent_peak_mib + workers.peak_resident_mib.iter().sum::<f64>();
        MemoryReport { parent_peak_mib, total_peak_mib: (total * 10.0).round() / 10.0 }
    }
}

/// Bytes in MiB, to a tenth.
fn mib(bytes: u64) -> f64 {
    (bytes as f64 / (1u64 << 20) as f64 * 10.0).round() / 10.0
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct StageSeconds {
    pub walk: f64,
    /// Reading the old index, hashing possibly renamed files, carrying rows over.
    pub plan: f64,
    /// Decoding, sampling, preprocessing and hashing: the decode slots' time with a file in
    /// their worker process.
    pub decode: f64,
    /// Decode workers holding finished files while the encoder was busy.
    pub decode_waiting: f64,
    pub encode: f64,
    /// The encoder waiting for frames.
    pub encode_waiting: f64,
    pub write: f64,
    /// Building the model's towers (the encoder, while the first files decode).
    pub build_model: f64,
}

impl IngestReport {
    pub fn failed_total(&self) -> u64 {
        self.failed.values().sum()
    }

    pub fn summary(&self) -> String {
        let failed = if self.failed.is_empty() {
            "0 failed".to_string()
        } else {
            let kinds: Vec<String> = self.failed.iter().map(|(k, n)| format!("{n} {k}")).collect();
            format!("{} failed ({})", self.failed_total(), kinds.join(", "))
        };
        format!(
            "ingest: {} new, {} changed, {} reused, {} unchanged, {} removed, {failed}, {} skipped (not video); {} frames from {:.1} s of video in {:.1} s ({:.1} frames/s, {:.2} videos/s)",
            self.new,
            self.changed,
            self.reused,
            self.unchanged,
            self.removed,
            self.skipped,
            self.frames,
            self.video_seconds,
            self.wall_s,
            self.frames_per_s,
            self.videos_per_s
        )
    }
}

impl IngestReport {
    /// The report as a commit records it: the commits so far, committed.
    pub fn json_as_committed(&self, commits: u64) -> String {
        let mut report = self.clone();
        report.commits = commits;
        report.committed = true;
        report.json()
    }

    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report always serialises")
    }
}

/// `vtr-index: ROOT/PATH: kind: message`, as every failure is named on stderr.
pub fn failure_line(failure: &Failure) -> String {
    format!("vtr-index: {}/{}: {}: {}", failure.root.trim_end_matches('/'), failure.path, failure.kind, failure.message)
}
