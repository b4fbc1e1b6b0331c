//! A caption or query file encoded into the text set `texts/NAME` of an index, the logic of
//! `vtr-index encode-text`.
//!
//! Captions stream through in chunks: each chunk is tokenized, encoded in batches of similar
//! length (less padding) and written in file order, so memory does not grow with the file.
//! The set is published by one manifest commit that replaces any earlier set of that name;
//! until then nothing is visible, and a failure part-way leaves the index as it was. An
//! interruption (SIGINT, SIGTERM) stops it between batches, with the index as it was (the
//! report says so): a text set is published whole or not at all.

use std::path::PathBuf;
use std::time::Instant;

use crate::captions::{Caption, CaptionError, CaptionReader, Row};
use crate::model::tokenizer::ClipTokenizer;
use crate::model::{Clip, ModelError};
use crate::store::{Manifest, ShardWriter, StoreError, TextRow, WriterLock, collect_garbage};
use crate::types::DeviceChoice;

/// Texts held in memory at once, between reading and writing.
const CHUNK_TEXTS: usize = 4096;
const TEXT_SHARD_ROWS: u64 = 250_000;

#[derive(Debug, Clone)]
pub struct EncodeTextOptions {
    pub captions: PathBuf,
    pub index: PathBuf,
    /// Defaults to the captions file's stem.
    pub name: Option<String>,
    /// Another copy of the index's model (the same SHA-256), when the recorded path is gone.
    pub model: Option<PathBuf>,
    pub batch: usize,
    pub device: DeviceChoice,
}

#[derive(Debug, thiserror::Error)]
pub enum EncodeTextError {
    #[error(transparent)]
    Captions(#[from] CaptionError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Refused(String),
}

#[derive(Debug, Clone, Default)]
pub struct EncodeTextReport {
    pub name: String,
    pub texts: u64,
    pub with_video_id: u64,
    /// Lines whose caption was empty, skipped.
    pub skipped_lines: Vec<u64>,
    /// An earlier set of this name was replaced.
    pub replaced: bool,
    pub seconds: f64,
    /// The signal that stopped the run before its commit: then nothing of the set is published.
    pub interrupted: Option<&'static str>,
}

impl EncodeTextReport {
    pub fn summary(&self) -> String {
        if let Some(signal) = self.interrupted {
            return format!(
                "interrupted by {signal}: texts/{} was not changed (a text set is published whole); run the command again",
                self.name
            );
        }
        format!(
            "{} texts encoded into texts/{} ({} with a video_id){}{} in {:.1} s",
            self.texts,
            self.name,
            self.with_video_id,
            if self.replaced { ", replacing the earlier set" } else { "" },
            if self.skipped_lines.is_empty() {
                String::new()
            } else {
                format!(", {} empty captions skipped", self.skipped_lines.len())
            },
            self.seconds
        )
    }
}

/// A text-set name becomes a folder name: keep it to a safe alphabet.
pub fn validate_set_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok { Ok(()) } else { Err(format!("`{name}` is not a usable text-set name (use letters, digits, - _ .)")) }
}

/// Encodes the captions into the text set and commits it; on SIGINT or SIGTERM stops between
/// batches with the index as it was, and says so in the report.
pub fn encode_text(options: &EncodeTextOptions) -> Result<EncodeTextReport, EncodeTextError> {
    let started = Instant::now();
    let name = match &options.name {
        Some(name) => name.clone(),
        None => options.captions.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
    };
    validate_set_name(&name).map_err(EncodeTextError::Refused)?;
    let reader = CaptionReader::open(&options.captions)?;
    if !options.index.join(crate::store::MANIFEST).is_file() {
        return Err(EncodeTextError::Refused(format!(
            "{}: not a vtr-index index (no manifest.json); run `vtr-index ingest` first",
            options.index.display()
        )));
    }
    let lock = WriterLock::acquire(&options.index, "encode-text")?;
    let manifest = Manifest::load(&options.index)?
        .ok_or_else(|| EncodeTextError::Refused(format!("{}: the index disappeared", options.index.display())))?;
    let clip = Clip::load_recorded(&manifest.model, options.model.as_deref(), options.device)?;
    let tokenizer = ClipTokenizer::new(clip.max_text_tokens());
    collect_garbage(&options.index, Some(&manifest))?;
    let written = write_and_commit(options, manifest, &clip, &tokenizer, reader, &name);
    if !matches!(written, Ok(Written::Committed(_))) {
        // What this run wrote and no committed manifest lists goes now, not at the next
        // writer's start, so a stopped or failed run leaves the index as it found it. The
        // manifest on disk decides (a commit may have failed after its rename).
        if let Ok(Some(committed)) = Manifest::load(&options.index) {
            let _ = collect_garbage(&options.index, Some(&committed));
        }
    }
    drop(lock);
    let mut report = match written? {
        Written::Committed(report) => report,
        Written::Interrupted(signal) => EncodeTextReport { name, interrupted: Some(signal), ..Default::default() },
    };
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// How writing a text set ended without an error.
enum Written {
    Committed(EncodeTextReport),
    /// Stopped by this signal before the commit: nothing of the set is published.
    Interrupted(&'static str),
}

/// Upgrades an older index (in this same commit), encodes every caption into `texts/NAME`
/// shards and commits them, unless a signal stops it first.
fn write_and_commit(
    options: &EncodeTextOptions,
    mut manifest: Manifest,
    clip: &Clip,
    tokenizer: &ClipTokenizer,
    reader: CaptionReader,
    name: &str,
) -> Result<Written, EncodeTextError> {
    let table = format!("texts/{name}");
    let tag = crate::store::now_us().to_string();
    crate::store::upgrade(&options.index, &mut manifest, &tag, crate::walk::canonical_name)?;
    let mut out = ShardWriter::<TextRow>::new(&options.index, &table, &tag, clip.embed_dim(), TEXT_SHARD_ROWS)?;
    let mut report = EncodeTextReport { name: name.to_string(), ..Default::default() };
    let mut chunk: Vec<Caption> = Vec::with_capacity(CHUNK_TEXTS);
    let mut reader = reader.peekable();
    while let Some(row) = reader.next() {
        match row? {
            Row::Caption(caption) => chunk.push(caption),
            Row::EmptyText { line } => {
                eprintln!("vtr-index: {}, line {line}: empty caption, skipped", options.captions.display());
                report.skipped_lines.push(line);
            }
        }
        if chunk.len() == CHUNK_TEXTS || (reader.peek().is_none() && !chunk.is_empty()) {
            if let Some(signal) = encode_chunk(clip, tokenizer, &chunk, options.batch.max(1), &mut report, &mut out)? {
                return Ok(Written::Interrupted(signal));
            }
            chunk.clear();
        }
    }
    if report.texts == 0 {
        return Err(EncodeTextError::Refused(format!(
            "{}: no captions to encode; nothing was written",
            options.captions.display()
        )));
    }
    if let Some(signal) = interrupted() {
        return Ok(Written::Interrupted(signal));
    }
    let shards = out.finish()?;
    if let Some(signal) = interrupted() {
        return Ok(Written::Interrupted(signal));
    }
    report.replaced = manifest.tables.insert(table, shards).is_some();
    manifest.committed_at_us = crate::store::now_us();
    manifest.commit(&options.index)?;
    // The set is published: a collection that fails now leaves garbage for the next writer,
    // not a failed run.
    if let Err(e) = collect_garbage(&options.index, Some(&manifest)) {
        eprintln!("vtr-index: warning: {e}; the next writer removes the files left over");
    }
    Ok(Written::Committed(report))
}

/// The signal that asked the run to stop, if one has arrived: the run stops before its commit.
fn interrupted() -> Option<&'static str> {
    crate::interrupt::requested().map(crate::interrupt::signal_name)
}

/// Tokenizes and encodes one chunk, in batches of similar length, and writes it in file order;
/// returns the signal that stopped it between two batches, if one did.
fn encode_chunk(
    clip: &Clip,
    tokenizer: &ClipTokenizer,
    chunk: &[Caption],
    batch: usize,
    report: &mut EncodeTextReport,
    out: &mut ShardWriter<TextRow>,
) -> Result<Option<&'static str>, EncodeTextError> {
    let tokens: Vec<Vec<u32>> = chunk.iter().map(|c| tokenizer.encode(&c.text)).collect();
    let mut order: Vec<usize> = (0..chunk.len()).collect();
    order.sort_by_key(|&i| tokens[i].len());
    let dim = clip.embed_dim();
    let mut embeddings = vec![0f32; chunk.len() * dim];
    for group in order.chunks(batch) {
        crate::fault::point("encode");
        if let Some(signal) = interrupted() {
            return Ok(Some(signal));
        }
        let ids: Vec<Vec<u32>> = group.iter().map(|&i| tokens[i].clone()).collect();
        let values = clip.embed_texts(&ids)?;
        for (k, &i) in group.iter().enumerate() {
            embeddings[i * dim..(i + 1) * dim].copy_from_slice(&values[k * dim..(k + 1) * dim]);
        }
    }
    for (i, caption) in chunk.iter().enumerate() {
        report.with_video_id += u64::from(caption.video_id.is_some());
        out.push(TextRow {
            text_id: report.texts,
            text: caption.text.clone(),
            video_id: caption.video_id.clone(),
            token_ids: tokens[i].iter().map(|&t| t as i32).collect(),
            embedding: embeddings[i * dim..(i + 1) * dim].to_vec(),
        })?;
        report.texts += 1;
    }
    Ok(None)
}
