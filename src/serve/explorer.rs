//! The score explorer (`serve --scores DIR…`, contract §8): each score folder's metrics, its
//! queries paged, filtered by outcome and sorted by rank, each caption with its top k and its
//! true video, and the comparison of two folders that scored the same texts against the same
//! videos (`--revise none` against `--revise dsl`): the captions whose rank the second improved
//! or worsened, by how much, and how the changes are spread.
//!
//! A folder is read once at start: its record (a mixed folder is refused), its metrics, and in
//! memory only its ranks (text ids and ranks, and two orders by rank: 20 bytes a text) and where
//! each text's rows start in `topk.parquet` (8 bytes a text): 5 MB at 180,000 captions. Its two
//! Parquet files stay open, so a later `score` into the same folder does not mix another run
//! into the pages: the explorer shows the runs as they were when it started. A page reads only
//! the rows it shows, by position (`store::read_rows_at`), and captions from the index's text
//! set while it is the one scored; a comparison holds 4 bytes a changed caption.

use std::fs::File;
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
use super::index::{Snapshot, reopen};
use crate::store::{
    Manifest, ScoreRecord, ShardInfo, StoreError, TextAt, TopKEntry, corrupt, for_each_topk_text_id, io_error,
    open_score_folder, read_t2v_ranks, read_texts_at, read_topk_at, read_true_videos_at,
};

/// Comparisons kept once made (each 4 bytes a changed caption).
const CACHED_COMPARISONS: usize = 8;
/// The most top-k entries a query lists (a folder scored with a larger `--top-k` shows its
/// first ones): a page's work stays bounded whatever the run's k.
pub const MAX_TOP_LISTED: usize = 50;

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

/// Which queries a page lists, by the rank of their true video (as R@1, R@5 and R@10 count),
/// by its name in the API.
const OUTCOMES: [(&str, RangeInclusive<u32>); 5] =
    [("all", 1..=u32::MAX), ("r1", 1..=1), ("r5", 1..=5), ("r10", 1..=10), ("beyond", 11..=u32::MAX)];

fn outcome(name: &str) -> Result<RangeInclusive<u32>, ApiError> {
    OUTCOMES.iter().find(|(n, _)| *n == name).map(|(_, ranks)| ranks.clone()).ok_or_else(|| {
        let names: Vec<&str> = OUTCOMES.iter().map(|(n, _)| *n).collect();
        ApiError::bad_request(format!("outcome is one of {}", names.join(", ")))
    })
}

/// Why a score folder cannot be explored.
#[derive(Debug, thiserror::Error)]
pub enum FolderError {
    /// Unreadable, of another format, or mixed (the message names the folder or file).
    #[error(transparent)]
    Unreadable(#[from] StoreError),
    #[error(
        "{}: it scored the text set {texts:?}, which this index does not hold: serve the index it was scored from",
        dir.display()
    )]
    OtherIndex { dir: PathBuf, texts: String },
}

/// The score folders `serve` was given, and the comparisons made of them.
pub struct ScoreFolders {
    folders: Vec<ScoreFolder>,
    /// For each folder, the folders that scored the same things (the ones it compares with).
    comparable: Vec<Vec<usize>>,
    comparisons: Mutex<lru::LruCache<(usize, usize), Arc<Comparison>>>,
}

/// One score folder, read and checked once: its record, its metrics, its ranks and its two
/// Parquet files, held open.
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
    t2v_ranks: File,
    topk: File,
}

/// The order of a page of queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Order {
    Text,
    BestFirst,
    WorstFirst,
}

impl Order {
    fn parse(name: &str) -> Result<Order, ApiError> {
        match name {
            "text" => Ok(Order::Text),
            "rank" => Ok(Order::BestFirst),
            "-rank" => Ok(Order::WorstFirst),
            _ => Err(ApiError::bad_request("sort is one of text, rank, -rank")),
        }
    }
}

/// Two folders' ranks of the same queries, compared: the captions the second ranked better
/// (most improved first), worse (most worsened first), and how many it left as they were.
pub struct Comparison {
    improved: Vec<u32>,
    worsened: Vec<u32>,
    pub unchanged: usize,
    /// Captions per bin of [`CHANGE_BINS`].
    pub histogram: [u64; CHANGE_BINS.len()],
}

impl ScoreFolder {
    /// Reads the folder's record (refusing a mixed folder), metrics and ranks, and keeps its
    /// ranks and top k open.
    pub fn open(dir: &Path) -> Result<ScoreFolder, StoreError> {
        let mut files = open_score_folder(dir)?;
        let mut held = |name: &str| files.take(name).ok_or_else(|| corrupt(dir)(format!("{name} is missing")));
        let (t2v_ranks, topk) = (held("t2v_ranks.parquet")?, held("topk.parquet")?);
        let (record, metrics) = (files.record, files.metrics);
        let t2v = dir.join("t2v_ranks.parquet");
        let (text_ids, ranks) = read_t2v_ranks(reopen(&t2v_ranks).map_err(io_error(&t2v))?, &t2v)?;
        let ranks: Vec<u32> = ranks.into_iter().map(|r| r.unwrap_or(0)).collect();
        if !text_ids.windows(2).all(|w| w[0] < w[1]) {
            return Err(corrupt(&t2v)("its texts are not in ascending text_id order".into()));
        }
        // Each text's rows in topk.parquet, which lists texts in the same order (contract §4).
        let mut counts = vec![0u64; text_ids.len()];
        let (topk_path, mut next) = (dir.join("topk.parquet"), 0usize);
        for_each_topk_text_id(reopen(&topk).map_err(io_error(&topk_path))?, &topk_path, |id| {
            while text_ids.get(next).is_some_and(|&t| t < id) {
                next += 1;
            }
            match text_ids.get(next) {
                Some(&t) if t == id => counts[next] += 1,
                _ => return Err(format!("text {id} is out of text_id order, or not in t2v_ranks.parquet")),
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
            t2v_ranks,
            topk,
        })
    }

    /// Whether the index still holds the texts, and the videos, this folder scored.
    fn current(&self, manifest: &Manifest) -> (bool, bool) {
        let shas = |shards: &[ShardInfo]| shards.iter().map(|s| s.sha256.clone()).collect::<Vec<_>>();
        (
            shas(manifest.shards(&format!("texts/{}", self.record.texts))) == self.record.texts_sha256,
            shas(manifest.shards("videos")) == self.record.videos_sha256,
        )
    }

    /// The positions of one page of the queries whose rank is in `wanted`, in `order`, and how
    /// many there are.
    fn select(&self, wanted: &RangeInclusive<u32>, order: Order, offset: usize, limit: usize) -> (usize, Vec<u32>) {
        let rank = |&row: &u32| self.ranks[row as usize];
        let within: &[u32] = match order {
            Order::Text => {
                let matching = (0..self.ranks.len() as u32).filter(|row| wanted.contains(&rank(row)));
                return (self.count(wanted), matching.skip(offset).take(limit).collect());
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

    /// How many queries have their rank in `wanted`.
    fn count(&self, wanted: &RangeInclusive<u32>) -> usize {
        let rank = |&row: &u32| self.ranks[row as usize];
        self.best_first.partition_point(|row| rank(row) <= *wanted.end())
            - self.best_first.partition_point(|row| rank(row) < *wanted.start())
    }

    /// The true video of each text at `rows` (ascending), from `t2v_ranks.parquet`.
    fn true_videos(&self, rows: &[u64]) -> Result<Vec<Option<String>>, StoreError> {
        let path = self.dir.join("t2v_ranks.parquet");
        read_true_videos_at(reopen(&self.t2v_ranks).map_err(io_error(&path))?, &path, rows)
    }

    /// The first [`MAX_TOP_LISTED`] top-k entries of each text at `rows` (ascending).
    fn top(&self, rows: &[u64]) -> Result<Vec<Vec<TopKEntry>>, StoreError> {
        let listed = |row: u64| {
            let start = self.topk_starts[row as usize];
            start..self.topk_starts[row as usize + 1].min(start + MAX_TOP_LISTED as u64)
        };
        let positions: Vec<u64> = rows.iter().flat_map(|&row| listed(row)).collect();
        let path = self.dir.join("topk.parquet");
        let mut entries = read_topk_at(reopen(&self.topk).map_err(io_error(&path))?, &path, &positions)?.into_iter();
        Ok(rows.iter().map(|&row| entries.by_ref().take(listed(row).count()).collect()).collect())
    }
}

/// The captions of the texts at `rows` (ascending positions in text_id order) that `folder`
/// scored, from the snapshot's text set while it is the one scored (a set encoded again under
/// the same name may give other texts the same ids); none otherwise, or where a later commit
/// has already collected the set's shard.
fn captions(snapshot: &Snapshot, folder: &ScoreFolder, rows: &[u64]) -> Result<Vec<Option<TextAt>>, StoreError> {
    let mut out: Vec<Option<TextAt>> = (0..rows.len()).map(|_| None).collect();
    if !folder.current(&snapshot.manifest).0 {
        return Ok(out);
    }
    let (mut first, mut next) = (0u64, 0usize);
    for shard in snapshot.manifest.shards(&format!("texts/{}", folder.record.texts)) {
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
        let path = snapshot.index.join(&shard.path);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_error(&path)(e)),
        };
        for (slot, text) in (start..next).zip(read_texts_at(file, &path, &local)?) {
            if text.text_id == folder.text_ids[rows[slot] as usize] {
                out[slot] = Some(text);
            }
        }
    }
    Ok(out)
}

/// The time of `video_id`'s frame most like `caption` (its first frame's without a caption), if
/// the index holds the video.
fn best_frame_s(snapshot: &Snapshot, caption: Option<&TextAt>, video_id: &str) -> Option<f64> {
    let at = snapshot.engine.find(video_id)?;
    match caption {
        Some(caption) => snapshot.engine.best_frame(&caption.embedding, at).ok().flatten().map(|b| b.time_s),
        None => snapshot.engine.frame_times(at).ok()?.first().copied(),
    }
}

/// What differs between two folders' inputs: empty when they scored the same texts against the
/// same videos.
fn differences(a: &ScoreFolder, b: &ScoreFolder) -> Vec<String> {
    let shards = |shas: &[String]| {
        let mut names: Vec<String> = shas.iter().take(3).map(|s| s.chars().take(12).collect()).collect();
        if shas.len() > 3 {
            names.push(format!("and {} more", shas.len() - 3));
        }
        format!("{} shard{} ({})", shas.len(), if shas.len() == 1 { "" } else { "s" }, names.join(", "))
    };
    let (r, s) = (&a.record, &b.record);
    let mut differ = Vec::new();
    if r.texts != s.texts || r.texts_sha256 != s.texts_sha256 || a.text_ids != b.text_ids {
        differ.push(format!(
            "the texts: set {:?} of {} texts in {}, against set {:?} of {} texts in {}",
            r.texts,
            r.n_texts,
            shards(&r.texts_sha256),
            s.texts,
            s.n_texts,
            shards(&s.texts_sha256)
        ));
    }
    if r.videos_sha256 != s.videos_sha256 {
        differ.push(format!(
            "the videos: {} videos in {}, against {} videos in {}",
            r.n_videos,
            shards(&r.videos_sha256),
            s.n_videos,
            shards(&s.videos_sha256)
        ));
    }
    differ
}

impl Comparison {
    /// The rank changes from `a` to `b` of the texts that are queries in both.
    fn of(a: &ScoreFolder, b: &ScoreFolder) -> Comparison {
        let change = |row: u32| i64::from(a.ranks[row as usize]) - i64::from(b.ranks[row as usize]);
        let (mut improved, mut worsened, mut unchanged) = (Vec::new(), Vec::new(), 0);
        let mut histogram = [0u64; CHANGE_BINS.len()];
        for row in 0..a.ranks.len().min(b.ranks.len()) as u32 {
            if a.ranks[row as usize] == 0 || b.ranks[row as usize] == 0 {
                continue;
            }
            match change(row).cmp(&0) {
                std::cmp::Ordering::Greater => improved.push(row),
                std::cmp::Ordering::Less => worsened.push(row),
                std::cmp::Ordering::Equal => unchanged += 1,
            }
            if let Some(bin) = CHANGE_BINS.iter().position(|&(low, high, _)| (low..=high).contains(&change(row))) {
                histogram[bin] += 1;
            }
        }
        improved.sort_by_key(|&row| (std::cmp::Reverse(change(row)), row));
        worsened.sort_by_key(|&row| (change(row), row));
        Comparison { improved, worsened, unchanged, histogram }
    }

    /// The histogram as the API gives it: each bin's label, its ends (none where open) and count.
    fn bins(&self) -> Vec<Value> {
        let end = |value: i64| (value != i64::MIN && value != i64::MAX).then_some(value);
        CHANGE_BINS
            .iter()
            .zip(self.histogram)
            .map(|(&(low, high, label), captions)| {
                json!({"label": label, "lowest": end(low), "highest": end(high), "captions": captions})
            })
            .collect()
    }
}

impl ScoreFolders {
    /// Opens every folder of `dirs`, refusing a mixed one, or one whose text set `manifest`'s
    /// index does not hold (its captions could not be shown).
    pub fn open(dirs: &[PathBuf], manifest: &Manifest) -> Result<ScoreFolders, FolderError> {
        let mut folders = Vec::new();
        for dir in dirs {
            let folder = ScoreFolder::open(dir)?;
            if !manifest.tables.contains_key(&format!("texts/{}", folder.record.texts)) {
                return Err(FolderError::OtherIndex { dir: dir.clone(), texts: folder.record.texts });
            }
            folders.push(folder);
        }
        let comparable = (0..folders.len())
            .map(|a| {
                (0..folders.len()).filter(|&b| b != a && differences(&folders[a], &folders[b]).is_empty()).collect()
            })
            .collect();
        Ok(ScoreFolders {
            folders,
            comparable,
            comparisons: Mutex::new(lru::LruCache::new(NonZeroUsize::new(CACHED_COMPARISONS).expect("positive"))),
        })
    }

    /// The folder at `position` in `--scores` order, or the 404 that says there is none.
    fn folder(&self, position: &str) -> Result<(usize, &ScoreFolder), ApiError> {
        let found = position.parse::<usize>().ok().and_then(|p| Some((p, self.folders.get(p)?)));
        found.ok_or_else(|| {
            ApiError::not_found(match self.folders.len() {
                0 => format!("no score folder {position:?}: this service was given no --scores"),
                n => format!("no score folder {position:?}: the folders are 0 to {} in --scores order", n - 1),
            })
        })
    }

    /// The comparison of the folders at `a` and `b`, made once; a 409 saying what differs if
    /// they did not score the same things.
    pub fn compare(&self, a: &str, b: &str) -> Result<Arc<Comparison>, ApiError> {
        let ((first, folder_a), (second, folder_b)) = (self.folder(a)?, self.folder(b)?);
        if first != second && !self.comparable[first].contains(&second) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "not_comparable",
                format!(
                    "{} and {} did not score the same things, so their ranks cannot be compared; they differ in {}",
                    folder_a.name,
                    folder_b.name,
                    differences(folder_a, folder_b).join("; and in ")
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

/// A score folder's failure to give a page: a 500 that names the folder, not the index.
fn unreadable(folder: &ScoreFolder) -> impl Fn(StoreError) -> ApiError + '_ {
    move |e| ApiError::internal(format!("the score folder {} cannot be read: {e}", folder.name))
}

/// `GET /api/v1/scores`: every folder with its run's settings, metrics and counts, whether the
/// index still holds what it scored, and the folders it can be compared with.
pub async fn list(State(app): State<Arc<App>>, uri: Uri) -> Result<Json<Value>, ApiError> {
    Params::of(&uri, &[])?;
    let snapshot = app.live.snapshot();
    let scores = &app.scores;
    let items: Vec<Value> = scores
        .folders
        .iter()
        .enumerate()
        .map(|(position, folder)| {
            let r = &folder.record;
            let (texts_current, videos_current) = folder.current(&snapshot.manifest);
            let outcomes: serde_json::Map<String, Value> =
                OUTCOMES.iter().map(|(name, ranks)| (name.to_string(), json!(folder.count(ranks)))).collect();
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
                "comparable_with": scores.comparable[position],
            })
        })
        .collect();
    Ok(Json(json!({"folders": items})))
}

/// How an answer names a folder.
fn named(position: usize, folder: &ScoreFolder) -> Value {
    json!({"folder": position, "name": folder.name, "revise": folder.record.revise})
}

/// `GET /api/v1/scores/queries?folder=N&outcome=…&sort=…&offset=&limit=`: a page of one
/// folder's queries, each with its caption, its true video and rank, and its top k, every
/// video with the time of its frame most like the caption.
pub async fn queries(State(app): State<Arc<App>>, uri: Uri) -> Result<Json<Value>, ApiError> {
    let params = Params::of(&uri, &["folder", "outcome", "sort", "offset", "limit"])?;
    let position = params.required("folder")?.to_string();
    app.scores.folder(&position)?;
    let wanted = outcome(params.get("outcome").unwrap_or("all"))?;
    let order = Order::parse(params.get("sort").unwrap_or("text"))?;
    let (offset, limit) = params.page(MAX_LISTED)?;
    let snapshot = app.live.snapshot();
    blocking(move || {
        let (position, folder) = app.scores.folder(&position)?;
        let (total, rows) = folder.select(&wanted, order, offset, limit);
        let items = query_items(&snapshot, folder, &rows).map_err(unreadable(folder))?;
        Ok(Json(json!({"folder": named(position, folder), "page": Page::new(offset, limit, total, items)})))
    })
    .await
}

/// The items of a page of queries at `rows` (in the page's order).
fn query_items(snapshot: &Snapshot, folder: &ScoreFolder, rows: &[u32]) -> Result<Vec<Value>, StoreError> {
    let mut sorted: Vec<u64> = rows.iter().map(|&r| u64::from(r)).collect();
    sorted.sort_unstable();
    let videos = folder.true_videos(&sorted)?;
    let tops = folder.top(&sorted)?;
    let captions = captions(snapshot, folder, &sorted)?;
    let at = |row: u32| sorted.binary_search(&u64::from(row)).expect("a row of the page");
    Ok(rows
        .iter()
        .map(|&row| {
            let i = at(row);
            let caption = captions[i].as_ref();
            let video_id = videos[i].as_deref();
            let top: Vec<Value> = tops[i]
                .iter()
                .map(|entry| {
                    json!({
                        "rank": entry.rank,
                        "video_id": entry.video_id,
                        "score": entry.score,
                        "best_frame_s": best_frame_s(snapshot, caption, &entry.video_id),
                        "true": Some(entry.video_id.as_str()) == video_id,
                    })
                })
                .collect();
            // The true video's score and frame: its top-k entry's where it has one.
            let own = top.iter().find(|entry| entry["true"] == true);
            let best_frame = match own {
                Some(entry) => entry["best_frame_s"].clone(),
                None => json!(video_id.and_then(|id| best_frame_s(snapshot, caption, id))),
            };
            json!({
                "text_id": folder.text_ids[row as usize],
                "text": caption.map(|c| c.text.as_str()),
                "video_id": video_id,
                "rank": folder.ranks[row as usize],
                "score": own.map(|entry| entry["score"].clone()),
                "best_frame_s": best_frame,
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
        let ((first, folder_a), (second, folder_b)) = (app.scores.folder(&a)?, app.scores.folder(&b)?);
        let listed = if improved { &comparison.improved } else { &comparison.worsened };
        let page: Vec<u32> = listed.iter().skip(offset).take(limit).copied().collect();
        let mut sorted: Vec<u64> = page.iter().map(|&row| u64::from(row)).collect();
        sorted.sort_unstable();
        let videos = folder_a.true_videos(&sorted).map_err(unreadable(folder_a))?;
        let captions = captions(&snapshot, folder_a, &sorted).map_err(unreadable(folder_a))?;
        let items: Vec<Value> = page
            .iter()
            .map(|&row| {
                let i = sorted.binary_search(&u64::from(row)).expect("a row of the page");
                let (caption, video_id) = (captions[i].as_ref(), videos[i].as_deref());
                let (rank_a, rank_b) = (folder_a.ranks[row as usize], folder_b.ranks[row as usize]);
                json!({
                    "text_id": folder_a.text_ids[row as usize],
                    "text": caption.map(|c| c.text.as_str()),
                    "video_id": video_id,
                    "best_frame_s": video_id.and_then(|id| best_frame_s(&snapshot, caption, id)),
                    "rank_a": rank_a,
                    "rank_b": rank_b,
                    "change": i64::from(rank_a) - i64::from(rank_b),
                })
            })
            .collect();
        Ok(Json(json!({
            "a": named(first, folder_a),
            "b": named(second, folder_b),
            "improved": comparison.improved.len(),
            "worsened": comparison.worsened.len(),
            "unchanged": comparison.unchanged,
            "histogram": comparison.bins(),
            "page": Page::new(offset, limit, listed.len(), items),
        })))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder of these ranks (0: not a query), with nothing on disk behind it.
    fn ranked(ranks: &[u32]) -> ScoreFolder {
        let null = || File::open("/dev/null").unwrap();
        ScoreFolder {
            dir: PathBuf::from("/nonexistent"),
            name: "ranks".into(),
            record: serde_json::from_value(json!({
                "run_id": "r", "revise": "none", "temperature": 1.0, "beta": null, "scale": 100.0, "top_k": 10,
                "texts": "t", "texts_sha256": [], "videos_sha256": [], "bank": null, "bank_sha256": [],
                "n_texts": ranks.len(), "n_videos": 1000, "outputs": []
            }))
            .unwrap(),
            metrics: None,
            text_ids: (0..ranks.len() as u64).collect(),
            ranks: ranks.to_vec(),
            best_first: Vec::new(),
            worst_first: Vec::new(),
            topk_starts: vec![0; ranks.len() + 1],
            t2v_ranks: null(),
            topk: null(),
        }
    }

    #[test]
    fn changes_fall_in_the_contracts_bins_and_sort_most_changed_first() {
        // Changes (a − b): 0, +1, −1, +2, −2, +9, −9, +10, −10, +99, −99, +100, −100, +500; and two
        // texts that are not queries in one of the folders.
        let a = [5, 2, 1, 3, 1, 10, 1, 11, 1, 100, 1, 101, 1, 501, 0, 4];
        let b = [5, 1, 2, 1, 3, 1, 10, 1, 11, 1, 100, 1, 101, 1, 3, 0];
        let made = Comparison::of(&ranked(&a), &ranked(&b));
        assert_eq!(made.unchanged, 1);
        // ≤ −100, −99…−10, −9…−2, −1, +1, +2…+9, +10…+99, ≥ +100
        assert_eq!(made.histogram, [1, 2, 2, 1, 1, 2, 2, 2]);
        assert_eq!(made.improved, vec![13, 11, 9, 7, 5, 3, 1], "by change, most first");
        assert_eq!(made.worsened, vec![12, 10, 8, 6, 4, 2]);
        let bins = made.bins();
        let labels: Vec<&str> = bins.iter().map(|b| b["label"].as_str().unwrap()).collect();
        assert_eq!(labels, ["≤ −100", "−99…−10", "−9…−2", "−1", "+1", "+2…+9", "+10…+99", "≥ +100"]);
        assert_eq!((&bins[0]["lowest"], &bins[0]["highest"]), (&Value::Null, &json!(-100)));
        assert_eq!((&bins[7]["lowest"], &bins[7]["highest"]), (&json!(100), &Value::Null));
    }
}
