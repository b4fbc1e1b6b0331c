//! What an ingest run works with, resolved from its options and the index's recorded settings
//! before anything is written: the model (read only when something is to be embedded), its
//! head, dtype and sampling, the part of a sharded ingest, the writer lock, and the placement of
//! the index beside the user's files.

use std::path::{Path, PathBuf};

use super::{IngestError, IngestOptions};
use crate::model::{Checkpoint, Clip, Unbuilt};
use crate::sampling::SamplingConfig;
use crate::store::{Manifest, PreprocessRecord, StoreError, WriterLock};
use crate::types::{HeadKind, ModelIdentity, Precision};
use crate::walk::{Root, WalkError};

/// The model an index is built with, read only when something is to be embedded (or checked,
/// when `--model` names one). Its towers are built by the encoder, while decoding starts.
pub(super) struct ModelSource<'a> {
    pub(super) options: &'a IngestOptions,
    pub(super) path: PathBuf,
    pub(super) precision: Precision,
    /// Frames per video at most: a seqTransf head must have a position for each.
    pub(super) max_frames: usize,
    /// The model the index was built with, which any other is refused for.
    pub(super) recorded: Option<ModelIdentity>,
}

impl ModelSource<'_> {
    /// Reads the model, refuses another than the index's, and sets the head that pools videos.
    pub(super) fn load(&self) -> Result<Clip<Unbuilt>, IngestError> {
        let checkpoint = Checkpoint::open(&self.path)?.with_precision(self.precision);
        let mut clip = Clip::unbuilt(checkpoint, self.options.device)?;
        if let Some(recorded) = &self.recorded
            && recorded.sha256 != clip.identity.sha256
        {
            return Err(IngestError::Refused(format!(
                "{}: this index was built with the model at {} (sha256 {}…); {} is a different model. Build a new index for a new model.",
                self.options.index.display(),
                recorded.source,
                &recorded.sha256[..12.min(recorded.sha256.len())],
                self.path.display()
            )));
        }
        let carried = clip.checkpoint.head.clone();
        let head = resolve_head(self.options, self.recorded.as_ref(), carried.as_ref().map(|h| h.kind()))?;
        if let Some(positions) = carried.filter(|h| h.kind() == head).and_then(|h| h.max_frames())
            && self.max_frames > positions
        {
            return Err(IngestError::Refused(format!(
                "--frames {}: the {} head of {} has position embeddings for {positions} frames; sample at most that many",
                self.max_frames,
                head.name(),
                self.path.display()
            )));
        }
        clip.use_head(head)?;
        Ok(clip)
    }
}

/// What the manifest records of the model and its preprocessing: the loaded model's, or the
/// index's own when nothing was embedded.
pub(super) fn model_record(
    clip: Option<&Clip<Unbuilt>>,
    previous: Option<&Manifest>,
) -> (ModelIdentity, PreprocessRecord) {
    match (clip, previous) {
        (Some(clip), _) => {
            let p = &clip.checkpoint.preprocess;
            let record = PreprocessRecord {
                resize: "bicubic-antialias".into(),
                shortest_edge: p.resize,
                crop: p.crop,
                mean: p.mean,
                std: p.std,
            };
            (clip.identity.clone(), record)
        }
        (None, Some(manifest)) => (manifest.model.clone(), manifest.preprocess.clone()),
        (None, None) => unreachable!("a new index loads its model first"),
    }
}

/// Takes the index's writer lock, saying so when a crashed writer left it behind.
pub(super) fn lock_index(index: &Path) -> Result<WriterLock, StoreError> {
    let lock = WriterLock::acquire(index, "ingest")?;
    if let Some(stale) = &lock.taken_over_from {
        crate::progress::say(&format!("vtr-index: took over the lock of a writer that did not finish ({stale})"));
    }
    Ok(lock)
}

/// Refuses, before anything is created or removed, an `--index` that would mix the index with
/// the user's own files: a root inside the index folder (or equal to it), or an existing
/// folder that holds anything but an index. An index inside a root is fine: the walk leaves
/// it out.
pub(super) fn refuse_dangerous_placement(index: &Path, roots: &[Root]) -> Result<(), IngestError> {
    let Ok(index_real) = index.canonicalize() else {
        return Ok(()); // Not there yet: it will be created empty.
    };
    if !index_real.is_dir() {
        return Err(IngestError::Refused(format!("{}: --index must be a folder", index.display())));
    }
    for Root { path, name: root } in roots {
        let root_real = path.canonicalize().map_err(|source| WalkError::Unreadable { root: root.clone(), source })?;
        if root_real.starts_with(&index_real) {
            return Err(IngestError::Refused(format!(
                "{root} is inside the index folder {}: the index's tables would sit among your videos. Nothing was changed; give --index a folder outside the videos (for example {}-index)",
                index.display(),
                root.trim_end_matches('/')
            )));
        }
    }
    if Manifest::load(index)?.is_none() {
        let foreign = crate::store::foreign_entries(index)?;
        if !foreign.is_empty() {
            let shown: Vec<String> = foreign.iter().take(3).map(|p| p.display().to_string()).collect();
            return Err(IngestError::Refused(format!(
                "{}: this folder is not empty and holds no vtr-index index ({}{}); an index created here would mix its files with yours. Nothing was changed; give --index a new or empty folder",
                index.display(),
                shown.join(", "),
                if foreign.len() > 3 { format!(" and {} more", foreign.len() - 3) } else { String::new() }
            )));
        }
    }
    Ok(())
}

pub(super) fn resolve_sampling(
    options: &IngestOptions,
    previous: Option<&Manifest>,
) -> Result<SamplingConfig, IngestError> {
    let defaults = SamplingConfig::default();
    let Some(manifest) = previous else {
        let sampling = SamplingConfig {
            fps: options.fps.unwrap_or(defaults.fps),
            max_frames: options.max_frames.unwrap_or(defaults.max_frames),
        };
        if !(sampling.fps > 0.0 && sampling.fps.is_finite()) || sampling.max_frames == 0 {
            return Err(IngestError::Refused("--fps must be positive and --frames at least 1".into()));
        }
        return Ok(sampling);
    };
    let built = SamplingConfig { fps: manifest.sampling.fps, max_frames: manifest.sampling.max_frames };
    if options.fps.is_some_and(|f| f != built.fps) || options.max_frames.is_some_and(|n| n != built.max_frames) {
        return Err(IngestError::Refused(format!(
            "this index was built with --frames {} --fps {}; build a new index to sample differently",
            built.max_frames, built.fps
        )));
    }
    Ok(built)
}

/// An existing index is run as what it is: a part only as the same part, a whole index only
/// whole, and a merged index never (`merge` alone writes it).
pub(super) fn check_part(options: &IngestOptions, manifest: &Manifest) -> Result<(), IngestError> {
    let index = options.index.display();
    if manifest.merged.is_some() {
        return Err(IngestError::Refused(format!(
            "{index}: a merged index, which only `vtr-index merge` writes: ingest into its parts and merge them again"
        )));
    }
    match (manifest.shard, options.shard) {
        (recorded, asked) if recorded == asked => Ok(()),
        (Some(recorded), asked) => Err(IngestError::Refused(format!(
            "{index}: this index is part {recorded} of a sharded ingest; run it again as --shard {recorded}{}",
            asked.map_or(String::new(), |a| format!(", not {a}"))
        ))),
        (None, Some(asked)) => Err(IngestError::Refused(format!(
            "{index}: this index holds every file, not one part: build part {asked} in a new index"
        ))),
        (None, None) => unreachable!("equal above"),
    }
}

/// The head that pools the videos: for a new index `--head`, else the checkpoint's head, else
/// meanP; afterwards the index's own (an index made before heads is meanP, and a checkpoint's
/// head is then left unused, which is said once: the run's commit records meanP). Another
/// `--head` on an existing index is refused: its videos were pooled by its own.
fn resolve_head(
    options: &IngestOptions,
    recorded: Option<&ModelIdentity>,
    found: Option<HeadKind>,
) -> Result<HeadKind, IngestError> {
    let Some(recorded) = recorded else { return Ok(options.head.or(found).unwrap_or_default()) };
    let built = recorded.head.unwrap_or_default();
    if let Some(asked) = options.head
        && asked != built
    {
        return Err(IngestError::Refused(format!(
            "{}: this index's videos were pooled with the {} head; build a new index for --head {}",
            options.index.display(),
            built.name(),
            asked.name()
        )));
    }
    if recorded.head.is_none()
        && let Some(carried) = found.filter(|&k| k != built)
    {
        crate::progress::say(&format!(
            "vtr-index: {}: this index was made before temporal heads and pools with meanP; the checkpoint's {} head is not used (build a new index to use it)",
            options.index.display(),
            carried.name()
        ));
    }
    Ok(built)
}

/// The model's dtype: the flag for a new index, the manifest's afterwards (mixing precisions
/// in one index would make its embeddings subtly inconsistent).
pub(super) fn resolve_precision(
    options: &IngestOptions,
    previous: Option<&Manifest>,
) -> Result<Precision, IngestError> {
    match (options.dtype, previous) {
        (asked, None) => Ok(asked.unwrap_or_default()),
        (Some(asked), Some(manifest)) if asked != manifest.model.dtype => Err(IngestError::Refused(format!(
            "this index was built with --dtype {}; build a new index to embed in {}",
            manifest.model.dtype.name(),
            asked.name()
        ))),
        (_, Some(manifest)) => Ok(manifest.model.dtype),
    }
}
