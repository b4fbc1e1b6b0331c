//! The files the service sends: an indexed video itself (with HTTP range requests, so a browser
//! can seek) and thumbnails of its frames (`thumbnails.rs`).
//!
//! A file is reachable only as the recorded root and path of a `videos` row of the current
//! snapshot, found by the video's id, and only while its size and modification time are still
//! the row's: no path from a request ever reaches the file system, and a file replaced since it
//! was indexed is refused (409), not sent as if it were what the index describes.

use std::fs::File;
use std::io::SeekFrom;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::App;
use super::api::{ApiError, Params, blocking, find};
use super::thumbnails::{ThumbnailError, ThumbnailKey};
use crate::store::VideoRecord;
use crate::walk::unescape_path_bytes;

/// The latest time a thumbnail may be asked for, in seconds (about 115 days).
const MAX_TIME_S: f64 = 1e7;

/// The media type a browser is told for a video, by its extension (the walk's list).
pub fn media_type(path: &str) -> &'static str {
    let extension = path.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
    match extension.as_str() {
        "mp4" | "m4v" => "video/mp4",
        "mov" => "video/quicktime",
        "webm" => "video/webm",
        "mkv" => "video/x-matroska",
        "avi" => "video/x-msvideo",
        "mpg" | "mpeg" | "m2v" => "video/mpeg",
        "ts" | "m2ts" | "mts" => "video/mp2t",
        "wmv" | "asf" => "video/x-ms-asf",
        "flv" => "video/x-flv",
        "ogv" => "video/ogg",
        "3gp" => "video/3gpp",
        "3g2" => "video/3gpp2",
        "mxf" => "application/mxf",
        _ => "application/octet-stream",
    }
}

/// The file a `videos` row records, open, if it is still the file the row describes. Its
/// root and path are the walk's names: bytes that are not UTF-8 were written `%XX`, so the name
/// as written and the bytes it stands for are both tried.
pub fn recorded_file(record: &VideoRecord) -> Result<(File, PathBuf), ApiError> {
    let relative = Path::new(&record.path);
    if record.path.is_empty() || !relative.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(ApiError::not_found("the index records no servable path for this video"));
    }
    let roots = [PathBuf::from(&record.root), PathBuf::from(unescape_path_bytes(&record.root))];
    let paths = [PathBuf::from(&record.path), PathBuf::from(unescape_path_bytes(&record.path))];
    let mut changed = false;
    for root in &roots {
        for path in &paths {
            let candidate = root.join(path);
            // Only a regular file is opened, and without waiting: a FIFO put in its place, or a
            // device, must not hold the request (O_NONBLOCK changes nothing for a file's reads).
            if !std::fs::metadata(&candidate).is_ok_and(|m| m.is_file()) {
                continue;
            }
            let opened = File::options().read(true).custom_flags(libc::O_NONBLOCK).open(&candidate);
            let Ok(file) = opened else { continue };
            let Ok(metadata) = file.metadata() else { continue };
            if metadata.is_file()
                && metadata.len() == record.size_bytes
                && crate::walk::mtime_ns(&metadata) == record.mtime_ns
            {
                return Ok((file, candidate));
            }
            changed = true;
        }
    }
    if changed {
        Err(ApiError::new(
            StatusCode::CONFLICT,
            "changed",
            "the file has changed since it was indexed; the next ingest will index it again",
        ))
    } else {
        Err(ApiError::not_found("the indexed file is no longer there"))
    }
}

/// The video `id` of the current snapshot: its row and its file, open, unchanged since indexed.
async fn indexed_file(app: &App, id: &str) -> Result<(VideoRecord, File, PathBuf), ApiError> {
    let snapshot = app.live.snapshot();
    let at = find(&snapshot, id)?;
    blocking(move || {
        let record = snapshot.video(at)?;
        let (file, path) = recorded_file(&record)?;
        Ok((record, file, path))
    })
    .await
}

/// `GET /api/v1/thumbnail?id=ID&t=SECONDS`: the frame on screen at `t` as a JPEG.
pub async fn thumbnail(State(app): State<Arc<App>>, uri: Uri) -> Result<Response, ApiError> {
    let params = Params::of(&uri, &["id", "t"])?;
    let id = params.id()?.to_string();
    let time_s = match params.get("t").map(str::parse::<f64>) {
        None => 0.0,
        Some(Ok(t)) if t.is_finite() && (0.0..=MAX_TIME_S).contains(&t) => t,
        Some(_) => return Err(ApiError::bad_request(format!("t must be a time in seconds from 0 to {MAX_TIME_S}"))),
    };
    let (record, _, path) = indexed_file(&app, &id).await?;
    let key = ThumbnailKey {
        path,
        size_bytes: record.size_bytes,
        mtime_ns: record.mtime_ns,
        time_ms: (time_s * 1000.0).round() as u64,
    };
    let picture = match app.thumbnails.cached(&key) {
        Some(picture) => picture,
        None => app.thumbnails.make(key).await.map_err(|e| match e {
            ThumbnailError::Busy => ApiError::busy("every thumbnail decoder is busy; try again"),
            ThumbnailError::Failed(rejection) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "decode_failed",
                format!("{}: {}", rejection.kind.as_str(), rejection.message),
            ),
            ThumbnailError::WorkerDied(why) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "decode_failed", why),
            ThumbnailError::TimedOut => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "decode_failed",
                format!("no frame within {} s", super::thumbnails::THUMBNAIL_TIMEOUT.as_secs()),
            ),
        })?,
    };
    let mut response = Body::from(picture.jpeg.clone()).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("image/jpeg"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, max-age=3600"));
    headers.insert("x-frame-time", HeaderValue::from_str(&format!("{:.6}", picture.time_s)).expect("a number"));
    Ok(response)
}

/// `GET /api/v1/media?id=ID`: the video file, whole or one byte range of it.
pub async fn media(
    State(app): State<Arc<App>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let params = Params::of(&uri, &["id"])?;
    let id = params.id()?.to_string();
    let (record, file, _) = indexed_file(&app, &id).await?;
    let size = record.size_bytes;
    // A range is of bytes, and of a GET; anything else is ignored and the whole file sent.
    let range = match headers.get(header::RANGE) {
        Some(value) if method == Method::GET && value.as_bytes().starts_with(b"bytes=") => {
            Some(byte_range(value, size)?)
        }
        _ => None,
    };
    let (start, length) = range.unwrap_or((0, size));
    let mut file = tokio::fs::File::from_std(file);
    file.seek(SeekFrom::Start(start)).await.map_err(|e| ApiError::internal(format!("cannot read the file: {e}")))?;
    let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(file.take(length), 1 << 16));
    let mut response = body.into_response();
    let out = response.headers_mut();
    out.insert(header::CONTENT_TYPE, HeaderValue::from_static(media_type(&record.path)));
    out.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    out.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    out.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, no-cache"));
    if range.is_some() {
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
        let content_range = format!("bytes {start}-{}/{size}", start + length - 1);
        response.headers_mut().insert(header::CONTENT_RANGE, HeaderValue::from_str(&content_range).expect("ascii"));
    }
    Ok(response)
}

/// The one range a `Range` header asks of a file of `size` bytes, as `(start, length)`. Several
/// ranges, or one outside the file, are refused (416): a browser asks for one.
fn byte_range(value: &HeaderValue, size: u64) -> Result<(u64, u64), ApiError> {
    let unsatisfiable = |why: &str| {
        let mut e = ApiError::new(StatusCode::RANGE_NOT_SATISFIABLE, "range_not_satisfiable", why.to_string());
        e.message.push_str(&format!(" (the file has {size} bytes)"));
        e.content_range = Some(size);
        e
    };
    let text = value.to_str().map_err(|_| unsatisfiable("the Range header is not ASCII"))?;
    let parsed = http_range_header::parse_range_header_with_max_ranges(text, std::num::NonZeroUsize::MIN)
        .map_err(|_| unsatisfiable("an unreadable Range header"))?;
    let ranges = parsed.validate(size).map_err(|_| unsatisfiable("a range outside the file"))?;
    match ranges.as_slice() {
        [range] => Ok((*range.start(), range.end() - range.start() + 1)),
        _ => Err(unsatisfiable("one range at a time")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_is_one_slice_of_the_file() {
        let range = |text: &str| byte_range(&HeaderValue::from_str(text).unwrap(), 1000);
        assert_eq!(range("bytes=0-99").unwrap(), (0, 100));
        assert_eq!(range("bytes=900-").unwrap(), (900, 100));
        assert_eq!(range("bytes=-10").unwrap(), (990, 10));
        assert_eq!(range("bytes=990-5000").unwrap(), (990, 10), "an end past the file is the file's end");
        for bad in ["bytes=1000-", "bytes=0-1,5-6", "bytes=5-1", "bytes=x-y", "bytes="] {
            assert_eq!(range(bad).unwrap_err().status, StatusCode::RANGE_NOT_SATISFIABLE, "{bad}");
        }
    }

    #[test]
    fn media_types_follow_the_extension() {
        assert_eq!(media_type("a/b.MP4"), "video/mp4");
        assert_eq!(media_type("clip.webm"), "video/webm");
        assert_eq!(media_type("x.avi"), "video/x-msvideo");
        assert_eq!(media_type("noext"), "application/octet-stream");
    }
}
