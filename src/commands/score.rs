//! `vtr-index score --index INDEX --texts NAME --out DIR`: reads a text set and the videos of an index, scores them with
//! [`crate::score::score`], and writes `topk.parquet`, `metrics.json` and, with `--dense`,
//! `t2v.npy`, `v2t.npy` and `videos.txt` into the output folder (contract §3–5).
//!
//! Columns are the videos in ascending `video_id` byte order; rows are texts in `text_id`
//! order. Each output file is written under a temporary name and renamed when complete.
//!
//! With `--stage stats|rank --part I/N --work DIR` and then `--stage finish --work DIR --out
//! DIR`, the same score is split over many machines ([`crate::score::split`], contract §7):
//! each stage writes one small file into the shared `--work` folder, atomically, and a stage
//! whose file is there already is done.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use clap::Args;

use crate::score::{DeviceInputs, Metrics, Outcome, Problem, Revision, RowSink, ScoreOptions, is_positive, score};
use crate::store::npy::NpyWriter;
use crate::store::{
    Manifest, SCORE_RECORD, SCORE_TABLES, ScoreRecord, StageFiles, StageHeader, T2vRankRow, TextSet, TopKRow,
    V2tRankRow, read_text_embeddings, read_video_embeddings, temporary_path, write_t2v_ranks, write_topk,
    write_v2t_ranks,
};
use crate::types::DeviceChoice;

#[derive(Debug, Args)]
pub struct ScoreArgs {
    #[arg(long, value_name = "INDEX")]
    pub index: PathBuf,
    /// The text set to score (rows of the matrix).
    #[arg(long, value_name = "NAME")]
    pub texts: String,
    /// How the logit matrix is revised before ranking.
    #[arg(long, value_enum, default_value_t = crate::score::DEFAULT_REVISION)]
    pub revise: Revision,
    /// QB-Norm's query bank: another text set of the index.
    #[arg(long, value_name = "NAME")]
    pub bank: Option<String>,
    /// Softmax temperature τ of the dual softmax, on logits.
    #[arg(long, default_value_t = crate::score::DEFAULT_TEMPERATURE)]
    pub temperature: f64,
    /// QB-Norm's β, on cosines.
    #[arg(long, default_value_t = crate::score::DEFAULT_BETA)]
    pub beta: f64,
    /// Videos kept per text in topk.parquet.
    #[arg(long, short = 'k', default_value_t = crate::score::DEFAULT_TOP_K)]
    pub top_k: usize,
    /// Also write the full matrices: t2v.npy, v2t.npy and videos.txt.
    #[arg(long)]
    pub dense: bool,
    /// Logit multiplier [default: exp(logit_scale) of the index's model].
    #[arg(long)]
    pub scale: Option<f64>,
    /// Memory (MiB) for keeping the logits between the two passes; past it they are recomputed.
    #[arg(long, default_value_t = crate::score::DEFAULT_CACHE_MIB, value_name = "MIB")]
    pub cache_mib: usize,
    /// cpu, cuda or cuda:N (CUDA needs a build with --features cuda).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// On CUDA: f32 embeddings (exact; the matrix is stored in row blocks) or f16 on the tensor
    /// cores (the matrix is never stored, for corpora whose matrix exceeds device memory).
    #[arg(long, value_enum, default_value_t = crate::score::DEFAULT_DEVICE_INPUTS)]
    pub gpu_inputs: DeviceInputs,
    /// Output folder (the whole score, and `--stage finish`).
    #[arg(long, value_name = "DIR", required_unless_present = "stage")]
    pub out: Option<PathBuf>,
    /// One stage of a score split over many machines: `stats` then `rank` for each part
    /// (`--part`), then `finish` once (contract §7).
    #[arg(long, value_enum, requires = "work")]
    pub stage: Option<SplitStage>,
    /// The part of a split score: I/N, or auto/N from SLURM_ARRAY_TASK_ID or
    /// JOB_COMPLETION_INDEX.
    #[arg(long, value_name = "I/N")]
    pub part: Option<String>,
    /// The shared folder of a split score's stage files.
    #[arg(long, value_name = "DIR")]
    pub work: Option<PathBuf>,
}

/// The stages of a split score.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SplitStage {
    /// Per part: its column statistics, its slice of the bank's, its texts' own cosines.
    Stats,
    /// Per part, once every part's stats are done: its texts' top-k and ranks.
    Rank,
    /// Once every part's rank is done: topk.parquet and metrics.json into --out.
    Finish,
}

#[derive(Debug, Clone)]
pub struct ScoreCommand {
    pub index: PathBuf,
    pub texts: String,
    pub revise: Revision,
    pub bank: Option<String>,
    pub temperature: f64,
    pub beta: f64,
    pub top_k: usize,
    pub dense: bool,
    pub out: Option<PathBuf>,
    /// Overrides the model's `exp(logit_scale)`.
    pub scale: Option<f64>,
    pub cache_bytes: usize,
    /// Where the scoring runs: the CPU, or a CUDA device (feature `cuda`).
    pub device: DeviceChoice,
    /// What a CUDA device multiplies.
    pub gpu_inputs: DeviceInputs,
}

/// `metrics.json` (contract §5) with the settings that produced it.
#[derive(Debug, Clone, Serialize)]
pub struct MetricsFile {
    /// The run whose outputs these are (`run.json`).
    pub run_id: String,
    pub t2v: Option<Metrics>,
    pub v2t: Option<Metrics>,
    pub revise: Revision,
    pub temperature: f64,
    pub scale: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beta: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bank: Option<String>,
    pub texts: String,
    pub n_texts: usize,
    pub n_videos: usize,
    /// Texts whose `video_id` is not in the index: not queries.
    pub n_texts_unmatched: usize,
    /// Texts with no `video_id` at all (plain queries).
    pub n_texts_without_video_id: usize,
}

#[derive(Debug, Clone)]
pub struct ScoreReport {
    pub metrics: MetricsFile,
    pub files: Vec<PathBuf>,
    pub seconds: f64,
}

impl ScoreReport {
    pub fn summary(&self) -> String {
        let m = &self.metrics;
        let mut text = format!(
            "scored {} texts × {} videos ({}) in {:.1} s",
            m.n_texts,
            m.n_videos,
            m.revise.name(),
            self.seconds
        );
        for (name, metrics) in [("t2v", m.t2v), ("v2t", m.v2t)] {
            if let Some(x) = metrics {
                text.push_str(&format!(
                    "\n  {name}: R@1 {:.1}  R@5 {:.1}  R@10 {:.1}  MdR {:.1}  MnR {:.2}  (n = {})",
                    x.r1, x.r5, x.r10, x.mdr, x.mnr, x.n
                ));
            }
        }
        if m.n_texts_unmatched > 0 {
            text.push_str(&format!("\n  {} texts name a video that is not in the index", m.n_texts_unmatched));
        }
        text
    }
}

/// Writes the dense matrices as the second pass produces their rows.
struct DenseFiles {
    t2v: NpyWriter,
    v2t: NpyWriter,
    /// Rows are texts in `text_id` order; the engine's rows are in text-set order.
    row_of_text: Vec<usize>,
}

impl DenseFiles {
    /// Opens `t2v.npy` and `v2t.npy` under their temporary names.
    fn create(out: &Path, inputs: &Inputs, staged: &mut Staged) -> Result<DenseFiles> {
        let mut row_of_text = vec![0; inputs.texts.text_ids.len()];
        for (row, text) in inputs.by_text_id().into_iter().enumerate() {
            row_of_text[text] = row;
        }
        let (n, m) = (inputs.texts.text_ids.len(), inputs.columns.len());
        let mut create = |name: &str| {
            let path = out.join(name);
            let tmp = temporary_path(&path);
            staged.0.push((tmp.clone(), path));
            NpyWriter::create(&tmp, n, m).with_context(|| format!("{}: cannot create", tmp.display()))
        };
        Ok(DenseFiles { t2v: create("t2v.npy")?, v2t: create("v2t.npy")?, row_of_text })
    }

    /// Syncs the matrices and writes `videos.txt`, the `video_id` of each column.
    fn finish(self, out: &Path, inputs: &Inputs, staged: &mut Staged) -> Result<()> {
        for writer in [self.t2v, self.v2t] {
            writer.finish()?; // synced; already staged
        }
        let path = out.join("videos.txt");
        let mut list = inputs.columns.join("\n");
        list.push('\n');
        staged.0.push((crate::store::write_temporary(&path, list.as_bytes())?, path));
        Ok(())
    }
}

impl RowSink for DenseFiles {
    fn row(&self, text: usize, t2v: &[f64], v2t: &[f64]) -> std::io::Result<()> {
        self.t2v.write_row(self.row_of_text[text], t2v)?;
        self.v2t.write_row(self.row_of_text[text], v2t)
    }
}

#[cfg(feature = "cuda")]
fn score_on_gpu(
    ordinal: usize,
    problem: &Problem,
    options: &ScoreOptions,
    sink: Option<&dyn RowSink>,
) -> Result<Outcome> {
    let gpu = crate::gpu::Gpu::open(ordinal).with_context(|| format!("cannot score on cuda:{ordinal}"))?;
    eprintln!("vtr-index: scoring on cuda:{ordinal} ({})", gpu.name);
    Ok(crate::gpu::score::score(&gpu, problem, options, sink)?)
}

#[cfg(not(feature = "cuda"))]
fn score_on_gpu(ordinal: usize, _: &Problem, _: &ScoreOptions, _: Option<&dyn RowSink>) -> Result<Outcome> {
    bail!("cannot score on cuda:{ordinal}: this build scores on the CPU only (rebuild with --features cuda)")
}

pub fn run(args: ScoreArgs) -> Result<u8> {
    if ![args.temperature, args.beta, args.scale.unwrap_or(1.0)].into_iter().all(is_positive) {
        bail!("--temperature, --beta and --scale must be positive");
    }
    let command = ScoreCommand {
        index: args.index,
        texts: args.texts,
        revise: args.revise,
        bank: args.bank,
        temperature: args.temperature,
        beta: args.beta,
        top_k: args.top_k,
        dense: args.dense,
        out: args.out,
        scale: args.scale,
        cache_bytes: args.cache_mib.saturating_mul(1 << 20),
        device: super::device(&args.device)?,
        gpu_inputs: args.gpu_inputs,
    };
    if let Some(stage) = args.stage {
        let work = args.work.as_deref().expect("clap requires --work with --stage");
        return run_stage(&command, stage, args.part.as_deref(), work);
    }
    let report = run_score(&command)?;
    eprintln!("vtr-index: {}", report.summary());
    for file in &report.files {
        println!("{}", file.display());
    }
    Ok(0)
}

/// The matrix to score, read from the index: videos as columns in ascending `video_id` byte
/// order, texts as rows in text-set order, and each text's own column.
struct Inputs {
    /// `video_id` of each column.
    columns: Vec<String>,
    videos: Vec<f32>,
    texts: TextSet,
    text_video: Vec<Option<u32>>,
    bank: Option<Vec<f32>>,
    n_texts_unmatched: usize,
    n_texts_without_video_id: usize,
}

impl Inputs {
    fn read(command: &ScoreCommand, manifest: &Manifest) -> Result<Inputs> {
        let text_shards = text_set(manifest, &command.texts)?;
        let revise = command.revise.name();
        let bank_shards = match (command.revise.needs().bank, &command.bank) {
            (true, Some(bank)) => Some(text_set(manifest, bank)?),
            (true, None) => {
                bail!("--revise {revise} needs --bank NAME, a text set of bank queries (for example training captions)")
            }
            (false, Some(_)) => {
                let with_bank: Vec<&str> =
                    Revision::ALL.into_iter().filter(|r| r.needs().bank).map(Revision::name).collect();
                bail!("--bank is used only by --revise {}", with_bank.join(" or --revise "))
            }
            (false, None) => None,
        };
        // The two tables are decoded at once: each read is one thread's work.
        let (videos, texts) = rayon::join(
            || read_video_embeddings(&command.index, manifest.shards("videos")),
            || read_text_embeddings(&command.index, text_shards),
        );
        let ((video_ids, videos), texts) = (videos?, texts?);
        if video_ids.is_empty() {
            bail!("{}: the index holds no videos yet; run `vtr-index ingest` first", command.index.display());
        }
        super::refuse_non_unit("the videos table", &videos, |row| format!("video {:?}", video_ids[row]))?;
        super::refuse_non_unit(&format!("text set {}", command.texts), &texts.embeddings, |row| {
            format!("text_id {}", texts.text_ids[row])
        })?;
        let (dim, video_matrix, columns) = (videos.dim, videos.values, video_ids);
        let column_of: HashMap<&str, u32> = columns.iter().enumerate().map(|(c, id)| (id.as_str(), c as u32)).collect();

        if texts.text_ids.is_empty() {
            bail!("text set {} is empty", command.texts);
        }
        if texts.embeddings.dim != dim {
            bail!("text set {} has embeddings of width {}, the videos {dim}", command.texts, texts.embeddings.dim);
        }
        let text_video: Vec<Option<u32>> =
            texts.video_ids.iter().map(|v| v.as_deref().and_then(|id| column_of.get(id).copied())).collect();
        let n_texts_without_video_id = texts.video_ids.iter().filter(|v| v.is_none()).count();
        let n_texts_unmatched = text_video.iter().filter(|c| c.is_none()).count() - n_texts_without_video_id;
        let bank = match bank_shards {
            Some(shards) => {
                let bank = read_text_embeddings(&command.index, shards)?;
                let name = command.bank.as_deref().unwrap_or("");
                if bank.embeddings.dim != dim || bank.text_ids.is_empty() {
                    bail!("bank {name} must be a non-empty text set of width {dim}");
                }
                super::refuse_non_unit(&format!("text set {name}"), &bank.embeddings, |row| {
                    format!("text_id {}", bank.text_ids[row])
                })?;
                Some(bank.embeddings.values)
            }
            None => None,
        };
        Ok(Inputs {
            columns,
            videos: video_matrix,
            texts,
            text_video,
            bank,
            n_texts_unmatched,
            n_texts_without_video_id,
        })
    }

    fn problem(&self) -> Problem<'_> {
        Problem {
            texts: &self.texts.embeddings.values,
            videos: &self.videos,
            dim: self.texts.embeddings.dim,
            text_video: &self.text_video,
            bank: self.bank.as_deref(),
        }
    }

    /// Text positions in `text_id` order: the order of the output rows.
    fn by_text_id(&self) -> Vec<usize> {
        let mut by_id: Vec<usize> = (0..self.texts.text_ids.len()).collect();
        by_id.sort_by_key(|&i| self.texts.text_ids[i]);
        by_id
    }
}

/// What every way of scoring starts from: the index's manifest, the inputs, the options.
fn prepare(command: &ScoreCommand) -> Result<(Manifest, Inputs, ScoreOptions)> {
    let manifest = super::load_manifest(&command.index)?;
    let inputs = Inputs::read(command, &manifest)?;
    let options = score_options(command, &manifest);
    Ok((manifest, inputs, options))
}

/// The engine's options: the command's, with the model's logit scale unless `--scale` is given.
fn score_options(command: &ScoreCommand, manifest: &Manifest) -> ScoreOptions {
    ScoreOptions {
        revision: command.revise,
        scale: command.scale.unwrap_or_else(|| f64::from(manifest.model.logit_scale).exp()),
        temperature: command.temperature,
        beta: command.beta,
        top_k: command.top_k,
        cache_bytes: command.cache_bytes,
        device_inputs: command.gpu_inputs,
        ..ScoreOptions::default()
    }
}

pub fn run_score(command: &ScoreCommand) -> Result<ScoreReport> {
    let started = Instant::now();
    let out = command.out.as_deref().context("--out names the output folder")?;
    if command.top_k == 0 && !command.dense {
        eprintln!("vtr-index: --top-k 0: topk.parquet will be empty");
    }
    let (manifest, inputs, options) = prepare(command)?;
    let mut staged = open_outputs(out)?;
    let dense = if command.dense { Some(DenseFiles::create(out, &inputs, &mut staged)?) } else { None };
    let sink = dense.as_ref().map(|d| d as &dyn RowSink);
    let outcome = match command.device {
        DeviceChoice::Cpu => score(&inputs.problem(), &options, sink)?,
        DeviceChoice::Cuda(ordinal) => score_on_gpu(ordinal, &inputs.problem(), &options, sink)?,
    };
    if let Some(dense) = dense {
        dense.finish(out, &inputs, &mut staged)?;
    }
    publish_outcome(command, &manifest, out, &inputs, &options, &outcome, staged, started)
}

/// Makes the output folder and clears this process's temporaries from it. Every output is
/// then written under its temporary name first and all are renamed into place together, under
/// the lock an interruption waits for, so the folder never mixes this run's outputs with an
/// earlier run's. A run that fails first removes them (`Staged`).
fn open_outputs(out: &Path) -> Result<Staged> {
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    // Interrupted, the process removes its temporary files here and leaves the outputs as they were.
    crate::interrupt::remove_temporaries_in(out, crate::store::is_own_temporary_name);
    Ok(Staged(Vec::new()))
}

/// Writes `topk.parquet`, the ranks, `metrics.json` (when there are queries) and the run's
/// record beside what `staged` holds, all with the run's id, and publishes them all.
#[allow(clippy::too_many_arguments)]
fn publish_outcome(
    command: &ScoreCommand,
    manifest: &Manifest,
    out: &Path,
    inputs: &Inputs,
    options: &ScoreOptions,
    outcome: &Outcome,
    mut staged: Staged,
    started: Instant,
) -> Result<ScoreReport> {
    let (t2v, v2t) = (outcome.t2v_metrics(), outcome.v2t_metrics());
    let mut outputs: Vec<String> =
        staged.0.iter().filter_map(|(_, p)| p.file_name().map(|n| n.to_string_lossy().into_owned())).collect();
    outputs.extend(SCORE_TABLES.map(String::from));
    if t2v.is_some() {
        outputs.push("metrics.json".to_string());
    }
    outputs.push(SCORE_RECORD.to_string());
    let sha256s = |shards: &[crate::store::ShardInfo]| shards.iter().map(|s| s.sha256.clone()).collect::<Vec<_>>();
    let mut record = ScoreRecord {
        run_id: String::new(),
        revise: command.revise.name().to_string(),
        temperature: command.temperature,
        beta: command.revise.needs().bank.then_some(command.beta),
        scale: options.scale,
        top_k: command.top_k,
        texts: command.texts.clone(),
        texts_sha256: sha256s(text_set(manifest, &command.texts)?),
        videos_sha256: sha256s(manifest.shards("videos")),
        bank: command.bank.clone(),
        bank_sha256: match &command.bank {
            Some(bank) => sha256s(text_set(manifest, bank)?),
            None => Vec::new(),
        },
        n_texts: inputs.texts.text_ids.len(),
        n_videos: inputs.columns.len(),
        outputs,
    };
    record.identify();
    let run_id = record.run_id.as_str();
    stage_topk(out, run_id, inputs, outcome, &mut staged)?;
    stage_ranks(out, run_id, inputs, outcome, &mut staged)?;
    let metrics = MetricsFile {
        run_id: run_id.to_string(),
        t2v,
        v2t,
        revise: command.revise,
        temperature: command.temperature,
        scale: options.scale,
        beta: command.revise.needs().bank.then_some(command.beta),
        bank: command.bank.clone(),
        texts: command.texts.clone(),
        n_texts: inputs.texts.text_ids.len(),
        n_videos: inputs.columns.len(),
        n_texts_unmatched: inputs.n_texts_unmatched,
        n_texts_without_video_id: inputs.n_texts_without_video_id,
    };
    for (name, json) in [
        ("metrics.json", t2v.is_some().then(|| serde_json::to_string_pretty(&metrics))),
        (SCORE_RECORD, Some(serde_json::to_string_pretty(&record))),
    ] {
        if let Some(json) = json {
            let path = out.join(name);
            let mut json = json?;
            json.push('\n');
            staged.0.push((crate::store::write_temporary(&path, json.as_bytes())?, path));
        }
    }

    crate::fault::point("scored");
    let _publishing = crate::interrupt::publishing();
    crate::store::publish(&staged.0)?;
    let files = std::mem::take(&mut staged.0).into_iter().map(|(_, path)| path).collect();
    Ok(ScoreReport { metrics, files, seconds: started.elapsed().as_secs_f64() })
}

/// One stage of a split score (contract §7). `stats` and `rank` write `WORK/<stage>-I-of-N.json`
/// and are done at once if it is there (made for this index and these settings); `finish`
/// joins every part's `rank` file into the outputs.
fn run_stage(command: &ScoreCommand, stage: SplitStage, part: Option<&str>, work: &Path) -> Result<u8> {
    let started = Instant::now();
    if command.dense || command.device != DeviceChoice::Cpu {
        bail!("a split score runs on the CPU and writes top-k and metrics: leave out --dense and --device");
    }
    std::fs::create_dir_all(work).with_context(|| format!("{}: cannot create", work.display()))?;
    let files = StageFiles::new(work);
    match (stage, part) {
        (SplitStage::Finish, None) => finish_stage(command, &files, started),
        (SplitStage::Finish, Some(_)) => bail!("--stage finish joins every part: leave out --part"),
        (SplitStage::Stats | SplitStage::Rank, Some(text)) => {
            let shard =
                crate::partition::Shard::parse(text, |name| std::env::var(name).ok()).map_err(anyhow::Error::msg)?;
            part_stage(command, stage, shard, &files, started)
        }
        (_, None) => bail!("--stage stats and rank need --part I/N"),
    }
}

/// The index's manifest and the header every stage file of this score carries. Needs the
/// manifest alone: a stage found done returns before the inputs are read.
fn stage_header(command: &ScoreCommand, parts: u32) -> Result<(Manifest, ScoreOptions, StageHeader)> {
    let manifest_sha256 = crate::checksum::sha256_file(&command.index.join(crate::store::MANIFEST))
        .with_context(|| format!("{}: not an index", command.index.display()))?
        .1;
    let manifest = super::load_manifest(&command.index)?;
    let options = score_options(command, &manifest);
    let header = StageHeader {
        manifest_sha256,
        texts: command.texts.clone(),
        revise: command.revise.name().to_string(),
        bank: command.bank.clone(),
        temperature_bits: command.temperature.to_bits(),
        scale_bits: options.scale.to_bits(),
        beta_bits: command.beta.to_bits(),
        top_k: command.top_k,
        parts,
    };
    Ok((manifest, options, header))
}

/// `--stage stats|rank --part I/N`: part I's file, unless it is there already.
fn part_stage(
    command: &ScoreCommand,
    stage: SplitStage,
    shard: crate::partition::Shard,
    files: &StageFiles,
    started: Instant,
) -> Result<u8> {
    use crate::score::split;
    let parts = shard.count;
    let (manifest, options, header) = stage_header(command, parts)?;
    let name = if stage == SplitStage::Stats { "stats" } else { "rank" };
    let path = files.path(name, shard.index, parts);
    if path.exists() {
        if stage == SplitStage::Stats {
            files.read::<split::BlockStats>(&path, &header)?;
        } else {
            files.read::<split::BlockRanks>(&path, &header)?;
        }
        eprintln!("vtr-index: {name} of part {shard}: done already ({})", path.display());
        return Ok(0);
    }
    let inputs = Inputs::read(command, &manifest)?;
    let problem = inputs.problem();
    let blocks = split::blocks(&inputs.text_video, parts as usize);
    let i = shard.index as usize;
    if stage == SplitStage::Stats {
        files.write(&path, &header, split::stats(&problem, &options, &blocks, i)?)?;
    } else {
        let all = (0..parts)
            .map(|p| files.read(&files.path("stats", p, parts), &header))
            .collect::<Result<Vec<split::BlockStats>, _>>()
            .context("the rank stage needs every part's stats stage done first")?;
        files.write(&path, &header, split::rank(&problem, &options, &blocks, i, &all)?)?;
    }
    eprintln!(
        "vtr-index: {name} of part {shard}: {} texts in {:.1} s",
        blocks[i].len(),
        started.elapsed().as_secs_f64()
    );
    Ok(0)
}

/// `--stage finish`: every part's rank file joined into the outputs in `--out`.
fn finish_stage(command: &ScoreCommand, files: &StageFiles, started: Instant) -> Result<u8> {
    use crate::score::split;
    let parts = files.finished_parts()?;
    let (manifest, options, header) = stage_header(command, parts)?;
    let inputs = Inputs::read(command, &manifest)?;
    let out = command.out.as_deref().context("--stage finish writes into --out")?;
    let all = (0..parts)
        .map(|p| files.read(&files.path("rank", p, parts), &header))
        .collect::<Result<Vec<split::BlockRanks>, _>>()
        .context("the finish stage needs every part's rank stage done first")?;
    let outcome = split::finish(&inputs.text_video, inputs.columns.len(), all);
    let staged = open_outputs(out)?;
    let report = publish_outcome(command, &manifest, out, &inputs, &options, &outcome, staged, started)?;
    eprintln!("vtr-index: {} (from {parts} parts)", report.summary());
    for file in &report.files {
        println!("{}", file.display());
    }
    Ok(0)
}

/// Writes `topk.parquet` under its temporary name: each text's top videos, texts in
/// `text_id` order.
fn stage_topk(out: &Path, run_id: &str, inputs: &Inputs, outcome: &Outcome, staged: &mut Staged) -> Result<()> {
    let (text_ids, columns) = (&inputs.texts.text_ids, &inputs.columns);
    let rows = inputs.by_text_id().into_iter().flat_map(|i| {
        outcome.top[i].iter().enumerate().map(move |(r, &(col, score))| TopKRow {
            text_id: text_ids[i],
            rank: r as u32 + 1,
            video_id: columns[col as usize].as_str(),
            score,
        })
    });
    let path = out.join("topk.parquet");
    staged.0.push((write_topk(&path, run_id, rows)?, path));
    Ok(())
}

/// Writes `t2v_ranks.parquet` (every text, in `text_id` order; a rank only for a query) and
/// `v2t_ranks.parquet` (every video with captions, in the index's order) under their
/// temporary names.
fn stage_ranks(out: &Path, run_id: &str, inputs: &Inputs, outcome: &Outcome, staged: &mut Staged) -> Result<()> {
    let mut t2v = vec![None; inputs.texts.text_ids.len()];
    for &(text, rank) in &outcome.t2v_ranks {
        t2v[text] = Some(rank);
    }
    let rows = inputs.by_text_id().into_iter().map(|i| T2vRankRow {
        text_id: inputs.texts.text_ids[i],
        video_id: inputs.texts.video_ids[i].as_deref(),
        rank: t2v[i],
    });
    let path = out.join("t2v_ranks.parquet");
    staged.0.push((write_t2v_ranks(&path, run_id, rows)?, path));
    let rows = outcome
        .v2t_ranks
        .iter()
        .map(|&(column, rank)| V2tRankRow { video_id: inputs.columns[column as usize].as_str(), rank });
    let path = out.join("v2t_ranks.parquet");
    staged.0.push((write_v2t_ranks(&path, run_id, rows)?, path));
    Ok(())
}

/// Outputs written under their temporary names and not yet published (temporary, final path):
/// removed if the run fails before it publishes them.
struct Staged(Vec<(PathBuf, PathBuf)>);

impl Drop for Staged {
    fn drop(&mut self) {
        for (tmp, _) in &self.0 {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

fn text_set<'m>(manifest: &'m Manifest, name: &str) -> Result<&'m [crate::store::ShardInfo]> {
    let table = format!("texts/{name}");
    if !manifest.tables.contains_key(&table) {
        let sets = manifest.text_sets();
        bail!(
            "no text set named {name} in this index ({}); make one with `vtr-index encode-text CAPTIONS --name {name}`",
            if sets.is_empty() { "it has none".to_string() } else { format!("it has: {}", sets.join(", ")) }
        );
    }
    Ok(manifest.shards(&table))
}
