//! The score explorer (`serve --scores DIR…`, contract §8): each score folder's metrics, its
//! queries paged, filtered by outcome and sorted by rank, each caption with its top k and its
//! true video, and the comparison of two folders that scored the same texts against the same
//! videos (`--revise none` against `--revise dsl`): the captions whose rank the second improved
//! or worsened, by how much, and how the changes are spread.
//!
//! A folder keeps in memory only its ranks (text ids and ranks, and two orders by rank: 20 bytes
//! a text) and where each text's rows start in `topk.parquet` (8 bytes a text): 5 MB at 180,000
//! captions. A page reads its captions, true videos and top-k rows by position from the
//! Parquet files (`store::read_rows_at`), so no request reads a whole table, and a comparison
//! holds 12 bytes a changed caption.

use std::num::NonZeroUsize;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use serde_json::{Value, json};

use super::App;
use super::api::{ApiError, MAX_LISTED, Page, Params, blocking};
use super::index::Snapshot;
use crate::store::{
    Manifest, ScoreRecord, ShardInfo, StoreError, embedding_values, f64_column, for_each_batch_of, read_rows_at,
    read_score_folder, string_column, u32_column, u64_column,
};

/// Comparisons kept once made (each 12 bytes a changed caption).
const CACHED_COMPARISONS: usize = 8;

/// The bins of the histogram of rank changes (`rank in the first − rank in the second`: above 0
/// the second ranked the true video higher), each `(lowest, highest, label)`; unchanged
/// captions are counted apart.
pub const CHANGE_BINS: [(i64, i64, &str); 8] = [
    (i64::MIN, -100, "≤ −100"),
    (-99, -10, "−99…−10"),
    (-9, -2, "−9…−2"),
    (-1, -1, "−1"),
    (1, 1, "+1"),
    (2, 9, "+2…+9"),
    (10, 99, "+10…+99"),
    (100, i64::MAX, "≥ +100"),
];

/// Why a score folder cannot be explored.
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", dir.display())]
pub struct FolderError {
    pub dir: PathBuf,
    pub message: String,
}

/// The score folders `serve` was given, and the comparisons made of them.
pub struct ScoreFolders {
    folders: Vec<ScoreFolder>,
    comparisons: Mutex<lru::LruCache<(usize, usize), Arc<Comparison>>>,
}

/// One score folder, read and checked once: its record, its metrics and its ranks.
pub struct ScoreFolder {
    pub dir: PathBuf,
    /// The folder's own name, which the page shows.
    pub name: String,
    pub record: ScoreRecord,
    pub metrics: Option<Value>,
    /// Every text in `t2v_ranks.parquet`'s order (ascending `text_id`), and its rank; 0 for a
    /// text that is not a query.
    text_ids: Vec<u64>,
    ranks: Vec<u32>,
    /// The queries' positions by ascending rank, ties in text order; and by descending rank.
    best_first: Vec<u32>,
    worst_first: Vec<u32>,
    /// Where each text's rows start in `topk.parquet`, and where the last one's end.
    topk_starts: Vec<u64>,
}

/// Which queries a page lists, by the rank of their true video (as R@1, R@5 and R@10 count).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    All,
    AtOne,
    WithinFive,
    WithinTen,
    BeyondTen,
}

impl Outcome {
    pub const NAMES: &str = "all, r1, r5, r10, beyond";

    fn parse(name: &str) -> Option<Outcome> {
        Some(match name {
            "all" => Outcome::All,
            "r1" => Outcome::AtOne,
            "r5" => Outcome::WithinFive,
            "r10" => Outcome::WithinTen,
            "beyond" => Outcome::BeyondTen,
            _ => return None,
        })
    }

    fn ranks(self) -> RangeInclusive<u32> {
        match self {
            Outcome::All => 1..=u32::MAX,
            Outcome::AtOne => 1..=1,
            Outcome::WithinFive => 1..=5,
            Outcome::WithinTen => 1..=10,
            Outcome::BeyondTen => 11..=u32::MAX,
        }
    }
}

/// The order of a page of queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Order {
    Text,
    BestFirst,
    WorstFirst,
}

impl Order {
    fn parse(name: &str) -> Option<Order> {
        Some(match name {
            "text" => Order::Text,
            "rank" => Order::BestFirst,
            "-rank" => Order::WorstFirst,
            _ => return None,
        })
    }
}

/// Two folders' ranks of the same queries, compared: the captions the second ranked better
/// (most improved first), worse (most worsened first), and how many it left as they were.
pub struct Comparison {
    improved: Vec<(u32, i64)>,
    worsened: Vec<(u32, i64)>,
    pub unchanged: usize,
    /// Captions per bin of [`CHANGE_BINS`].
    pub histogram: [u64; CHANGE_BINS.len()],
}

fn corrupt(path: &Path) -> impl Fn(String) -> StoreError + '_ {
    move |message| StoreError::Corrupt { path: path.to_path_buf(), message }
}

impl ScoreFolder {
    /// Reads the folder's record (refusing a mixed folder), metrics and ranks.
    pub fn open(dir: &Path) -> Result<ScoreFolder, StoreError> {
        let record = read_score_folder(dir)?;
        let metrics_path = dir.join("metrics.json");
        let metrics = match std::fs::read(&metrics_path) {
            Ok(bytes) => Some(serde_json::from_slice(&bytes).map_err(|e| corrupt(&metrics_path)(e.to_string()))?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(crate::store::io_error(&metrics_path)(e)),
        };
        let (mut text_ids, mut ranks) = (Vec::with_capacity(record.n_texts), Vec::with_capacity(record.n_texts));
        let t2v = dir.join("t2v_ranks.parquet");
        for_each_batch_of(&t2v, &["text_id", "rank"], |batch| {
            text_ids.extend(u64_column(batch, "text_id")?.values());
            ranks.extend(u32_column(batch, "rank")?.iter().map(|r| r.unwrap_or(0)));
            Ok(())
        })?;
        if !text_ids.windows(2).all(|w| w[0] < w[1]) {
            return Err(corrupt(&t2v)("its texts are not in ascending text_id order".into()));
        }
        // Each text's rows in topk.parquet, which lists texts in the same order.
        let mut counts = vec![0u64; text_ids.len()];
        let (topk, mut next) = (dir.join("topk.parquet"), 0usize);
        for_each_batch_of(&topk, &["text_id"], |batch| {
            for id in u64_column(batch, "text_id")?.values() {
                while text_ids.get(next).is_some_and(|&t| t < *id) {
                    next += 1;
                }
                match text_ids.get(next) {
                    Some(t) if t == id => counts[next] += 1,
                    _ => return Err(format!("text {id} is out of order, or not in t2v_ranks.parquet")),
                }
            }
            Ok(())
        })?;
        let mut topk_starts = Vec::with_capacity(counts.len() + 1);
        topk_starts.push(0);
        for count in counts {
            topk_starts.push(topk_starts.last().copied().unwrap_or(0) + count);
        }
        let mut best_first: Vec<u32> = (0..ranks.len() as u32).filter(|&row| ranks[row as usize] != 0).collect();
        best_first.sort_by_key(|&row| (ranks[row as usize], row));
        let mut worst_first = best_first.clone();
        worst_first.sort_by_key(|&row| (std::cmp::Reverse(ranks[row as usize]), row));
        let name = dir.file_name().map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned());
        Ok(ScoreFolder {
            dir: dir.to_path_buf(),
            name,
            record,
            metrics,
            text_ids,
            ranks,
            best_first,
            worst_first,
            topk_starts,
        })
    }

    /// How many texts the folder's score ranked, queries or not.
    pub fn texts(&self) -> usize {
        self.text_ids.len()
    }

    /// Whether the index still holds the texts, and the videos, this folder scored.
    fn current(&self, manifest: &Manifest) -> (bool, bool) {
        let shas = |shards: &[ShardInfo]| shards.iter().map(|s| s.sha256.clone()).collect::<Vec<_>>();
        (
            shas(manifest.shards(&format!("texts/{}", self.record.texts))) == self.record.texts_sha256,
            shas(manifest.shards("videos")) == self.record.videos_sha256,
        )
    }

    /// The positions of one page of the queries of `outcome` in `order`, and how many there are.
    fn select(&self, outcome: Outcome, order: Order, offset: usize, limit: usize) -> (usize, Vec<u32>) {
        let wanted = outcome.ranks();
        let rank = |&row: &u32| self.ranks[row as usize];
        let within: &[u32] = match order {
            Order::Text => {
                let matching = (0..self.ranks.len() as u32).filter(|row| wanted.contains(&rank(row)));
                return (self.count(outcome), matching.skip(offset).take(limit).collect());
            }
            Order::BestFirst => {
                let start = self.best_first.partition_point(|row| rank(row) < *wanted.start());
                let end = self.best_first.partition_point(|row| rank(row) <= *wanted.end());
                &self.best_first[start..end]
            }
            Order::WorstFirst => {
                let start = self.worst_first.partition_point(|row| rank(row) > *wanted.end());
                let end = self.worst_first.partition_point(|row| rank(row) >= *wanted.start());
                &self.worst_first[start..end]
            }
        };
        (within.len(), within.iter().skip(offset).take(limit).copied().collect())
    }

    /// How many queries have the outcome.
    fn count(&self, outcome: Outcome) -> usize {
        let wanted = outcome.ranks();
        let rank = |&row: &u32| self.ranks[row as usize];
        self.best_first.partition_point(|row| rank(row) <= *wanted.end())
            - self.best_first.partition_point(|row| rank(row) < *wanted.start())
    }

    /// The true video of each text at `rows` (ascending), from `t2v_ranks.parquet`.
    fn true_videos(&self, rows: &[u64]) -> Result<Vec<Option<String>>, StoreError> {
        let path = self.dir.join("t2v_ranks.parquet");
        let mut videos = Vec::with_capacity(rows.len());
        for batch in read_rows_at(&path, &["video_id"], rows)? {
            let ids = string_column(&batch, "video_id").map_err(corrupt(&path))?;
            videos.extend(ids.iter().map(|id| id.map(str::to_string)));
        }
        Ok(videos)
    }

    /// The top-k entries of each text at `rows` (ascending).
    fn top(&self, rows: &[u64]) -> Result<Vec<Vec<TopEntry>>, StoreError> {
        let path = self.dir.join("topk.parquet");
        let positions: Vec<u64> =
            rows.iter().flat_map(|&row| self.topk_starts[row as usize]..self.topk_starts[row as usize + 1]).collect();
        let mut entries = Vec::with_capacity(positions.len());
        for batch in read_rows_at(&path, &["rank", "video_id", "score"], &positions)? {
            let ranks = u32_column(&batch, "rank").map_err(corrupt(&path))?;
            let ids = string_column(&batch, "video_id").map_err(corrupt(&path))?;
            let scores = f64_column(&batch, "score").map_err(corrupt(&path))?;
            for i in 0..batch.num_rows() {
                entries.push((ranks.value(i), ids.value(i).to_string(), scores.value(i)));
            }
        }
        let mut entries = entries.into_iter();
        Ok(rows
            .iter()
            .map(|&row| {
                let n = self.topk_starts[row as usize + 1] - self.topk_starts[row as usize];
                entries.by_ref().take(n as usize).collect()
            })
            .collect())
    }
}

/// One of a text's top k: its rank, video and score, as `topk.parquet` holds them.
type TopEntry = (u32, String, f64);

/// A caption as the index's text set holds it: its text and its embedding.
struct Caption {
    text: String,
    embedding: Vec<f32>,
}

/// The captions of the texts at `rows` (ascending positions in text_id order) that `folder`
/// scored, from the snapshot's text set while it is the one scored (a set encoded again under
/// the same name may give other texts the same ids); none otherwise.
fn captions(snapshot: &Snapshot, folder: &ScoreFolder, rows: &[u64]) -> Vec<Option<Caption>> {
    let mut out: Vec<Option<Caption>> = (0..rows.len()).map(|_| None).collect();
    if !folder.current(&snapshot.manifest).0 {
        return out;
    }
    let (name, text_ids) = (&folder.record.texts, &folder.text_ids);
    let (mut first, mut next) = (0u64, 0usize);
    for shard in snapshot.manifest.shards(&format!("texts/{name}")) {
        let end = first + shard.rows;
        let start = next;
        while rows.get(next).is_some_and(|&row| row < end) {
            next += 1;
        }
        let local: Vec<u64> = rows[start..next].iter().map(|row| row - first).collect();
        first = end;
        if local.is_empty() {
            continue;
        }
        // A shard collected since this snapshot (a later commit rewrote the set) gives none.
        let path = snapshot.index.join(&shard.path);
        let Ok(batches) = read_rows_at(&path, &["text_id", "text", "embedding"], &local) else { continue };
        let mut slot = start;
        for batch in batches {
            let (Ok(ids), Ok(texts), Ok((values, dim))) =
                (u64_column(&batch, "text_id"), string_column(&batch, "text"), embedding_values(&batch))
            else {
                break;
            };
            for i in 0..batch.num_rows() {
                if ids.value(i) == text_ids[rows[slot] as usize] {
                    let embedding = values[i * dim..(i + 1) * dim].to_vec();
                    out[slot] = Some(Caption { text: texts.value(i).to_string(), embedding });
                }
                slot += 1;
            }
        }
    }
    out
}

/// The time of `video_id`'s frame most like `caption`, if the index holds the video.
fn best_frame_s(snapshot: &Snapshot, caption: Option<&Caption>, video_id: &str) -> Option<f64> {
    let at = snapshot.engine.find(video_id)?;
    match caption {
        Some(caption) => snapshot.engine.best_frame(&caption.embedding, at).ok().flatten().map(|b| b.time_s),
        None => snapshot.engine.frame_times(at).ok()?.first().copied(),
    }
}

/// What differs between two runs' inputs: empty when they scored the same texts against the
/// same videos.
pub fn differences(a: &ScoreRecord, b: &ScoreRecord) -> Vec<String> {
    let shards = |shas: &[String]| {
        let mut names: Vec<String> = shas.iter().take(3).map(|s| s.chars().take(12).collect()).collect();
        if shas.len() > 3 {
            names.push(format!("and {} more", shas.len() - 3));
        }
        format!("{} shard{} ({})", shas.len(), if shas.len() == 1 { "" } else { "s" }, names.join(", "))
    };
    let mut differ = Vec::new();
    if a.texts != b.texts || a.texts_sha256 != b.texts_sha256 {
        differ.push(format!(
            "the texts: set {:?} of {} texts in {}, against set {:?} of {} texts in {}",
            a.texts,
            a.n_texts,
            shards(&a.texts_sha256),
            b.texts,
            b.n_texts,
            shards(&b.texts_sha256)
        ));
    }
    if a.videos_sha256 != b.videos_sha256 {
        differ.push(format!(
            "the videos: {} videos in {}, against {} videos in {}",
            a.n_videos,
            shards(&a.videos_sha256),
            b.n_videos,
            shards(&b.videos_sha256)
        ));
    }
    differ
}

impl Comparison {
    fn of(a: &ScoreFolder, b: &ScoreFolder) -> Comparison {
        let (mut improved, mut worsened, mut unchanged) = (Vec::new(), Vec::new(), 0);
        let mut histogram = [0u64; CHANGE_BINS.len()];
        for (row, (&rank_a, &rank_b)) in a.ranks.iter().zip(&b.ranks).enumerate() {
            if rank_a == 0 || rank_b == 0 {
                continue;
            }
            let change = i64::from(rank_a) - i64::from(rank_b);
            match change.cmp(&0) {
                std::cmp::Ordering::Greater => improved.push((row as u32, change)),
                std::cmp::Ordering::Less => worsened.push((row as u32, change)),
                std::cmp::Ordering::Equal => unchanged += 1,
            }
            if let Some(bin) = CHANGE_BINS.iter().position(|&(low, high, _)| (low..=high).contains(&change)) {
                histogram[bin] += 1;
            }
        }
        improved.sort_by_key(|&(row, change)| (std::cmp::Reverse(change), row));
        worsened.sort_by_key(|&(row, change)| (change, row));
        Comparison { improved, worsened, unchanged, histogram }
    }

    pub fn improved(&self) -> usize {
        self.improved.len()
    }

    pub fn worsened(&self) -> usize {
        self.worsened.len()
    }
}

impl ScoreFolders {
    /// Opens every folder of `dirs`, refusing a mixed one, or one whose text set `index` does
    /// not hold (its captions could not be shown).
    pub fn open(dirs: &[PathBuf], manifest: &Manifest) -> Result<ScoreFolders, FolderError> {
        let mut folders = Vec::new();
        for dir in dirs {
            let refused = |message: String| FolderError { dir: dir.clone(), message };
            let folder = ScoreFolder::open(dir).map_err(|e| refused(e.to_string()))?;
            if !manifest.tables.contains_key(&format!("texts/{}", folder.record.texts)) {
                return Err(refused(format!(
                    "it scored the text set {:?}, which this index does not hold: serve the index it was scored from",
                    folder.record.texts
                )));
            }
            folders.push(folder);
        }
        Ok(ScoreFolders {
            folders,
            comparisons: Mutex::new(lru::LruCache::new(NonZeroUsize::new(CACHED_COMPARISONS).expect("positive"))),
        })
    }

    pub fn len(&self) -> usize {
        self.folders.len()
    }

    pub fn is_empty(&self) -> bool {
        self.folders.is_empty()
    }

    /// The folder at `position` in `--scores` order, or the 404 that says there is none.
    fn folder(&self, position: &str) -> Result<&ScoreFolder, ApiError> {
        self.folders.get(self.position(position)?).ok_or_else(|| self.no_such(position))
    }

    fn position(&self, text: &str) -> Result<usize, ApiError> {
        text.parse::<usize>().map_err(|_| self.no_such(text))
    }

    fn no_such(&self, position: &str) -> ApiError {
        ApiError::not_found(match self.folders.len() {
            0 => format!("no score folder {position:?}: this service was given no --scores"),
            n => format!("no score folder {position:?}: the folders are 0 to {} in --scores order", n - 1),
        })
    }

    /// The comparison of the folders at `a` and `b`, made once; a 409 saying what differs if
    /// they did not score the same things.
    pub fn compare(&self, a: &str, b: &str) -> Result<Arc<Comparison>, ApiError> {
        let (first, second) = (self.position(a)?, self.position(b)?);
        let (folder_a, folder_b) = (self.folder(a)?, self.folder(b)?);
        let differ = differences(&folder_a.record, &folder_b.record);
        if !differ.is_empty() || folder_a.text_ids != folder_b.text_ids {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "not_comparable",
                format!(
                    "{} and {} did not score the same things, so their ranks cannot be compared; they differ in {}",
                    folder_a.name,
                    folder_b.name,
                    if differ.is_empty() { "their texts".to_string() } else { differ.join("; and in ") }
                ),
            ));
        }
        let mut cache = self.comparisons.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(made) = cache.get(&(first, second)) {
            return Ok(Arc::clone(made));
        }
        let made = Arc::new(Comparison::of(folder_a, folder_b));
        cache.put((first, second), Arc::clone(&made));
        Ok(made)
    }
}

/// `GET /api/v1/scores`: every folder with its run's settings, metrics and counts, whether the
/// index still holds what it scored, and the folders it can be compared with.
pub async fn list(State(app): State<Arc<App>>, uri: Uri) -> Result<Json<Value>, ApiError> {
    Params::of(&uri, &[])?;
    let snapshot = app.live.snapshot();
    let folders = &app.scores.folders;
    let items: Vec<Value> = folders
        .iter()
        .enumerate()
        .map(|(position, folder)| {
            let r = &folder.record;
            let (texts_current, videos_current) = folder.current(&snapshot.manifest);
            let comparable: Vec<usize> = (0..folders.len())
                .filter(|&other| {
                    other != position
                        && differences(r, &folders[other].record).is_empty()
                        && folders[other].text_ids == folder.text_ids
                })
                .collect();
            let outcomes: serde_json::Map<String, Value> =
                [("all", Outcome::All), ("r1", Outcome::AtOne), ("r5", Outcome::WithinFive)]
                    .into_iter()
                    .chain([("r10", Outcome::WithinTen), ("beyond", Outcome::BeyondTen)])
                    .map(|(name, outcome)| (name.to_string(), json!(folder.count(outcome))))
                    .collect();
            json!({
                "folder": position,
                "name": folder.name,
                "run_id": r.run_id,
                "revise": r.revise,
                "temperature": r.temperature,
                "beta": r.beta,
                "scale": r.scale,
                "top_k": r.top_k,
                "texts": r.texts,
                "bank": r.bank,
                "n_texts": r.n_texts,
                "n_videos": r.n_videos,
                "metrics": folder.metrics.as_ref().map(|m| json!({"t2v": m.get("t2v"), "v2t": m.get("v2t")})),
                "outcomes": outcomes,
                "texts_current": texts_current,
                "videos_current": videos_current,
                "comparable_with": comparable,
            })
        })
        .collect();
    Ok(Json(json!({"folders": items})))
}

/// `GET /api/v1/scores/queries?folder=N&outcome=…&sort=…&offset=&limit=`: a page of one
/// folder's queries, each with its caption, its true video and rank, and its top k, every
/// video with the time of its frame most like the caption.
pub async fn queries(State(app): State<Arc<App>>, uri: Uri) -> Result<Json<Value>, ApiError> {
    let params = Params::of(&uri, &["folder", "outcome", "sort", "offset", "limit"])?;
    let position = params.required("folder")?.to_string();
    app.scores.folder(&position)?;
    let outcome = Outcome::parse(params.get("outcome").unwrap_or("all"))
        .ok_or_else(|| ApiError::bad_request(format!("outcome is one of {}", Outcome::NAMES)))?;
    let sort = params.get("sort").unwrap_or("text").to_string();
    let order = Order::parse(&sort).ok_or_else(|| ApiError::bad_request("sort is one of text, rank, -rank"))?;
    let (offset, limit) = params.page(MAX_LISTED)?;
    let snapshot = app.live.snapshot();
    blocking(move || {
        let folder = app.scores.folder(&position)?;
        let (total, rows) = folder.select(outcome, order, offset, limit);
        let items = query_items(&snapshot, folder, &rows)?;
        Ok(Json(json!({"folder": folder_name(folder, &position), "page": Page::new(offset, limit, total, items)})))
    })
    .await
}

fn folder_name(folder: &ScoreFolder, position: &str) -> Value {
    json!({"folder": position.parse::<usize>().ok(), "name": folder.name, "revise": folder.record.revise})
}

/// The items of a page of queries at `rows` (in the page's order).
fn query_items(snapshot: &Snapshot, folder: &ScoreFolder, rows: &[u32]) -> Result<Vec<Value>, ApiError> {
    let mut sorted: Vec<u64> = rows.iter().map(|&r| u64::from(r)).collect();
    sorted.sort_unstable();
    let videos = folder.true_videos(&sorted)?;
    let tops = folder.top(&sorted)?;
    let captions = captions(snapshot, folder, &sorted);
    let at = |row: u32| sorted.binary_search(&u64::from(row)).expect("a row of the page");
    Ok(rows
        .iter()
        .map(|&row| {
            let i = at(row);
            let caption = captions[i].as_ref();
            let video_id = videos[i].as_deref();
            let top: Vec<Value> = tops[i]
                .iter()
                .map(|(rank, id, score)| {
                    json!({
                        "rank": rank,
                        "video_id": id,
                        "score": score,
                        "best_frame_s": best_frame_s(snapshot, caption, id),
                        "true": Some(id.as_str()) == video_id,
                    })
                })
                .collect();
            let score = tops[i].iter().find(|(_, id, _)| Some(id.as_str()) == video_id).map(|&(_, _, s)| s);
            json!({
                "text_id": folder.text_ids[row as usize],
                "text": caption.map(|c| c.text.as_str()),
                "video_id": video_id,
                "rank": folder.ranks[row as usize],
                "score": score,
                "best_frame_s": video_id.and_then(|id| best_frame_s(snapshot, caption, id)),
                "top": top,
            })
        })
        .collect())
}

/// `GET /api/v1/scores/changes?a=N&b=M&change=improved|worsened&offset=&limit=`: the captions
/// whose rank `b` improved (or worsened) against `a`, most changed first, with the counts.
pub async fn changes(State(app): State<Arc<App>>, uri: Uri) -> Result<Json<Value>, ApiError> {
    let params = Params::of(&uri, &["a", "b", "change", "offset", "limit"])?;
    let (a, b) = (params.required("a")?.to_string(), params.required("b")?.to_string());
    let improved = match params.get("change").unwrap_or("improved") {
        "improved" => true,
        "worsened" => false,
        _ => return Err(ApiError::bad_request("change is improved or worsened")),
    };
    let (offset, limit) = params.page(MAX_LISTED)?;
    let snapshot = app.live.snapshot();
    blocking(move || {
        let comparison = app.scores.compare(&a, &b)?;
        let (folder_a, folder_b) = (app.scores.folder(&a)?, app.scores.folder(&b)?);
        let listed = if improved { &comparison.improved } else { &comparison.worsened };
        let page: Vec<(u32, i64)> = listed.iter().skip(offset).take(limit).copied().collect();
        let mut sorted: Vec<u64> = page.iter().map(|&(row, _)| u64::from(row)).collect();
        sorted.sort_unstable();
        let videos = folder_a.true_videos(&sorted)?;
        let captions = captions(&snapshot, folder_a, &sorted);
        let items: Vec<Value> = page
            .iter()
            .map(|&(row, change)| {
                let i = sorted.binary_search(&u64::from(row)).expect("a row of the page");
                let caption = captions[i].as_ref();
                let video_id = videos[i].as_deref();
                json!({
                    "text_id": folder_a.text_ids[row as usize],
                    "text": caption.map(|c| c.text.as_str()),
                    "video_id": video_id,
                    "best_frame_s": video_id.and_then(|id| best_frame_s(&snapshot, caption, id)),
                    "rank_a": folder_a.ranks[row as usize],
                    "rank_b": folder_b.ranks[row as usize],
                    "change": change,
                })
            })
            .collect();
        Ok(Json(json!({
            "a": folder_name(folder_a, &a),
            "b": folder_name(folder_b, &b),
            "improved": comparison.improved(),
            "worsened": comparison.worsened(),
            "unchanged": comparison.unchanged,
            "histogram": CHANGE_BINS.iter().zip(comparison.histogram).map(|(&(low, high, label), count)| {
                json!({"label": label, "lowest": (low != i64::MIN).then_some(low), "highest": (high != i64::MAX).then_some(high), "captions": count})
            }).collect::<Vec<_>>(),
            "page": Page::new(offset, limit, listed.len(), items),
        })))
    })
    .await
}
