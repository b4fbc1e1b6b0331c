//! `vtr-index ingest DIR… --index INDEX`: the command line → [`IngestOptions`], the run
//! ([`crate::ingest::ingest`]), and its summary and exit code.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::Args;

use crate::ingest::{IngestOptions, ingest};
use crate::partition::Shard;
use crate::types::{HeadKind, Precision};

#[derive(Debug, Args)]
pub struct IngestArgs {
    /// Folders to walk recursively for video files.
    #[arg(required = true, value_name = "DIR")]
    pub roots: Vec<PathBuf>,
    /// The index folder (created if it does not exist).
    #[arg(long, value_name = "INDEX")]
    pub index: PathBuf,
    /// CLIP checkpoint: a Hugging Face folder, or a weights file in any layout `info --model`
    /// recognises; required for a new index, defaults to the index's model.
    #[arg(long, value_name = "M")]
    pub model: Option<PathBuf>,
    /// At most this many frames per video [default: 12].
    #[arg(long)]
    pub frames: Option<usize>,
    /// Frames sampled per second of video [default: 1].
    #[arg(long)]
    pub fps: Option<f64>,
    /// Frames per model batch (frames of several videos share a batch).
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// The dtype the model runs in: f32, f16 or bf16 (embeddings are stored as f32); fixed when
    /// the index is created [default: f32].
    #[arg(long)]
    pub dtype: Option<String>,
    /// How a video's frames become its vector: meanP, seqTransf or seqLSTM (CLIP4Clip's heads);
    /// fixed when the index is created [default: the head the checkpoint carries, else meanP].
    #[arg(long, value_name = "HEAD")]
    pub head: Option<String>,
    /// Index only part I of N: the files whose BLAKE3(video_id) mod N is I. `auto/N` takes I
    /// from SLURM_ARRAY_TASK_ID or JOB_COMPLETION_INDEX. `vtr-index merge` joins the parts.
    #[arg(long, value_name = "I/N")]
    pub shard: Option<String>,
    /// Take the root's files from LIST (one path per line, relative to the root) instead of
    /// walking it: the list a step before made once, for every part of a sharded ingest.
    #[arg(long, value_name = "LIST")]
    pub files_from: Option<PathBuf>,
    /// Give up on a file after this many seconds (recorded as a `timeout` failure).
    #[arg(long, default_value_t = 300.0, value_name = "SECONDS")]
    pub decode_timeout: f64,
    /// Decode worker processes (each decodes one file at a time), besides one more at the
    /// lowest priority that uses the core the encoder leaves idle [default: half the cores].
    #[arg(long)]
    pub decode_workers: Option<usize>,
    /// Stop a decode worker whose resident memory exceeds this and record its file as a
    /// `memory_limit` failure.
    #[arg(long, default_value_t = crate::ingest::pool::DEFAULT_DECODE_MEMORY_MIB, value_name = "MIB")]
    pub decode_memory_mib: u64,
    /// Retry files that failed before even if they did not change.
    #[arg(long)]
    pub retry_failed: bool,
    /// Commit the work done so far every N finished files (a crash keeps what was committed).
    #[arg(long, default_value_t = 500, value_name = "N")]
    pub commit_every: u64,
    /// …and at least this often.
    #[arg(long, default_value_t = 300.0, value_name = "SECONDS")]
    pub commit_interval: f64,
}

pub fn run(args: IngestArgs) -> Result<u8> {
    if !(args.decode_timeout > 0.0 && args.commit_interval > 0.0) || args.commit_every == 0 {
        bail!("--decode-timeout, --commit-interval and --commit-every must be positive");
    }
    if args.decode_workers == Some(0) || args.decode_memory_mib == 0 {
        bail!("--decode-workers and --decode-memory-mib must be at least 1");
    }
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let options = IngestOptions {
        roots: args.roots.into_iter().map(crate::walk::Root::new).collect(),
        index: args.index,
        model: args.model,
        max_frames: args.frames,
        fps: args.fps,
        batch: args.batch.max(1),
        device: super::device(&args.device)?,
        dtype: args.dtype.as_deref().map(Precision::parse).transpose().map_err(anyhow::Error::msg)?,
        head: args.head.as_deref().map(HeadKind::parse).transpose().map_err(anyhow::Error::msg)?,
        shard: args
            .shard
            .as_deref()
            .map(|s| Shard::parse(s, |name| std::env::var(name).ok()))
            .transpose()
            .map_err(anyhow::Error::msg)?,
        files_from: args.files_from,
        decode_timeout: Duration::try_from_secs_f64(args.decode_timeout).unwrap_or(Duration::MAX),
        decode_workers: args.decode_workers.unwrap_or((cores / 2).max(1)),
        decode_memory_mib: args.decode_memory_mib,
        retry_failed: args.retry_failed,
        commit_every: args.commit_every,
        commit_interval: Duration::try_from_secs_f64(args.commit_interval).unwrap_or(Duration::MAX),
    };
    let report = ingest(&options)?;
    // A stderr nobody reads any more loses these lines; the run's work is committed already.
    crate::progress::say(&format!("vtr-index: {}", report.summary()));
    if let Some(signal) = &report.interrupted {
        crate::progress::say(&format!(
            "vtr-index: interrupted by {signal}: the {} videos finished in this run and the {} failures recorded are committed; {} files were not processed; run the same command again to continue",
            report.new + report.changed + report.reused,
            report.failed_total(),
            report.not_processed
        ));
    }
    Ok(if report.failed_total() > 0 { 2 } else { 0 })
}
