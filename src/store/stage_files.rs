//! The files of a split score (contract §7): one JSON file per stage and part in the shared
//! `--work` folder (`stats-I-of-N.json`, `rank-I-of-N.json`), each written atomically and
//! carrying a header that ties it to one score of one index, so a stage never mixes another
//! score's parts or another state of the index.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::StoreError;

/// What every stage file records besides its data, so that every stage works on one score of
/// one index: the manifest read (its SHA-256) and the settings (numbers by their bits, which
/// JSON carries exactly).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageHeader {
    pub manifest_sha256: String,
    pub texts: String,
    pub revise: String,
    pub bank: Option<String>,
    pub temperature_bits: u64,
    pub scale_bits: u64,
    pub beta_bits: u64,
    pub top_k: usize,
    pub parts: u32,
}

#[derive(Serialize, Deserialize)]
struct StageFile<T> {
    header: StageHeader,
    data: T,
}

#[derive(Debug, thiserror::Error)]
pub enum StageFileError {
    #[error("{0}: missing")]
    Missing(PathBuf),
    #[error("{0}: not a stage file of vtr-index ({1})")]
    NotAStageFile(PathBuf, String),
    #[error(
        "{0}: made from another state of the index (its manifest changed since the stats stage: a commit, a new \
         text set): run the split score again in a new --work folder"
    )]
    OtherIndex(PathBuf),
    #[error("{0}: made for other settings ({1:?}); use one --work folder per score")]
    OtherSettings(PathBuf, Box<StageHeader>),
    #[error("{0}: no rank stage has finished here")]
    NoRankFinished(PathBuf),
    #[error("{0}: rank files of splits into {1:?} parts: use one --work folder per score")]
    SeveralSplits(PathBuf, Vec<u32>),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The stage files of one `--work` folder.
pub struct StageFiles {
    work: PathBuf,
}

impl StageFiles {
    pub fn new(work: &Path) -> StageFiles {
        StageFiles { work: work.to_path_buf() }
    }

    /// `WORK/<stage>-<part>-of-<parts>.json`.
    pub fn path(&self, stage: &str, part: u32, parts: u32) -> PathBuf {
        self.work.join(format!("{stage}-{part}-of-{parts}.json"))
    }

    /// A stage file's data, checked to belong to the score `header` describes.
    pub fn read<T: DeserializeOwned>(&self, path: &Path, header: &StageHeader) -> Result<T, StageFileError> {
        let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => StageFileError::Missing(path.to_path_buf()),
            _ => StoreError::Io { path: path.to_path_buf(), source: e }.into(),
        })?;
        let file: StageFile<T> = serde_json::from_str(&text)
            .map_err(|e| StageFileError::NotAStageFile(path.to_path_buf(), e.to_string()))?;
        if file.header.manifest_sha256 != header.manifest_sha256 {
            return Err(StageFileError::OtherIndex(path.to_path_buf()));
        }
        if file.header != *header {
            return Err(StageFileError::OtherSettings(path.to_path_buf(), Box::new(file.header)));
        }
        Ok(file.data)
    }

    /// Writes a stage file atomically.
    pub fn write<T: Serialize>(&self, path: &Path, header: &StageHeader, data: T) -> Result<(), StageFileError> {
        let json = serde_json::to_string(&StageFile { header: header.clone(), data })
            .map_err(|e| StoreError::Corrupt { path: path.to_path_buf(), message: e.to_string() })?;
        Ok(super::atomic_write(path, json.as_bytes())?)
    }

    /// N of the split score whose rank files are here: the one N they all share.
    pub fn finished_parts(&self) -> Result<u32, StageFileError> {
        let mut counts = std::collections::BTreeSet::new();
        let entries = std::fs::read_dir(&self.work).map_err(super::io_error(&self.work))?;
        for entry in entries {
            let name = entry.map_err(super::io_error(&self.work))?.file_name().to_string_lossy().into_owned();
            let parts =
                name.strip_prefix("rank-").and_then(|r| r.strip_suffix(".json")).and_then(|r| r.split_once("-of-"));
            if let Some((_, parts)) = parts {
                let count = parts.parse::<u32>().map_err(|e| {
                    StageFileError::NotAStageFile(self.work.join(&name), format!("not a rank file: {e}"))
                })?;
                counts.insert(count);
            }
        }
        match counts.len() {
            1 => Ok(*counts.first().expect("one")),
            0 => Err(StageFileError::NoRankFinished(self.work.clone())),
            _ => Err(StageFileError::SeveralSplits(self.work.clone(), counts.into_iter().collect())),
        }
    }
}
