//! `vtr-index verify --index INDEX [--deep]`: every shard the manifest lists is present,
//! readable, of the recorded size and rows, and matches its checksum, and so is each `videos`
//! shard's search segment; `--deep` also compares each segment's contents with its shard and
//! the frames table. Exit 1 names each file that fails.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::load_manifest;
use crate::store::segment::{SEGMENTS_SINCE_FORMAT, deep_check, verify_segment};
use crate::store::verify_shard;

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[arg(long, value_name = "INDEX")]
    pub index: PathBuf,
    /// Also compare each search segment's contents with its shard and the frames table (reads
    /// the whole index).
    #[arg(long)]
    pub deep: bool,
}

pub fn run(args: VerifyArgs) -> Result<u8> {
    let m = load_manifest(&args.index)?;
    let mut problems = Vec::new();
    let mut checked = 0;
    // Indexes of an older format have no segments until their next writer upgrades them.
    let has_segments = m.format_version >= SEGMENTS_SINCE_FORMAT;
    for (table, shards) in &m.tables {
        for shard in shards {
            checked += 1;
            problems.extend(verify_shard(&args.index, shard).err());
            if table == "videos" && has_segments {
                checked += 1;
                problems.extend(verify_segment(&args.index, shard, m.model.embed_dim).err());
            }
        }
    }
    if problems.is_empty() && args.deep && has_segments {
        problems.extend(deep_check(&args.index, &m)?);
    }
    for problem in &problems {
        eprintln!("vtr-index: {problem}");
    }
    if !problems.is_empty() {
        eprintln!("vtr-index: verify: {} problems in {checked} files", problems.len());
        return Ok(1);
    }
    let deep = match (args.deep, has_segments) {
        (true, true) => ", segments equal to their shards".to_string(),
        (true, false) => format!(", no search segments to compare: format {}", m.format_version),
        (false, _) => String::new(),
    };
    println!("verify: {checked} files OK ({} videos, {} frames{deep})", m.rows("videos"), m.rows("frames"));
    Ok(0)
}
