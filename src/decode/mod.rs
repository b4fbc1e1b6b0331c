//! One video file → its sampled RGB frames with their presentation times, through GStreamer.
//!
//! This is the only module that knows GStreamer. It runs two short pipelines per file:
//! a *probe* (`filesrc ! parsebin`, no decoding) that reads every video packet's presentation
//! time, the display rotation and the stated duration; then a *fetch* (`filesrc ! parsebin !
//! decodebin`) that decodes only what it must to return the frames [`crate::sampling`] chose,
//! seeking when the next one is far and leaving out the unsampled H.264 pictures nothing refers
//! to ([`nal`]). Only the chosen frames are converted to RGB, with the
//! stream's colour matrix, or BT.601 when the stream says nothing (as ffmpeg assumes).
//! Every wait has a deadline, and every error becomes a typed [`Rejection`].

mod bus;
mod fetch;
pub mod nal;
mod orientation;
mod pipeline;
mod probe;
mod rgb;
mod timeline;

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use gstreamer as gst;
use gstreamer::prelude::*;

use crate::failure::{FailureKind, Rejection, Stage};
use crate::sampling::{SamplingConfig, choose_frames};
use crate::types::RgbImage;
use fetch::fetch_frames;
use pipeline::SkipUnwanted;
use probe::probe_packets;

pub use orientation::Orientation;

/// Decoding one next sample that is further away than this seeks instead of decoding through.
const SEEK_GAP_NS: i64 = 2_500_000_000;
/// How long one pull waits before the bus and the deadline are checked again.
const POLL: Duration = Duration::from_millis(50);

/// How one file is decoded.
#[derive(Debug, Clone)]
pub struct DecodeConfig {
    pub sampling: SamplingConfig,
    /// A file that takes longer than this (probe and fetch together) is a `timeout` failure.
    pub timeout: Duration,
}

impl DecodeConfig {
    pub fn new(sampling: SamplingConfig, timeout: Duration) -> DecodeConfig {
        DecodeConfig { sampling, timeout }
    }
}

/// When a file's decoding must stop. (An ingest run stopped by a signal kills its decode
/// workers instead: `ingest/pool.rs`.)
#[derive(Clone, Copy)]
struct Deadline {
    at: Instant,
}

impl Deadline {
    fn passed(&self) -> bool {
        Instant::now() > self.at
    }
}

/// One frame chosen by the sampling protocol.
#[derive(Debug, Clone)]
pub struct SampledFrame {
    /// Presentation time in seconds from the first frame.
    pub pts_s: f64,
    pub image: RgbImage,
}

/// What decoding one file gives: the frames to embed and what the videos table records.
#[derive(Debug, Clone)]
pub struct DecodedVideo {
    pub frames: Vec<SampledFrame>,
    /// The last frame's presentation time plus its duration.
    pub duration_s: f64,
    /// As displayed, after rotation.
    pub width: u32,
    pub height: u32,
    /// Frames / duration.
    pub fps: f64,
    /// Which stream of the container was indexed: its position among the streams the demuxer
    /// exposes (ffmpeg's numbering wherever GStreamer exposes every stream).
    pub stream_index: Option<u32>,
}

/// Initialises GStreamer once and checks that the elements the decoder needs are installed.
pub fn init() -> Result<(), String> {
    static INIT: OnceLock<Result<(), String>> = OnceLock::new();
    INIT.get_or_init(|| {
        gst::init().map_err(|e| format!("cannot initialise GStreamer: {e}"))?;
        // Motion JPEG through ffmpeg's own decoder, as the Python references decode it: libjpeg's
        // `jpegdec` (ranked first by default) turns 4:2:2 JPEG into 4:2:0 and its IDCT differs.
        if let Some(mjpeg) = gst::Registry::get().lookup_feature("avdec_mjpeg") {
            mjpeg.set_rank(gst::Rank::PRIMARY + 1);
        }
        let missing: Vec<&str> = ["filesrc", "parsebin", "decodebin", "appsink", "fakesink"]
            .into_iter()
            .filter(|name| gst::ElementFactory::find(name).is_none())
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "GStreamer elements missing: {}; install gstreamer1.0-plugins-base and gstreamer1.0-plugins-good",
                missing.join(", ")
            ))
        }
    })
    .clone()
}

/// Decodes the frames the sampling protocol chooses from the video at `path`.
pub fn decode_video(path: &Path, config: &DecodeConfig) -> Result<DecodedVideo, Rejection> {
    let deadline = Deadline { at: Instant::now() + config.timeout };
    match std::fs::metadata(path) {
        Ok(m) if m.len() == 0 => {
            return Err(Rejection::new(Stage::Probe, FailureKind::Empty, "the file is empty (0 bytes)"));
        }
        Ok(_) => {}
        Err(e) => return Err(io_rejection(&e)),
    }
    // Held open for the whole decode: a name that is not UTF-8 reaches filesrc through it.
    let (_file, location) = open_source(path)?;
    let path = location.as_str();

    let probe = probe_packets(path, deadline)?;
    let first_ns = probe.frame_times_ns[0];
    let relative: Vec<i64> = probe.frame_times_ns.iter().map(|t| t - first_ns).collect();
    let chosen = choose_frames(&relative, &config.sampling);
    let targets: Vec<i64> = chosen.iter().map(|&i| probe.frame_times_ns[i]).collect();
    // Unreferenced pictures that are not sampled are left out before the decoder. Only where
    // the probe read the packets' own timestamps, so the wanted ones are known exactly.
    let skip = probe.packets.as_ref().map(|packets| Arc::new(SkipUnwanted::new(packets, &targets)));

    let fetched = fetch_frames(path, &targets, skip, deadline)?;
    let mut frames = Vec::with_capacity(fetched.len());
    for (stream_time_ns, image) in fetched {
        frames.push(SampledFrame {
            pts_s: (stream_time_ns - first_ns) as f64 / 1e9,
            image: probe.orientation.apply(image),
        });
    }
    let duration_ns = (relative.last().copied().unwrap_or(0) + probe.last_frame_duration_ns).max(1);
    let duration_s = duration_ns as f64 / 1e9;
    let (width, height) = frames.first().map(|f| (f.image.width, f.image.height)).unwrap_or((0, 0));
    let fps = relative.len() as f64 / duration_s;
    Ok(DecodedVideo { duration_s, width, height, fps, frames, stream_index: probe.stream_index })
}

/// The frame on screen `time_s` seconds after the first frame of the video at `path` (the last
/// frame for a time past the end), as displayed, with its presentation time: what a thumbnail
/// of a sampled frame shows. Probes and decodes as [`decode_video`] does, for one target.
pub fn decode_frame_at(path: &Path, time_s: f64, timeout: Duration) -> Result<SampledFrame, Rejection> {
    let deadline = Deadline { at: Instant::now() + timeout };
    let (_file, location) = open_source(path)?;
    let path = location.as_str();
    let probe = probe_packets(path, deadline)?;
    let first_ns = probe.frame_times_ns[0];
    let wanted_ns = first_ns.saturating_add((time_s.max(0.0) * 1e9).round() as i64);
    // The probe's times are in presentation order: the last one not after the time is on screen.
    let target = probe.frame_times_ns.iter().copied().filter(|&t| t <= wanted_ns).max().unwrap_or(first_ns);
    let skip = probe.packets.as_ref().map(|packets| Arc::new(SkipUnwanted::new(packets, &[target])));
    let (stream_time_ns, image) = fetch_frames(path, &[target], skip, deadline)?
        .pop()
        .ok_or_else(|| Rejection::new(Stage::Decode, FailureKind::Corrupt, "the decoder gave no frame at that time"))?;
    Ok(SampledFrame { pts_s: (stream_time_ns - first_ns) as f64 / 1e9, image: probe.orientation.apply(image) })
}

/// Opens the file at `path` (to be held while its pipelines run) and initialises GStreamer;
/// returns the file and the location `filesrc` reads it by.
fn open_source(path: &Path) -> Result<(std::fs::File, String), Rejection> {
    let file = std::fs::File::open(path).map_err(|e| io_rejection(&e))?;
    let location = source_location(path, &file);
    init().map_err(|e| Rejection::new(Stage::Probe, FailureKind::UnsupportedCodec, e))?;
    Ok((file, location))
}

/// What `filesrc` opens: the path itself when it is UTF-8 (GStreamer's string properties are),
/// otherwise the already open file through `/proc/self/fd`, which is the same file whatever
/// bytes its name holds.
fn source_location(path: &Path, file: &std::fs::File) -> String {
    use std::os::fd::AsRawFd;
    match path.to_str() {
        Some(utf8) => utf8.to_string(),
        None => format!("/proc/self/fd/{}", file.as_raw_fd()),
    }
}

fn io_rejection(e: &std::io::Error) -> Rejection {
    Rejection::new(Stage::Probe, FailureKind::Io, format!("cannot read the file: {e}"))
}
