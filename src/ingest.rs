//! `vtr-index ingest`: wires walk → decode → encode → store and commits the result.
//!
//! Owns no domain logic. It decides which files need work (new or changed since the last
//! commit, failed files only when they changed), runs the stages on their own threads joined
//! by bounded channels (the bounds are the backpressure that keeps memory flat), and
//! publishes the new rows with one manifest commit. Existing shards that still hold only
//! kept videos are listed again untouched; a shard with a removed or replaced video is
//! rewritten without it. A panic in any stage fails the run before anything is committed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crossbeam_channel::bounded;
use serde::Serialize;

use crate::decode::{DecodeConfig, decode_video};
use crate::encode::{BatchEncoder, EmbeddedVideo, PreparedVideo, VideoFacts};
use crate::failure::{Failure, FailureKind, Rejection, Stage};
use crate::model::{Checkpoint, Clip, DeviceChoice, ModelError};
use crate::preprocess::{PreprocessConfig, pixel_values};
use crate::progress::Progress;
use crate::sampling::SamplingConfig;
use crate::store::{
    FrameRow, Manifest, PreprocessRecord, SamplingRecord, ShardInfo, ShardWriter, StoreError, TableRows, VideoRow,
    WriterLock, collect_garbage, read_table,
};
use crate::walk::{VideoFile, WalkError, walk_roots};

/// Rows per shard: frames shards stay around 40 MB at D = 512.
const VIDEO_SHARD_ROWS: u64 = 100_000;
const FRAME_SHARD_ROWS: u64 = 20_000;

/// Resolved options of one ingest run.
#[derive(Debug, Clone)]
pub struct IngestOptions {
    pub roots: Vec<String>,
    pub index: PathBuf,
    /// Required for a new index; defaults to the manifest's model afterwards.
    pub model: Option<PathBuf>,
    pub max_frames: Option<usize>,
    pub fps: Option<f64>,
    pub batch: usize,
    pub device: DeviceChoice,
    pub decode_timeout: Duration,
    pub decode_workers: usize,
    pub retry_failed: bool,
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
    pub unchanged: u64,
    pub removed: u64,
    /// Files that failed in this run or earlier and still fail, by kind.
    pub failed: BTreeMap<String, u64>,
    /// Failed files left alone because they did not change (retry with --retry-failed).
    pub failed_not_retried: u64,
    /// Files without a video extension.
    pub skipped: u64,
    pub frames: u64,
    pub video_seconds: f64,
    pub wall_s: f64,
    pub frames_per_s: f64,
    pub videos_per_s: f64,
    pub committed: bool,
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
            "ingest: {} new, {} changed, {} unchanged, {} removed, {failed}, {} skipped (not video); {} frames from {:.1} s of video in {:.1} s ({:.1} frames/s, {:.2} videos/s)",
            self.new,
            self.changed,
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

/// Runs one ingest. Per-file failures are data in the report; an `Err` means nothing useful
/// could be done and the index is as it was.
/// Takes the index's writer lock, saying so when a crashed writer left it behind.
fn lock_index(index: &Path) -> Result<WriterLock, StoreError> {
    let lock = WriterLock::acquire(index, "ingest")?;
    if let Some(stale) = &lock.taken_over_from {
        eprintln!("vtr-index: took over the lock of a writer that did not finish ({stale})");
    }
    Ok(lock)
}

pub fn ingest(options: &IngestOptions) -> Result<IngestReport, IngestError> {
    let started = Instant::now();
    let started_at_us = now_us();
    crate::walk::check_roots(&options.roots)?;
    // Lock before reading the manifest, so no other writer commits between our read and ours.
    // A new index is locked once its folder exists (below), after the model checks pass.
    let mut lock = options.index.is_dir().then(|| lock_index(&options.index)).transpose()?;
    let previous = Manifest::load(&options.index)?;

    let model_path = match (&options.model, &previous) {
        (Some(path), _) => path.clone(),
        (None, Some(manifest)) => PathBuf::from(&manifest.model.source),
        (None, None) => {
            return Err(IngestError::Refused(format!(
                "{}: a new index needs --model (a CLIP checkpoint folder)",
                options.index.display()
            )));
        }
    };
    let sampling = resolve_sampling(options, previous.as_ref())?;
    let checkpoint = Checkpoint::open(&model_path)?;
    let preprocess = checkpoint.preprocess.clone();
    let clip = Clip::load(checkpoint, options.device)?;
    if let Some(manifest) = &previous
        && manifest.model.sha256 != clip.identity.sha256
    {
        return Err(IngestError::Refused(format!(
            "{}: this index was built with the model at {} (sha256 {}…); {} is a different model. Build a new index for a new model.",
            options.index.display(),
            manifest.model.source,
            &manifest.model.sha256[..12.min(manifest.model.sha256.len())],
            model_path.display()
        )));
    }
    crate::decode::init().map_err(IngestError::Refused)?;
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

    let walked = walk_roots(&options.roots, started_at_us)?;
    let mut report =
        IngestReport { started_at_us, roots: options.roots.clone(), skipped: walked.skipped, ..Default::default() };
    let old_videos: Vec<VideoRow> = match &previous {
        Some(m) => read_table(&options.index, m.shards("videos"))?,
        None => Vec::new(),
    };
    let old_failures: Vec<Failure> = match &previous {
        Some(m) => read_table(&options.index, m.shards("failures"))?,
        None => Vec::new(),
    };
    let plan = Plan::new(&options.roots, walked.videos, &old_videos, &old_failures, options.retry_failed);
    report.unchanged = plan.unchanged;
    report.removed = plan.removed;
    report.failed_not_retried = plan.kept_failures.len() as u64;

    let tag = started_at_us.to_string();
    let dim = clip.embed_dim();
    let mut videos_out = ShardWriter::<VideoRow>::new(&options.index, "videos", &tag, dim, VIDEO_SHARD_ROWS)?;
    let mut frames_out = ShardWriter::<FrameRow>::new(&options.index, "frames", &tag, dim, FRAME_SHARD_ROWS)?;
    let mut kept_shards: BTreeMap<&str, Vec<ShardInfo>> = BTreeMap::new();
    if let Some(manifest) = &previous {
        kept_shards.insert(
            "videos",
            carry_over(&options.index, manifest.shards("videos"), &plan.keep_ids, &mut videos_out, |r: &VideoRow| {
                &r.video_id
            })?,
        );
        kept_shards.insert(
            "frames",
            carry_over(&options.index, manifest.shards("frames"), &plan.keep_ids, &mut frames_out, |r: &FrameRow| {
                &r.video_id
            })?,
        );
    }

    let mut failures: Vec<Failure> = plan.kept_failures.clone();
    failures.extend(walked.failures.iter().cloned());
    let mut progress = Progress::new(plan.to_process.len() as u64);
    for failure in &walked.failures {
        progress.println(&failure_line(failure));
    }
    let decode_config = DecodeConfig { sampling, timeout: options.decode_timeout };
    let processed = plan.to_process.len();
    run_pipeline(plan.to_process, options, &decode_config, &preprocess, &clip, |outcome| {
        match outcome {
            Encoded::Video(video) => {
                let frames = video.frames.len() as u64;
                report.frames += frames;
                report.video_seconds += video.facts.duration_s;
                if plan.replaced.contains(&(video.key.root.clone(), video.key.path.clone())) {
                    report.changed += 1;
                } else {
                    report.new += 1;
                }
                write_video(video, &mut videos_out, &mut frames_out)?;
                progress.advance(frames);
            }
            Encoded::Failed(file, rejection) => {
                let previous_failure = old_failures.iter().find(|f| f.root == file.root && f.path == file.path);
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
                failures.push(failure);
                progress.advance(0);
            }
        }
        Ok(())
    })?;
    progress.finish();

    for failure in &failures {
        *report.failed.entry(failure.kind.as_str().to_string()).or_default() += 1;
    }
    let failures_changed = {
        let key = |f: &Failure| (f.root.clone(), f.path.clone(), f.kind, f.size_bytes, f.mtime_ns, f.attempts);
        let old: HashSet<_> = old_failures.iter().map(key).collect();
        let new: HashSet<_> = failures.iter().map(key).collect();
        old != new
    };
    let roots_changed = previous.as_ref().is_none_or(|m| options.roots.iter().any(|r| !m.roots.contains(r)));
    let needs_commit = processed > 0 || report.removed > 0 || failures_changed || roots_changed;

    report.wall_s = started.elapsed().as_secs_f64();
    report.frames_per_s = report.frames as f64 / report.wall_s.max(1e-9);
    report.videos_per_s = (report.new + report.changed) as f64 / report.wall_s.max(1e-9);
    if needs_commit {
        let mut tables: BTreeMap<String, Vec<ShardInfo>> =
            previous.as_ref().map(|m| m.tables.clone()).unwrap_or_default();
        for (name, writer_shards) in [("videos", videos_out.finish()?), ("frames", frames_out.finish()?)] {
            let mut shards = kept_shards.remove(name).unwrap_or_default();
            shards.extend(writer_shards);
            tables.insert(name.to_string(), shards);
        }
        failures.sort_by(|a, b| (&a.root, &a.path).cmp(&(&b.root, &b.path)));
        let mut failures_out = ShardWriter::<Failure>::new(&options.index, "failures", &tag, 0, u64::MAX)?;
        for failure in failures {
            failures_out.push(failure)?;
        }
        tables.insert("failures".to_string(), failures_out.finish()?);
        let mut roots = previous.as_ref().map(|m| m.roots.clone()).unwrap_or_default();
        roots.extend(options.roots.iter().filter(|r| !roots.contains(r)).cloned().collect::<Vec<_>>());
        report.committed = true;
        let run_file = write_run_report(&options.index, &tag, &report)?;
        let manifest = Manifest {
            format_version: crate::store::FORMAT_VERSION,
            model: clip.identity.clone(),
            sampling: SamplingRecord { fps: sampling.fps, max_frames: sampling.max_frames },
            preprocess: PreprocessRecord {
                resize: "bicubic-antialias".into(),
                shortest_edge: preprocess.resize,
                crop: preprocess.crop,
                mean: preprocess.mean,
                std: preprocess.std,
            },
            roots,
            tables,
            committed_at_us: now_us(),
            last_run: Some(run_file),
        };
        manifest.commit(&options.index)?;
        // Shards the new manifest no longer lists (rewritten ones) can go now.
        collect_garbage(&options.index, Some(&manifest))?;
    } else {
        drop(videos_out);
        drop(frames_out);
        write_run_report(&options.index, &tag, &report)?;
    }
    drop(lock);
    Ok(report)
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
}

/// Lists again the old shards whose rows all stay, and copies the kept rows of the others
/// into `writer`. Returns the shards listed unchanged.
fn carry_over<R: TableRows>(
    index: &Path,
    shards: &[ShardInfo],
    keep_ids: &HashSet<String>,
    writer: &mut ShardWriter<R>,
    video_id: impl Fn(&R) -> &String,
) -> Result<Vec<ShardInfo>, StoreError> {
    let mut unchanged = Vec::new();
    for shard in shards {
        let rows: Vec<R> = read_table(index, std::slice::from_ref(shard))?;
        if rows.iter().all(|r| keep_ids.contains(video_id(r))) {
            unchanged.push(shard.clone());
            continue;
        }
        for row in rows.into_iter().filter(|r| keep_ids.contains(video_id(r))) {
            writer.push(row)?;
        }
    }
    Ok(unchanged)
}

fn write_video(
    video: EmbeddedVideo<VideoFile>,
    videos_out: &mut ShardWriter<VideoRow>,
    frames_out: &mut ShardWriter<FrameRow>,
) -> Result<(), StoreError> {
    let file = video.key;
    for (index, (pts_s, embedding)) in video.frames.iter().enumerate() {
        frames_out.push(FrameRow {
            video_id: file.video_id.clone(),
            frame_index: index as u32,
            pts_s: *pts_s,
            embedding: embedding.clone(),
        })?;
    }
    videos_out.push(VideoRow {
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
        embedding: video.embedding,
    })
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
    };
    Decoded::Video(PreparedVideo { key: file, facts, frames })
}

pub fn hash_file(path: &Path) -> std::io::Result<String> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(std::fs::File::open(path)?)?;
    Ok(hasher.finalize().to_hex().to_string())
}

/// Runs decode workers and the encoder on their own threads, joined by bounded channels,
/// and hands every outcome to `consume` on the calling thread.
fn run_pipeline(
    files: Vec<VideoFile>,
    options: &IngestOptions,
    decode: &DecodeConfig,
    preprocess: &PreprocessConfig,
    clip: &Clip,
    mut consume: impl FnMut(Encoded) -> Result<(), StoreError>,
) -> Result<(), IngestError> {
    let workers = options.decode_workers.max(1);
    let (task_tx, task_rx) = bounded::<VideoFile>(workers * 2);
    let (decoded_tx, decoded_rx) = bounded::<Decoded>(workers + 2);
    let (encoded_tx, encoded_rx) = bounded::<Encoded>(16);
    let dim = clip.embed_dim();
    std::thread::scope(|scope| {
        let feeder = std::thread::Builder::new()
            .name("feed".into())
            .spawn_scoped(scope, move || {
                for file in files {
                    if task_tx.send(file).is_err() {
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
                            if out.send(prepare(file, decode, preprocess)).is_err() {
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
                    let flat = clip.embed_images(pixels, count).map_err(|e| e.to_string())?;
                    Ok(flat.chunks(dim).map(<[f32]>::to_vec).collect())
                };
                let mut encoder = BatchEncoder::new(options.batch, embed);
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
