//! One home per command. Each module holds its command's clap arguments (`…Args`), turns them
//! into the options of the library's stages, runs, prints its report, and returns its exit code
//! (0 all done, 2 done but some inputs failed; an error is exit 1, contract §3). `anyhow` is
//! used here, in `cli`'s dispatch and in `main` only: the stages below return typed errors.

pub mod encode_text;
pub mod info;
pub mod ingest;
pub mod job;
pub mod merge;
pub mod score;
pub mod search;
pub mod verify;

use std::path::Path;

use anyhow::{Context, Result};

use crate::store::Manifest;
use crate::types::DeviceChoice;

/// `--device` → where to run, or the error the user reads.
fn device(text: &str) -> Result<DeviceChoice> {
    DeviceChoice::parse(text).map_err(anyhow::Error::msg)
}

/// An index's committed manifest, or an error saying the folder is not an index.
fn load_manifest(index: &Path) -> Result<Manifest> {
    Manifest::load(index)?.with_context(|| format!("{}: not a vtr-index index (no manifest.json)", index.display()))
}
