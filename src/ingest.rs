//! `vtr-index ingest`: wires walk → decode → encode → store and commits the result.
//!
//! Owns no domain logic. It decides which files need work (new or changed since the last
//! commit, failed files only when they changed; a file whose bytes an indexed video already
//! has reuses that video's rows), runs the stages on their own threads joined by bounded
//! channels (the bounds are the backpressure that keeps memory flat), and publishes the new
//! rows with manifest commits: every `--commit-every` files or `--commit-interval`, and at the
//! end. Existing shards that still hold only kept videos are listed again untouched; a shard
//! with a removed or replaced video is rewritten without it. A panic in any stage fails the
//! run with only its earlier periodic commits published. Decode workers journal the files in
//! flight, so the run after a crash can tell which file the process died on. On SIGINT or
//! SIGTERM no new file starts and what is finished is committed. An index of an older format
//! is upgraded in this run's commit.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::bounded;
use serde::Serialize;

use crate::decode::{DecodeConfig, decode_video};
use crate::encode::{BatchEncoder, EmbeddedVideo, PreparedVideo, VideoFacts};
use crate::failure::{Failure, FailureKind, Rejection, Stage};
use crate::model::{Checkpoint, Clip, ModelError};
use crate::preprocess::{PreprocessConfig, pixel_values};
use crate::progress::Progress;
use crate::sampling::SamplingConfig;
use crate::store::{
    FRAME_SHARD_ROWS, FrameRow, InFlightJournal, Manifest, PreprocessRecord, SamplingRecord, ShardInfo, ShardWriter,
    StoreError, Suspect, VIDEO_SHARD_ROWS, VideoRow, WriterLock, collect_garbage, crashed_runs, read_table,
    read_video_ids,
};
use crate::types::{DeviceChoice, Precision};
use crate::walk::{Root, VideoFile, WalkError, walk_roots};

/// Resolved options of one ingest run.
#[derive(Debug, Clone)]
pub struct IngestOptions {
    pub roots: Vec<Root>,
    pub index: PathBuf,
    /// Required for a new index; defaults to the manifest's model afterwards.
    pub model: Option<PathBuf>,
    pub max_frames: Option<usize>,
    pub fps: Option<f64>,
    pub batch: usize,
    pub device: DeviceChoice,
    /// The dtype the model runs in; fixed when the index is created [default: f32].
    pub dtype: Option<Precision>,
    pub decode_timeout: Duration,
    pub decode_workers: usize,
    pub retry_failed: bool,
    /// Commit the work done so far after this many finished files…
    pub commit_every: u64,
    /// …or after this long, whichever comes first.
    pub commit_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Walk(#[from] WalkError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Refused(String),
    #[error("the {0} stage failed: {1}; nothing was committed")]
    Stage(&'static str, String),
}

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
    /// Commits made, the periodic ones included.
    pub commits: u64,
    pub committed: bool,
    /// The signal that stopped the run early (`SIGINT`, `SIGTERM`); what was finished is committed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interrupted: Option<String>,
    /// Files left for the next run because the run was interrupted.
    pub not_processed: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct StageSeconds {
    pub walk: f64,
    /// Reading the old index, hashing possibly renamed files, carrying rows over.
    pub plan: f64,
    pub decode: f64,
    pub encode: f64,
    pub write: f64,
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

pub fn now_us() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

/// A decode worker's result for one file.
enum Decoded {
    Video(PreparedVideo<VideoFile>),
    Failed(VideoFile, Rejection),
}

/// The encoder's result for one file.
enum Encoded {
    Video(EmbeddedVideo<VideoFile>),
    Failed(VideoFile, Rejection),
}

/// Takes the index's writer lock, saying so when a crashed writer left it behind.
fn lock_index(index: &Path) -> Result<WriterLock, StoreError> {
    let lock = WriterLock::acquire(index, "ingest")?;
    if let Some(stale) = &lock.taken_over_from {
        eprintln!("vtr-index: took over the lock of a writer that did not finish ({stale})");
    }
    Ok(lock)
}

/// Runs one ingest. Per-file failures are data in the report; an `Err` means nothing useful
/// could be done and the index is as it was.
pub fn ingest(options: &IngestOptions) -> Result<IngestReport, IngestError> {
    let started = Instant::now();
    let started_at_us = now_us();
    crate::walk::check_roots(&options.roots)?;
    refuse_dangerous_placement(&options.index, &options.roots)?;
    let root_names: Vec<String> = options.roots.iter().map(|r| r.name.clone()).collect();
    // Lock before reading the manifest, so no other writer commits between our read and ours.
    // A new index is locked once its folder exists (below), after the model checks pass.
    let mut lock = options.index.is_dir().then(|| lock_index(&options.index)).transpose()?;
    let mut previous = Manifest::load(&options.index)?;

    let model_path = match (&options.model, &previous) {
        (Some(path), _) => path.clone(),
        (None, Some(manifest)) => PathBuf::from(&manifest.model.source),
        (None, None) => {
            return Err(IngestError::Refused(format!(
                "{}: a new index needs --model (a CLIP checkpoint folder or weights file)",
                options.index.display()
            )));
        }
    };
    let sampling = resolve_sampling(options, previous.as_ref())?;
    let precision = resolve_precision(options, previous.as_ref())?;
    let recorded_model = previous.as_ref().map(|m| m.model.clone());
    let load_model = || -> Result<Clip, IngestError> {
        let clip = Clip::load(Checkpoint::open(&model_path)?.with_precision(precision), options.device)?;
        if let Some(recorded) = &recorded_model
            && recorded.sha256 != clip.identity.sha256
        {
            return Err(IngestError::Refused(format!(
                "{}: this index was built with the model at {} (sha256 {}…); {} is a different model. Build a new index for a new model.",
                options.index.display(),
                recorded.source,
                &recorded.sha256[..12.min(recorded.sha256.len())],
                model_path.display()
            )));
        }
        Ok(clip)
    };
    // A re-run with the index's own model loads it only when there is something to embed, so
    // a run that finds nothing to do stays fast however large the model.
    let mut clip = if options.model.is_some() || previous.is_none() { Some(load_model()?) } else { None };
    if lock.is_none() {
        std::fs::create_dir_all(&options.index)
            .map_err(|source| StoreError::Io { path: options.index.clone(), source })?;
        lock = Some(lock_index(&options.index)?);
        if Manifest::load(&options.index)?.is_some() {
            return Err(IngestError::Refused(format!(
                "{}: another ingest created this index while this one started; run again",
                options.index.display()
            )));
        }
    }
    collect_garbage(&options.index, previous.as_ref())?;
    // An index of an older format moves to this one in this run's commit (after the collection
    // above: the old shards must outlive every manifest that lists them).
    let upgraded = match previous.as_mut() {
        Some(manifest) => crate::store::upgrade(&options.index, manifest, &started_at_us.to_string())?,
        None => false,
    };
    // Files in flight when earlier runs died: counted once per crash, on top of the counts
    // the manifest carries; at two crashes a file becomes a `crashed_decoder` failure.
    let (crash_counts, crashed_journals) = crashed_runs(&options.index)?;
    let mut suspects: BTreeMap<(String, String), u32> = previous
        .as_ref()
        .map(|m| m.suspects.iter().map(|s| ((s.root.clone(), s.path.clone()), s.crashes)).collect())
        .unwrap_or_default();
    for (file, crashes) in crash_counts {
        *suspects.entry(file).or_insert(0) += crashes;
    }
    let suspects_before = suspects.clone();
    let journal = JournalGuard(Some(InFlightJournal::create(&options.index, &started_at_us.to_string())?));

    let walk_started = Instant::now();
    let walked = walk_roots(&options.roots, &options.index, started_at_us)?;
    for link in &walked.repeated_folders {
        eprintln!("vtr-index: {link}: skipped, a folder this walk reaches by another path");
    }
    let mut report = IngestReport {
        started_at_us,
        roots: root_names.clone(),
        skipped: walked.skipped,
        repeated_folders: walked.repeated_folders.len() as u64,
        ..Default::default()
    };
    report.stage_seconds.walk = walk_started.elapsed().as_secs_f64();
    let plan_started = Instant::now();
    let old_videos: Vec<VideoRow> = match &previous {
        Some(m) => read_table(&options.index, m.shards("videos"))?,
        None => Vec::new(),
    };
    let old_failures: Vec<Failure> = match &previous {
        Some(m) => read_table(&options.index, m.shards("failures"))?,
        None => Vec::new(),
    };
    let old_failure_at: HashMap<(&str, &str), &Failure> =
        old_failures.iter().map(|f| ((f.root.as_str(), f.path.as_str()), f)).collect();
    let mut plan = Plan::new(&root_names, walked.videos, &old_videos, &old_failures, options.retry_failed);
    let crashed = plan.set_aside_crashing(&mut suspects, options.retry_failed, started_at_us);
    let reused = plan.find_reusable(&old_videos);
    report.unchanged = plan.unchanged;
    report.removed = plan.removed;
    // A signal during the walk or the plan: no file is started, and the files that would have
    // been keep what the index had of them; the plan's other changes are committed as usual.
    crate::fault::point("planned");
    let mut held_back = match crate::interrupt::requested() {
        Some(_) => plan.hold_back(&old_failure_at),
        None => 0,
    };
    if clip.is_none() && !plan.to_process.is_empty() {
        clip = Some(load_model()?);
    }
    if !plan.to_process.is_empty() {
        crate::decode::init().map_err(IngestError::Refused)?;
    }
    // …or during the model's load: the same, before any row is carried over.
    if crate::interrupt::requested().is_some() {
        held_back += plan.hold_back(&old_failure_at);
    }
    report.failed_not_retried = plan.kept_failures.len() as u64;
    let (model, preprocess_record) = match (&clip, &previous) {
        (Some(clip), _) => {
            let p = &clip.checkpoint.preprocess;
            let record = PreprocessRecord {
                resize: "bicubic-antialias".into(),
                shortest_edge: p.resize,
                crop: p.crop,
                mean: p.mean,
                std: p.std,
            };
            (clip.identity.clone(), record)
        }
        (None, Some(manifest)) => (manifest.model.clone(), manifest.preprocess.clone()),
        (None, None) => unreachable!("a new index loads its model first"),
    };

    let tag = started_at_us.to_string();
    let dim = model.embed_dim;
    let mut base_tables: BTreeMap<String, Vec<ShardInfo>> =
        previous.as_ref().map(|m| m.tables.clone()).unwrap_or_default();
    let mut writers = RowWriters::new(&options.index, &tag, dim)?;
    for table in ["videos", "frames"] {
        let old = previous.as_ref().map_or(&[][..], |m| m.shards(table));
        let kept = carry_over(&options.index, table, old, &old_videos, &plan.keep_ids, &mut writers)?;
        base_tables.insert(table.to_string(), kept);
    }
    if !reused.is_empty() {
        let old = previous.as_ref().map_or(&[][..], |m| m.shards("frames"));
        write_reused(&options.index, old, &reused, &mut writers)?;
        report.reused = reused.len() as u64;
    }
    report.stage_seconds.plan = plan_started.elapsed().as_secs_f64();

    let mut failures: Vec<Failure> = plan.kept_failures.clone();
    failures.extend(walked.failures.iter().cloned());
    failures.extend(crashed);
    // Old failures of files being retried stay listed until their retry ends.
    let mut retried_failures: HashMap<(String, String), Failure> = plan
        .to_process
        .iter()
        .filter_map(|f| old_failure_at.get(&(f.root.as_str(), f.path.as_str())).copied())
        .map(|f| ((f.root.clone(), f.path.clone()), f.clone()))
        .collect();
    let mut progress = Progress::new(plan.to_process.len() as u64);
    // Every failure the index will hold that this run does not decode again: the walk's, the
    // quarantined files', and the unchanged failures of earlier runs (exit 2 names them all).
    for failure in &failures {
        progress.println(&failure_line(failure));
    }
    // On SIGINT/SIGTERM the files being decoded stop at once and are dropped (not failures):
    // the next run takes them up again.
    let decode_config =
        DecodeConfig { sampling, timeout: options.decode_timeout, cancelled: crate::interrupt::was_requested };
    let processed = plan.to_process.len();
    let mut committer = Committer {
        index: &options.index,
        template: Manifest {
            format_version: crate::store::FORMAT_VERSION,
            model,
            sampling: SamplingRecord { fps: sampling.fps, max_frames: sampling.max_frames },
            preprocess: preprocess_record,
            roots: merged_roots(previous.as_ref(), &root_names),
            tables: base_tables,
            committed_at_us: 0,
            last_run: None,
            suspects: Vec::new(),
        },
        tag: tag.clone(),
        crashed_journals,
        every_videos: options.commit_every.max(1),
        every: options.commit_interval,
        last_commit: Instant::now(),
        since_commit: 0,
        commits: 0,
    };
    let stage_nanos = StageNanos::default();
    let files = std::mem::take(&mut plan.to_process);
    let mut finished = 0usize;
    let consume = |outcome| {
        let write_started = Instant::now();
        let key = match outcome {
            Encoded::Video(video) => {
                let frames = video.frames.len() as u64;
                report.frames += frames;
                report.video_seconds += video.facts.duration_s;
                if plan.replaced.contains(&(video.key.root.clone(), video.key.path.clone())) {
                    report.changed += 1;
                } else {
                    report.new += 1;
                }
                let key = (video.key.root.clone(), video.key.path.clone());
                writers.write_video(video)?;
                progress.advance(frames);
                key
            }
            Encoded::Failed(file, rejection) => {
                let previous_failure = old_failure_at.get(&(file.root.as_str(), file.path.as_str()));
                let failure = Failure {
                    first_seen_us: previous_failure.map_or(started_at_us, |f| f.first_seen_us),
                    attempts: previous_failure.map_or(1, |f| f.attempts + 1),
                    root: file.root,
                    path: file.path,
                    stage: rejection.stage,
                    kind: rejection.kind,
                    message: rejection.message,
                    size_bytes: file.size_bytes,
                    mtime_ns: file.mtime_ns,
                };
                progress.println(&failure_line(&failure));
                let key = (failure.root.clone(), failure.path.clone());
                failures.push(failure);
                progress.advance(0);
                key
            }
        };
        retried_failures.remove(&key);
        suspects.remove(&key);
        finished += 1;
        committer.since_commit += 1;
        stage_nanos.add(&stage_nanos.write, write_started);
        if committer.due() {
            let listed: Vec<Failure> = failures.iter().chain(retried_failures.values()).cloned().collect();
            report.wall_s = started.elapsed().as_secs_f64();
            committer.commit(&mut writers, listed, &suspects, &report, false)?;
        }
        Ok(())
    };
    if let Some(clip) = &clip
        && !files.is_empty()
    {
        let preprocess = &clip.checkpoint.preprocess;
        let pipeline = Pipeline { options, decode: &decode_config, preprocess, clip, journal: journal.get() };
        pipeline.run(files, &stage_nanos, consume)?;
    }
    progress.finish();
    if let Some(signal) = crate::interrupt::requested() {
        report.interrupted = Some(crate::interrupt::signal_name(signal).to_string());
        report.not_processed = (processed - finished + held_back) as u64;
    }
    report.stage_seconds.decode = stage_nanos.seconds(&stage_nanos.decode);
    report.stage_seconds.encode = stage_nanos.seconds(&stage_nanos.encode);
    report.stage_seconds.write = stage_nanos.seconds(&stage_nanos.write);
    // Failed files whose retry never ran (the run was interrupted first) keep their record.
    failures.extend(retried_failures.into_values());

    for failure in &failures {
        *report.failed.entry(failure.kind.as_str().to_string()).or_default() += 1;
    }
    let failures_changed = {
        let key = |f: &Failure| (f.root.clone(), f.path.clone(), f.kind, f.size_bytes, f.mtime_ns, f.attempts);
        let old: HashSet<_> = old_failures.iter().map(key).collect();
        let new: HashSet<_> = failures.iter().map(key).collect();
        old != new
    };
    let roots_changed = previous.as_ref().is_none_or(|m| root_names.iter().any(|r| !m.roots.contains(r)));
    let needs_commit = processed > 0
        || upgraded
        || report.removed > 0
        || report.reused > 0
        || failures_changed
        || roots_changed
        || suspects != suspects_before
        || !committer.crashed_journals.is_empty();

    report.wall_s = started.elapsed().as_secs_f64();
    report.frames_per_s = report.frames as f64 / report.wall_s.max(1e-9);
    report.videos_per_s = (report.new + report.changed) as f64 / report.wall_s.max(1e-9);
    if needs_commit {
        failures.sort_by(|a, b| (&a.root, &a.path).cmp(&(&b.root, &b.path)));
        report.committed = true;
        committer.commit(&mut writers, failures, &suspects, &report, true)?;
        report.commits = committer.commits;
    } else {
        drop(writers);
        write_run_report(&options.index, &tag, &report)?;
    }
    drop(journal);
    drop(lock);
    Ok(report)
}

/// Refuses, before anything is created or removed, an `--index` that would mix the index with
/// the user's own files: a root inside the index folder (or equal to it), or an existing
/// folder that holds anything but an index. An index inside a root is fine: the walk leaves
/// it out.
fn refuse_dangerous_placement(index: &Path, roots: &[Root]) -> Result<(), IngestError> {
    let Ok(index_real) = index.canonicalize() else {
        return Ok(()); // Not there yet: it will be created empty.
    };
    if !index_real.is_dir() {
        return Err(IngestError::Refused(format!("{}: --index must be a folder", index.display())));
    }
    for Root { path, name: root } in roots {
        let root_real = path.canonicalize().map_err(|source| WalkError::Unreadable { root: root.clone(), source })?;
        if root_real.starts_with(&index_real) {
            return Err(IngestError::Refused(format!(
                "{root} is inside the index folder {}: the index's tables would sit among your videos. Nothing was changed; give --index a folder outside the videos (for example {}-index)",
                index.display(),
                root.trim_end_matches('/')
            )));
        }
    }
    if Manifest::load(index)?.is_none() {
        let foreign = crate::store::foreign_entries(index)?;
        if !foreign.is_empty() {
            let shown: Vec<String> = foreign.iter().take(3).map(|p| p.display().to_string()).collect();
            return Err(IngestError::Refused(format!(
                "{}: this folder is not empty and holds no vtr-index index ({}{}); an index created here would mix its files with yours. Nothing was changed; give --index a new or empty folder",
                index.display(),
                shown.join(", "),
                if foreign.len() > 3 { format!(" and {} more", foreign.len() - 3) } else { String::new() }
            )));
        }
    }
    Ok(())
}

fn resolve_sampling(options: &IngestOptions, previous: Option<&Manifest>) -> Result<SamplingConfig, IngestError> {
    let defaults = SamplingConfig::default();
    let Some(manifest) = previous else {
        let sampling = SamplingConfig {
            fps: options.fps.unwrap_or(defaults.fps),
            max_frames: options.max_frames.unwrap_or(defaults.max_frames),
        };
        if !(sampling.fps > 0.0 && sampling.fps.is_finite()) || sampling.max_frames == 0 {
            return Err(IngestError::Refused("--fps must be positive and --frames at least 1".into()));
        }
        return Ok(sampling);
    };
    let built = SamplingConfig { fps: manifest.sampling.fps, max_frames: manifest.sampling.max_frames };
    if options.fps.is_some_and(|f| f != built.fps) || options.max_frames.is_some_and(|n| n != built.max_frames) {
        return Err(IngestError::Refused(format!(
            "this index was built with --frames {} --fps {}; build a new index to sample differently",
            built.max_frames, built.fps
        )));
    }
    Ok(built)
}

/// The model's dtype: the flag for a new index, the manifest's afterwards (mixing precisions
/// in one index would make its embeddings subtly inconsistent).
fn resolve_precision(options: &IngestOptions, previous: Option<&Manifest>) -> Result<Precision, IngestError> {
    match (options.dtype, previous) {
        (asked, None) => Ok(asked.unwrap_or_default()),
        (Some(asked), Some(manifest)) if asked != manifest.model.dtype => Err(IngestError::Refused(format!(
            "this index was built with --dtype {}; build a new index to embed in {}",
            manifest.model.dtype.name(),
            asked.name()
        ))),
        (_, Some(manifest)) => Ok(manifest.model.dtype),
    }
}

/// Which walked files need work, and what of the old index stays.
struct Plan {
    to_process: Vec<VideoFile>,
    /// Old videos kept as they are.
    keep_ids: HashSet<String>,
    /// (root, path) of old videos being re-embedded because the file changed.
    replaced: HashSet<(String, String)>,
    kept_failures: Vec<Failure>,
    unchanged: u64,
    removed: u64,
}

impl Plan {
    fn new(
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
    fn hold_back(&mut self, old_failure_at: &HashMap<(&str, &str), &Failure>) -> usize {
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
    fn set_aside_crashing(
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
                    "the process died while decoding this file in {crashes} runs; it is tried again when it changes or with --retry-failed"
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
    fn find_reusable(&mut self, old_videos: &[VideoRow]) -> Vec<(VideoFile, VideoRow)> {
        let mut by_size: HashMap<u64, Vec<&VideoRow>> = HashMap::new();
        for old in old_videos {
            by_size.entry(old.size_bytes).or_default().push(old);
        }
        let mut reused = Vec::new();
        let mut rest = Vec::with_capacity(self.to_process.len());
        for file in std::mem::take(&mut self.to_process) {
            let same = by_size.get(&file.size_bytes).and_then(|candidates| {
                let hash = hash_file(&file.abs_path).ok()?;
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

/// The open shard writers of the two per-video tables.
struct RowWriters {
    videos: ShardWriter<VideoRow>,
    frames: ShardWriter<FrameRow>,
}

impl RowWriters {
    fn new(index: &Path, tag: &str, dim: usize) -> Result<RowWriters, StoreError> {
        Ok(RowWriters {
            videos: ShardWriter::new(index, "videos", tag, dim, VIDEO_SHARD_ROWS)?,
            frames: ShardWriter::new(index, "frames", tag, dim, FRAME_SHARD_ROWS)?,
        })
    }

    fn write_video(&mut self, video: EmbeddedVideo<VideoFile>) -> Result<(), StoreError> {
        let file = video.key;
        for (index, (pts_s, embedding)) in video.frames.iter().enumerate() {
            self.frames.push(FrameRow {
                video_id: file.video_id.clone(),
                frame_index: index as u32,
                pts_s: *pts_s,
                embedding: embedding.clone(),
            })?;
        }
        self.videos.push(VideoRow {
            video_id: file.video_id,
            root: file.root,
            path: file.path,
            size_bytes: file.size_bytes,
            mtime_ns: file.mtime_ns,
            content_hash: video.facts.content_hash,
            duration_s: video.facts.duration_s,
            width: video.facts.width,
            height: video.facts.height,
            fps: video.facts.fps,
            n_frames: video.frames.len() as u32,
            stream_index: video.facts.stream_index,
            embedding: video.embedding,
        })
    }
}

/// Lists again the old shards of `table` whose rows all stay, and copies the kept rows of the
/// others into `writers`. Returns the shards listed unchanged. When every old video stays (a
/// run that only adds, or finds nothing to do) no shard is read at all; otherwise a frames
/// shard is read whole only if its `video_id` column names a dropped video.
fn carry_over(
    index: &Path,
    table: &str,
    shards: &[ShardInfo],
    old_videos: &[VideoRow],
    keep_ids: &HashSet<String>,
    writers: &mut RowWriters,
) -> Result<Vec<ShardInfo>, StoreError> {
    if old_videos.iter().all(|v| keep_ids.contains(&v.video_id)) {
        return Ok(shards.to_vec());
    }
    let mut unchanged = Vec::new();
    for shard in shards {
        if read_video_ids(index, shard)?.iter().all(|id| keep_ids.contains(id)) {
            unchanged.push(shard.clone());
            continue;
        }
        let one = std::slice::from_ref(shard);
        if table == "videos" {
            for row in read_table::<VideoRow>(index, one)?.into_iter().filter(|r| keep_ids.contains(&r.video_id)) {
                writers.videos.push(row)?;
            }
        } else {
            for row in read_table::<FrameRow>(index, one)?.into_iter().filter(|r| keep_ids.contains(&r.video_id)) {
                writers.frames.push(row)?;
            }
        }
    }
    Ok(unchanged)
}

/// Writes the rows of files whose bytes an old video already had, under their new identity:
/// the old video's row and frames, with the new id, location, size and mtime.
fn write_reused(
    index: &Path,
    old_frame_shards: &[ShardInfo],
    reused: &[(VideoFile, VideoRow)],
    writers: &mut RowWriters,
) -> Result<(), StoreError> {
    let mut new_ids_of: HashMap<&str, Vec<&str>> = HashMap::new();
    for (file, old) in reused {
        new_ids_of.entry(old.video_id.as_str()).or_default().push(file.video_id.as_str());
    }
    for shard in old_frame_shards {
        if !read_video_ids(index, shard)?.iter().any(|id| new_ids_of.contains_key(id.as_str())) {
            continue;
        }
        for row in read_table::<FrameRow>(index, std::slice::from_ref(shard))? {
            for new_id in new_ids_of.get(row.video_id.as_str()).into_iter().flatten() {
                writers.frames.push(FrameRow { video_id: new_id.to_string(), ..row.clone() })?;
            }
        }
    }
    for (file, old) in reused {
        writers.videos.push(VideoRow {
            video_id: file.video_id.clone(),
            root: file.root.clone(),
            path: file.path.clone(),
            size_bytes: file.size_bytes,
            mtime_ns: file.mtime_ns,
            ..old.clone()
        })?;
    }
    Ok(())
}

/// Every root the index has walked: the manifest's, then this run's new ones.
fn merged_roots(previous: Option<&Manifest>, roots: &[String]) -> Vec<String> {
    let mut merged = previous.map(|m| m.roots.clone()).unwrap_or_default();
    for root in roots {
        if !merged.contains(root) {
            merged.push(root.clone());
        }
    }
    merged
}

/// Publishes the run's work: periodically while it runs (so a crash late in a long run keeps
/// most of it), and once at the end.
struct Committer<'a> {
    index: &'a Path,
    /// The manifest to publish, less this run's new shards, failures and suspects.
    template: Manifest,
    tag: String,
    /// Journals of crashed runs, removed once a commit has recorded their counts.
    crashed_journals: Vec<PathBuf>,
    every_videos: u64,
    every: Duration,
    last_commit: Instant,
    since_commit: u64,
    commits: u64,
}

impl Committer<'_> {
    fn due(&self) -> bool {
        self.since_commit >= self.every_videos || self.last_commit.elapsed() >= self.every
    }

    /// Closes the open shards, commits a manifest listing them with every shard committed
    /// before, and opens new writers. The final commit also removes what no manifest names.
    fn commit(
        &mut self,
        writers: &mut RowWriters,
        failures: Vec<Failure>,
        suspects: &BTreeMap<(String, String), u32>,
        report: &IngestReport,
        last: bool,
    ) -> Result<(), StoreError> {
        self.commits += 1;
        let dim = writers.videos.dim();
        // `TAG-N` from 1: `TAG-0` is the format upgrade's (`store::upgrade`).
        let next_tag = format!("{}-{}", self.tag, self.commits);
        let done = std::mem::replace(writers, RowWriters::new(self.index, &next_tag, dim)?);
        for (table, shards) in [("videos", done.videos.finish()?), ("frames", done.frames.finish()?)] {
            self.template.tables.entry(table.to_string()).or_default().extend(shards);
        }
        let mut manifest = self.template.clone();
        let mut failures_out = ShardWriter::<Failure>::new(self.index, "failures", &next_tag, 0, u64::MAX)?;
        for failure in failures {
            failures_out.push(failure)?;
        }
        manifest.tables.insert("failures".to_string(), failures_out.finish()?);
        manifest.suspects = suspects
            .iter()
            .map(|((root, path), &crashes)| Suspect { root: root.clone(), path: path.clone(), crashes })
            .collect();
        let mut report = report.clone();
        report.commits = self.commits;
        report.committed = true;
        manifest.last_run = Some(write_run_report(self.index, &self.tag, &report)?);
        manifest.committed_at_us = now_us();
        manifest.commit(self.index)?;
        for journal in self.crashed_journals.drain(..) {
            let _ = std::fs::remove_file(journal);
        }
        if last {
            // Shards the new manifest no longer lists (rewritten ones) can go now. Periodic
            // commits keep them: rows still to be reused may be read from them.
            collect_garbage(self.index, Some(&manifest))?;
        }
        self.last_commit = Instant::now();
        self.since_commit = 0;
        Ok(())
    }
}

/// This run's in-flight journal, removed whenever the run ends without the process dying.
struct JournalGuard(Option<InFlightJournal>);

impl JournalGuard {
    fn get(&self) -> &InFlightJournal {
        self.0.as_ref().expect("the journal lives as long as its guard")
    }
}

impl Drop for JournalGuard {
    fn drop(&mut self) {
        if let Some(journal) = self.0.take() {
            journal.remove();
        }
    }
}

/// Busy time per stage, summed over the threads of each.
#[derive(Default)]
struct StageNanos {
    decode: AtomicU64,
    encode: AtomicU64,
    write: AtomicU64,
}

impl StageNanos {
    fn add(&self, counter: &AtomicU64, since: Instant) {
        counter.fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    fn seconds(&self, counter: &AtomicU64) -> f64 {
        counter.load(Ordering::Relaxed) as f64 / 1e9
    }
}

pub fn failure_line(failure: &Failure) -> String {
    format!("vtr-index: {}/{}: {}: {}", failure.root.trim_end_matches('/'), failure.path, failure.kind, failure.message)
}

fn write_run_report(index: &Path, tag: &str, report: &IngestReport) -> Result<String, StoreError> {
    let folder = index.join("runs");
    std::fs::create_dir_all(&folder).map_err(|source| StoreError::Io { path: folder.clone(), source })?;
    let rel = format!("runs/{tag}.json");
    let text = serde_json::to_string_pretty(report).expect("a report always serialises");
    crate::store::atomic_write(&index.join(&rel), text.as_bytes())?;
    Ok(rel)
}

/// Decodes, preprocesses and hashes one file in a decode worker.
fn prepare(file: VideoFile, decode: &DecodeConfig, preprocess: &PreprocessConfig) -> Decoded {
    let video = match decode_video(&file.abs_path, decode) {
        Ok(video) => video,
        Err(rejection) => return Decoded::Failed(file, rejection),
    };
    let mut frames = Vec::with_capacity(video.frames.len());
    for frame in &video.frames {
        match pixel_values(&frame.image, preprocess) {
            Ok(pixels) => frames.push((frame.pts_s, pixels)),
            Err(message) => return Decoded::Failed(file, Rejection::new(Stage::Encode, FailureKind::Corrupt, message)),
        }
    }
    let content_hash = match hash_file(&file.abs_path) {
        Ok(hash) => hash,
        Err(e) => {
            let rejection = Rejection::new(Stage::Decode, FailureKind::Io, format!("cannot read the file: {e}"));
            return Decoded::Failed(file, rejection);
        }
    };
    let facts = VideoFacts {
        duration_s: video.duration_s,
        width: video.width,
        height: video.height,
        fps: video.fps,
        content_hash,
        stream_index: video.stream_index,
    };
    Decoded::Video(PreparedVideo { key: file, facts, frames })
}

pub fn hash_file(path: &Path) -> std::io::Result<String> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(std::fs::File::open(path)?)?;
    Ok(hasher.finalize().to_hex().to_string())
}

/// The decode workers and the encoder of one run, on their own threads joined by bounded
/// channels.
struct Pipeline<'a> {
    options: &'a IngestOptions,
    decode: &'a DecodeConfig,
    preprocess: &'a PreprocessConfig,
    clip: &'a Clip,
    journal: &'a InFlightJournal,
}

impl Pipeline<'_> {
    /// Runs `files` through decode and encode and hands every outcome to `consume` on the
    /// calling thread.
    fn run(
        &self,
        files: Vec<VideoFile>,
        nanos: &StageNanos,
        mut consume: impl FnMut(Encoded) -> Result<(), StoreError>,
    ) -> Result<(), IngestError> {
        let workers = self.options.decode_workers.max(1);
        let (task_tx, task_rx) = bounded::<VideoFile>(workers * 2);
        let (decoded_tx, decoded_rx) = bounded::<Decoded>(workers + 2);
        let (encoded_tx, encoded_rx) = bounded::<Encoded>(16);
        let dim = self.clip.embed_dim();
        std::thread::scope(|scope| {
            let feeder = std::thread::Builder::new()
                .name("feed".into())
                .spawn_scoped(scope, move || {
                    for file in files {
                        // Interrupted: no new file is started.
                        if crate::interrupt::was_requested() || task_tx.send(file).is_err() {
                            break;
                        }
                    }
                })
                .expect("spawn a thread");
            let decoders: Vec<_> = (0..workers)
                .map(|i| {
                    let tasks = task_rx.clone();
                    let out = decoded_tx.clone();
                    std::thread::Builder::new()
                        .name(format!("decode-{i}"))
                        .spawn_scoped(scope, move || {
                            for file in tasks {
                                if crate::interrupt::was_requested() {
                                    continue;
                                }
                                let started = Instant::now();
                                self.journal.started(&file.root, &file.path);
                                crate::fault::point(&format!("decode:{}", file.path));
                                let (root, path) = (file.root.clone(), file.path.clone());
                                let decoded = prepare(file, self.decode, self.preprocess);
                                self.journal.finished(&root, &path);
                                nanos.add(&nanos.decode, started);
                                // A file cut short by an interruption is not a failure: drop it.
                                let cut_short =
                                    matches!(decoded, Decoded::Failed(..)) && crate::interrupt::was_requested();
                                if !cut_short && out.send(decoded).is_err() {
                                    break;
                                }
                            }
                        })
                        .expect("spawn a thread")
                })
                .collect();
            drop(task_rx);
            drop(decoded_tx);
            let encoder = std::thread::Builder::new()
                .name("encode".into())
                .spawn_scoped(scope, move || -> Result<(), String> {
                    let embed = |pixels: &[f32], count: usize| -> Result<Vec<Vec<f32>>, String> {
                        crate::fault::point("encode");
                        let started = Instant::now();
                        let flat = self.clip.embed_images(pixels, count).map_err(|e| e.to_string())?;
                        nanos.add(&nanos.encode, started);
                        Ok(flat.chunks(dim).map(<[f32]>::to_vec).collect())
                    };
                    let mut encoder = BatchEncoder::new(self.options.batch, embed, crate::model::mean_pool);
                    for item in decoded_rx {
                        let done = match item {
                            Decoded::Video(video) => encoder.push(video)?,
                            Decoded::Failed(file, rejection) => {
                                if encoded_tx.send(Encoded::Failed(file, rejection)).is_err() {
                                    return Ok(());
                                }
                                continue;
                            }
                        };
                        for video in done {
                            if encoded_tx.send(Encoded::Video(video)).is_err() {
                                return Ok(());
                            }
                        }
                    }
                    for video in encoder.finish()? {
                        if encoded_tx.send(Encoded::Video(video)).is_err() {
                            return Ok(());
                        }
                    }
                    Ok(())
                })
                .expect("spawn a thread");

            let mut written: Result<(), IngestError> = Ok(());
            for outcome in &encoded_rx {
                if let Err(e) = consume(outcome) {
                    written = Err(e.into());
                    break;
                }
            }
            // Stops the upstream stages if writing failed: their sends now fail.
            drop(encoded_rx);
            let panicked = |stage: &'static str| IngestError::Stage(stage, "a worker thread panicked".into());
            let encoded = encoder.join().map_err(|_| panicked("encode"))?;
            for decoder in decoders {
                decoder.join().map_err(|_| panicked("decode"))?;
            }
            feeder.join().map_err(|_| panicked("feed"))?;
            written?;
            encoded.map_err(|e| IngestError::Stage("encode", e))
        })
    }
}
