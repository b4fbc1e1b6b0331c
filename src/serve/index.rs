//! The index as the service reads it: an immutable [`Snapshot`] (a manifest, its query engine
//! and its `videos` shards held open) that each request takes whole, and [`LiveIndex`], which
//! polls the manifest (inotify does not see other machines' writes on NFS) and swaps in a new
//! snapshot when a writer has committed.
//!
//! A request sees one snapshot from start to end: the old index or the new one, never a mix.
//! A new snapshot maps only the segments the old one did not (`SearchEngine::open_reusing`), so
//! following a commit does not double the memory. The old snapshot's files stay readable while a
//! request holds it, even once the writer's collection has unlinked them: segments are mapped
//! and shards held open. A manifest that cannot be loaded whole (a file of it already collected
//! by a later commit, a damaged index) leaves the current snapshot in place, to be tried again.
//! The service never writes to the index, takes no lock and never upgrades it.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;

use crate::search_engine::{SearchEngine, VideoAt};
use crate::store::{MANIFEST, Manifest, StoreError, VideoRecord, io_error, read_video_record};

/// What identifies a version of the manifest file without reading it: a commit renames a new
/// file into place, so its inode changes, and its size and time most likely with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    device: u64,
    inode: u64,
    bytes: u64,
    mtime_ns: i64,
    /// The inode's change time too: a file system with coarse times and reused inodes could
    /// otherwise hide a commit of the same size.
    ctime_ns: i64,
}

impl Stamp {
    fn of(metadata: &std::fs::Metadata) -> Stamp {
        Stamp {
            device: metadata.dev(),
            inode: metadata.ino(),
            bytes: metadata.len(),
            mtime_ns: crate::walk::mtime_ns(metadata),
            ctime_ns: metadata.ctime() * 1_000_000_000 + metadata.ctime_nsec(),
        }
    }
}

/// One committed state of the index, ready for requests.
pub struct Snapshot {
    pub index: PathBuf,
    pub manifest: Manifest,
    pub engine: SearchEngine,
    /// The `videos` shards in manifest order, open.
    videos_shards: Vec<File>,
    stamp: Stamp,
}

impl Snapshot {
    /// Loads the committed manifest and what it lists, sharing what `previous` already holds.
    fn load(index: &Path, previous: Option<&Snapshot>) -> Result<Snapshot, StoreError> {
        let path = index.join(MANIFEST);
        let mut file = File::open(&path).map_err(io_error(&path))?;
        // The stamp of the file read, not of the name: a commit between the two is seen next time.
        let stamp = Stamp::of(&file.metadata().map_err(io_error(&path))?);
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(io_error(&path))?;
        let manifest = Manifest::parse(&path, &text)?;
        let mut videos_shards = Vec::new();
        for shard in manifest.shards("videos") {
            let shard_path = index.join(&shard.path);
            videos_shards.push(File::open(&shard_path).map_err(io_error(&shard_path))?);
        }
        let engine = SearchEngine::open_reusing(index, &manifest, previous.map(|p| &p.engine))?.ok_or_else(|| {
            StoreError::Corrupt {
                path: path.clone(),
                message: format!(
                    "an index of format {} has no search segments, which the service reads: run `vtr-index ingest` or \
                     `vtr-index encode-text` on it once to upgrade it (the service itself never writes to an index)",
                    manifest.format_version
                ),
            }
        })?;
        let engine = engine.with_id_lookup();
        if let Some((id, why)) = engine.first_not_unit() {
            return Err(StoreError::Corrupt {
                path,
                message: format!("the embedding of video {id:?} {why}: re-ingest that video"),
            });
        }
        Ok(Snapshot { index: index.to_path_buf(), manifest, engine, videos_shards, stamp })
    }

    /// The `videos` row of the video at `at`, without its embedding.
    pub fn video(&self, at: VideoAt) -> Result<VideoRecord, StoreError> {
        let shard = &self.manifest.shards("videos")[at.segment];
        let path = self.index.join(&shard.path);
        let file = reopen(&self.videos_shards[at.segment]).map_err(io_error(&path))?;
        read_video_record(file, &path, at.row)
    }
}

/// The file `held` is open on, opened again: its own offset for this request, and the same file
/// even if its name has since been unlinked or replaced (a writer's collection, a new score).
pub fn reopen(held: &File) -> std::io::Result<File> {
    File::open(format!("/proc/self/fd/{}", held.as_raw_fd()))
}

/// The snapshot requests read now, replaced when the manifest changes.
pub struct LiveIndex {
    index: PathBuf,
    current: ArcSwap<Snapshot>,
    /// Held while a new snapshot is loaded: one load at a time.
    loading: Mutex<()>,
    /// Why the latest manifest could not be loaded, while it cannot.
    last_error: Mutex<Option<String>>,
    reloads: std::sync::atomic::AtomicU64,
}

impl LiveIndex {
    pub fn open(index: &Path) -> Result<LiveIndex, StoreError> {
        let snapshot = Snapshot::load(index, None)?;
        Ok(LiveIndex {
            index: index.to_path_buf(),
            current: ArcSwap::from_pointee(snapshot),
            loading: Mutex::new(()),
            last_error: Mutex::new(None),
            reloads: 0.into(),
        })
    }

    /// The snapshot a request reads from start to end.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Loads the manifest if it changed since the current snapshot's, and swaps the new
    /// snapshot in. Returns whether it did.
    pub fn refresh(&self) -> bool {
        let _loading = self.loading.lock().unwrap_or_else(PoisonError::into_inner);
        let current = self.snapshot();
        let path = self.index.join(MANIFEST);
        match std::fs::metadata(&path) {
            Ok(metadata) if Stamp::of(&metadata) == current.stamp => return false,
            Ok(_) => {}
            Err(e) => {
                self.note_error(Some(format!("{}: {e}", path.display())));
                return false;
            }
        }
        match Snapshot::load(&self.index, Some(&current)) {
            Ok(next) => {
                self.current.store(Arc::new(next));
                self.reloads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.note_error(None);
                true
            }
            Err(e) => {
                self.note_error(Some(e.to_string()));
                false
            }
        }
    }

    fn note_error(&self, error: Option<String>) {
        let mut last = self.last_error.lock().unwrap_or_else(PoisonError::into_inner);
        if error.is_some() && *last != error {
            eprintln!("vtr-index serve: keeping the index as it was: {}", error.as_deref().unwrap_or_default());
        }
        *last = error;
    }

    /// Why the latest manifest could not be loaded, while it cannot.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// How many times a new snapshot was swapped in.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(std::sync::atomic::Ordering::Relaxed)
    }
}
