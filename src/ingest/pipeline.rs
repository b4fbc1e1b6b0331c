//! The stages of one ingest run on their own threads: a feeder, `--decode-workers` decode
//! workers (decode, sample, preprocess, hash; each file journalled while in flight, and a file
//! in flight at an earlier crash decoded alone) and the encoder (which builds the model's towers
//! first, and decodes a file itself whenever it has nothing to encode), joined by bounded
//! channels, so a slow stage holds the ones before it back and memory holds at most a few
//! videos' frames. Outcomes reach the caller's `consume` on its own thread. This module wires
//! stages; the work is done in `decode`, `preprocess`, `encode` and `model`.

use std::collections::HashSet;
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Instant;

use crossbeam_channel::{TryRecvError, bounded};

use super::timeline::{Activity, StageClock};
use super::{IngestError, IngestOptions};
use crate::checksum::blake3_file;
use crate::decode::{DecodeConfig, decode_video};
use crate::encode::{BatchEncoder, EmbeddedVideo, PreparedVideo, VideoFacts};
use crate::failure::{FailureKind, Rejection, Stage};
use crate::model::{Clip, Unbuilt};
use crate::preprocess::{PreprocessConfig, pixel_values};
use crate::store::{InFlightJournal, StoreError};
use crate::walk::VideoFile;

/// One file decoded, preprocessed and hashed, or its failure.
pub enum Decoded {
    Video(PreparedVideo<VideoFile>),
    Failed(VideoFile, Rejection),
}

/// The encoder's result for one file.
pub enum Encoded {
    Video(EmbeddedVideo<VideoFile>),
    Failed(VideoFile, Rejection),
}

/// This run's in-flight journal, removed whenever the run ends without the process dying.
pub struct JournalGuard(pub Option<InFlightJournal>);

impl JournalGuard {
    pub fn get(&self) -> &InFlightJournal {
        self.0.as_ref().expect("the journal lives as long as its guard")
    }
}

impl Drop for JournalGuard {
    fn drop(&mut self) {
        if let Some(journal) = self.0.take() {
            journal.remove();
        }
    }
}

/// Decodes, preprocesses and hashes one file (public for the stage
/// benchmark, `examples/ingest_stages.rs`, which runs this stage alone).
pub fn prepare(file: VideoFile, decode: &DecodeConfig, preprocess: &PreprocessConfig) -> Decoded {
    let video = match decode_video(&file.abs_path, decode) {
        Ok(video) => video,
        Err(rejection) => return Decoded::Failed(file, rejection),
    };
    let mut frames = Vec::with_capacity(video.frames.len());
    for frame in &video.frames {
        match pixel_values(&frame.image, preprocess) {
            Ok(pixels) => frames.push((frame.pts_s, pixels)),
            Err(message) => return Decoded::Failed(file, Rejection::new(Stage::Encode, FailureKind::Corrupt, message)),
        }
    }
    let content_hash = match blake3_file(&file.abs_path) {
        Ok(hash) => hash,
        Err(e) => {
            let rejection = Rejection::new(Stage::Decode, FailureKind::Io, format!("cannot read the file: {e}"));
            return Decoded::Failed(file, rejection);
        }
    };
    let facts = VideoFacts {
        duration_s: video.duration_s,
        width: video.width,
        height: video.height,
        fps: video.fps,
        content_hash,
        stream_index: video.stream_index,
    };
    Decoded::Video(PreparedVideo { key: file, facts, frames })
}

/// The decode workers and the encoder of one run, on their own threads joined by bounded
/// channels. The encoder also decodes a file whenever it has nothing to encode.
pub struct Pipeline<'a> {
    pub options: &'a IngestOptions,
    pub decode: &'a DecodeConfig,
    pub preprocess: &'a PreprocessConfig,
    pub journal: &'a InFlightJournal,
    /// (root, path) of the files in flight at an earlier crash. Each is decoded with no other
    /// file in flight, so that a crash while it decodes blames it alone.
    pub suspects: &'a HashSet<(String, String)>,
}

/// Who may decode now: any number of files at once, or one suspect alone.
struct DecodeTurns(RwLock<()>);

/// A turn to decode, held while a file is in flight.
enum Turn<'a> {
    Shared { _guard: RwLockReadGuard<'a, ()> },
    Alone { _guard: RwLockWriteGuard<'a, ()> },
}

impl DecodeTurns {
    /// Waits for a turn: a shared one, or one alone, once the files in flight are done.
    fn take(&self, alone: bool) -> Turn<'_> {
        // A poisoned lock only means a decoding thread panicked, which fails the run anyway.
        if alone {
            Turn::Alone { _guard: self.0.write().unwrap_or_else(PoisonError::into_inner) }
        } else {
            Turn::Shared { _guard: self.0.read().unwrap_or_else(PoisonError::into_inner) }
        }
    }
}

impl Pipeline<'_> {
    /// Decodes one file, journalled while in flight; `None` when the run was interrupted before
    /// or during it (a file cut short is not a failure: the next run takes it up again).
    fn decode_one(&self, file: VideoFile, turns: &DecodeTurns, clock: &StageClock) -> Option<Decoded> {
        if crate::interrupt::was_requested() {
            return None;
        }
        let key = (file.root.clone(), file.path.clone());
        let _turn = turns.take(self.suspects.contains(&key));
        let started = Instant::now();
        self.journal.started(&key.0, &key.1);
        crate::fault::point(&format!("decode:{}", key.1));
        let decoded = prepare(file, self.decode, self.preprocess);
        self.journal.finished(&key.0, &key.1);
        clock.add(Activity::Decode, started);
        let cut_short = matches!(decoded, Decoded::Failed(..)) && crate::interrupt::was_requested();
        (!cut_short).then_some(decoded)
    }

    /// Runs `files` through decode and encode with `clip`, and hands every outcome to `consume`
    /// on the calling thread. The encoder builds `clip`'s towers while the workers start
    /// decoding, and takes no file before they are built: no outcome (and so no commit) comes
    /// before a model that fails to build.
    pub fn run(
        &self,
        files: Vec<VideoFile>,
        clip: Clip<Unbuilt>,
        clock: &StageClock,
        mut consume: impl FnMut(Encoded) -> Result<(), StoreError>,
    ) -> Result<(), IngestError> {
        let workers = self.options.decode_workers.max(1);
        let (task_tx, task_rx) = bounded::<VideoFile>(workers * 2);
        let (decoded_tx, decoded_rx) = bounded::<Decoded>(workers + 2);
        let (encoded_tx, encoded_rx) = bounded::<Encoded>(16);
        let dim = clip.embed_dim();
        let turns = &DecodeTurns(RwLock::new(()));
        std::thread::scope(|scope| {
            let feeder = std::thread::Builder::new()
                .name("feed".into())
                .spawn_scoped(scope, move || {
                    for file in files {
                        // Interrupted: no new file is started.
                        if crate::interrupt::was_requested() || task_tx.send(file).is_err() {
                            break;
                        }
                    }
                })
                .expect("spawn a thread");
            let decoders: Vec<_> = (0..workers)
                .map(|i| {
                    let tasks = task_rx.clone();
                    let out = decoded_tx.clone();
                    std::thread::Builder::new()
                        .name(format!("decode-{i}"))
                        .spawn_scoped(scope, move || {
                            for file in tasks {
                                let Some(decoded) = self.decode_one(file, turns, clock) else { continue };
                                let waiting = Instant::now();
                                if out.send(decoded).is_err() {
                                    break;
                                }
                                clock.add(Activity::DecodeWaiting, waiting);
                            }
                        })
                        .expect("spawn a thread")
                })
                .collect();
            drop(decoded_tx);
            let encoder = std::thread::Builder::new()
                .name("encode".into())
                .spawn_scoped(scope, move || -> Result<(), IngestError> {
                    let building = Instant::now();
                    let clip = clip.build()?;
                    clock.add(Activity::BuildModel, building);
                    let embed = |pixels: &[f32], count: usize| -> Result<Vec<Vec<f32>>, String> {
                        crate::fault::point("encode");
                        let started = Instant::now();
                        let flat = clip.image_features(pixels, count).map_err(|e| e.to_string())?;
                        clock.add(Activity::Encode, started);
                        Ok(flat.chunks(dim).map(<[f32]>::to_vec).collect())
                    };
                    let pool = |features: Vec<Vec<f32>>| clip.pool_video(features).map_err(|e| e.to_string());
                    let mut encoder = BatchEncoder::new(self.options.batch, embed, pool);
                    loop {
                        // With nothing to encode (before the first batch is full, or when the
                        // workers fall behind), the encoder decodes the next file itself rather
                        // than leave its core idle.
                        let item = match decoded_rx.try_recv() {
                            Ok(item) => item,
                            Err(TryRecvError::Disconnected) => break,
                            Err(TryRecvError::Empty) => match task_rx.try_recv() {
                                Ok(file) => match self.decode_one(file, turns, clock) {
                                    Some(decoded) => decoded,
                                    None => continue,
                                },
                                Err(_) => {
                                    let waiting = Instant::now();
                                    let Ok(item) = decoded_rx.recv() else { break };
                                    clock.add(Activity::EncodeWaiting, waiting);
                                    item
                                }
                            },
                        };
                        let done = match item {
                            Decoded::Video(video) => encoder.push(video).map_err(encode_failed)?,
                            Decoded::Failed(file, rejection) => {
                                if encoded_tx.send(Encoded::Failed(file, rejection)).is_err() {
                                    return Ok(());
                                }
                                continue;
                            }
                        };
                        for video in done {
                            if encoded_tx.send(Encoded::Video(video)).is_err() {
                                return Ok(());
                            }
                        }
                    }
                    for video in encoder.finish().map_err(encode_failed)? {
                        if encoded_tx.send(Encoded::Video(video)).is_err() {
                            return Ok(());
                        }
                    }
                    Ok(())
                })
                .expect("spawn a thread");

            let mut written: Result<(), IngestError> = Ok(());
            for outcome in &encoded_rx {
                if let Err(e) = consume(outcome) {
                    written = Err(e.into());
                    break;
                }
            }
            // Stops the upstream stages if writing failed: their sends now fail.
            drop(encoded_rx);
            let panicked = |stage: &'static str| IngestError::Stage(stage, "a worker thread panicked".into());
            let encoded = encoder.join().map_err(|_| panicked("encode"))?;
            for decoder in decoders {
                decoder.join().map_err(|_| panicked("decode"))?;
            }
            feeder.join().map_err(|_| panicked("feed"))?;
            written?;
            encoded
        })
    }
}

fn encode_failed(message: String) -> IngestError {
    IngestError::Stage("encode", message)
}
