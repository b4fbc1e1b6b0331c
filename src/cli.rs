//! The command line: clap's definition of `vtr-index` and its subcommands, and the dispatch of
//! a parsed command line (or each step of a job file) to its command in [`crate::commands`].

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser, Subcommand};

use crate::commands::{encode_text, info, ingest, job, merge, score, search, serve, verify};

#[derive(Debug, Parser)]
#[command(name = "vtr-index", version, about = "Index video corpora with CLIP for text-to-video retrieval")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Embed every video under the given folders into the index (only new or changed files).
    Ingest(ingest::IngestArgs),
    /// Join the parts of a sharded ingest (`ingest --shard I/N`) into one index.
    Merge(merge::MergeArgs),
    /// Encode captions or queries (CSV, JSON Lines or plain text) into a text set of the index.
    EncodeText(encode_text::EncodeTextArgs),
    /// Score a text set against every video: top-k, retrieval metrics, optional dense matrices.
    Score(score::ScoreArgs),
    /// Top videos for one query, with the time of each one's best-matching frame.
    Search(search::SearchArgs),
    /// Serve searches of an index over HTTP, with a web page (loopback unless --public).
    Serve(serve::ServeArgs),
    /// Show what an index holds, or what a checkpoint is.
    Info(info::InfoArgs),
    /// Check every shard the manifest lists: present, readable, right size, rows and checksum.
    Verify(verify::VerifyArgs),
    /// Run a job file: ingest, then encode-text and score when configured.
    Run(job::RunArgs),
    /// An ingest run's decode worker process (`ingest/worker.rs`), started by the run itself.
    #[command(name = "decode-worker", hide = true)]
    DecodeWorker(DecodeWorkerArgs),
}

#[derive(Debug, clap::Args)]
pub struct DecodeWorkerArgs {
    /// The ingest process that started this worker.
    #[arg(long)]
    pub parent: u32,
    /// Run below the parent's priority.
    #[arg(long)]
    pub low_priority: bool,
}

/// Parses one step of a job file as a command line.
pub fn parse_step(line: &[String]) -> Result<Cli> {
    Cli::try_parse_from(line).map_err(|e| anyhow::anyhow!("{}", e.to_string().trim_end()))
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
        // `serve` only reads: a signal ends it where it is.
        Command::Run(_) | Command::Merge(_) | Command::Serve(_) => {}
        // A worker leaves every signal to its parent (`ingest::worker::serve`).
        Command::DecodeWorker(args) => return Ok(crate::ingest::worker::serve(args.parent, args.low_priority)),
    }
    match cli.command {
        Command::Run(args) => run_job(&args),
        Command::Ingest(args) => ingest::run(args),
        Command::Merge(args) => merge::run(args),
        Command::EncodeText(args) => encode_text::run(args),
        Command::Score(args) => score::run(args),
        Command::Search(args) => search::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Info(args) => info::run(args),
        Command::Verify(args) => verify::run(args),
        Command::DecodeWorker(_) => unreachable!("run above"),
    }
}

/// Runs a job's steps in order, every step parsed before the first runs; a step that could do
/// nothing useful (exit 1) stops the job.
fn run_job(args: &job::RunArgs) -> Result<u8> {
    let steps = job::steps(&args.job, &Cli::command(), parse_step)?;
    let mut worst = 0;
    for (line, cli) in steps {
        eprintln!("vtr-index: run: {}", line[1..].join(" "));
        let code = run(cli).with_context(|| format!("{}: step `{}` failed", args.job.display(), line[1]))?;
        worst = worst.max(code);
        if let Some(signal) = crate::interrupt::requested() {
            eprintln!("vtr-index: run: interrupted; the later steps were not run");
            return Ok(crate::interrupt::exit_code(signal));
        }
    }
    Ok(worst)
}
