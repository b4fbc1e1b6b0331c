//! `vtr-index search "a query" --index INDEX`: one query against every video of an index, answered with the
//! top videos and, for each, the time of its frame that matches the query best.
//!
//! Ranking is by the logit `scale · cos(query, video)` (one query has no dual-softmax prior);
//! the best frame is the sampled frame whose embedding has the highest cosine with the query.
//! The index's search segments answer it through [`SearchEngine`]; an index of an older format
//! without them is answered from its tables.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;

use crate::model::Clip;
use crate::model::tokenizer::ClipTokenizer;
use crate::score::{Problem, Revision, ScoreOptions, cosine_of_unit_vectors, score};
use crate::search_engine::{Hit, SearchEngine, embed_query, hits_of, logit_scale};
use crate::store::{Manifest, read_frames_of, read_video_embeddings};
use crate::types::DeviceChoice;

#[derive(Debug, Args)]
pub struct SearchArgs {
    /// The query text.
    pub query: String,
    #[arg(long, value_name = "INDEX")]
    pub index: PathBuf,
    #[arg(long, short = 'k', default_value_t = 10)]
    pub top_k: usize,
    /// Another copy of the index's model, if the recorded path is gone.
    #[arg(long, value_name = "M")]
    pub model: Option<PathBuf>,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone)]
pub struct SearchCommand {
    pub query: String,
    pub index: PathBuf,
    pub top_k: usize,
    pub model: Option<PathBuf>,
    pub device: DeviceChoice,
}

pub fn run(args: SearchArgs) -> Result<u8> {
    let command = SearchCommand {
        query: args.query,
        index: args.index,
        top_k: args.top_k,
        model: args.model,
        device: DeviceChoice::Cpu,
    };
    for hit in search(&command)? {
        if args.json {
            println!("{}", serde_json::to_string(&hit)?);
        } else {
            let frame = hit.best_frame_s.map_or_else(|| "-".to_string(), |t| format!("{t:.2}s"));
            println!("{:>3}  {:>8.4}  {:>8}  {}", hit.rank, hit.score, frame, hit.video_id);
        }
    }
    Ok(0)
}

pub fn search(command: &SearchCommand) -> Result<Vec<Hit>> {
    if ClipTokenizer::is_blank(&command.query) {
        bail!("the query is empty");
    }
    let manifest = super::load_manifest(&command.index)?;
    let clip = Clip::load_recorded(&manifest.model, command.model.as_deref(), command.device)?;
    let query = embed_query(&clip, &command.query)?;
    let scale = logit_scale(&manifest);
    if manifest.rows("videos") == 0 {
        bail!("{}: the index holds no videos yet", command.index.display());
    }
    match SearchEngine::open(&command.index, &manifest)? {
        Some(engine) => {
            let not_unit = engine.first_not_unit().map(|(id, why)| (format!("video {id:?}"), why));
            super::refuse_not_unit("the videos table", not_unit)?;
            Ok(hits_of(engine.search(&query, command.top_k)?, scale))
        }
        None => search_tables(command, &manifest, &query, scale),
    }
}

/// The query answered from the Parquet tables: an index of a format before 5, which has no
/// search segments until its next writer upgrades it (a reader never does).
fn search_tables(command: &SearchCommand, manifest: &Manifest, query: &[f32], scale: f64) -> Result<Vec<Hit>> {
    let (ids, videos) = read_video_embeddings(&command.index, manifest.shards("videos"))?;
    super::refuse_non_unit("the videos table", &videos, |row| format!("video {:?}", ids[row]))?;
    let (dim, matrix) = (videos.dim, &videos.values);
    let options = ScoreOptions { revision: Revision::None, scale, top_k: command.top_k, ..ScoreOptions::default() };
    let problem = Problem { texts: query, videos: matrix, dim, text_video: &[None], bank: None };
    let outcome = score(&problem, &options, None)?;
    let top: Vec<(&str, f64)> =
        outcome.top[0].iter().map(|&(col, score)| (ids[col as usize].as_str(), score)).collect();

    let wanted: HashSet<&str> = top.iter().map(|&(id, _)| id).collect();
    let mut best: HashMap<String, (f64, f64)> = HashMap::new();
    for frame in read_frames_of(&command.index, manifest.shards("frames"), &wanted)? {
        let cosine = cosine_of_unit_vectors(&frame.embedding, query);
        let entry = best.entry(frame.video_id).or_insert((f64::NEG_INFINITY, frame.pts_s));
        if cosine > entry.0 {
            *entry = (cosine, frame.pts_s);
        }
    }
    Ok(top
        .into_iter()
        .enumerate()
        .map(|(i, (id, score))| Hit {
            rank: i + 1,
            video_id: id.to_string(),
            score,
            best_frame_s: best.get(id).map(|b| b.1),
            best_frame_cosine: best.get(id).map(|b| b.0),
        })
        .collect())
}
