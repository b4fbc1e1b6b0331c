//! The stages of one ingest run on their own threads: a feeder, one thread per decode slot,
//! each handing files to its decode worker process (`pool.rs`; each file journalled while in
//! flight, and a file in flight at an earlier crash decoded alone) and the encoder (which
//! builds the model's towers first), joined by bounded channels, so a slow stage holds the
//! ones before it back and memory holds at most a few videos' frames. Outcomes reach the
//! caller's `consume` on its own thread. This module wires stages; the work is done in the
//! workers (`worker.rs`: `decode`, `preprocess`), `encode` and `model`.

use std::collections::HashSet;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, bounded};

use super::pool::{FileOutcome, Pool};
use super::timeline::{Activity, StageClock};
use super::worker::Prepared;
use super::{IngestError, IngestOptions};
use crate::encode::{BatchEncoder, EmbeddedVideo, PreparedVideo};
use crate::failure::Rejection;
use crate::model::{Clip, ModelError, Unbuilt};
use crate::store::{InFlightJournal, StoreError};
use crate::walk::VideoFile;

/// One file decoded, preprocessed and hashed, or its failure.
pub enum Decoded {
    Video(PreparedVideo<VideoFile>),
    Failed(VideoFile, Rejection),
}

impl Decoded {
    fn of(file: VideoFile, prepared: Prepared) -> Decoded {
        match prepared {
            Prepared::Video { facts, frames } => Decoded::Video(PreparedVideo { key: file, facts, frames }),
            Prepared::Failed(rejection) => Decoded::Failed(file, rejection),
        }
    }
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

/// The decode slots and the encoder of one run, on their own threads joined by bounded
/// channels.
pub struct Pipeline<'a> {
    pub options: &'a IngestOptions,
    pub pool: &'a Pool,
    pub journal: &'a InFlightJournal,
    /// (root, path) of the files in flight at an earlier crash of the parent. Each is decoded
    /// with no other file in flight, so that a crash while it decodes blames it alone.
    pub suspects: &'a HashSet<(String, String)>,
}

impl Pipeline<'_> {
    /// Runs `files` through the decode slots and the encoder with `clip`, and hands every
    /// outcome to `consume` on the calling thread. The encoder builds `clip`'s towers while the
    /// workers start decoding, and takes no file before they are built: no outcome (and so no
    /// commit) comes before a model that fails to build.
    pub fn run(
        &self,
        files: Vec<VideoFile>,
        clip: Clip<Unbuilt>,
        clock: &StageClock,
        mut consume: impl FnMut(Encoded) -> Result<(), StoreError>,
    ) -> Result<(), IngestError> {
        let pool = self.pool;
        let slots = pool.slots();
        let (task_tx, task_rx) = bounded::<VideoFile>(slots * 2);
        let (decoded_tx, decoded_rx) = bounded::<Decoded>(slots + 2);
        std::thread::scope(|scope| {
            // Made in the scope, so that a panic on this thread (in `consume`) drops the
            // receiver and the encoder's sends fail, as `_abandon` stops the slots: the scope's
            // joins then end, and the panic reaches the caller instead of a hang.
            let (encoded_tx, encoded_rx) = bounded::<Encoded>(16);
            let _abandon = AbandonOnPanic(pool);
            let spawn = |name: String| std::thread::Builder::new().name(name);
            let starter =
                spawn("worker-starter".into()).spawn_scoped(scope, || pool.run_starter()).expect("spawn a thread");
            let watchdog =
                spawn("worker-watchdog".into()).spawn_scoped(scope, || pool.run_watchdog()).expect("spawn a thread");
            let feeder = spawn("feed".into())
                .spawn_scoped(scope, move || {
                    for file in files {
                        // Interrupted (or the decoders are broken): no new file is started.
                        if pool.is_stopping() || task_tx.send(file).is_err() {
                            break;
                        }
                    }
                })
                .expect("spawn a thread");
            let decoders: Vec<_> = (0..slots)
                .map(|i| {
                    let (tasks, out) = (task_rx.clone(), decoded_tx.clone());
                    spawn(format!("decode-{i}"))
                        .spawn_scoped(scope, move || self.decode_slot(i, tasks, out, clock))
                        .expect("spawn a thread")
                })
                .collect();
            drop(task_rx);
            drop(decoded_tx);
            let encoder = spawn("encode".into())
                .spawn_scoped(scope, move || self.encode(clip, decoded_rx, encoded_tx, clock))
                .expect("spawn a thread");

            let mut written: Result<(), IngestError> = Ok(());
            for outcome in &encoded_rx {
                if let Err(e) = consume(outcome) {
                    written = Err(e.into());
                    break;
                }
            }
            // Stops the upstream stages if writing failed: their sends now fail, and the
            // workers holding files are stopped.
            drop(encoded_rx);
            if written.is_err() {
                pool.stop();
            }
            let panicked = |stage: &'static str| IngestError::Stage(stage, "a worker thread panicked".into());
            let encoded = encoder.join().map_err(|_| panicked("encode"));
            if !matches!(encoded, Ok(Ok(()))) {
                pool.stop();
            }
            let mut decoded = Ok(());
            for decoder in decoders {
                let result = decoder.join().map_err(|_| panicked("decode")).and_then(|r| r);
                decoded = decoded.and(result);
            }
            pool.finish();
            starter.join().map_err(|_| panicked("worker-starter"))?;
            watchdog.join().map_err(|_| panicked("worker-watchdog"))?;
            feeder.join().map_err(|_| panicked("feed"))?;
            written?;
            encoded??;
            decoded
        })
    }

    /// Decode slot `i`'s thread: each file it takes through its worker process (journalled
    /// while in flight, alone if it was in flight at an earlier crash), the outcomes to `out`.
    fn decode_slot(
        &self,
        i: usize,
        tasks: Receiver<VideoFile>,
        out: Sender<Decoded>,
        clock: &StageClock,
    ) -> Result<(), IngestError> {
        let pool = self.pool;
        let mut slot = pool.slot(i);
        let send = |decoded: Decoded| {
            let waiting = Instant::now();
            let sent = out.send(decoded).is_ok();
            clock.add(Activity::DecodeWaiting, waiting);
            sent
        };
        let decoded = (|| {
            for file in tasks {
                if pool.is_stopping() {
                    break;
                }
                let key = (file.root.clone(), file.path.clone());
                let started = Instant::now();
                let alone = self.suspects.contains(&key);
                let outcome = slot.prepare(
                    &file.abs_path,
                    file.size_bytes,
                    alone,
                    || {
                        self.journal.started(&key.0, &key.1);
                        crate::fault::point(&format!("decode:{}", key.1));
                    },
                    || self.journal.finished(&key.0, &key.1),
                );
                clock.add(Activity::Decode, started);
                let prepared = match outcome {
                    Ok(FileOutcome::Prepared(prepared)) => prepared,
                    // Cut short by a stop: the next run takes it up again.
                    Ok(FileOutcome::CutShort) => continue,
                    Err(message) => {
                        pool.stop();
                        return Err(IngestError::Stage("decode", message));
                    }
                };
                for (file, prepared) in pool.after_file(file, prepared) {
                    if !send(Decoded::of(file, prepared)) {
                        return Ok(());
                    }
                }
            }
            Ok(())
        })();
        // The last slot to end records the crashed files still held back for a run of crashes
        // that did not reach its end.
        for (file, prepared) in pool.slot_ended() {
            if !send(Decoded::of(file, prepared)) {
                break;
            }
        }
        decoded
    }

    /// The encoder's thread: builds the towers, then embeds the decoded videos in batches and
    /// sends each outcome on; ends when the decoders are done or the receiver is gone.
    fn encode(
        &self,
        clip: Clip<Unbuilt>,
        decoded: Receiver<Decoded>,
        encoded: Sender<Encoded>,
        clock: &StageClock,
    ) -> Result<(), IngestError> {
        let dim = clip.embed_dim();
        let building = Instant::now();
        let clip = clip.build()?;
        clock.add(Activity::BuildModel, building);
        let embed = |pixels: &[f32], count: usize| -> Result<Vec<Vec<f32>>, ModelError> {
            crate::fault::point("encode");
            let started = Instant::now();
            let flat = clip.image_features(pixels, count)?;
            clock.add(Activity::Encode, started);
            Ok(flat.chunks(dim).map(<[f32]>::to_vec).collect())
        };
        let pool_video = |features: Vec<Vec<f32>>| clip.pool_video(features);
        let mut encoder = BatchEncoder::new(self.options.batch, embed, pool_video);
        loop {
            let waiting = Instant::now();
            let Ok(item) = decoded.recv() else { break };
            clock.add(Activity::EncodeWaiting, waiting);
            let done = match item {
                Decoded::Video(video) => encoder.push(video).map_err(IngestError::Encode)?,
                Decoded::Failed(file, rejection) => {
                    if encoded.send(Encoded::Failed(file, rejection)).is_err() {
                        return Ok(());
                    }
                    continue;
                }
            };
            for video in done {
                if encoded.send(Encoded::Video(video)).is_err() {
                    return Ok(());
                }
            }
        }
        for video in encoder.finish().map_err(IngestError::Encode)? {
            if encoded.send(Encoded::Video(video)).is_err() {
                return Ok(());
            }
        }
        Ok(())
    }
}

/// Stops the pool, its workers included, if this thread unwinds past it.
struct AbandonOnPanic<'a>(&'a Pool);

impl Drop for AbandonOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.abandon();
        }
    }
}
