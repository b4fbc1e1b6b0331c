//! Command-line interface: clap arguments validated into each command's options, and the
//! exit codes of contract §3 (0 all done, 2 done but some inputs failed, 1 nothing useful done).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use crate::encode_text::{EncodeTextError, EncodeTextOptions, encode_text};
use crate::ingest::{IngestOptions, ingest};
use crate::model::{Checkpoint, DeviceChoice, Precision};
use crate::score::command::{ScoreCommand, run_score as run_score_command};
use crate::score::{DeviceInputs, Revision, is_positive};
use crate::search::{SearchCommand, search};
use crate::store::{Manifest, index_bytes, verify_shard};

#[derive(Debug, Parser)]
#[command(name = "vtr-index", version, about = "Index video corpora with CLIP for text-to-video retrieval")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Embed every video under the given folders into the index (only new or changed files).
    Ingest(IngestArgs),
    /// Encode captions or queries (CSV, JSON Lines or plain text) into a text set of the index.
    EncodeText(EncodeTextArgs),
    /// Score a text set against every video: top-k, retrieval metrics, optional dense matrices.
    Score(ScoreArgs),
    /// Top videos for one query, with the time of each one's best-matching frame.
    Search(SearchArgs),
    /// Show what an index holds, or what a checkpoint is.
    Info(InfoArgs),
    /// Check every shard the manifest lists: present, readable, right size, rows and checksum.
    Verify(VerifyArgs),
    /// Run a job file: ingest, then encode-text and score when configured.
    Run(RunArgs),
}

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
    /// Give up on a file after this many seconds (recorded as a `timeout` failure).
    #[arg(long, default_value_t = 300.0, value_name = "SECONDS")]
    pub decode_timeout: f64,
    /// Files decoded in parallel [default: half the cores].
    #[arg(long)]
    pub decode_workers: Option<usize>,
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

#[derive(Debug, Args)]
pub struct EncodeTextArgs {
    /// Captions: CSV/TSV with a header (`video_id`, `sentence`|`caption`|`text`), JSON Lines, or
    /// plain text with one query per line.
    #[arg(value_name = "CAPTIONS")]
    pub captions: PathBuf,
    #[arg(long, value_name = "INDEX")]
    pub index: PathBuf,
    /// Name of the text set [default: the file's stem].
    #[arg(long)]
    pub name: Option<String>,
    /// Another copy of the index's model, if the recorded path is gone.
    #[arg(long, value_name = "M")]
    pub model: Option<PathBuf>,
    /// Texts per model batch.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(Debug, Args)]
pub struct ScoreArgs {
    #[arg(long, value_name = "INDEX")]
    pub index: PathBuf,
    /// The text set to score (rows of the matrix).
    #[arg(long, value_name = "NAME")]
    pub texts: String,
    /// How the logit matrix is revised before ranking.
    #[arg(long, value_enum, default_value_t = crate::score::DEFAULT_REVISION)]
    pub revise: Revision,
    /// QB-Norm's query bank: another text set of the index.
    #[arg(long, value_name = "NAME")]
    pub bank: Option<String>,
    /// Softmax temperature τ of the dual softmax, on logits.
    #[arg(long, default_value_t = crate::score::DEFAULT_TEMPERATURE)]
    pub temperature: f64,
    /// QB-Norm's β, on cosines.
    #[arg(long, default_value_t = crate::score::DEFAULT_BETA)]
    pub beta: f64,
    /// Videos kept per text in topk.parquet.
    #[arg(long, short = 'k', default_value_t = crate::score::DEFAULT_TOP_K)]
    pub top_k: usize,
    /// Also write the full matrices: t2v.npy, v2t.npy and videos.txt.
    #[arg(long)]
    pub dense: bool,
    /// Logit multiplier [default: exp(logit_scale) of the index's model].
    #[arg(long)]
    pub scale: Option<f64>,
    /// Memory (MiB) for keeping the logits between the two passes; past it they are recomputed.
    #[arg(long, default_value_t = crate::score::DEFAULT_CACHE_MIB, value_name = "MIB")]
    pub cache_mib: usize,
    /// cpu, cuda or cuda:N (CUDA needs a build with --features cuda).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// On CUDA: f32 embeddings (exact; the matrix is stored in row blocks) or f16 on the tensor
    /// cores (the matrix is never stored, for corpora whose matrix exceeds device memory).
    #[arg(long, value_enum, default_value_t = crate::score::DEFAULT_DEVICE_INPUTS)]
    pub gpu_inputs: DeviceInputs,
    /// Output folder.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct SearchArgs {
    /// The query text.
    pub query: String,
    #[arg(long, value_name = "INDEX")]
    pub index: PathBuf,
    #[arg(long, short = 'k', default_value_t = 10)]
    pub top_k: usize,
    /// Another copy of the index's model, if the recorded path is gone.
    #[arg(long, value_name = "M")]
    pub model: Option<PathBuf>,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct InfoArgs {
    #[arg(long, value_name = "INDEX")]
    pub index: Option<PathBuf>,
    #[arg(long, value_name = "M")]
    pub model: Option<PathBuf>,
    /// Whether this build and machine can score on CUDA, and with which devices.
    #[arg(long)]
    pub gpu: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The job file (TOML): [ingest], [encode_text] and [score] tables whose keys are the
    /// commands' long flags with _ for -, plus `roots` and `captions`.
    #[arg(value_name = "JOB.toml")]
    pub job: PathBuf,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[arg(long, value_name = "INDEX")]
    pub index: PathBuf,
}

/// The binary's entry point: every error ends as one line on stderr and exit code 1.
pub fn main() -> ExitCode {
    crate::model::keep_freed_activation_memory();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let outcome = run(cli);
    let interrupted = crate::interrupt::requested();
    match outcome {
        Ok(code) => ExitCode::from(interrupted.map_or(code, crate::interrupt::exit_code)),
        Err(e) => {
            eprintln!("vtr-index: {e:#}");
            // 128 + the signal promises that the finished work is committed: only a command
            // that stopped because it was asked to says so, never one that failed afterwards
            // (a commit on a full disk, say).
            let stopped = matches!(e.downcast_ref::<EncodeTextError>(), Some(EncodeTextError::Interrupted { .. }));
            ExitCode::from(interrupted.filter(|_| stopped).map_or(1, crate::interrupt::exit_code))
        }
    }
}

/// Runs one command; returns its exit code (0 all done, 2 done but some inputs failed, 128 +
/// the signal's number when interrupted).
pub fn run(cli: Cli) -> Result<u8> {
    use crate::interrupt::{Policy, install};
    match &cli.command {
        Command::Ingest(_) | Command::EncodeText(_) => install(Policy::Finish),
        Command::Score(_) => install(Policy::Abandon),
        Command::Search(_) | Command::Info(_) | Command::Verify(_) => {
            // Commands that only print end quietly when their reader goes away
            // (`vtr-index info … | head -1`), as Unix tools do, instead of panicking in
            // `println!`. Rust ignores SIGPIPE by default; these commands write nothing else.
            // SAFETY: setting a signal's disposition before any thread of ours is started.
            unsafe {
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            }
        }
        Command::Run(_) => {}
    }
    match cli.command {
        Command::Run(args) => run_job(&args.job),
        Command::Ingest(args) => run_ingest(args),
        Command::EncodeText(args) => run_encode_text(args),
        Command::Score(args) => run_score(args),
        Command::Search(args) => run_search(args),
        Command::Info(args) => run_info(args),
        Command::Verify(args) => run_verify(args),
    }
}

/// Runs a job's steps in order; a step that could do nothing useful (exit 1) stops the job.
fn run_job(job: &Path) -> Result<u8> {
    let steps = crate::job::steps(job)?;
    let mut worst = 0;
    for (line, cli) in steps {
        eprintln!("vtr-index: run: {}", line[1..].join(" "));
        let code = run(cli).with_context(|| format!("{}: step `{}` failed", job.display(), line[1]))?;
        worst = worst.max(code);
        if let Some(signal) = crate::interrupt::requested() {
            eprintln!("vtr-index: run: interrupted; the later steps were not run");
            return Ok(crate::interrupt::exit_code(signal));
        }
    }
    Ok(worst)
}

fn run_ingest(args: IngestArgs) -> Result<u8> {
    if !(args.decode_timeout > 0.0 && args.commit_interval > 0.0) || args.commit_every == 0 {
        bail!("--decode-timeout, --commit-interval and --commit-every must be positive");
    }
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let options = IngestOptions {
        roots: args.roots.into_iter().map(crate::walk::Root::new).collect(),
        index: args.index,
        model: args.model,
        max_frames: args.frames,
        fps: args.fps,
        batch: args.batch.max(1),
        device: DeviceChoice::parse(&args.device).map_err(anyhow::Error::msg)?,
        dtype: args.dtype.as_deref().map(Precision::parse).transpose().map_err(anyhow::Error::msg)?,
        decode_timeout: Duration::try_from_secs_f64(args.decode_timeout).unwrap_or(Duration::MAX),
        decode_workers: args.decode_workers.unwrap_or((cores / 2).max(1)),
        retry_failed: args.retry_failed,
        commit_every: args.commit_every,
        commit_interval: Duration::try_from_secs_f64(args.commit_interval).unwrap_or(Duration::MAX),
    };
    let report = ingest(&options)?;
    eprintln!("vtr-index: {}", report.summary());
    if let Some(signal) = &report.interrupted {
        eprintln!(
            "vtr-index: interrupted by {signal}: the {} videos finished in this run and the {} failures recorded are committed; {} files were not processed; run the same command again to continue",
            report.new + report.changed + report.reused,
            report.failed_total(),
            report.not_processed
        );
    }
    Ok(if report.failed_total() > 0 { 2 } else { 0 })
}

fn run_encode_text(args: EncodeTextArgs) -> Result<u8> {
    let options = EncodeTextOptions {
        captions: args.captions,
        index: args.index,
        name: args.name,
        model: args.model,
        batch: args.batch.max(1),
        device: DeviceChoice::parse(&args.device).map_err(anyhow::Error::msg)?,
    };
    let report = encode_text(&options)?;
    eprintln!("vtr-index: {}", report.summary());
    Ok(if report.skipped_lines.is_empty() { 0 } else { 2 })
}

fn run_score(args: ScoreArgs) -> Result<u8> {
    if ![args.temperature, args.beta, args.scale.unwrap_or(1.0)].into_iter().all(is_positive) {
        bail!("--temperature, --beta and --scale must be positive");
    }
    let command = ScoreCommand {
        index: args.index,
        texts: args.texts,
        revise: args.revise,
        bank: args.bank,
        temperature: args.temperature,
        beta: args.beta,
        top_k: args.top_k,
        dense: args.dense,
        out: args.out,
        scale: args.scale,
        cache_bytes: args.cache_mib.saturating_mul(1 << 20),
        device: DeviceChoice::parse(&args.device).map_err(anyhow::Error::msg)?,
        gpu_inputs: args.gpu_inputs,
    };
    let report = run_score_command(&command)?;
    eprintln!("vtr-index: {}", report.summary());
    for file in &report.files {
        println!("{}", file.display());
    }
    Ok(0)
}

fn run_search(args: SearchArgs) -> Result<u8> {
    let command = SearchCommand {
        query: args.query,
        index: args.index,
        top_k: args.top_k,
        model: args.model,
        device: DeviceChoice::Cpu,
    };
    for hit in search(&command)? {
        if args.json {
            println!("{}", serde_json::to_string(&hit)?);
        } else {
            let frame = hit.best_frame_s.map_or_else(|| "-".to_string(), |t| format!("{t:.2}s"));
            println!("{:>3}  {:>8.4}  {:>8}  {}", hit.rank, hit.score, frame, hit.video_id);
        }
    }
    Ok(0)
}

fn run_info(args: InfoArgs) -> Result<u8> {
    match (args.index, args.model, args.gpu) {
        (Some(index), None, false) => print_index_info(&index),
        (None, Some(model), false) => print_model_info(&model),
        (None, None, true) => print_gpu_info(),
        _ => bail!("give exactly one of --index INDEX, --model M or --gpu"),
    }
}

#[cfg(feature = "cuda")]
fn print_gpu_info() -> Result<u8> {
    use crate::gpu;
    println!("cuda:      {}", gpu::probe());
    println!("nvrtc:     {}", if gpu::nvrtc_present() { "loads" } else { "not found (LD_LIBRARY_PATH)" });
    if let gpu::Probe::Ready { devices } = gpu::probe() {
        for ordinal in 0..devices {
            match gpu::Gpu::open(ordinal) {
                Ok(device) => println!("cuda:{ordinal}:    {} (kernels compiled)", device.name),
                Err(e) => println!("cuda:{ordinal}:    {e}"),
            }
        }
    }
    Ok(0)
}

#[cfg(not(feature = "cuda"))]
fn print_gpu_info() -> Result<u8> {
    println!("cuda:      not in this build (rebuild with --features cuda)");
    Ok(0)
}

fn load_manifest(index: &Path) -> Result<Manifest> {
    Manifest::load(index)?.with_context(|| format!("{}: not a vtr-index index (no manifest.json)", index.display()))
}

fn print_index_info(index: &Path) -> Result<u8> {
    let m = load_manifest(index)?;
    println!("index:     {}", index.display());
    println!("videos:    {}", m.rows("videos"));
    println!("frames:    {}", m.rows("frames"));
    println!("failures:  {}", m.rows("failures"));
    for name in m.text_sets() {
        println!("texts:     {name} ({} rows)", m.rows(&format!("texts/{name}")));
    }
    println!("model:     {} ({}, sha256 {}, {})", m.model.id, m.model.source, m.model.sha256, m.model.dtype.name());
    println!(
        "           embed_dim {}, image_size {}, logit scale {:.4}",
        m.model.embed_dim,
        m.model.image_size,
        m.model.logit_scale.exp()
    );
    println!("sampling:  {} fps, at most {} frames per video", m.sampling.fps, m.sampling.max_frames);
    println!("roots:     {}", m.roots.join(", "));
    println!("size:      {} bytes in {} shards", index_bytes(&m), m.tables.values().map(Vec::len).sum::<usize>());
    if let Some(run) = &m.last_run {
        println!("last run:  {run}");
    }
    Ok(0)
}

fn print_model_info(model: &Path) -> Result<u8> {
    let checkpoint = Checkpoint::open(model)?;
    let c = &checkpoint.config;
    let v = &c.vision;
    let t = &c.text;
    println!("checkpoint: {}", checkpoint.source.display());
    println!("layout:     {}", checkpoint.layout.name());
    println!("weights:    {}", checkpoint.weights.display());
    println!(
        "config:     {}",
        if checkpoint.config_inferred { "inferred from the tensor shapes" } else { "config.json" }
    );
    println!("dtype:      {} (as stored)", checkpoint.stored_dtypes.join(" + "));
    println!("parameters: {}", checkpoint.parameters);
    if !checkpoint.ignored.is_empty() {
        println!(
            "ignored:    {} tensors not used by CLIP meanP: {}",
            checkpoint.ignored.len(),
            crate::model::layout::name_list(&checkpoint.ignored, 4)
        );
    }
    println!(
        "vision:     width {}, layers {}, heads {}, patch {}, image size {}, mlp {}, {:?}",
        v.hidden_size,
        v.num_hidden_layers,
        v.num_attention_heads,
        v.patch_size,
        v.image_size,
        v.intermediate_size,
        v.hidden_act
    );
    println!(
        "text:       width {}, layers {}, heads {}, context {}, vocabulary {}",
        t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.max_position_embeddings, t.vocab_size
    );
    println!("embed dim:  {}", c.projection_dim);
    let p = &checkpoint.preprocess;
    println!("preprocess: resize {} bicubic-antialias, crop {}, mean {:?}, std {:?}", p.resize, p.crop, p.mean, p.std);
    Ok(0)
}

fn run_verify(args: VerifyArgs) -> Result<u8> {
    let m = load_manifest(&args.index)?;
    let mut problems = 0;
    let mut checked = 0;
    for shard in m.tables.values().flatten() {
        checked += 1;
        if let Err(problem) = verify_shard(&args.index, shard) {
            eprintln!("vtr-index: {problem}");
            problems += 1;
        }
    }
    if problems > 0 {
        eprintln!("vtr-index: verify: {problems} of {checked} shards are damaged or missing");
        return Ok(1);
    }
    println!("verify: {checked} shards OK ({} videos, {} frames)", m.rows("videos"), m.rows("frames"));
    Ok(0)
}
