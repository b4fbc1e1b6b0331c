//! `vtr-index encode-text CAPTIONS --index INDEX`: a caption or query file → the text set
//! `texts/NAME` of an index.
//!
//! Captions stream through in chunks: each chunk is tokenized, encoded in batches of similar
//! length (less padding) and written in file order, so memory does not grow with the file.
//! The set is published by one manifest commit that replaces any earlier set of that name;
//! until then nothing is visible, and a failure part-way leaves the index as it was. An
//! interruption (SIGINT, SIGTERM) stops it between batches, with the index as it was: a text
//! set is published whole or not at all.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;

use crate::captions::{Caption, CaptionError, CaptionReader, Row};
use crate::model::tokenizer::ClipTokenizer;
use crate::model::{Clip, ModelError};
use crate::store::{Manifest, ShardWriter, StoreError, TextRow, WriterLock, collect_garbage};
use crate::types::DeviceChoice;

/// Texts held in memory at once, between reading and writing.
const CHUNK_TEXTS: usize = 4096;
const TEXT_SHARD_ROWS: u64 = 250_000;

#[derive(Debug, Args)]
pub struct EncodeTextArgs {
    /// Captions: CSV/TSV with a header (`video_id`, `sentence`|`caption`|`text`), JSON Lines, or
    /// plain text with one query per line.
    #[arg(value_name = "CAPTIONS")]
    pub captions: PathBuf,
    #[arg(long, value_name = "INDEX")]
    pub index: PathBuf,
    /// Name of the text set [default: the file's stem].
    #[arg(long)]
    pub name: Option<String>,
    /// Another copy of the index's model, if the recorded path is gone.
    #[arg(long, value_name = "M")]
    pub model: Option<PathBuf>,
    /// Texts per model batch.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

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
    #[error(
        "interrupted by {signal}: texts/{name} was not changed (a text set is published whole); run the command again"
    )]
    Interrupted { signal: &'static str, name: String },
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
}

impl EncodeTextReport {
    pub fn summary(&self) -> String {
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

/// The command: options from the arguments, the run, its summary; exit 2 when captions were skipped.
pub fn run(args: EncodeTextArgs) -> anyhow::Result<u8> {
    let options = EncodeTextOptions {
        captions: args.captions,
        index: args.index,
        name: args.name,
        model: args.model,
        batch: args.batch.max(1),
        device: super::device(&args.device)?,
    };
    let report = encode_text(&options)?;
    eprintln!("vtr-index: {}", report.summary());
    Ok(if report.skipped_lines.is_empty() { 0 } else { 2 })
}

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
    match write_and_commit(options, manifest, &clip, &tokenizer, reader, &name) {
        Ok(mut report) => {
            drop(lock);
            report.seconds = started.elapsed().as_secs_f64();
            Ok(report)
        }
        Err(e) => {
            // What this run wrote and no committed manifest lists goes now, not at the next
            // writer's start, so a stopped or failed run leaves the index as it found it. The
            // manifest on disk decides (a commit may have failed after its rename).
            if let Ok(Some(committed)) = Manifest::load(&options.index) {
                let _ = collect_garbage(&options.index, Some(&committed));
            }
            Err(e)
        }
    }
}

/// Upgrades an older index (in this same commit), encodes every caption into `texts/NAME`
/// shards and commits them.
fn write_and_commit(
    options: &EncodeTextOptions,
    mut manifest: Manifest,
    clip: &Clip,
    tokenizer: &ClipTokenizer,
    reader: CaptionReader,
    name: &str,
) -> Result<EncodeTextReport, EncodeTextError> {
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
            encode_chunk(clip, tokenizer, &chunk, options.batch.max(1), &mut report, &mut out)?;
            chunk.clear();
        }
    }
    if report.texts == 0 {
        return Err(EncodeTextError::Refused(format!(
            "{}: no captions to encode; nothing was written",
            options.captions.display()
        )));
    }
    check_interrupted(name)?;
    let shards = out.finish()?;
    check_interrupted(name)?;
    report.replaced = manifest.tables.insert(table, shards).is_some();
    manifest.committed_at_us = crate::store::now_us();
    manifest.commit(&options.index)?;
    // The set is published: a collection that fails now leaves garbage for the next writer,
    // not a failed run.
    if let Err(e) = collect_garbage(&options.index, Some(&manifest)) {
        eprintln!("vtr-index: warning: {e}; the next writer removes the files left over");
    }
    Ok(report)
}

/// Stops the run (nothing committed) once SIGINT or SIGTERM has arrived.
fn check_interrupted(set: &str) -> Result<(), EncodeTextError> {
    match crate::interrupt::requested() {
        Some(signal) => {
            Err(EncodeTextError::Interrupted { signal: crate::interrupt::signal_name(signal), name: set.to_string() })
        }
        None => Ok(()),
    }
}

/// Tokenizes and encodes one chunk, in batches of similar length, and writes it in file order.
fn encode_chunk(
    clip: &Clip,
    tokenizer: &ClipTokenizer,
    chunk: &[Caption],
    batch: usize,
    report: &mut EncodeTextReport,
    out: &mut ShardWriter<TextRow>,
) -> Result<(), EncodeTextError> {
    let tokens: Vec<Vec<u32>> = chunk.iter().map(|c| tokenizer.encode(&c.text)).collect();
    let mut order: Vec<usize> = (0..chunk.len()).collect();
    order.sort_by_key(|&i| tokens[i].len());
    let dim = clip.embed_dim();
    let mut embeddings = vec![0f32; chunk.len() * dim];
    for group in order.chunks(batch) {
        crate::fault::point("encode");
        check_interrupted(&report.name)?;
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
    Ok(())
}
