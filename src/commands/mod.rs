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
pub mod serve;
pub mod verify;

use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::store::{Embeddings, Manifest, NotUnit};
use crate::types::DeviceChoice;

/// `--device` → where to run, or the error the user reads.
fn device(text: &str) -> Result<DeviceChoice> {
    DeviceChoice::parse(text).map_err(anyhow::Error::msg)
}

/// Refuses a table read for scoring whose embeddings are not all unit vectors (contract §4): a
/// NaN would rank first and spread into every column's sums, silently raising R@1. Names the
/// table, the row (`id_of` its position) and what is wrong with it.
fn refuse_non_unit(table: &str, embeddings: &Embeddings, id_of: impl Fn(usize) -> String) -> Result<()> {
    refuse_not_unit(table, embeddings.first_not_unit().map(|(row, why)| (id_of(row), why)))
}

/// The error for a row (named as `what`) that is not a unit vector, if there is one.
fn refuse_not_unit(table: &str, found: Option<(String, NotUnit)>) -> Result<()> {
    match found {
        Some((what, why)) => bail!(
            "{table}: the embedding of {what} {why}; scoring needs L2-normalised, finite embeddings: \
             re-ingest that video or re-encode that text set",
        ),
        None => Ok(()),
    }
}

/// An index's committed manifest, or an error saying the folder is not an index.
fn load_manifest(index: &Path) -> Result<Manifest> {
    Manifest::load(index)?.with_context(|| format!("{}: not a vtr-index index (no manifest.json)", index.display()))
}
