//! `vtr-index verify --index INDEX`: every shard the manifest lists is present, readable, of
//! the recorded size and rows, and matches its checksum; exit 1 names each one that is not.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::load_manifest;
use crate::store::verify_shard;

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[arg(long, value_name = "INDEX")]
    pub index: PathBuf,
}

pub fn run(args: VerifyArgs) -> Result<u8> {
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
