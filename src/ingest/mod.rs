//! `vtr-index ingest`'s run: opens the index, plans, runs the stages, commits the result.
//!
//! The work is done elsewhere: which files need work in [`plan`], the threads and channels of
//! the stages in [`pipeline`], the decode worker processes in [`worker`] (their side) and
//! [`pool`] (ours), decoding, sampling, preprocessing and embedding in their own modules, the
//! rows, commits and run reports in `store`. This module takes them in order:
//! the writer lock and the recorded settings, the collection of unlisted files and the upgrade
//! of an older format, the crash journals, the walk and the plan, the old rows carried over,
//! the stages, a commit every `--commit-every` files or `--commit-interval` and one at the end.
//! A panic in any stage fails the run with only its earlier periodic commits published. On
//! SIGINT or SIGTERM, or when decode workers die on file after file, no new file starts and
//! what is finished is committed.

pub mod pipeline;
pub mod plan;
pub mod pool;
pub mod report;
pub mod timeline;
pub mod worker;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::encode::EmbeddedVideo;
use crate::failure::{Failure, Rejection};
use crate::model::{Checkpoint, Clip, ModelError, Unbuilt};
use crate::partition::Shard;
use crate::progress::Progress;
use crate::sampling::SamplingConfig;
use crate::store::{
    Committer, FrameRow, InFlightJournal, Manifest, PreprocessRecord, RowWriters, SamplingRecord, StoreError, VideoRow,
    WriterLock, carry_over, collect_garbage, crashed_runs, merged_roots, now_us, read_table, write_reused,
    write_run_report,
};
use crate::types::{DeviceChoice, HeadKind, ModelIdentity, Precision};
use crate::walk::{Root, VideoFile, WalkError, list_files, walk_roots};
use pipeline::{Encoded, JournalGuard, Pipeline};
use plan::Plan;
pub use report::{IngestReport, StageSeconds, failure_line};
use timeline::{Activity, StageClock};

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
    /// The head that pools each video's frames; fixed when the index is created [default: the
    /// checkpoint's head, meanP for plain CLIP].
    pub head: Option<HeadKind>,
    /// Index only this part of the files (`--shard I/N`); the index records it.
    pub shard: Option<Shard>,
    /// Take the files from this list (one path per line, relative to the one root) instead of
    /// walking the root.
    pub files_from: Option<PathBuf>,
    pub decode_timeout: Duration,
    /// Decode worker processes at normal priority (one more runs at the lowest).
    pub decode_workers: usize,
    /// A decode worker whose resident memory exceeds this is stopped (`memory_limit`).
    pub decode_memory_mib: u64,
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
    /// Decode workers died on too many files in a row; the files finished before are committed.
    #[error("{0}; the files finished before were committed")]
    DecodersBroken(String),
}

/// Runs one ingest. Per-file failures are data in the report; an `Err` means nothing useful
/// could be done and the index is as it was.
pub fn ingest(options: &IngestOptions) -> Result<IngestReport, IngestError> {
    let started = Instant::now();
    let started_at_us = now_us();
    crate::walk::check_roots(&options.roots)?;
    if options.files_from.is_some() && options.roots.len() != 1 {
        return Err(IngestError::Refused(
            "--files-from lists paths relative to one root: give exactly one root with it".into(),
        ));
    }
    refuse_dangerous_placement(&options.index, &options.roots)?;
    let (opened, journal) = Opened::open(options, started_at_us)?;
    let mut run = Run::plan(options, opened, started, started_at_us)?;
    let broken = run.process(journal.get())?;
    let report = run.finish(journal)?;
    match broken {
        Some(message) => Err(IngestError::DecodersBroken(message)),
        None => Ok(report),
    }
}

/// The model an index is built with, read only when something is to be embedded (or checked,
/// when `--model` names one). Its towers are built by the encoder, while decoding starts.
struct ModelSource<'a> {
    options: &'a IngestOptions,
    path: PathBuf,
    precision: Precision,
    /// Frames per video at most: a seqTransf head must have a position for each.
    max_frames: usize,
    /// The model the index was built with, which any other is refused for.
    recorded: Option<ModelIdentity>,
}

impl ModelSource<'_> {
    /// Reads the model, refuses another than the index's, and sets the head that pools videos.
    fn load(&self) -> Result<Clip<Unbuilt>, IngestError> {
        let checkpoint = Checkpoint::open(&self.path)?.with_precision(self.precision);
        let mut clip = Clip::unbuilt(checkpoint, self.options.device)?;
        if let Some(recorded) = &self.recorded
            && recorded.sha256 != clip.identity.sha256
        {
            return Err(IngestError::Refused(format!(
                "{}: this index was built with the model at {} (sha256 {}…); {} is a different model. Build a new index for a new model.",
                self.options.index.display(),
                recorded.source,
                &recorded.sha256[..12.min(recorded.sha256.len())],
                self.path.display()
            )));
        }
        let carried = clip.checkpoint.head.clone();
        let head = resolve_head(self.options, self.recorded.as_ref(), carried.as_ref().map(|h| h.kind()))?;
        if let Some(positions) = carried.filter(|h| h.kind() == head).and_then(|h| h.max_frames())
            && self.max_frames > positions
        {
            return Err(IngestError::Refused(format!(
                "--frames {}: the {} head of {} has position embeddings for {positions} frames; sample at most that many",
                self.max_frames,
                head.name(),
                self.path.display()
            )));
        }
        clip.use_head(head)?;
        Ok(clip)
    }
}

/// The index as this run found it, locked, with what the run keeps of its state.
struct Opened<'a> {
    lock: WriterLock,
    previous: Option<Manifest>,
    model: ModelSource<'a>,
    clip: Option<Clip<Unbuilt>>,
    sampling: SamplingConfig,
    upgraded: bool,
    /// Crashes per (root, path) in flight: the manifest's counts plus the crashed journals'.
    suspects: BTreeMap<(String, String), u32>,
    crashed_journals: Vec<PathBuf>,
}

impl<'a> Opened<'a> {
    /// Locks the index (creating it once the model checks pass), checks the options against
    /// what the index records, collects the index's unlisted files, upgrades an older format,
    /// reads the crash journals and starts this run's, which it returns beside the index.
    fn open(options: &'a IngestOptions, started_at_us: i64) -> Result<(Opened<'a>, JournalGuard), IngestError> {
        // Lock before reading the manifest, so no other writer commits between our read and
        // ours. A new index is locked once its folder exists (below), after the model checks.
        let mut lock = options.index.is_dir().then(|| lock_index(&options.index)).transpose()?;
        let mut previous = Manifest::load(&options.index)?;
        let path = match (&options.model, &previous) {
            (Some(path), _) => path.clone(),
            (None, Some(manifest)) => PathBuf::from(&manifest.model.source),
            (None, None) => {
                return Err(IngestError::Refused(format!(
                    "{}: a new index needs --model (a CLIP checkpoint folder or weights file)",
                    options.index.display()
                )));
            }
        };
        if let Some(manifest) = &previous {
            check_part(options, manifest)?;
        }
        let sampling = resolve_sampling(options, previous.as_ref())?;
        let precision = resolve_precision(options, previous.as_ref())?;
        let model = ModelSource {
            options,
            path,
            precision,
            max_frames: sampling.max_frames,
            recorded: previous.as_ref().map(|m| m.model.clone()),
        };
        // A re-run with the index's own model loads it only when there is something to embed,
        // so a run that finds nothing to do stays fast however large the model.
        let clip = if options.model.is_some() || previous.is_none() { Some(model.load()?) } else { None };
        let lock = match lock.take() {
            Some(lock) => lock,
            None => {
                std::fs::create_dir_all(&options.index)
                    .map_err(|source| StoreError::Io { path: options.index.clone(), source })?;
                let lock = lock_index(&options.index)?;
                if Manifest::load(&options.index)?.is_some() {
                    return Err(IngestError::Refused(format!(
                        "{}: another ingest created this index while this one started; run again",
                        options.index.display()
                    )));
                }
                lock
            }
        };
        collect_garbage(&options.index, previous.as_ref())?;
        // An index of an older format moves to this one in this run's commit (after the
        // collection above: the old shards must outlive every manifest that lists them).
        let upgraded = match previous.as_mut() {
            Some(manifest) => crate::store::upgrade(
                &options.index,
                manifest,
                &started_at_us.to_string(),
                crate::walk::canonical_name,
            )?,
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
        let journal = JournalGuard(Some(InFlightJournal::create(&options.index, &started_at_us.to_string())?));
        Ok((Opened { lock, previous, model, clip, sampling, upgraded, suspects, crashed_journals }, journal))
    }
}

/// One run from its plan to its last commit.
struct Run<'a> {
    options: &'a IngestOptions,
    started: Instant,
    started_at_us: i64,
    lock: WriterLock,
    previous: Option<Manifest>,
    clip: Option<Clip<Unbuilt>>,
    sampling: SamplingConfig,
    upgraded: bool,
    root_names: Vec<String>,
    report: IngestReport,
    /// Files the stages take, in walk order.
    files: Vec<VideoFile>,
    /// Files given to the stages, and files held back because a signal came before any started.
    processed: usize,
    held_back: usize,
    /// (root, path) of old videos being re-embedded because the file changed.
    replaced: HashSet<(String, String)>,
    old_failures: Vec<Failure>,
    /// Where each (root, path) of `old_failures` is.
    old_failure_index: HashMap<(String, String), usize>,
    /// Every failure the next commit lists, but the old failures of files being retried…
    failures: Vec<Failure>,
    /// …which stay listed until their retry ends.
    retried_failures: HashMap<(String, String), Failure>,
    suspects: BTreeMap<(String, String), u32>,
    suspects_before: BTreeMap<(String, String), u32>,
    writers: RowWriters,
    committer: Committer<'a>,
    progress: Progress,
    finished: usize,
}

impl<'a> Run<'a> {
    /// Walks the roots, plans the work against the old index, carries the old rows that stay
    /// over into this run's writers and writes the rows of reused files.
    fn plan(
        options: &'a IngestOptions,
        opened: Opened<'a>,
        started: Instant,
        started_at_us: i64,
    ) -> Result<Run<'a>, IngestError> {
        let Opened { lock, previous, model, mut clip, sampling, upgraded, mut suspects, crashed_journals } = opened;
        let index = &options.index;
        let root_names: Vec<String> = options.roots.iter().map(|r| r.name.clone()).collect();
        let suspects_before = suspects.clone();
        let walk_started = Instant::now();
        let mut walked = match &options.files_from {
            Some(list) => list_files(&options.roots[0], list, started_at_us)?,
            None => walk_roots(&options.roots, index, started_at_us)?,
        };
        if let Some(shard) = options.shard {
            walked.videos.retain(|file| shard.holds(&file.video_id));
            walked.failures.retain(|failure| shard.holds(&failure.path));
        }
        for link in &walked.repeated_folders {
            crate::progress::say(&format!("vtr-index: {link}: skipped, a folder this walk reaches by another path"));
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
            Some(m) => read_table(index, m.shards("videos"))?,
            None => Vec::new(),
        };
        let old_failures: Vec<Failure> = match &previous {
            Some(m) => read_table(index, m.shards("failures"))?,
            None => Vec::new(),
        };
        let old_failure_at: HashMap<(&str, &str), &Failure> =
            old_failures.iter().map(|f| ((f.root.as_str(), f.path.as_str()), f)).collect();
        let mut plan = Plan::new(&root_names, walked.videos, &old_videos, &old_failures, options.retry_failed);
        let crashed = plan.set_aside_crashing(&mut suspects, options.retry_failed, started_at_us);
        let reused = plan.find_reusable(&old_videos);
        let reused_count = reused.len() as u64;
        report.unchanged = plan.unchanged;
        report.removed = plan.removed;
        // A signal during the walk or the plan: no file is started, and the files that would
        // have been keep what the index had of them; the plan's other changes are committed.
        crate::fault::point("planned");
        let mut held_back = match crate::interrupt::requested() {
            Some(_) => plan.hold_back(&old_failure_at),
            None => 0,
        };
        if clip.is_none() && !plan.to_process.is_empty() {
            clip = Some(model.load()?);
        }
        if !plan.to_process.is_empty() {
            crate::decode::init().map_err(IngestError::Refused)?;
        }
        // …or during the model's load: the same, before any row is carried over.
        if crate::interrupt::requested().is_some() {
            held_back += plan.hold_back(&old_failure_at);
        }
        report.failed_not_retried = plan.kept_failures.len() as u64;
        let (identity, preprocess) = model_record(clip.as_ref(), previous.as_ref());

        let tag = started_at_us.to_string();
        let mut writers = RowWriters::new(index, &tag, identity.embed_dim)?;
        let tables = write_kept_rows(index, previous.as_ref(), &old_videos, &plan.keep_ids, reused, &mut writers)?;
        report.reused = reused_count;
        report.stage_seconds.plan = plan_started.elapsed().as_secs_f64();

        let mut failures: Vec<Failure> = plan.kept_failures.clone();
        failures.extend(walked.failures.iter().cloned());
        failures.extend(crashed);
        let retried_failures = plan
            .to_process
            .iter()
            .filter_map(|f| old_failure_at.get(&(f.root.as_str(), f.path.as_str())).copied())
            .map(|f| ((f.root.clone(), f.path.clone()), f.clone()))
            .collect();
        let progress = Progress::new(plan.to_process.len() as u64);
        // Every failure the index will hold that this run does not decode again: the walk's,
        // the quarantined files', and the unchanged failures of earlier runs (exit 2 names them).
        for failure in &failures {
            progress.println(&failure_line(failure));
        }
        let template = Manifest {
            format_version: crate::store::FORMAT_VERSION,
            model: identity,
            sampling: SamplingRecord { fps: sampling.fps, max_frames: sampling.max_frames },
            preprocess,
            roots: merged_roots(previous.as_ref(), &root_names),
            tables,
            committed_at_us: 0,
            last_run: None,
            suspects: Vec::new(),
            shard: options.shard,
            merged: None,
        };
        let committer =
            Committer::new(index, template, tag, crashed_journals, options.commit_every, options.commit_interval);
        Ok(Run {
            options,
            started,
            started_at_us,
            lock,
            previous,
            clip,
            sampling,
            upgraded,
            root_names,
            report,
            processed: plan.to_process.len(),
            files: std::mem::take(&mut plan.to_process),
            held_back,
            replaced: plan.replaced,
            old_failure_index: old_failures
                .iter()
                .enumerate()
                .map(|(i, f)| ((f.root.clone(), f.path.clone()), i))
                .collect(),
            old_failures,
            failures,
            retried_failures,
            suspects,
            suspects_before,
            writers,
            committer,
            progress,
            finished: 0,
        })
    }

    /// Runs the planned files through the stages, writing and committing as they finish; the
    /// threads that decode record the files in flight in `journal`. Returns why the decoders
    /// were found broken, if they were (the run then stopped early, as on a signal).
    fn process(&mut self, journal: &InFlightJournal) -> Result<Option<String>, IngestError> {
        let files = std::mem::take(&mut self.files);
        let clock = StageClock::new(self.started);
        let mut broken = None;
        if let Some(clip) = self.clip.take()
            && !files.is_empty()
        {
            let setup = worker::Setup {
                sampling: self.sampling,
                preprocess: clip.checkpoint.preprocess.clone(),
                timeout_s: self.options.decode_timeout.as_secs_f64(),
            };
            // One worker more than asked, at the lowest priority: it decodes on the core the
            // encoder leaves idle while it waits for frames, and yields it when the encoder runs.
            let slots = self.options.decode_workers + 1;
            let memory_limit = self.options.decode_memory_mib.saturating_mul(1 << 20);
            let pool = pool::Pool::new(setup, memory_limit, self.options.decode_timeout, slots, 1);
            let suspects = self.suspects.keys().cloned().collect();
            let pipeline = Pipeline { options: self.options, pool: &pool, journal, suspects: &suspects };
            pipeline.run(files, clip, &clock, |outcome| self.consume(outcome, &clock))?;
            broken = pool.broken();
            self.report.decode_workers = report::WorkersReport::of(&pool);
        }
        self.progress.finish();
        if let Some(signal) = crate::interrupt::requested() {
            self.report.interrupted = Some(crate::interrupt::signal_name(signal).to_string());
        }
        if self.report.interrupted.is_some() || broken.is_some() {
            self.report.not_processed = (self.processed - self.finished + self.held_back) as u64;
        }
        let stages = &mut self.report.stage_seconds;
        stages.decode = clock.seconds(Activity::Decode);
        stages.decode_waiting = clock.seconds(Activity::DecodeWaiting);
        stages.encode = clock.seconds(Activity::Encode);
        stages.encode_waiting = clock.seconds(Activity::EncodeWaiting);
        stages.write = clock.seconds(Activity::Write);
        stages.build_model = clock.seconds(Activity::BuildModel);
        self.report.timeline = clock.report();
        self.report.memory = report::MemoryReport::of(&self.report.decode_workers);
        Ok(broken)
    }

    /// Takes one file's outcome: its rows or its failure; commits when one is due.
    fn consume(&mut self, outcome: Encoded, clock: &StageClock) -> Result<(), StoreError> {
        let write_started = Instant::now();
        let key = match outcome {
            Encoded::Video(video) => {
                let frames = video.frames.len() as u64;
                self.report.frames += frames;
                self.report.video_seconds += video.facts.duration_s;
                let key = (video.key.root.clone(), video.key.path.clone());
                if self.replaced.contains(&key) {
                    self.report.changed += 1;
                } else {
                    self.report.new += 1;
                }
                let (video, frame_rows) = rows_of(video);
                self.writers.write_video(video, frame_rows)?;
                self.progress.advance(frames);
                key
            }
            Encoded::Failed(file, rejection) => {
                let failure = self.failure_of(file, rejection);
                self.progress.println(&failure_line(&failure));
                let key = (failure.root.clone(), failure.path.clone());
                self.failures.push(failure);
                self.progress.advance(0);
                key
            }
        };
        self.retried_failures.remove(&key);
        self.suspects.remove(&key);
        self.finished += 1;
        self.committer.since_commit += 1;
        clock.add(Activity::Write, write_started);
        if self.committer.due() {
            let listed: Vec<Failure> = self.failures.iter().chain(self.retried_failures.values()).cloned().collect();
            self.report.wall_s = self.started.elapsed().as_secs_f64();
            let report = &self.report;
            self.committer.commit(&mut self.writers, listed, &self.suspects, |n| report.json_as_committed(n), false)?;
        }
        Ok(())
    }

    /// A file's failure record, counting the attempts of an earlier failure of the same file.
    fn failure_of(&self, file: VideoFile, rejection: Rejection) -> Failure {
        let at = self.old_failure_index.get(&(file.root.clone(), file.path.clone()));
        let previous = at.map(|&i| &self.old_failures[i]);
        Failure {
            first_seen_us: previous.map_or(self.started_at_us, |f| f.first_seen_us),
            attempts: previous.map_or(1, |f| f.attempts + 1),
            root: file.root,
            path: file.path,
            stage: rejection.stage,
            kind: rejection.kind,
            message: rejection.message,
            size_bytes: file.size_bytes,
            mtime_ns: file.mtime_ns,
        }
    }

    /// Commits the run when it changed anything (otherwise only writes its report), removes
    /// its journal and releases the lock.
    fn finish(mut self, journal: JournalGuard) -> Result<IngestReport, IngestError> {
        // Failed files whose retry never ran (the run was interrupted first) keep their record.
        let mut failures = std::mem::take(&mut self.failures);
        failures.extend(std::mem::take(&mut self.retried_failures).into_values());
        for failure in &failures {
            *self.report.failed.entry(failure.kind.as_str().to_string()).or_default() += 1;
        }
        let failures_changed = {
            let key = |f: &Failure| (f.root.clone(), f.path.clone(), f.kind, f.size_bytes, f.mtime_ns, f.attempts);
            let old: HashSet<_> = self.old_failures.iter().map(key).collect();
            let new: HashSet<_> = failures.iter().map(key).collect();
            old != new
        };
        let roots_changed = self.previous.as_ref().is_none_or(|m| self.root_names.iter().any(|r| !m.roots.contains(r)));
        let report = &mut self.report;
        let needs_commit = self.processed > 0
            || self.upgraded
            || report.removed > 0
            || report.reused > 0
            || failures_changed
            || roots_changed
            || self.suspects != self.suspects_before
            || !self.committer.crashed_journals.is_empty();
        report.wall_s = self.started.elapsed().as_secs_f64();
        report.frames_per_s = report.frames as f64 / report.wall_s.max(1e-9);
        report.videos_per_s = (report.new + report.changed) as f64 / report.wall_s.max(1e-9);
        if needs_commit {
            failures.sort_by(|a, b| (&a.root, &a.path).cmp(&(&b.root, &b.path)));
            report.committed = true;
            let snapshot = report.clone();
            self.committer.commit(
                &mut self.writers,
                failures,
                &self.suspects,
                |n| snapshot.json_as_committed(n),
                true,
            )?;
            report.commits = self.committer.commits;
        } else {
            write_run_report(&self.options.index, &self.committer.tag, &report.json())?;
        }
        let report = std::mem::take(&mut self.report);
        drop(journal);
        drop(self.lock);
        Ok(report)
    }
}

/// Carries the old rows that stay over into `writers` (whole shards listed again where they
/// can be) and writes the rows of reused files under their new identity. Returns the tables
/// the next commit starts from.
fn write_kept_rows(
    index: &Path,
    previous: Option<&Manifest>,
    old_videos: &[VideoRow],
    keep_ids: &HashSet<String>,
    reused: Vec<(VideoFile, VideoRow)>,
    writers: &mut RowWriters,
) -> Result<BTreeMap<String, Vec<crate::store::ShardInfo>>, StoreError> {
    let mut tables = previous.map(|m| m.tables.clone()).unwrap_or_default();
    for table in ["videos", "frames"] {
        let old = previous.map_or(&[][..], |m| m.shards(table));
        let kept = carry_over(index, table, old, old_videos, keep_ids, writers)?;
        tables.insert(table.to_string(), kept);
    }
    if !reused.is_empty() {
        let old = previous.map_or(&[][..], |m| m.shards("frames"));
        let rows = reused.into_iter().map(|(file, old)| {
            let old_id = old.video_id.clone();
            let row = VideoRow {
                video_id: file.video_id,
                root: file.root,
                path: file.path,
                size_bytes: file.size_bytes,
                mtime_ns: file.mtime_ns,
                ..old
            };
            (row, old_id)
        });
        write_reused(index, old, rows.collect(), writers)?;
    }
    Ok(tables)
}

/// What the manifest records of the model and its preprocessing: the loaded model's, or the
/// index's own when nothing was embedded.
fn model_record(clip: Option<&Clip<Unbuilt>>, previous: Option<&Manifest>) -> (ModelIdentity, PreprocessRecord) {
    match (clip, previous) {
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
    }
}

/// An embedded video's row and its frames' rows.
fn rows_of(video: EmbeddedVideo<VideoFile>) -> (VideoRow, Vec<FrameRow>) {
    let file = video.key;
    let frames = video
        .frames
        .into_iter()
        .enumerate()
        .map(|(index, (pts_s, embedding))| FrameRow {
            video_id: file.video_id.clone(),
            frame_index: index as u32,
            pts_s,
            embedding,
        })
        .collect::<Vec<_>>();
    let row = VideoRow {
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
        n_frames: frames.len() as u32,
        stream_index: video.facts.stream_index,
        embedding: video.embedding,
    };
    (row, frames)
}

/// Takes the index's writer lock, saying so when a crashed writer left it behind.
fn lock_index(index: &Path) -> Result<WriterLock, StoreError> {
    let lock = WriterLock::acquire(index, "ingest")?;
    if let Some(stale) = &lock.taken_over_from {
        crate::progress::say(&format!("vtr-index: took over the lock of a writer that did not finish ({stale})"));
    }
    Ok(lock)
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

/// An existing index is run as what it is: a part only as the same part, a whole index only
/// whole, and a merged index never (`merge` alone writes it).
fn check_part(options: &IngestOptions, manifest: &Manifest) -> Result<(), IngestError> {
    let index = options.index.display();
    if manifest.merged.is_some() {
        return Err(IngestError::Refused(format!(
            "{index}: a merged index, which only `vtr-index merge` writes: ingest into its parts and merge them again"
        )));
    }
    match (manifest.shard, options.shard) {
        (recorded, asked) if recorded == asked => Ok(()),
        (Some(recorded), asked) => Err(IngestError::Refused(format!(
            "{index}: this index is part {recorded} of a sharded ingest; run it again as --shard {recorded}{}",
            asked.map_or(String::new(), |a| format!(", not {a}"))
        ))),
        (None, Some(asked)) => Err(IngestError::Refused(format!(
            "{index}: this index holds every file, not one part: build part {asked} in a new index"
        ))),
        (None, None) => unreachable!("equal above"),
    }
}

/// The head that pools the videos: for a new index `--head`, else the checkpoint's head, else
/// meanP; afterwards the index's own (an index made before heads is meanP, and a checkpoint's
/// head is then left unused, which is said once: the run's commit records meanP). Another
/// `--head` on an existing index is refused: its videos were pooled by its own.
fn resolve_head(
    options: &IngestOptions,
    recorded: Option<&ModelIdentity>,
    found: Option<HeadKind>,
) -> Result<HeadKind, IngestError> {
    let Some(recorded) = recorded else { return Ok(options.head.or(found).unwrap_or_default()) };
    let built = recorded.head.unwrap_or_default();
    if let Some(asked) = options.head
        && asked != built
    {
        return Err(IngestError::Refused(format!(
            "{}: this index's videos were pooled with the {} head; build a new index for --head {}",
            options.index.display(),
            built.name(),
            asked.name()
        )));
    }
    if recorded.head.is_none()
        && let Some(carried) = found.filter(|&k| k != built)
    {
        crate::progress::say(&format!(
            "vtr-index: {}: this index was made before temporal heads and pools with meanP; the checkpoint's {} head is not used (build a new index to use it)",
            options.index.display(),
            carried.name()
        ));
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
