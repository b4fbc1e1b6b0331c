//! Command-line interface: clap arguments validated into each command's options, and the
//! exit codes of DESIGN §3 (0 all done, 2 done but some inputs failed, 1 nothing useful done).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use crate::ingest::{IngestOptions, ingest};
use crate::model::{Checkpoint, DeviceChoice};
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
    /// Show what an index holds, or what a checkpoint is.
    Info(InfoArgs),
    /// Check every shard the manifest lists: present, readable, right size, rows and checksum.
    Verify(VerifyArgs),
}

#[derive(Debug, Args)]
pub struct IngestArgs {
    /// Folders to walk recursively for video files.
    #[arg(required = true, value_name = "DIR")]
    pub roots: Vec<String>,
    /// The index folder (created if it does not exist).
    #[arg(long, value_name = "INDEX")]
    pub index: PathBuf,
    /// CLIP checkpoint folder; required for a new index, defaults to the index's model.
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
    /// Give up on a file after this many seconds (recorded as a `timeout` failure).
    #[arg(long, default_value_t = 300.0, value_name = "SECONDS")]
    pub decode_timeout: f64,
    /// Files decoded in parallel [default: half the cores].
    #[arg(long)]
    pub decode_workers: Option<usize>,
    /// Retry files that failed before even if they did not change.
    #[arg(long)]
    pub retry_failed: bool,
}

#[derive(Debug, Args)]
pub struct InfoArgs {
    #[arg(long, value_name = "INDEX")]
    pub index: Option<PathBuf>,
    #[arg(long, value_name = "M")]
    pub model: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[arg(long, value_name = "INDEX")]
    pub index: PathBuf,
}

/// The binary's entry point: every error ends as one line on stderr and exit code 1.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vtr-index: {e:#}");
            ExitCode::from(1)
        }
    }
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Ingest(args) => run_ingest(args),
        Command::Info(args) => run_info(args),
        Command::Verify(args) => run_verify(args),
    }
}

fn run_ingest(args: IngestArgs) -> Result<ExitCode> {
    if args.decode_timeout.is_nan() || args.decode_timeout <= 0.0 {
        bail!("--decode-timeout must be positive");
    }
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let options = IngestOptions {
        roots: args.roots,
        index: args.index,
        model: args.model,
        max_frames: args.frames,
        fps: args.fps,
        batch: args.batch.max(1),
        device: DeviceChoice::parse(&args.device).map_err(anyhow::Error::msg)?,
        decode_timeout: Duration::from_secs_f64(args.decode_timeout),
        decode_workers: args.decode_workers.unwrap_or((cores / 2).max(1)),
        retry_failed: args.retry_failed,
    };
    let report = ingest(&options)?;
    eprintln!("vtr-index: {}", report.summary());
    Ok(if report.failed_total() > 0 { ExitCode::from(2) } else { ExitCode::SUCCESS })
}

fn run_info(args: InfoArgs) -> Result<ExitCode> {
    match (args.index, args.model) {
        (Some(index), None) => print_index_info(&index),
        (None, Some(model)) => print_model_info(&model),
        _ => bail!("give exactly one of --index INDEX or --model M"),
    }
}

fn load_manifest(index: &Path) -> Result<Manifest> {
    Manifest::load(index)?.with_context(|| format!("{}: not a vtr-index index (no manifest.json)", index.display()))
}

fn print_index_info(index: &Path) -> Result<ExitCode> {
    let m = load_manifest(index)?;
    println!("index:     {}", index.display());
    println!("videos:    {}", m.rows("videos"));
    println!("frames:    {}", m.rows("frames"));
    println!("failures:  {}", m.rows("failures"));
    for name in m.text_sets() {
        println!("texts:     {name} ({} rows)", m.rows(&format!("texts/{name}")));
    }
    println!("model:     {} ({}, sha256 {})", m.model.id, m.model.source, m.model.sha256);
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
    Ok(ExitCode::SUCCESS)
}

fn print_model_info(model: &Path) -> Result<ExitCode> {
    let checkpoint = Checkpoint::open(model)?;
    let c = &checkpoint.config;
    let v = &c.vision;
    let t = &c.text;
    println!("checkpoint: {}", checkpoint.source.display());
    println!("layout:     {}", checkpoint.layout);
    println!("weights:    {}", checkpoint.weights.display());
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
    Ok(ExitCode::SUCCESS)
}

fn run_verify(args: VerifyArgs) -> Result<ExitCode> {
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
        return Ok(ExitCode::from(1));
    }
    println!("verify: {checked} shards OK ({} videos, {} frames)", m.rows("videos"), m.rows("frames"));
    Ok(ExitCode::SUCCESS)
}
