//! `vtr-index serve` over real HTTP on loopback: the API against `search` and a brute-force
//! reference, ids of any bytes, the files it serves and refuses, the Host and token checks, the
//! one error shape for malformed requests, a writer's commit picked up while it serves, a
//! decoder crash contained, and a load of mixed and hostile requests.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::{
    CLIPS, Dir, ReferenceVideo, SearchHit, TestCommand, assert_search_matches, corpus, fixtures, ingest_command, sample,
};
use vtr_index::store::{Manifest, VideoRow, read_table};

/// A running `serve`, killed when dropped.
pub struct Service {
    child: Child,
    pub port: u16,
    /// The first line it printed: the URL (with `?token=` when it requires one).
    pub url: String,
}

impl Service {
    pub fn start(index: &Path, extra: &[&str]) -> Service {
        Service::start_with(index, extra, &[])
    }

    pub fn start_with(index: &Path, extra: &[&str], env: &[(&str, &str)]) -> Service {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_vtr-index"));
        command.args(["serve", "--bind", "127.0.0.1:0", "--poll-seconds", "0.2", "--index"]).arg(index).args(extra);
        for (key, value) in env {
            command.env(key, value);
        }
        command.stdout(Stdio::piped()).stderr(Stdio::inherit());
        Service::of(command.spawn().expect("serve starts"))
    }

    /// The service `child` runs, once it has printed where it listens.
    pub fn of(mut child: Child) -> Service {
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let url = line.split_whitespace().find(|w| w.starts_with("http://")).unwrap_or_else(|| {
            let _ = child.kill();
            panic!("serve printed no URL: {line:?}")
        });
        let port = url.trim_start_matches("http://").split(['/', ':']).nth(1).unwrap().parse().unwrap();
        Service { child, port, url: url.to_string() }
    }

    /// `GET path` with this service's own Host.
    pub fn get(&self, path: &str) -> Response {
        self.request(&format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\r\n", self.port))
    }

    pub fn get_json(&self, path: &str) -> Value {
        let response = self.get(path);
        assert_eq!(response.status, 200, "{path}: {}", response.text());
        serde_json::from_slice(&response.body).unwrap()
    }

    /// Sends `raw` as it is and reads the answer to its end.
    pub fn request(&self, raw: &str) -> Response {
        self.request_bytes(raw.as_bytes())
    }

    pub fn request_bytes(&self, raw: &[u8]) -> Response {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        stream.write_all(raw).unwrap();
        let mut bytes = Vec::new();
        let _ = stream.read_to_end(&mut bytes);
        Response::parse(&bytes)
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP answer as read off the socket.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl Response {
    fn parse(bytes: &[u8]) -> Response {
        let end = bytes.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or_else(|| {
            panic!("no complete answer: {:?}", String::from_utf8_lossy(bytes));
        });
        let head = String::from_utf8_lossy(&bytes[..end]);
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        Response { status, headers, body: bytes[end + 4..].to_vec() }
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.text()))
    }

    /// The contract's one error shape, with `code`.
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "{}", self.text());
        let body = self.json();
        assert_eq!(body["error"]["code"], code, "{body}");
        assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    }

    /// The headers every answer carries, and none that would let another origin read it.
    pub fn assert_safe_headers(&self) {
        let csp = self.headers.get("content-security-policy").expect("a content security policy");
        assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'"), "{csp}");
        assert_eq!(self.headers.get("x-content-type-options").map(String::as_str), Some("nosniff"));
        assert_eq!(self.headers.get("cross-origin-resource-policy").map(String::as_str), Some("same-origin"));
        assert!(!self.headers.keys().any(|k| k.starts_with("access-control-")), "{:?}", self.headers);
    }
}

/// Every byte but the unreserved ones as `%XX`: how a browser's `encodeURIComponent` sends an id.
pub fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An index of `clips` from the fixtures (under `videos/` in `dir`).
fn index_of(dir: &Dir, clips: &[&str]) -> (PathBuf, PathBuf) {
    let root = corpus(dir, "videos", clips);
    let index = dir.join("index");
    ingest_command(&index, &root, &[]).expect_code(0);
    (root, index)
}

/// Each video's f32 embedding and frames, from the tables.
fn reference(index: &Path, query: &[f32], scale: f64) -> Vec<ReferenceVideo> {
    let manifest = Manifest::load(index).unwrap().unwrap();
    let videos: Vec<VideoRow> = read_table(index, manifest.shards("videos")).unwrap();
    let frames: Vec<vtr_index::store::FrameRow> = read_table(index, manifest.shards("frames")).unwrap();
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum::<f64>();
    videos
        .iter()
        .map(|v| {
            let mut own: Vec<&vtr_index::store::FrameRow> =
                frames.iter().filter(|f| f.video_id == v.video_id).collect();
            own.sort_by_key(|f| f.frame_index);
            ReferenceVideo {
                video_id: v.video_id.clone(),
                score: scale * dot(&v.embedding, query),
                frames: own.iter().map(|f| (dot(&f.embedding, query), f.pts_s)).collect(),
            }
        })
        .collect()
}

fn hits(page: &Value) -> Vec<SearchHit> {
    page["page"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| SearchHit {
            video_id: h["video_id"].as_str().unwrap().to_string(),
            score: h["score"].as_f64().unwrap(),
            best_frame_s: h["best_frame_s"].as_f64(),
        })
        .collect()
}

fn scale_of(index: &Path) -> f64 {
    f64::from(Manifest::load(index).unwrap().unwrap().model.logit_scale).exp()
}

#[test]
fn the_api_answers_a_query_as_search_does_and_pages_it() {
    let dir = Dir::new();
    let (_, index) = index_of(&dir, &CLIPS);
    let service = Service::start(&index, &[]);
    let (stdout, _) =
        TestCommand::new(&["search", "a red square", "-k", "5", "--json", "--index"]).arg(&index).expect_code(0);
    let want: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let whole = service.get_json("/api/v1/search?q=a+red%20square&limit=5");
    assert_eq!(whole["query"]["text"], "a red square", "`+` is a space in a query string");
    assert_eq!(whole["page"]["items"].as_array().unwrap(), &want, "the API's hits are search's");
    assert_eq!(whole["page"]["total"], 5);
    assert_eq!(whole["page"]["next_offset"], Value::Null);

    let first = service.get_json("/api/v1/search?q=a%20red%20square&limit=2");
    let second = service.get_json("/api/v1/search?q=a%20red%20square&offset=2&limit=2");
    assert_eq!(first["page"]["next_offset"], 2);
    let paged: Vec<Value> =
        [&first, &second].iter().flat_map(|p| p["page"]["items"].as_array().unwrap().clone()).collect();
    assert_eq!(paged, want[..4], "pages are slices of one ranking");
}

#[test]
fn more_like_this_ranks_the_other_videos_by_their_cosine_with_the_video() {
    let dir = Dir::new();
    let (_, index) = index_of(&dir, &CLIPS);
    let service = Service::start(&index, &[]);
    let manifest = Manifest::load(&index).unwrap().unwrap();
    let videos: Vec<VideoRow> = read_table(&index, manifest.shards("videos")).unwrap();
    let subject = videos.iter().find(|v| v.video_id == "vfr_h264").unwrap();
    // The query is the video's embedding as its segment holds it: rounded to f16, normalised.
    let rounded: Vec<f32> = subject.embedding.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect();
    let norm = rounded.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let query: Vec<f32> = rounded.iter().map(|&x| (f64::from(x) / norm) as f32).collect();
    let scale = scale_of(&index);
    let mut want = reference(&index, &query, scale);
    want.retain(|v| v.video_id != "vfr_h264");

    let page = service.get_json("/api/v1/similar?id=vfr_h264&limit=10");
    assert_eq!(page["page"]["total"], CLIPS.len() - 1);
    let got = hits(&page);
    assert!(got.iter().all(|h| h.video_id != "vfr_h264"), "the video itself is left out");
    assert_search_matches(&got, &want, CLIPS.len() - 1, scale);
    let ranks: Vec<u64> =
        page["page"]["items"].as_array().unwrap().iter().map(|h| h["rank"].as_u64().unwrap()).collect();
    assert_eq!(ranks, (1..CLIPS.len() as u64).collect::<Vec<_>>());
    service.get("/api/v1/similar?id=nothing-of-that-name").assert_error(404, "not_found");
}

#[test]
fn ids_of_any_bytes_reach_their_video_decoded_once() {
    use std::os::unix::ffi::OsStrExt;
    let dir = Dir::new();
    let root = dir.join("videos");
    let names: [&[u8]; 5] = [
        b"odd/a%b#c?d&e+f g.mp4",
        b"odd/caf\xe9 100%.mp4",
        b"<script>alert(1)</script>.mp4",
        b"odd/%41literal.webm",
        b"plain.avi",
    ];
    let sources = ["short_h264.mp4", "vfr_h264.mp4", "rotated90_h264.mp4", "mandelbrot_vp9.webm", "bars_mpeg4.avi"];
    for (name, source) in names.iter().zip(sources) {
        let path = root.join(std::ffi::OsStr::from_bytes(name));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::copy(fixtures().join("videos").join(source), &path).unwrap();
    }
    let index = dir.join("index");
    ingest_command(&index, &root, &[]).expect_code(0);
    let service = Service::start(&index, &[]);
    let ids = ["odd/a%b#c?d&e+f g", "odd/caf%E9 100%", "<script>alert(1)</script>", "odd/%41literal", "plain"];
    for ((id, name), source) in ids.iter().zip(names).zip(sources) {
        let video = service.get_json(&format!("/api/v1/video?id={}", encode(id)));
        assert_eq!(video["video_id"], *id);
        assert_eq!(video["file"], "unchanged", "{id}: its file is found by its real bytes");
        let media = service.get(&format!("/api/v1/media?id={}", encode(id)));
        assert_eq!(media.status, 200, "{id}: {}", media.text());
        assert_eq!(media.body, std::fs::read(root.join(std::ffi::OsStr::from_bytes(name))).unwrap(), "{id}");
        assert_eq!(media.body, std::fs::read(fixtures().join("videos").join(source)).unwrap());
        let thumb = service.get(&format!("/api/v1/thumbnail?id={}&t=0", encode(id)));
        assert_eq!(thumb.status, 200, "{id}: {}", thumb.text());
        assert_eq!(&thumb.body[..3], b"\xff\xd8\xff", "{id}: a JPEG");
    }
    // Decoded once: `%2541` is the text `%41`, never the byte it would stand for decoded twice.
    service.get("/api/v1/video?id=odd%2FA").assert_error(404, "not_found");
    // A `+` sent as it is means a space, as in every query string.
    service.get("/api/v1/video?id=odd%2Fa%25b%23c%3Fd%26e+f+g").assert_error(404, "not_found");
}

#[test]
fn only_a_listed_unchanged_file_is_served_and_ranges_are_bounded() {
    let dir = Dir::new();
    let (root, index) = index_of(&dir, &["short_h264.mp4", "vfr_h264.mp4", "bars_mpeg4.avi"]);
    let service = Service::start(&index, &[]);
    let file = std::fs::read(root.join("vfr_h264.mp4")).unwrap();

    let part = service.request(
        "GET /api/v1/media?id=vfr_h264 HTTP/1.1\r\nHost: localhost\r\nRange: bytes=100-199\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(part.status, 206, "{}", part.text());
    assert_eq!(part.headers["content-range"], format!("bytes 100-199/{}", file.len()));
    assert_eq!(part.headers["accept-ranges"], "bytes");
    assert_eq!(part.headers["content-type"], "video/mp4");
    assert_eq!(part.body, file[100..200]);
    let tail = service.request(
        "GET /api/v1/media?id=vfr_h264 HTTP/1.1\r\nHost: localhost\r\nRange: bytes=-10\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(tail.body, file[file.len() - 10..]);
    for range in ["bytes=0-1,5-6", "bytes=99999999-", "bytes=5-1"] {
        let refused = service.request(&format!(
            "GET /api/v1/media?id=vfr_h264 HTTP/1.1\r\nHost: localhost\r\nRange: {range}\r\nConnection: close\r\n\r\n"
        ));
        refused.assert_error(416, "range_not_satisfiable");
        assert_eq!(refused.headers["content-range"], format!("bytes */{}", file.len()));
    }
    // A range of another unit is ignored, as HTTP says: the whole file.
    let other_unit = service.request(
        "GET /api/v1/media?id=vfr_h264 HTTP/1.1\r\nHost: localhost\r\nRange: pages=1-2\r\nConnection: close\r\n\r\n",
    );
    assert_eq!((other_unit.status, other_unit.body.len()), (200, file.len()));
    // HEAD: a range is ignored; the length is the file's.
    let head = service.request(
        "HEAD /api/v1/media?id=vfr_h264 HTTP/1.1\r\nHost: localhost\r\nRange: bytes=0-9\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(head.status, 200);
    assert_eq!(head.headers["content-length"], file.len().to_string());
    assert!(head.body.is_empty());

    // Paths never come from a request: these are ids the index does not have.
    for id in ["../../../../etc/passwd", "/etc/passwd", "vfr_h264.mp4", "videos/vfr_h264", "%2e%2e%2findex%2fmanifest"]
    {
        service.get(&format!("/api/v1/media?id={}", encode(id))).assert_error(404, "not_found");
    }
    service.get("/api/v1/media/../../manifest.json").assert_error(404, "not_found");
    service.get("/index/manifest.json").assert_error(404, "not_found");

    // A file changed since it was indexed is not sent as if it were the indexed one.
    let touched = std::fs::File::options().write(true).open(root.join("short_h264.mp4")).unwrap();
    touched.set_modified(std::time::SystemTime::now() + Duration::from_secs(5)).unwrap();
    service.get("/api/v1/media?id=short_h264").assert_error(409, "changed");
    service.get("/api/v1/thumbnail?id=short_h264&t=0").assert_error(409, "changed");
    assert_eq!(service.get_json("/api/v1/video?id=short_h264")["file"], "changed");
    std::fs::remove_file(root.join("bars_mpeg4.avi")).unwrap();
    service.get("/api/v1/media?id=bars_mpeg4").assert_error(404, "not_found");
    assert_eq!(service.get_json("/api/v1/video?id=bars_mpeg4")["file"], "not_found");
}

#[test]
fn malformed_requests_get_a_4xx_with_the_one_error_shape() {
    let dir = Dir::new();
    let (_, index) = index_of(&dir, &["short_h264.mp4", "vfr_h264.mp4"]);
    let service = Service::start(&index, &[]);
    let long_query = format!("/api/v1/search?q={}", "a".repeat(1001));
    let cases: Vec<(&str, u16, &str)> = vec![
        ("/api/v1/search?q=%FF", 400, "bad_request"),
        ("/api/v1/search?q=%", 400, "bad_request"),
        ("/api/v1/search?q=dog&bogus=1", 400, "bad_request"),
        ("/api/v1/search?q=dog&q=cat", 400, "bad_request"),
        ("/api/v1/search", 400, "bad_request"),
        ("/api/v1/search?q=%20%20", 400, "bad_request"),
        ("/api/v1/search?q=dog&limit=0", 400, "bad_request"),
        ("/api/v1/search?q=dog&limit=101", 400, "bad_request"),
        ("/api/v1/search?q=dog&limit=-1", 400, "bad_request"),
        ("/api/v1/search?q=dog&limit=abc", 400, "bad_request"),
        ("/api/v1/search?q=dog&offset=990&limit=20", 400, "bad_request"),
        ("/api/v1/search?q=dog&offset=99999999999999999999999", 400, "bad_request"),
        (&long_query, 400, "bad_request"),
        ("/api/v1/video", 400, "bad_request"),
        ("/api/v1/video?id=", 400, "bad_request"),
        ("/api/v1/video?id=nope", 404, "not_found"),
        ("/api/v1/thumbnail?id=short_h264&t=NaN", 400, "bad_request"),
        ("/api/v1/thumbnail?id=short_h264&t=-1", 400, "bad_request"),
        ("/api/v1/thumbnail?id=short_h264&t=1e300", 400, "bad_request"),
        ("/api/v1/plots/runs.svg?metric=../../etc", 400, "bad_request"),
        ("/api/v1/runs?limit=1000", 400, "bad_request"),
        ("/api/v1/failures?offset=x", 400, "bad_request"),
        ("/api/v1/failures?offset=18446744073709551615", 400, "bad_request"),
        ("/api/v1/failures?offset=4294967295&limit=100", 400, "bad_request"),
        ("/api/v1/index?x=1", 400, "bad_request"),
        ("/api/v2/search?q=dog", 404, "not_found"),
        ("/nothing", 404, "not_found"),
    ];
    for (path, status, code) in cases {
        let response = service.get(path);
        response.assert_error(status, code);
        response.assert_safe_headers();
    }
    let host = format!("Host: 127.0.0.1:{}\r\n", service.port);
    for method in ["POST", "PUT", "DELETE", "OPTIONS", "PATCH"] {
        let response = service.request(&format!(
            "{method} /api/v1/search?q=dog HTTP/1.1\r\n{host}Content-Length: 3\r\nConnection: close\r\n\r\nabc"
        ));
        response.assert_error(405, "method_not_allowed");
    }
    let long_uri = format!("/api/v1/search?q=dog&offset={}", "0".repeat(17_000));
    service.get(&long_uri).assert_error(414, "uri_too_long");
    service.request("GET /api/v1/index HTTP/1.1\r\nConnection: close\r\n\r\n").assert_error(400, "bad_request");
    // What hyper itself refuses before any handler: a 4xx, and the service goes on.
    let huge_header = format!("GET / HTTP/1.1\r\n{host}X-Junk: {}\r\n\r\n", "j".repeat(100_000));
    assert!((400..500).contains(&service.request(&huge_header).status));
    let junk = service.request_bytes(b"\x00\x01\x02 not http at all\r\n\r\n");
    assert!((400..500).contains(&junk.status));
    // Every good answer carries the headers too, the page included.
    for path in ["/", "/page.js", "/page.css", "/api/v1/index", "/api/v1/thumbnail?id=short_h264"] {
        let response = service.get(path);
        assert_eq!(response.status, 200, "{path}");
        response.assert_safe_headers();
    }
    assert!(service.get("/").text().contains("<script src=\"page.js\" defer></script>"), "a relative URL");
}

#[test]
fn the_host_header_must_name_this_service() {
    let dir = Dir::new();
    let (_, index) = index_of(&dir, &["short_h264.mp4"]);
    let service = Service::start(&index, &["--allow-host", "search.lab.example"]);
    let with_host = |host: &str| {
        service.request(&format!("GET /api/v1/index HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"))
    };
    for allowed in ["localhost:9000", "localhost", "127.0.0.1", "[::1]:8080", "search.lab.example:443", "10.1.2.3"] {
        assert_eq!(with_host(allowed).status, 200, "{allowed}");
    }
    for refused in ["attacker.example", "attacker.example:8080", "search.lab.example.attacker.example"] {
        let response = with_host(refused);
        response.assert_error(403, "host_not_allowed");
        assert_eq!(response.headers["connection"], "close");
    }
    // Another site's page may link to the service, not load its thumbnails, videos or answers.
    let from = |site: &str, mode: &str, path: &str| {
        service.request(&format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nSec-Fetch-Site: {site}\r\nSec-Fetch-Mode: {mode}\r\nConnection: close\r\n\r\n"
        ))
    };
    for path in ["/api/v1/thumbnail?id=short_h264", "/api/v1/media?id=short_h264", "/api/v1/search?q=dog", "/page.js"] {
        from("cross-site", "no-cors", path).assert_error(403, "cross_site");
        from("same-site", "cors", path).assert_error(403, "cross_site");
        assert_eq!(from("same-origin", "no-cors", path).status, 200, "{path}");
    }
    assert_eq!(from("cross-site", "navigate", "/").status, 200, "a link from elsewhere opens the page");
    assert_eq!(from("none", "navigate", "/").status, 200);
    drop(service);
    let plain = Service::start(&index, &[]);
    let response = plain.request("GET /api/v1/index HTTP/1.1\r\nHost: search.lab.example\r\nConnection: close\r\n\r\n");
    response.assert_error(403, "host_not_allowed");
}

#[test]
fn beyond_loopback_the_service_needs_the_flag_and_then_a_token() {
    let dir = Dir::new();
    let (_, index) = index_of(&dir, &["short_h264.mp4"]);
    let (_, stderr) = TestCommand::new(&["serve", "--bind", "0.0.0.0:0", "--index"]).arg(&index).expect_code(1);
    assert!(stderr.contains("--public"), "{stderr}");

    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_vtr-index"));
    command.args(["serve", "--bind", "0.0.0.0:0", "--public", "--index"]).arg(&index);
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let service = Service::of(command.spawn().unwrap());
    let token = service.url.split("?token=").nth(1).unwrap().to_string();
    assert_eq!(token.len(), 32);
    let request = |extra: &str| {
        service.request(&format!("GET /api/v1/index HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}Connection: close\r\n\r\n"))
    };
    request("").assert_error(401, "unauthorized");
    request("Authorization: Bearer wrong\r\n").assert_error(401, "unauthorized");
    assert_eq!(request(&format!("Authorization: Bearer {token}\r\n")).status, 200);
    let link =
        service.request(&format!("GET /?token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"));
    assert_eq!(link.status, 303);
    assert_eq!(link.headers["location"], "./");
    let cookie = link.headers["set-cookie"].split(';').next().unwrap().to_string();
    assert!(link.headers["set-cookie"].contains("HttpOnly") && link.headers["set-cookie"].contains("SameSite=Lax"));
    assert_eq!(request(&format!("Cookie: other=1; {cookie}\r\n")).status, 200);
}

#[test]
fn a_writers_commit_is_picked_up_while_queries_go_on() {
    let dir = Dir::new();
    let root = corpus(&dir, "videos", &["short_h264.mp4", "vfr_h264.mp4"]);
    let index = dir.join("index");
    ingest_command(&index, &root, &[]).expect_code(0);
    let service = Service::start(&index, &[]);
    assert_eq!(service.get_json("/api/v1/index")["videos"], 2);

    // Queries all along the commits: each sees the old index or the new one, whole.
    let port = service.port;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let querying = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
                let request = format!(
                    "GET /api/v1/search?q=moving%20colours&limit=100 HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\n\r\n"
                );
                stream.write_all(request.as_bytes()).unwrap();
                let mut bytes = Vec::new();
                stream.read_to_end(&mut bytes).unwrap();
                let response = Response::parse(&bytes);
                assert_eq!(response.status, 200, "{}", response.text());
                let page = response.json();
                let total = page["page"]["total"].as_u64().unwrap();
                assert_eq!(page["page"]["items"].as_array().unwrap().len() as u64, total, "one index's whole ranking");
                seen.push(total);
            }
            seen
        })
    };
    for clip in ["rotated90_h264.mp4", "bars_mpeg4.avi"] {
        std::fs::copy(fixtures().join("videos").join(clip), root.join(clip)).unwrap();
    }
    ingest_command(&index, &root, &[]).expect_code(0);
    let due = Instant::now() + Duration::from_secs(30);
    while service.get_json("/api/v1/index")["videos"] != 4 {
        assert!(Instant::now() < due, "the commit was not picked up");
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let seen = querying.join().unwrap();
    assert!(seen.iter().all(|&t| t == 2 || t == 4), "{seen:?}");
    let state = service.get_json("/api/v1/index");
    assert!(state["reloads"].as_u64().unwrap() >= 1);
    assert_eq!(service.get_json("/api/v1/video?id=bars_mpeg4")["video_id"], "bars_mpeg4");
    assert_eq!(service.get_json("/api/v1/runs")["page"]["total"], 2);

    // A commit that dies before its manifest is in place changes nothing the service shows.
    std::fs::remove_file(root.join("short_h264.mp4")).unwrap();
    let died = ingest_command(&index, &root, &[]).env("VTR_INDEX_KILL_AT", "manifest-written").output();
    assert_ne!(died.status.code(), Some(0));
    std::thread::sleep(Duration::from_millis(800));
    let state = service.get_json("/api/v1/index");
    assert_eq!(state["videos"], 4);
    assert_eq!(state["reload_error"], Value::Null);
    assert_eq!(service.get_json("/api/v1/video?id=short_h264")["video_id"], "short_h264");
    // The next run commits, the old segments go, and the service follows without a restart.
    ingest_command(&index, &root, &[]).expect_code(0);
    let due = Instant::now() + Duration::from_secs(30);
    while service.get_json("/api/v1/index")["videos"] != 3 {
        assert!(Instant::now() < due, "the second commit was not picked up");
        std::thread::sleep(Duration::from_millis(100));
    }
    service.get("/api/v1/video?id=short_h264").assert_error(404, "not_found");
    assert_eq!(service.get_json("/api/v1/search?q=bars&limit=10")["page"]["total"], 3);
}

#[test]
fn a_decoder_that_crashes_on_one_file_costs_only_its_thumbnail() {
    let dir = Dir::new();
    let (_, index) = index_of(&dir, &["short_h264.mp4", "vfr_h264.mp4"]);
    let service = Service::start_with(&index, &[], &[("VTR_INDEX_WORKER_FAULT", "abort:short_h264.mp4")]);
    let crashed = service.get("/api/v1/thumbnail?id=short_h264&t=0");
    crashed.assert_error(422, "decode_failed");
    assert!(crashed.json()["error"]["message"].as_str().unwrap().contains("SIGABRT"), "{}", crashed.text());
    let fine = service.get("/api/v1/thumbnail?id=vfr_h264&t=1");
    assert_eq!(fine.status, 200, "{}", fine.text());
    let time: f64 = fine.headers["x-frame-time"].parse().unwrap();
    assert!((time - 1.0).abs() < 0.05, "the frame on screen at 1 s: {time}");
    assert_eq!(service.get_json("/api/v1/index")["videos"], 2);
}

#[test]
fn the_failures_and_runs_are_paged_and_a_merged_index_says_where_its_runs_are() {
    let dir = Dir::new();
    let root = corpus(&dir, "videos", &["short_h264.mp4"]);
    for n in 0..25 {
        dir.create(&format!("videos/broken-{n:02}.mp4"), format!("<b>not a video {n}</b>").as_bytes());
    }
    let index = dir.join("index");
    ingest_command(&index, &root, &[]).expect_code(2);
    let service = Service::start(&index, &[]);
    let first = service.get_json("/api/v1/failures?limit=20");
    assert_eq!(first["page"]["total"], 25);
    assert_eq!(first["page"]["items"].as_array().unwrap().len(), 20);
    let rest = service.get_json("/api/v1/failures?offset=20&limit=20");
    assert_eq!(rest["page"]["items"].as_array().unwrap().len(), 5);
    assert_eq!(rest["page"]["next_offset"], Value::Null);
    let paths: std::collections::BTreeSet<String> = [&first, &rest]
        .iter()
        .flat_map(|p| p["page"]["items"].as_array().unwrap().iter().map(|f| f["path"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(paths.len(), 25, "each failure once");
    let runs = service.get_json("/api/v1/runs");
    assert_eq!(runs["page"]["items"][0]["failures"], 25);
    assert_eq!(runs["page"]["items"][0]["videos"], 1, "embedded: the failed files are not");
    let plot = service.get("/api/v1/plots/runs.svg?metric=failures");
    assert_eq!(plot.headers["content-type"], "image/svg+xml");
    assert!(plot.text().starts_with("<svg"));
    drop(service);

    let parts = Dir::new();
    for i in 0..2 {
        ingest_command(&parts.join(&format!("part-{i}")), &root, &["--shard", &format!("{i}/2")]).output();
    }
    let merged = parts.join("merged");
    TestCommand::new(&["merge"])
        .arg(parts.join("part-0"))
        .arg(parts.join("part-1"))
        .arg("--index")
        .arg(&merged)
        .expect_code(0);
    let service = Service::start(&merged, &[]);
    let runs = service.get_json("/api/v1/runs");
    let note = runs["note"].as_str().unwrap();
    assert!(note.contains("merged") && note.contains("part-0"), "{note}");
}

#[test]
fn an_index_without_segments_is_refused_with_what_to_do() {
    let dir = Dir::new();
    let (_, index) = index_of(&dir, &["short_h264.mp4"]);
    crate::util::as_older_format(&index, 4);
    let (_, stderr) = TestCommand::new(&["serve", "--bind", "127.0.0.1:0", "--index"]).arg(&index).expect_code(1);
    assert!(stderr.contains("run `vtr-index ingest`"), "{stderr}");
    let (_, stderr) =
        TestCommand::new(&["serve", "--bind", "127.0.0.1:0", "--index"]).arg(dir.join("nothing")).expect_code(1);
    assert!(!stderr.is_empty());
}

#[test]
fn the_routes_are_the_contracts() {
    let contract = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/contract.md")).unwrap();
    let section = contract.split("## 8. The service").nth(1).expect("the contract's §8");
    let listed: Vec<&str> = section
        .lines()
        .filter_map(|l| l.strip_prefix("| `GET "))
        .map(|l| l.split(['`', '?']).next().unwrap())
        .collect();
    assert_eq!(listed, vtr_index::serve::api::ROUTES, "contract §8's table and the router's routes");
}

#[test]
fn the_service_survives_concurrent_mixed_and_hostile_requests() {
    let sample_index = Dir::new();
    let index = sample_index.join("index");
    ingest_command(&index, &sample().join("videos"), &[]).expect_code(0);
    let before = crate::util::file_tree(&index);
    let mut service = Service::start(&index, &[]);
    let port = service.port;
    let ids: Vec<String> = service.get_json("/api/v1/search?q=video&limit=100")["page"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["video_id"].as_str().unwrap().to_string())
        .collect();
    let ids = std::sync::Arc::new(ids);
    let clients: Vec<_> = (0..32)
        .map(|client| {
            let ids = std::sync::Arc::clone(&ids);
            std::thread::spawn(move || {
                let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
                for n in 0..150 {
                    let id = encode(&ids[(client + n) % ids.len()]);
                    let host = format!("Host: localhost:{port}\r\n");
                    let raw: Vec<u8> = match (client * 150 + n) % 12 {
                        0 => format!("GET /api/v1/search?q=clip%20{n}&limit=20 HTTP/1.1\r\n{host}\r\n").into_bytes(),
                        1 => format!("GET /api/v1/search?q=dog&offset=20&limit=20 HTTP/1.1\r\n{host}\r\n").into_bytes(),
                        2 => format!("GET /api/v1/thumbnail?id={id}&t={} HTTP/1.1\r\n{host}\r\n", n % 3).into_bytes(),
                        3 => format!("GET /api/v1/media?id={id} HTTP/1.1\r\n{host}Range: bytes=0-999\r\n\r\n")
                            .into_bytes(),
                        4 => format!("GET /api/v1/similar?id={id} HTTP/1.1\r\n{host}\r\n").into_bytes(),
                        5 => format!("GET /api/v1/video?id={id} HTTP/1.1\r\n{host}\r\n").into_bytes(),
                        6 => format!("GET /api/v1/failures?offset={n} HTTP/1.1\r\n{host}\r\n").into_bytes(),
                        7 => format!("GET /api/v1/search?q=%FF%FE{n} HTTP/1.1\r\n{host}\r\n").into_bytes(),
                        8 => format!("GET /api/v1/media?id=..%2F..%2Fetc%2Fpasswd HTTP/1.1\r\n{host}\r\n").into_bytes(),
                        9 => b"GET /api/v1/index HTTP/1.1\r\nHost: rebind.attacker.example\r\n\r\n".to_vec(),
                        10 => vec![0xff; 64 + n],
                        _ => format!("GET /api/v1/search?q=dog&limit={} HTTP/1.1\r\n{host}\r\n", 1000 + n).into_bytes(),
                    };
                    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
                    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                    let mut raw = raw;
                    if raw.ends_with(b"\r\n\r\n") {
                        raw.truncate(raw.len() - 2);
                        raw.extend_from_slice(b"Connection: close\r\n\r\n");
                    }
                    stream.write_all(&raw).unwrap();
                    if n % 17 == 0 {
                        // A client that goes away before the answer.
                        continue;
                    }
                    let mut bytes = Vec::new();
                    let _ = stream.read_to_end(&mut bytes);
                    let status = if bytes.is_empty() { 0 } else { Response::parse(&bytes).status };
                    *statuses.entry(status).or_default() += 1;
                }
                statuses
            })
        })
        .collect();
    let mut all: BTreeMap<u16, usize> = BTreeMap::new();
    for client in clients {
        for (status, count) in client.join().unwrap() {
            *all.entry(status).or_default() += count;
        }
    }
    eprintln!("statuses: {all:?}");
    assert!(service.is_running(), "the service is up");
    for status in all.keys() {
        assert!(*status == 503 || (200..500).contains(status), "status {status}: {all:?}");
    }
    assert!(all.get(&200).copied().unwrap_or(0) > 1000, "{all:?}");
    assert_eq!(service.get_json("/api/v1/index")["videos"], ids.len());
    drop(service);
    assert!(crate::util::file_tree(&index) == before, "the service wrote nothing to the index");
}

#[test]
fn past_its_bounds_the_service_answers_503_at_once() {
    let dir = Dir::new();
    let (_, index) = index_of(&dir, &["short_h264.mp4"]);
    // Decoders that hang: every thumbnail holds its decoder until the deadline.
    let service = Service::start_with(&index, &[], &[("VTR_INDEX_WORKER_FAULT", "hang:*")]);
    let port = service.port;
    let decoders = vtr_index::serve::thumbnails::DECODERS;
    let queued = vtr_index::serve::thumbnails::QUEUED;
    // Fill the decoders and their queue, then ask for more.
    let mut waiting = Vec::new();
    for t in 0..decoders + queued {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let request = format!("GET /api/v1/thumbnail?id=short_h264&t={t} HTTP/1.1\r\nHost: localhost\r\n\r\n");
        stream.write_all(request.as_bytes()).unwrap();
        waiting.push(stream);
    }
    // On a loaded machine some of those may not have reached the queue yet: a request that gets
    // no answer within 2 s was queued in their place, and the next one is tried.
    let due = Instant::now() + Duration::from_secs(60);
    let refused = loop {
        assert!(Instant::now() < due, "no thumbnail request was refused with the queue full");
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let request =
            "GET /api/v1/thumbnail?id=short_h264&t=999 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
        stream.write_all(request.as_bytes()).unwrap();
        let mut bytes = Vec::new();
        match stream.read_to_end(&mut bytes) {
            Ok(_) if !bytes.is_empty() => break Response::parse(&bytes),
            _ => waiting.push(stream),
        }
    };
    refused.assert_error(503, "busy");
    assert_eq!(refused.headers["retry-after"], "1");
    // The rest of the service goes on meanwhile.
    assert_eq!(service.get_json("/api/v1/index")["videos"], 1);
    drop(waiting);
    drop(service);

    // Connections past the bound: refused at once with the same error, and closed.
    let service = Service::start(&index, &[]);
    let port = service.port;
    let idle: Vec<TcpStream> =
        (0..vtr_index::serve::MAX_CONNECTIONS).map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    let refused = service.get("/api/v1/index");
    refused.assert_error(503, "busy");
    assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
    drop(idle);
    let due = Instant::now() + Duration::from_secs(10);
    while service.get("/api/v1/index").status != 200 {
        assert!(Instant::now() < due, "the service did not come back once the connections closed");
        std::thread::sleep(Duration::from_millis(50));
    }
}
