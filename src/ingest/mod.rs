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

mod failures;
pub mod pipeline;
pub mod plan;
pub mod pool;
pub(crate) mod process;
pub mod report;
mod settings;
pub mod timeline;
pub mod worker;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::encode::EmbeddedVideo;
use crate::failure::Failure;
use crate::model::{Clip, ModelError, Unbuilt};
use crate::partition::Shard;
use crate::progress::Progress;
use crate::sampling::SamplingConfig;
use crate::store::{
    Committer, FrameRow, InFlightJournal, Manifest, RowWriters, SamplingRecord, StoreError, VideoRow, WriterLock,
    carry_over, collect_garbage, crashed_runs, merged_roots, now_us, read_table, write_reused, write_run_report,
};
use crate::types::{DeviceChoice, HeadKind, Precision};
use crate::walk::{Root, VideoFile, WalkError, list_files, walk_roots};
use failures::{FailureBook, FileKey};
use pipeline::{Encoded, JournalGuard, Pipeline};
use plan::Plan;
pub use process::resident_bytes;
pub use report::{IngestReport, StageSeconds, failure_line};
use settings::{
    ModelSource, check_part, lock_index, model_record, refuse_dangerous_placement, resolve_precision, resolve_sampling,
};
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
    #[error("the {0} stage failed: {1}; only the commits made before it are kept")]
    Stage(&'static str, String),
    #[error("the encode stage failed: {0}; only the commits made before it are kept")]
    Encode(ModelError),
    /// Decode workers died on too many files in a row; the files finished before are committed.
    #[error("{0}; the files finished before were committed")]
    DecodersBroken(String),
}

/// Runs one ingest. Per-file failures are data in the report; an `Err` means the run could not
/// go on, with the index as its last commit left it (a refusal before any work: as it was).
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
    replaced: HashSet<FileKey>,
    failures: FailureBook,
    writers: RowWriters,
    committer: Committer<'a>,
    progress: Progress,
    finished: usize,
}

/// What the walk found, with the report it starts.
struct Walked {
    walked: crate::walk::WalkOutcome,
    report: IngestReport,
}

/// The walk: every root's files (or `--files-from`'s), this part's alone under `--shard`.
fn walk(options: &IngestOptions, root_names: &[String], started_at_us: i64) -> Result<Walked, IngestError> {
    let walk_started = Instant::now();
    let mut walked = match &options.files_from {
        Some(list) => list_files(&options.roots[0], list, started_at_us)?,
        None => walk_roots(&options.roots, &options.index, started_at_us)?,
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
        roots: root_names.to_vec(),
        skipped: walked.skipped,
        repeated_folders: walked.repeated_folders.len() as u64,
        ..Default::default()
    };
    report.stage_seconds.walk = walk_started.elapsed().as_secs_f64();
    Ok(Walked { walked, report })
}

/// A signal during the walk, the plan or the model's load: no file is started, and the files
/// that would have been keep what the index had of them; the plan's other changes are
/// committed. Loads the model and GStreamer when files are to be processed. Returns how many
/// files were held back.
fn hold_back_or_load(
    plan: &mut Plan,
    old_failures: &[Failure],
    model: &ModelSource,
    clip: &mut Option<Clip<Unbuilt>>,
) -> Result<usize, IngestError> {
    let old_failure_at: HashMap<(&str, &str), &Failure> =
        old_failures.iter().map(|f| ((f.root.as_str(), f.path.as_str()), f)).collect();
    crate::fault::point("planned");
    let mut held_back = match crate::interrupt::requested() {
        Some(_) => plan.hold_back(&old_failure_at),
        None => 0,
    };
    if clip.is_none() && !plan.to_process.is_empty() {
        *clip = Some(model.load()?);
    }
    if !plan.to_process.is_empty() {
        crate::decode::init().map_err(IngestError::Refused)?;
    }
    if crate::interrupt::requested().is_some() {
        held_back += plan.hold_back(&old_failure_at);
    }
    Ok(held_back)
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
        let Walked { walked, mut report } = walk(options, &root_names, started_at_us)?;

        let plan_started = Instant::now();
        let (old_videos, old_failures): (Vec<VideoRow>, Vec<Failure>) = match &previous {
            Some(m) => (read_table(index, m.shards("videos"))?, read_table(index, m.shards("failures"))?),
            None => (Vec::new(), Vec::new()),
        };
        let mut plan = Plan::new(&root_names, walked.videos, &old_videos, &old_failures, options.retry_failed);
        let crashed = plan.set_aside_crashing(&mut suspects, options.retry_failed, started_at_us);
        let reused = plan.find_reusable(&old_videos);
        (report.unchanged, report.removed, report.reused) = (plan.unchanged, plan.removed, reused.len() as u64);
        let held_back = hold_back_or_load(&mut plan, &old_failures, &model, &mut clip)?;
        report.failed_not_retried = plan.kept_failures.len() as u64;

        let (identity, preprocess) = model_record(clip.as_ref(), previous.as_ref());
        let tag = started_at_us.to_string();
        let mut writers = RowWriters::new(index, &tag, identity.embed_dim)?;
        let tables = write_kept_rows(index, previous.as_ref(), &old_videos, &plan.keep_ids, reused, &mut writers)?;
        report.stage_seconds.plan = plan_started.elapsed().as_secs_f64();

        let mut listed = std::mem::take(&mut plan.kept_failures);
        listed.extend(walked.failures);
        listed.extend(crashed);
        let failures =
            FailureBook::new(started_at_us, old_failures, listed, &plan.to_process, suspects_before, suspects);
        let progress = Progress::new(plan.to_process.len() as u64);
        // Every failure the index will hold that this run does not decode again: the walk's,
        // the quarantined files', and the unchanged failures of earlier runs (exit 2 names them).
        for failure in failures.listed() {
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
            failures,
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
            let suspects = self.failures.suspects().keys().cloned().collect();
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
                let failure = self.failures.record(file, rejection);
                self.progress.println(&failure_line(failure));
                let key = (failure.root.clone(), failure.path.clone());
                self.progress.advance(0);
                key
            }
        };
        self.failures.settle(&key);
        self.finished += 1;
        self.committer.since_commit += 1;
        clock.add(Activity::Write, write_started);
        if self.committer.due() {
            self.report.wall_s = self.started.elapsed().as_secs_f64();
            let report = &self.report;
            let (listed, suspects) = (self.failures.to_commit(), self.failures.suspects());
            self.committer.commit(&mut self.writers, listed, suspects, |n| report.json_as_committed(n), false)?;
        }
        Ok(())
    }

    /// Commits the run when it changed anything (otherwise only writes its report), removes
    /// its journal and releases the lock.
    fn finish(mut self, journal: JournalGuard) -> Result<IngestReport, IngestError> {
        let closed = self.failures.close();
        for failure in &closed.failures {
            *self.report.failed.entry(failure.kind.as_str().to_string()).or_default() += 1;
        }
        let roots_changed = self.previous.as_ref().is_none_or(|m| self.root_names.iter().any(|r| !m.roots.contains(r)));
        let report = &mut self.report;
        let needs_commit = self.processed > 0
            || self.upgraded
            || report.removed > 0
            || report.reused > 0
            || closed.changed
            || roots_changed
            || !self.committer.crashed_journals.is_empty();
        report.wall_s = self.started.elapsed().as_secs_f64();
        report.frames_per_s = report.frames as f64 / report.wall_s.max(1e-9);
        report.videos_per_s = (report.new + report.changed) as f64 / report.wall_s.max(1e-9);
        if needs_commit {
            report.committed = true;
            let snapshot = report.clone();
            self.committer.commit(
                &mut self.writers,
                closed.failures,
                &closed.suspects,
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
        let old_video_shards = previous.map_or(&[][..], |m| m.shards("videos"));
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
        write_reused(index, old_video_shards, old, rows.collect(), writers)?;
    }
    Ok(tables)
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
