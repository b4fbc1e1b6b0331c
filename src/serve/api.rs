//! The JSON API under `/api/v1/` (contract §8), the one error shape its refusals share, and the
//! router that serves it with the page and the files.
//!
//! Every parameter travels in the query string and is percent-decoded once (ids included: an
//! id holds `/`, `%`, `#`, `?`, `&` or `+` as any other character, written `%XX`); a parameter
//! this API does not define, one given twice, or a value that is not UTF-8 is refused. Lists
//! are paged by `offset` and `limit` (at most [`MAX_PAGE`]), and a ranking goes at most
//! [`MAX_RANKED`] deep: no request makes the service read or send everything.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get};
use serde::Serialize;
use serde_json::{Value, json};

use super::index::Snapshot;
use super::{App, explorer, guard, media, page};
use crate::failure::Failure;
use crate::model::tokenizer::ClipTokenizer;
use crate::search_engine::{EngineHit, Hit, VideoAt, embed_query, hits_of, logit_scale};
use crate::store::{StoreError, TableRows, for_each_batch};

/// The most items one page lists.
pub const MAX_PAGE: usize = 100;
/// Items a page lists unless `limit` says otherwise.
pub const DEFAULT_PAGE: usize = 20;
/// How deep a ranking pages: `offset + limit` at most this.
pub const MAX_RANKED: usize = 1000;
/// How far a list of the index's own rows (the failures table) pages.
pub const MAX_LISTED: usize = u32::MAX as usize;
/// The longest text query, in bytes (CLIP reads 77 tokens of it at most).
pub const MAX_QUERY_BYTES: usize = 1000;
/// The longest id accepted.
pub const MAX_ID_BYTES: usize = 4096;

/// Every path the service answers (all GET, and HEAD): the contract's list (§8), which a test
/// compares with this one, and the router's, which is built from it.
pub const ROUTES: &[&str] = &[
    "/",
    "/page.js",
    "/page.css",
    "/api/v1/search",
    "/api/v1/similar",
    "/api/v1/video",
    "/api/v1/index",
    "/api/v1/runs",
    "/api/v1/failures",
    "/api/v1/thumbnail",
    "/api/v1/media",
    "/api/v1/plots/runs.svg",
    "/api/v1/scores",
    "/api/v1/scores/queries",
    "/api/v1/scores/changes",
    "/api/v1/plots/changes.svg",
];

fn handler(path: &str) -> MethodRouter<Arc<App>> {
    match path {
        "/" => get(page::index),
        "/page.js" => get(page::script),
        "/page.css" => get(page::style),
        "/api/v1/search" => get(search),
        "/api/v1/similar" => get(similar),
        "/api/v1/video" => get(video),
        "/api/v1/index" => get(index_state),
        "/api/v1/runs" => get(runs),
        "/api/v1/failures" => get(failures),
        "/api/v1/thumbnail" => get(media::thumbnail),
        "/api/v1/media" => get(media::media),
        "/api/v1/plots/runs.svg" => get(page::runs_plot),
        "/api/v1/scores" => get(explorer::list),
        "/api/v1/scores/queries" => get(explorer::queries),
        "/api/v1/scores/changes" => get(explorer::changes),
        "/api/v1/plots/changes.svg" => get(page::changes_plot),
        other => unreachable!("{other} is in ROUTES without a handler"),
    }
}

/// The service's router: [`ROUTES`] behind the guard.
pub fn router(app: Arc<App>) -> Router {
    let mut router = Router::new();
    for &path in ROUTES {
        router = router.route(path, handler(path));
    }
    router
        .fallback(|| async { ApiError::not_found("no such page or endpoint") })
        .layer(axum::middleware::from_fn_with_state(Arc::clone(&app), guard::guard))
        .with_state(app)
}

/// A refusal: its status and `{"error": {"code": …, "message": …}}`, the one error shape.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// For a 416: the file's size, which its `Content-Range: bytes */SIZE` states.
    pub content_range: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), content_range: None }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn busy(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy", message)
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let Some(size) = self.content_range {
            let value = HeaderValue::from_str(&format!("bytes */{size}")).expect("ascii");
            response.headers_mut().insert(header::CONTENT_RANGE, value);
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        ApiError::internal(format!("the index cannot be read: {e}"))
    }
}

/// A request's query parameters, decoded once.
pub struct Params(Vec<(String, String)>);

impl Params {
    /// The parameters of `uri`, each one of `allowed` at most once.
    pub fn of(uri: &Uri, allowed: &[&str]) -> Result<Params, ApiError> {
        let mut pairs = Vec::new();
        for pair in uri.query().unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            pairs.push((form_decoded(name)?, form_decoded(value)?));
        }
        for (i, (name, _)) in pairs.iter().enumerate() {
            if !allowed.contains(&name.as_str()) {
                return Err(ApiError::bad_request(format!(
                    "unknown parameter {name:?}; this endpoint takes {}",
                    allowed.join(", ")
                )));
            }
            if pairs[..i].iter().any(|(earlier, _)| earlier == name) {
                return Err(ApiError::bad_request(format!("the parameter {name:?} is given twice")));
            }
        }
        Ok(Params(pairs))
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    pub fn required(&self, name: &str) -> Result<&str, ApiError> {
        self.get(name).ok_or_else(|| ApiError::bad_request(format!("the parameter {name:?} is required")))
    }

    /// A video id: present, not empty, of a bounded length.
    pub fn id(&self) -> Result<&str, ApiError> {
        let id = self.required("id")?;
        if id.is_empty() || id.len() > MAX_ID_BYTES {
            return Err(ApiError::bad_request(format!("an id is 1 to {MAX_ID_BYTES} bytes")));
        }
        Ok(id)
    }

    /// A whole number in `0..=max`, `default` when absent.
    fn count(&self, name: &str, default: usize, max: usize) -> Result<usize, ApiError> {
        let Some(text) = self.get(name) else { return Ok(default) };
        match text.parse::<usize>() {
            Ok(n) if n <= max => Ok(n),
            _ => Err(ApiError::bad_request(format!("{name} must be a whole number from 0 to {max}"))),
        }
    }

    /// `offset` and `limit`, with `offset + limit` at most `deepest`.
    pub fn page(&self, deepest: usize) -> Result<(usize, usize), ApiError> {
        let limit = self.count("limit", DEFAULT_PAGE, MAX_PAGE)?;
        if limit == 0 {
            return Err(ApiError::bad_request(format!("limit must be from 1 to {MAX_PAGE}")));
        }
        let offset = self.count("offset", 0, deepest)?;
        if offset.checked_add(limit).is_none_or(|end| end > deepest) {
            return Err(ApiError::bad_request(format!("offset + limit must be at most {deepest}")));
        }
        Ok((offset, limit))
    }
}

/// A query string's name or value decoded once, as a form's: `+` is a space and `%XX` a byte;
/// a `%` without two hex digits after it, or bytes that are not UTF-8, are refused rather than
/// guessed at.
fn form_decoded(text: &str) -> Result<String, ApiError> {
    let refused = || ApiError::bad_request("the query string is not percent-encoded UTF-8");
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex =
                    bytes.get(i + 1..i + 3).filter(|h| h.iter().all(u8::is_ascii_hexdigit)).ok_or_else(refused)?;
                let hex = std::str::from_utf8(hex).map_err(|_| refused())?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| refused())?);
                i += 2;
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| refused())
}

/// A page of a list.
#[derive(Debug, Serialize)]
pub struct Page<T> {
    pub offset: usize,
    pub limit: usize,
    /// How many items the list has in all (for a ranking: how many it can page through).
    pub total: usize,
    /// Where the next page starts; none after the last.
    pub next_offset: Option<usize>,
    pub items: Vec<T>,
}

impl<T> Page<T> {
    pub fn new(offset: usize, limit: usize, total: usize, items: Vec<T>) -> Page<T> {
        let next_offset = (offset + limit < total).then_some(offset + limit);
        Page { offset, limit, total, next_offset, items }
    }
}

/// Runs blocking work (the model, a scan, a file) off the async threads. The work runs to its
/// end even if the client leaves; what bounds it is the permit it holds (the embeddings') or
/// the scans' bound in [`ranked_blocking`].
pub async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| ApiError::internal(format!("a task failed: {e}")))?
}

/// A scan, [`super::CONCURRENT_SCANS`] at a time (each uses every core), its permit held by the
/// work itself.
async fn ranked_blocking(
    app: &Arc<App>,
    work: impl FnOnce() -> Result<Page<Hit>, ApiError> + Send + 'static,
) -> Result<Page<Hit>, ApiError> {
    let permit = Arc::clone(&app.scans).acquire_owned().await.map_err(|_| ApiError::busy("shutting down"))?;
    blocking(move || {
        let _permit = permit;
        work()
    })
    .await
}

/// The video `id` in the snapshot, or the 404 that says it is not indexed.
pub fn find(snapshot: &Snapshot, id: &str) -> Result<VideoAt, ApiError> {
    snapshot.engine.find(id).ok_or_else(|| ApiError::not_found(format!("no video {id:?} in the index")))
}

/// A ranking's page, searched `offset + limit` deep (plus `skip_id`, left out, if given).
fn ranked(
    snapshot: &Snapshot,
    query: &[f32],
    offset: usize,
    limit: usize,
    skip_id: Option<&str>,
) -> Result<Page<Hit>, ApiError> {
    let engine = &snapshot.engine;
    let mut top = engine.rank(query, offset + limit + usize::from(skip_id.is_some()));
    top.retain(|ranked| Some(ranked.video_id) != skip_id);
    top.truncate(offset + limit);
    // Only the page's best frames are read.
    let page: Vec<EngineHit<'_>> = top
        .iter()
        .skip(offset)
        .map(|r| Ok(EngineHit { video_id: r.video_id, cosine: r.cosine, best_frame: engine.best_frame(query, r.at)? }))
        .collect::<Result<_, StoreError>>()?;
    let mut items = hits_of(page, logit_scale(&snapshot.manifest));
    for hit in &mut items {
        hit.rank += offset;
    }
    let videos = engine.videos() - usize::from(skip_id.is_some());
    Ok(Page::new(offset, limit, videos.min(MAX_RANKED), items))
}

async fn search(State(app): State<Arc<App>>, uri: Uri) -> Result<Json<Value>, ApiError> {
    let params = Params::of(&uri, &["q", "offset", "limit"])?;
    let text = params.required("q")?.to_string();
    if text.len() > MAX_QUERY_BYTES {
        return Err(ApiError::bad_request(format!("a query of at most {MAX_QUERY_BYTES} bytes")));
    }
    if ClipTokenizer::is_blank(&text) {
        return Err(ApiError::bad_request("the query is empty"));
    }
    let (offset, limit) = params.page(MAX_RANKED)?;
    let query = query_embedding(&app, &text).await?;
    let snapshot = app.live.snapshot();
    let page = ranked_blocking(&app, move || ranked(&snapshot, &query, offset, limit, None)).await?;
    Ok(Json(json!({"query": {"text": text}, "page": page})))
}

/// The text's embedding: from the cache (a user pages through one query, a page asks again),
/// or made by the model, [`super::CONCURRENT_EMBEDDINGS`] at a time.
async fn query_embedding(app: &Arc<App>, text: &str) -> Result<Arc<Vec<f32>>, ApiError> {
    if let Some(cached) = app.queries.lock().unwrap_or_else(PoisonError::into_inner).get(text) {
        return Ok(Arc::clone(cached));
    }
    // The permit goes with the work: a client that leaves does not free it while the model runs.
    let permit = Arc::clone(&app.embeddings).acquire_owned().await.map_err(|_| ApiError::busy("shutting down"))?;
    let embedding = {
        let (app, text) = (Arc::clone(app), text.to_string());
        blocking(move || {
            let _permit = permit;
            embed_query(&app.clip, &text).map_err(|e| ApiError::internal(e.to_string()))
        })
        .await?
    };
    let embedding = Arc::new(embedding);
    app.queries.lock().unwrap_or_else(PoisonError::into_inner).put(text.to_string(), Arc::clone(&embedding));
    Ok(embedding)
}

async fn similar(State(app): State<Arc<App>>, uri: Uri) -> Result<Json<Value>, ApiError> {
    let params = Params::of(&uri, &["id", "offset", "limit"])?;
    let id = params.id()?.to_string();
    let (offset, limit) = params.page(MAX_RANKED)?;
    let snapshot = app.live.snapshot();
    let at = find(&snapshot, &id)?;
    let query = snapshot.engine.video_embedding(at);
    let skip = id.clone();
    let page = ranked_blocking(&app, move || ranked(&snapshot, &query, offset, limit, Some(&skip))).await?;
    Ok(Json(json!({"query": {"video_id": id}, "page": page})))
}

async fn video(State(app): State<Arc<App>>, uri: Uri) -> Result<Json<Value>, ApiError> {
    let params = Params::of(&uri, &["id"])?;
    let id = params.id()?.to_string();
    let snapshot = app.live.snapshot();
    let at = find(&snapshot, &id)?;
    blocking(move || {
        let record = snapshot.video(at)?;
        let frame_times = snapshot.engine.frame_times(at)?;
        let file = media::recorded_file(&record).map(|_| "unchanged").unwrap_or_else(|e| e.code);
        let mut value = serde_json::to_value(&record).map_err(|e| ApiError::internal(e.to_string()))?;
        value["frame_times"] = json!(frame_times);
        value["media_type"] = json!(media::media_type(&record.path));
        value["file"] = json!(file);
        Ok(Json(value))
    })
    .await
}

async fn index_state(State(app): State<Arc<App>>, uri: Uri) -> Result<Json<Value>, ApiError> {
    Params::of(&uri, &[])?;
    let snapshot = app.live.snapshot();
    let m = &snapshot.manifest;
    let text_sets: Vec<Value> = m
        .text_sets()
        .into_iter()
        .map(|name| json!({"name": name, "texts": m.rows(&format!("texts/{name}"))}))
        .collect();
    Ok(Json(json!({
        "format_version": m.format_version,
        "videos": m.rows("videos"),
        "frames": m.rows("frames"),
        "failures": m.rows("failures"),
        "text_sets": text_sets,
        "model": m.model,
        "sampling": m.sampling,
        "preprocess": m.preprocess,
        "committed_at_us": m.committed_at_us,
        "last_run": m.last_run,
        "shard": m.shard,
        "merged": m.merged,
        "suspects": m.suspects.len(),
        "reloads": app.live.reloads(),
        "reload_error": app.live.last_error(),
        "thumbnail_cache_bytes": app.thumbnails.cached_bytes(),
    })))
}

async fn failures(State(app): State<Arc<App>>, uri: Uri) -> Result<Json<Value>, ApiError> {
    let params = Params::of(&uri, &["offset", "limit"])?;
    let (offset, limit) = params.page(MAX_LISTED)?;
    let first = app.live.snapshot();
    let page = blocking(move || match failures_page(&first, offset, limit) {
        // A commit since the snapshot was taken may have collected its failures shards: the
        // newer snapshot lists the ones to read.
        Err(StoreError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            app.live.refresh();
            Ok(failures_page(&app.live.snapshot(), offset, limit)?)
        }
        other => Ok(other?),
    })
    .await?;
    Ok(Json(json!({"page": page})))
}

/// One page of the failures table, reading only the shards that hold it.
fn failures_page(snapshot: &Snapshot, offset: usize, limit: usize) -> Result<Page<Value>, StoreError> {
    let shards = snapshot.manifest.shards("failures");
    let total = shards.iter().map(|s| s.rows as usize).sum();
    let mut items = Vec::new();
    let mut start = 0;
    for shard in shards {
        let rows = shard.rows as usize;
        if start + rows <= offset || start >= offset + limit {
            start += rows;
            continue;
        }
        let mut row = start;
        for_each_batch(&snapshot.index, shard, |batch| {
            let (first, n) = (row, batch.num_rows());
            row += n;
            if first + n <= offset || first >= offset + limit {
                return Ok(());
            }
            for (i, failure) in Failure::from_batch(batch)?.into_iter().enumerate() {
                if (offset..offset + limit).contains(&(first + i)) {
                    items.push(json!({
                        "root": failure.root,
                        "path": failure.path,
                        "stage": failure.stage.as_str(),
                        "kind": failure.kind.as_str(),
                        "message": failure.message,
                        "first_seen_us": failure.first_seen_us,
                        "attempts": failure.attempts,
                    }));
                }
            }
            Ok(())
        })?;
        start += rows;
    }
    Ok(Page::new(offset, limit, total, items))
}

/// What a run report says of its run, for the list and the plots.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub tag: String,
    pub started_at_us: i64,
    pub wall_s: f64,
    /// Files decoded and embedded: new and changed.
    pub videos: u64,
    pub reused: u64,
    pub unchanged: u64,
    pub removed: u64,
    /// Files that failed, by the run's count of every kind.
    pub failures: u64,
    pub frames: u64,
    pub frames_per_s: f64,
    pub videos_per_s: f64,
    pub committed: bool,
    pub interrupted: Option<String>,
}

/// A run report larger than this is not read (a report is some kilobytes).
const MAX_REPORT_BYTES: u64 = 16 << 20;
/// The runs a list or a plot reads: the latest ones.
pub const MAX_RUNS: usize = 1000;

/// A run report as last read: its path, size and modification time.
type ReportKey = (std::path::PathBuf, u64, i64);

/// The index's run reports (`runs/TAG.json`) summarised, each read once while it is unchanged.
#[derive(Default)]
pub struct RunSummaries {
    read: Mutex<HashMap<ReportKey, RunSummary>>,
}

impl RunSummaries {
    /// The latest [`MAX_RUNS`] runs of the snapshot's index, newest first.
    pub fn of(&self, snapshot: &Snapshot) -> Vec<RunSummary> {
        let folder = snapshot.index.join("runs");
        let Ok(entries) = std::fs::read_dir(&folder) else { return Vec::new() };
        let mut reports: Vec<(u64, std::path::PathBuf)> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let tag = name.strip_suffix(".json")?.parse::<u64>().ok()?;
                Some((tag, e.path()))
            })
            .collect();
        reports.sort_by_key(|r| std::cmp::Reverse(r.0));
        reports.truncate(MAX_RUNS);
        let mut read = self.read.lock().unwrap_or_else(PoisonError::into_inner);
        // Reports rewritten or removed since leave the cache now and then.
        if read.len() > 2 * MAX_RUNS {
            read.clear();
        }
        let mut out = Vec::new();
        for (tag, path) in reports {
            let Ok(metadata) = std::fs::metadata(&path) else { continue };
            if metadata.len() > MAX_REPORT_BYTES {
                continue;
            }
            let key = (path.clone(), metadata.len(), crate::walk::mtime_ns(&metadata));
            if let Some(summary) = read.get(&key) {
                out.push(summary.clone());
                continue;
            }
            let Some(report) = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<Value>(&b).ok()) else {
                continue;
            };
            let summary = RunSummary::of(tag, &report);
            read.insert(key, summary.clone());
            out.push(summary);
        }
        out
    }
}

impl RunSummary {
    /// What an ingest run report (`ingest/report.rs`) says of its run.
    fn of(tag: u64, report: &Value) -> RunSummary {
        let number = |name: &str| report.get(name).and_then(Value::as_f64).unwrap_or(0.0);
        RunSummary {
            tag: tag.to_string(),
            started_at_us: number("started_at_us") as i64,
            wall_s: number("wall_s"),
            videos: (number("new") + number("changed")) as u64,
            reused: number("reused") as u64,
            unchanged: number("unchanged") as u64,
            removed: number("removed") as u64,
            failures: report
                .get("failed")
                .and_then(Value::as_object)
                .map_or(0, |kinds| kinds.values().filter_map(Value::as_u64).sum()),
            frames: number("frames") as u64,
            frames_per_s: number("frames_per_s"),
            videos_per_s: number("videos_per_s"),
            committed: report.get("committed").and_then(Value::as_bool).unwrap_or(false),
            interrupted: report.get("interrupted").and_then(Value::as_str).map(str::to_string),
        }
    }
}

async fn runs(State(app): State<Arc<App>>, uri: Uri) -> Result<Json<Value>, ApiError> {
    let params = Params::of(&uri, &["offset", "limit"])?;
    let (offset, limit) = params.page(MAX_RUNS)?;
    let snapshot = app.live.snapshot();
    blocking(move || {
        let summaries = app.runs.of(&snapshot);
        let total = summaries.len();
        let items: Vec<RunSummary> = summaries.into_iter().skip(offset).take(limit).collect();
        let note = match &snapshot.manifest.merged {
            Some(merged) => Some(format!(
                "a merged index has no ingest runs of its own: each of its {} parts keeps its run reports in its own \
                 runs/ folder ({})",
                merged.count,
                merged.parts.iter().map(|p| p.path.as_str()).collect::<Vec<_>>().join(", ")
            )),
            None if total == 0 => Some("no run reports in this index".to_string()),
            None => None,
        };
        Ok(Json(json!({"page": Page::new(offset, limit, total, items), "note": note})))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_value_is_decoded_once_and_strictly() {
        assert_eq!(form_decoded("a+b%20c%2Bd%25E9").unwrap(), "a b c+d%E9");
        assert_eq!(form_decoded("caf%C3%A9").unwrap(), "café");
        for bad in ["%", "%4", "%zz", "%+1", "%FF", "%C3"] {
            assert!(form_decoded(bad).is_err(), "{bad}");
        }
    }
}
