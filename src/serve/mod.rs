//! `vtr-index serve`: a resident process that answers searches of one index over HTTP, and the
//! web page that shows them (contract §8).
//!
//! It loads the model once and keeps the index's query engine open ([`index::LiveIndex`],
//! which follows the writers' commits). Requests go through [`guard`] (Host and token checks,
//! the bound on concurrent requests, the security headers), then to the JSON API
//! ([`api`]), the files ([`media`]: thumbnails, the videos themselves) or the page ([`page`]).
//! It only reads: the index is opened without a lock and never written, and a file is served
//! only if it is the recorded file of a `videos` row, unchanged since.
//!
//! Connections are accepted here, not by `axum::serve`, so that each resource has its bound:
//! at most [`MAX_CONNECTIONS`] open (one more is answered 503 and closed), headers within
//! [`HEADER_READ_TIMEOUT`] and [`MAX_HEADER_BYTES`].

pub mod api;
pub mod explorer;
pub mod guard;
pub mod index;
pub mod media;
pub mod page;
pub mod thumbnails;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;

use crate::model::{Clip, ModelError};
use crate::store::StoreError;
use crate::types::DeviceChoice;
use index::LiveIndex;
use thumbnails::Thumbnails;

/// Where `serve` listens unless told otherwise: loopback only.
pub const DEFAULT_BIND: &str = "127.0.0.1:8080";
/// Connections open at once; one more is answered 503 at once and closed.
pub const MAX_CONNECTIONS: usize = 256;
/// Requests in progress at once; one more is answered 503 at once.
pub const MAX_CONCURRENT_REQUESTS: usize = 64;
/// Text queries embedded at once (the text tower's threads are the machine's).
pub const CONCURRENT_EMBEDDINGS: usize = 2;
/// Threads for blocking work: the permits' sum and room for the file reads.
pub const BLOCKING_THREADS: usize = 16;
/// Scans of the video arrays at once: each is parallel, but reads its page's frames alone after.
pub const CONCURRENT_SCANS: usize = 4;
/// Text queries whose embeddings are kept (2 KiB each at D = 512).
pub const CACHED_QUERIES: usize = 1024;
/// A client has this long to send a request's headers, and to start the next one on a kept-alive
/// connection.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A request line and headers larger than this are refused (hyper's read buffer): room for a
/// URI of [`guard::MAX_URI_BYTES`] and ordinary headers.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;
/// How often the manifest is looked at for a writer's commit.
pub const DEFAULT_POLL: Duration = Duration::from_secs(2);
/// The thumbnail cache's bound unless told otherwise.
pub const DEFAULT_THUMBNAIL_CACHE_MIB: usize = 64;

/// What `serve` was asked to do.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub index: PathBuf,
    pub bind: SocketAddr,
    /// Whether a bind address other than loopback was allowed (`--public`).
    pub public: bool,
    /// Host names accepted in the `Host` header besides loopback's (`--allow-host`).
    pub allowed_hosts: Vec<String>,
    pub model: Option<PathBuf>,
    pub poll: Duration,
    pub thumbnail_cache_bytes: usize,
    /// Score folders to explore (`--scores`), in the order their API positions count.
    pub scores: Vec<PathBuf>,
}

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(
        "{0}: not a loopback address; serving to other machines makes the index's file names, captions, failures \
         and videos readable there: give --public to do so (it then requires an access token it prints)"
    )]
    NotLoopback(SocketAddr),
    #[error(transparent)]
    Index(#[from] StoreError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("--scores: {0}")]
    Scores(#[from] explorer::FolderError),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
}

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServeError {
    let what = what.into();
    move |source| ServeError::Io { what, source }
}

/// What every request handler shares.
pub struct App {
    pub live: LiveIndex,
    pub clip: Clip,
    pub thumbnails: Thumbnails,
    pub embeddings: Arc<Semaphore>,
    pub scans: Arc<Semaphore>,
    /// The latest queries' embeddings, by their text.
    pub queries: std::sync::Mutex<lru::LruCache<String, Arc<Vec<f32>>>>,
    pub requests: Arc<Semaphore>,
    pub access: guard::Access,
    pub runs: api::RunSummaries,
    pub scores: explorer::ScoreFolders,
}

/// Runs the service until the process is stopped. Returns an error for a refused address or
/// an index or model that cannot be opened.
pub fn run(options: ServeOptions) -> Result<(), ServeError> {
    if !options.bind.ip().is_loopback() && !options.public {
        return Err(ServeError::NotLoopback(options.bind));
    }
    if let Err(e) = crate::decode::init() {
        eprintln!("vtr-index serve: warning: thumbnails will fail: {e}");
    }
    let live = LiveIndex::open(&options.index)?;
    let snapshot = live.snapshot();
    let scores = explorer::ScoreFolders::open(&options.scores, &snapshot.manifest)?;
    let clip = Clip::load_recorded(&snapshot.manifest.model, options.model.as_deref(), DeviceChoice::Cpu)?;
    let thumbnails =
        Thumbnails::start(options.thumbnail_cache_bytes).map_err(io_error("cannot start the thumbnail decoders"))?;
    let token = options.public.then(guard::new_token).transpose().map_err(io_error("cannot make an access token"))?;
    let access = guard::Access { token: token.clone(), allowed_hosts: options.allowed_hosts.clone() };
    let app = Arc::new(App {
        live,
        clip,
        thumbnails,
        embeddings: Arc::new(Semaphore::new(CONCURRENT_EMBEDDINGS)),
        scans: Arc::new(Semaphore::new(CONCURRENT_SCANS)),
        queries: std::sync::Mutex::new(lru::LruCache::new(
            std::num::NonZeroUsize::new(CACHED_QUERIES).expect("a positive count"),
        )),
        requests: Arc::new(Semaphore::new(MAX_CONCURRENT_REQUESTS)),
        access,
        runs: api::RunSummaries::default(),
        scores,
    });

    let cannot_listen = || format!("cannot listen on {}", options.bind);
    let listener = std::net::TcpListener::bind(options.bind).map_err(io_error(cannot_listen()))?;
    listener.set_nonblocking(true).map_err(io_error(cannot_listen()))?;
    let address = listener.local_addr().map_err(io_error(cannot_listen()))?;
    if options.public {
        eprintln!(
            "vtr-index serve: WARNING: listening on {address}, beyond this machine: whoever reaches it and has the token \
             can read the index's video names, captions, failures and the videos themselves"
        );
        if address.ip().is_unspecified() {
            eprintln!(
                "vtr-index serve: open it by this machine's address (http://ADDRESS:{}/?token=…); a host name other \
                 than an address needs --allow-host NAME",
                address.port()
            );
        }
    }
    let token_query = token.as_ref().map(|t| format!("?token={t}")).unwrap_or_default();
    println!(
        "vtr-index serve: http://{address}/{token_query} ({}: {} videos)",
        options.index.display(),
        snapshot.engine.videos()
    );
    drop(snapshot);
    {
        let app = Arc::clone(&app);
        let poller = std::thread::Builder::new().name("manifest-poll".into()).spawn(move || {
            loop {
                std::thread::sleep(options.poll);
                app.live.refresh();
            }
        });
        poller.map_err(io_error("cannot start a thread"))?;
    }
    // Blocking work (the model, scans, file reads) is bounded by its permits; a small pool of
    // threads for it keeps the allocator's per-thread arenas, and so the memory, bounded too.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads(BLOCKING_THREADS)
        .enable_all()
        .build()
        .map_err(io_error("cannot start the runtime"))?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).map_err(io_error(cannot_listen()))?;
        accept(listener, app).await;
        Ok(())
    })
}

/// Accepts connections until the process ends, each served by hyper within the bounds above.
async fn accept(listener: tokio::net::TcpListener, app: Arc<App>) {
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let router = api::router(Arc::clone(&app));
    loop {
        let (mut stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            // Out of descriptors, or a connection reset before it was accepted: go on.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
            tokio::spawn(async move {
                let _ = stream.write_all(guard::BUSY_RESPONSE.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(MAX_HEADER_BYTES)
                .max_headers(64);
            let _ = http.serve_connection(TokioIo::new(stream), service).await;
            drop(permit);
        });
    }
}
