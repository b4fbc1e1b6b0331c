//! `vtr-index merge PART… --index OUT`: the parts of a sharded ingest (`ingest --shard I/N`)
//! joined into one index ([`crate::store::merge`]), and its summary. Exit 0 when merged, 1 when
//! refused (a part missing or doubled, parts that disagree, an `OUT` that ingest wrote), with
//! `OUT` untouched.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::store::merge;

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The part indexes, one per shard 0…N−1 (in any order).
    #[arg(required = true, value_name = "PART")]
    pub parts: Vec<PathBuf>,
    /// The merged index (created, or brought up to date from the parts).
    #[arg(long, value_name = "OUT")]
    pub index: PathBuf,
}

pub fn run(args: MergeArgs) -> Result<u8> {
    let report = merge(&args.parts, &args.index)?;
    eprintln!(
        "vtr-index: merged {} parts into {}: {} videos, {} frames, {} failures; {} shard files linked, {} copied, {} already there, {} no longer listed removed",
        report.parts,
        args.index.display(),
        report.videos,
        report.frames,
        report.failures,
        report.linked,
        report.copied,
        report.kept,
        report.removed
    );
    Ok(0)
}
