//! `vtr-index encode-text CAPTIONS --index INDEX`: its arguments, the run
//! ([`crate::text_sets::encode_text`]) and its report; exit 2 when captions were skipped.

use std::path::PathBuf;

use clap::Args;

use crate::text_sets::{EncodeTextOptions, encode_text};

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
    // Interrupted, `main` exits 128 + the signal, as for every command stopped as asked.
    Ok(if report.skipped_lines.is_empty() { 0 } else { 2 })
}
