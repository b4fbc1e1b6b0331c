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

pub mod nal;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use gstreamer as gst;
use gstreamer::glib;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use gstreamer_video as gst_video;

use crate::failure::{FailureKind, Rejection, Stage};
use crate::sampling::{SamplingConfig, choose_frames};
use crate::types::RgbImage;
use nal::{NalFraming, is_unreferenced_picture};

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
    let file = std::fs::File::open(path).map_err(|e| io_rejection(&e))?;
    let location = source_location(path, &file);
    let path = location.as_str();
    init().map_err(|e| Rejection::new(Stage::Probe, FailureKind::UnsupportedCodec, e))?;

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

/// What the probe learns from the demuxed packets, without decoding.
struct Probe {
    /// Stream times of every frame, sorted and distinct.
    frame_times_ns: Vec<i64>,
    /// Every shown packet's stream time and timestamp (buffer PTS, as the fetch pipeline's
    /// parser gives it again); `None` when the probe had to decode to find the times.
    packets: Option<Vec<(i64, u64)>>,
    last_frame_duration_ns: i64,
    orientation: Orientation,
    stream_index: Option<u32>,
}

/// Sets the pipeline to `Null` on every exit path, so no streaming thread outlives a file.
struct PipelineGuard(gst::Pipeline);

impl Drop for PipelineGuard {
    fn drop(&mut self) {
        let _ = self.0.set_state(gst::State::Null);
        // The drains (see `drain`) keep their own state; stop them too.
        let mut children = self.0.iterate_elements();
        while let Ok(Some(element)) = children.next() {
            if element.is_locked_state() {
                let _ = element.set_state(gst::State::Null);
            }
        }
    }
}

/// What the `pad-added` handler saw, shared with the thread that pulls samples.
#[derive(Default)]
struct PadState {
    /// A `pad-added` call has taken the video stream and is linking it (outside this lock).
    video_claimed: bool,
    video_sink: Option<gst_app::AppSink>,
    other_streams: Vec<String>,
    no_more_pads: bool,
    orientation: Option<String>,
    /// The chosen video pad's stream id, which its demuxer pad carries too.
    video_stream_id: Option<String>,
    /// The first demuxer parsebin plugged (a container inside a container is not counted), and
    /// its source pads in the order it created them: the container's stream order. Weak: the
    /// demuxer's own pad-added handler holds this state, and a strong reference back would keep
    /// the demuxer, and every object it holds, alive after the pipeline is gone.
    demuxer: Option<glib::WeakRef<gst::Element>>,
    demuxer_pads: Vec<glib::WeakRef<gst::Pad>>,
}

impl PadState {
    /// The chosen stream's position among the demuxer's streams (ffmpeg's stream number where
    /// GStreamer exposes every stream); 0 for a bare stream with no demuxer. Called once the
    /// stream has ended, while the pads still hold their stream-start events.
    fn video_stream_index(state: &Mutex<PadState>) -> Option<u32> {
        let (chosen, pads, has_video) = {
            let state = state.lock().unwrap();
            (state.video_stream_id.clone(), state.demuxer_pads.clone(), state.video_sink.is_some())
        };
        if pads.is_empty() {
            return has_video.then_some(0);
        }
        let chosen = chosen?;
        let position = pads
            .iter()
            .position(|pad| pad.upgrade().and_then(|pad| pad.stream_id()).as_deref() == Some(chosen.as_str()))?;
        u32::try_from(position).ok()
    }
}

/// What the pipeline does with the video stream: hand over its packets (the probe), or decode
/// them, leaving out what `skip` says is not needed.
#[derive(Clone)]
enum VideoBranch {
    Packets,
    Decoded { skip: Option<Arc<SkipUnwanted>> },
}

/// Which pictures the fetch may leave out before the decoder: H.264 access units that hold an
/// unreferenced picture (see [`nal`]) and are not sampled. With frames sampled a second
/// apart from a 30 fps x264 stream, about half the pictures are such B-frames; leaving them out
/// cut the decode's CPU time by about 30 % on the benchmark's clips. Other codecs pass
/// untouched.
struct SkipUnwanted {
    /// Packet timestamps (buffer PTS) of the sampled frames, sorted.
    wanted: Vec<u64>,
    /// How many buffers were dropped (the tests check that some are).
    left_out: AtomicUsize,
}

impl SkipUnwanted {
    /// `packets`: every shown packet's (stream time, PTS); `targets`: the sampled stream times,
    /// sorted. Every packet at a sampled time is wanted (two can share one where an edit list
    /// clips the first).
    fn new(packets: &[(i64, u64)], targets: &[i64]) -> Self {
        let mut wanted: Vec<u64> =
            packets.iter().filter(|(time, _)| targets.binary_search(time).is_ok()).map(|&(_, pts)| pts).collect();
        wanted.sort_unstable();
        SkipUnwanted { wanted, left_out: AtomicUsize::new(0) }
    }

    fn leaves_out(&self, buffer: &gst::BufferRef, framing: NalFraming) -> bool {
        let unwanted = buffer.pts().is_some_and(|pts| self.wanted.binary_search(&pts.nseconds()).is_err());
        let left_out = unwanted && buffer.map_readable().is_ok_and(|data| is_unreferenced_picture(&data, framing));
        if left_out {
            self.left_out.fetch_add(1, Ordering::Relaxed);
        }
        left_out
    }
}

/// Builds `filesrc ! parsebin` and links the first video stream to an appsink (through a
/// decodebin for [`VideoBranch::Decoded`]); every other stream goes to a fakesink.
fn build_pipeline(
    path: &str,
    branch: VideoBranch,
    stage: Stage,
) -> Result<(PipelineGuard, Arc<Mutex<PadState>>), Rejection> {
    let internal = |what: &str, e: &dyn std::fmt::Display| {
        Rejection::new(stage, FailureKind::UnsupportedCodec, format!("GStreamer could not {what}: {e}"))
    };
    let pipeline = gst::Pipeline::new();
    let guard = PipelineGuard(pipeline.clone());
    let src = gst::ElementFactory::make("filesrc")
        .property("location", path)
        .build()
        .map_err(|e| internal("create filesrc", &e))?;
    let parse = gst::ElementFactory::make("parsebin").build().map_err(|e| internal("create parsebin", &e))?;
    pipeline.add_many([&src, &parse]).map_err(|e| internal("build the pipeline", &e))?;
    src.link(&parse).map_err(|e| internal("link filesrc to parsebin", &e))?;

    let state = Arc::new(Mutex::new(PadState::default()));
    // The first demuxer parsebin plugs numbers the streams: record its pads as they come.
    let pad_state = state.clone();
    pipeline.connect_deep_element_added(move |_, _, element| {
        let is_demuxer = element.factory().is_some_and(|f| {
            let klass = f.metadata(gst::ELEMENT_METADATA_KLASS).unwrap_or_default();
            klass.contains("Demuxer") && !klass.contains("Metadata")
        });
        if !is_demuxer {
            return;
        }
        let pad_state = pad_state.clone();
        element.connect_pad_added(move |demuxer, pad| {
            if pad.direction() != gst::PadDirection::Src {
                return;
            }
            let mut state = pad_state.lock().unwrap();
            let first = state.demuxer.get_or_insert_with(|| demuxer.downgrade()).upgrade();
            if first.as_ref() == Some(demuxer) {
                state.demuxer_pads.push(pad.downgrade());
            }
        });
    });
    let weak_pipeline = pipeline.downgrade();
    let pad_state = state.clone();
    // Runs on a streaming thread. The lock on `PadState` is held only to read or record a fact,
    // never across a GStreamer call: linking and state changes can wait on other streaming
    // threads, which take the same lock in their probes (`watch_orientation`).
    parse.connect_pad_added(move |_, pad| {
        let Some(pipeline) = weak_pipeline.upgrade() else { return };
        let caps = pad.current_caps().unwrap_or_else(|| pad.query_caps(None));
        let is_video = caps.structure(0).is_some_and(is_video_structure);
        let claimed = is_video && !std::mem::replace(&mut pad_state.lock().unwrap().video_claimed, true);
        if claimed {
            let stream_id = pad.stream_id().map(|id| id.to_string());
            pad_state.lock().unwrap().video_stream_id = stream_id;
            watch_orientation(pad, pad_state.clone());
            if let Some(sink) = link_video(&pipeline, pad, &branch) {
                pad_state.lock().unwrap().video_sink = Some(sink);
                return;
            }
            pad_state.lock().unwrap().video_claimed = false;
        }
        if !is_video {
            let name = caps.structure(0).map(|s| s.name().to_string()).unwrap_or_default();
            pad_state.lock().unwrap().other_streams.push(name);
        }
        drain(&pipeline, pad);
    });
    let pad_state = state.clone();
    parse.connect_no_more_pads(move |_| pad_state.lock().unwrap().no_more_pads = true);
    Ok((guard, state))
}

fn is_video_structure(s: &gst::StructureRef) -> bool {
    let name = s.name();
    if name.starts_with("video/") {
        return true;
    }
    // Motion JPEG and friends: image caps that carry a real frame rate are a video stream;
    // a lone PNG or JPEG has none (or 0/1).
    name.starts_with("image/") && s.get::<gst::Fraction>("framerate").is_ok_and(|f| f.numer() > 0 && f.denom() > 0)
}

fn new_appsink(decode: bool) -> gst_app::AppSink {
    let builder = gst_app::AppSink::builder().sync(false).max_buffers(4).drop(false).enable_last_sample(false);
    if decode { builder.caps(&gst::Caps::builder("video/x-raw").build()).build() } else { builder.build() }
}

fn link_video(pipeline: &gst::Pipeline, pad: &gst::Pad, branch: &VideoBranch) -> Option<gst_app::AppSink> {
    let decode = matches!(branch, VideoBranch::Decoded { .. });
    let sink = new_appsink(decode);
    pipeline.add(&sink).ok()?;
    if let VideoBranch::Decoded { skip: Some(skip) } = branch {
        leave_out_unwanted(pad, skip.clone());
    }
    if decode {
        let decodebin = gst::ElementFactory::make("decodebin").build().ok()?;
        pipeline.add(&decodebin).ok()?;
        let sink_element = sink.clone().upcast::<gst::Element>();
        decodebin.connect_pad_added(move |_, decoded_pad| {
            let raw = decoded_pad
                .current_caps()
                .unwrap_or_else(|| decoded_pad.query_caps(None))
                .structure(0)
                .is_some_and(|s| s.name() == "video/x-raw");
            if let (true, Some(sink_pad)) = (raw, sink_element.static_pad("sink"))
                && !sink_pad.is_linked()
            {
                let _ = decoded_pad.link(&sink_pad);
            }
        });
        decodebin.sync_state_with_parent().ok()?;
        sink.sync_state_with_parent().ok()?;
        pad.link(&decodebin.static_pad("sink")?).ok()?;
    } else {
        sink.sync_state_with_parent().ok()?;
        pad.link(&sink.static_pad("sink")?).ok()?;
    }
    Some(sink)
}

/// Drops, on the parsed stream's way to the decoder, the buffers `skip` leaves out. The NAL
/// framing comes from the stream's caps, which a demuxer such as MPEG-TS's fixes only after the
/// pad appears: it is read again from every caps event, and nothing is left out until known.
fn leave_out_unwanted(pad: &gst::Pad, skip: Arc<SkipUnwanted>) {
    let framing = Mutex::new(pad.current_caps().and_then(|caps| h264_framing(&caps)));
    pad.add_probe(gst::PadProbeType::BUFFER | gst::PadProbeType::EVENT_DOWNSTREAM, move |_, info| {
        match &info.data {
            Some(gst::PadProbeData::Event(event)) => {
                if let gst::EventView::Caps(caps) = event.view() {
                    *framing.lock().unwrap() = h264_framing(caps.caps());
                }
            }
            Some(gst::PadProbeData::Buffer(buffer)) => {
                let known = *framing.lock().unwrap();
                if known.is_some_and(|framing| skip.leaves_out(buffer, framing)) {
                    return gst::PadProbeReturn::Drop;
                }
            }
            _ => {}
        }
        gst::PadProbeReturn::Ok
    });
}

/// The NAL framing of fixed `video/x-h264` caps; `None` for anything else.
fn h264_framing(caps: &gst::CapsRef) -> Option<NalFraming> {
    let s = caps.structure(0).filter(|s| s.name() == "video/x-h264")?;
    let codec_data = s.get::<gst::Buffer>("codec_data").ok();
    let codec_data = codec_data.as_ref().and_then(|b| b.map_readable().ok());
    NalFraming::from_caps(s.get::<&str>("stream-format").ok(), codec_data.as_deref())
}

/// Links a stream that is not the chosen video stream (audio, subtitles, data, a second
/// video stream) to a sink that takes every buffer at once and never prerolls: a `fakesink`
/// locked in `Playing`. Demuxers push all their streams from one thread; a sink that waited in
/// preroll (any sink of a pipeline in `Paused`, `async=false` included) would hold that thread
/// before the video sink ever received a frame, so the pipeline could never reach `Playing`.
fn drain(pipeline: &gst::Pipeline, pad: &gst::Pad) {
    let Ok(sink) = gst::ElementFactory::make("fakesink").property("sync", false).property("async", false).build()
    else {
        return;
    };
    sink.set_locked_state(true);
    if sink.set_state(gst::State::Playing).is_err() || pipeline.add(&sink).is_err() {
        let _ = sink.set_state(gst::State::Null);
        return;
    }
    if let Some(sink_pad) = sink.static_pad("sink") {
        let _ = pad.link(&sink_pad);
    }
}

/// Records the stream's `image-orientation` tag (the container's display rotation).
fn watch_orientation(pad: &gst::Pad, state: Arc<Mutex<PadState>>) {
    pad.add_probe(gst::PadProbeType::EVENT_DOWNSTREAM, move |_, info| {
        if let Some(gst::PadProbeData::Event(event)) = &info.data
            && let gst::EventView::Tag(tag) = event.view()
            && let Some(orientation) = tag.tag().get::<gst::tags::ImageOrientation>()
        {
            state.lock().unwrap().orientation = Some(orientation.get().to_string());
        }
        gst::PadProbeReturn::Ok
    });
}

/// Why a pipeline stopped: the first error on the bus, classified.
fn classify_error(err: &gst::message::Error, stage: Stage, missing_plugin: Option<&str>) -> Rejection {
    let error = err.error();
    let debug = err.debug().map(|d| d.to_string()).unwrap_or_default();
    let text = error.message().to_string();
    let kind = if let Some(e) = error.kind::<gst::StreamError>() {
        match e {
            gst::StreamError::TypeNotFound | gst::StreamError::WrongType => FailureKind::NotAVideo,
            gst::StreamError::CodecNotFound | gst::StreamError::NotImplemented => FailureKind::UnsupportedCodec,
            _ => FailureKind::Corrupt,
        }
    } else if let Some(e) = error.kind::<gst::ResourceError>() {
        match e {
            gst::ResourceError::NotFound
            | gst::ResourceError::OpenRead
            | gst::ResourceError::Read
            | gst::ResourceError::Seek
            | gst::ResourceError::NotAuthorized => FailureKind::Io,
            _ => FailureKind::Corrupt,
        }
    } else if let Some(gst::CoreError::MissingPlugin) = error.kind::<gst::CoreError>() {
        FailureKind::UnsupportedCodec
    } else {
        FailureKind::Corrupt
    };
    let message = match (kind, missing_plugin) {
        (FailureKind::UnsupportedCodec, Some(plugin)) => {
            format!("no decoder installed for {plugin} (install gstreamer1.0-libav or gstreamer1.0-plugins-bad/ugly)")
        }
        (FailureKind::NotAVideo, _) => format!("unrecognised data, not a video GStreamer can read ({text})"),
        _ if debug.is_empty() => text,
        _ => format!("{text} ({})", reason_line(&debug)),
    };
    Rejection::new(stage, kind, message)
}

/// The reason in a GStreamer debug string: its last line (the lines before it name the source
/// file, function and element path), cut to at most 200 bytes at a character boundary.
fn reason_line(debug: &str) -> &str {
    let line = debug.lines().last().unwrap_or(debug);
    let end = (0..=line.len().min(200)).rev().find(|&i| line.is_char_boundary(i)).unwrap_or(0);
    &line[..end]
}

/// Watches the bus of one pipeline: the first error, the end of stream, missing plugins.
struct BusWatch {
    bus: gst::Bus,
    stage: Stage,
    missing_plugin: Option<String>,
    eos: bool,
}

impl BusWatch {
    fn new(pipeline: &gst::Pipeline, stage: Stage) -> Self {
        BusWatch { bus: pipeline.bus().expect("a pipeline has a bus"), stage, missing_plugin: None, eos: false }
    }

    /// Drains pending messages, waiting at most `wait` for the first one.
    fn check(&mut self, wait: Duration) -> Result<(), Rejection> {
        let mut timeout = Some(gst::ClockTime::from_nseconds(wait.as_nanos() as u64));
        while let Some(msg) = self.bus.timed_pop(timeout.take().unwrap_or(gst::ClockTime::ZERO)) {
            match msg.view() {
                gst::MessageView::Error(err) => {
                    return Err(classify_error(err, self.stage, self.missing_plugin.as_deref()));
                }
                gst::MessageView::Eos(_) => self.eos = true,
                gst::MessageView::Element(element) => {
                    if let Some(s) = element.structure()
                        && s.name() == "missing-plugin"
                    {
                        let detail = s.get::<String>("name").ok().or_else(|| s.get::<String>("detail").ok());
                        self.missing_plugin = Some(detail.unwrap_or_else(|| "this stream".to_string()));
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
}

fn timeout_rejection(stage: Stage, deadline_passed_during: &str) -> Rejection {
    Rejection::new(
        stage,
        FailureKind::Timeout,
        format!(
            "gave up after the per-file deadline while {deadline_passed_during} (raise --decode-timeout if the file is merely slow)"
        ),
    )
}

fn start(pipeline: &gst::Pipeline, watch: &mut BusWatch) -> Result<(), Rejection> {
    if pipeline.set_state(gst::State::Playing).is_err() {
        // The reason is on the bus; fall back to a generic message if it is not.
        watch.check(Duration::from_millis(100))?;
        return Err(Rejection::new(watch.stage, FailureKind::Corrupt, "GStreamer could not start reading the file"));
    }
    Ok(())
}

/// Waits for the video appsink to appear, or for evidence that there is no video stream.
fn wait_for_video_sink(
    pipeline: &gst::Pipeline,
    state: &Mutex<PadState>,
    watch: &mut BusWatch,
    deadline: Deadline,
) -> Result<gst_app::AppSink, Rejection> {
    let mut stalled_polls = 0;
    loop {
        {
            let state = state.lock().unwrap();
            if let Some(sink) = &state.video_sink {
                return Ok(sink.clone());
            }
            // (A claimed stream is being linked: its sink is moments away.)
            if (state.no_more_pads && !state.video_claimed) || watch.eos {
                return Err(no_video_rejection(watch.stage, &state.other_streams));
            }
        }
        if deadline.passed() {
            return Err(timeout_rejection(watch.stage, "looking for a video stream"));
        }
        watch.check(POLL)?;
        stalled_polls = if streaming_stopped(pipeline) { stalled_polls + 1 } else { 0 };
        if stalled_polls >= STALLED_POLLS {
            return Err(Rejection::new(
                watch.stage,
                FailureKind::Corrupt,
                "the demuxer stopped without finding a stream (the file is damaged or truncated)",
            ));
        }
    }
}

/// Polls (of `POLL`) in a row with every streaming thread paused before a pipeline that has
/// not found its video stream is declared dead.
const STALLED_POLLS: u32 = 10;

/// Whether every streaming thread of the pipeline has stopped for good: some pad has a paused
/// task and none has a running one. A demuxer that hits an error pauses its task and posts the
/// error, but parsebin drops errors from an element it is still adding (a race in GStreamer),
/// so without this the pipeline would sit there until the deadline. A slow read keeps its task
/// running, so it is never mistaken for this.
fn streaming_stopped(pipeline: &gst::Pipeline) -> bool {
    let (mut paused, mut running) = (false, false);
    let mut elements = pipeline.iterate_recurse();
    while let Ok(Some(element)) = elements.next() {
        for pad in element.pads() {
            match pad.task_state() {
                gst::TaskState::Started => running = true,
                gst::TaskState::Paused => paused = true,
                _ => {}
            }
        }
    }
    paused && !running
}

fn no_video_rejection(stage: Stage, other_streams: &[String]) -> Rejection {
    if other_streams.iter().any(|s| s.starts_with("audio/")) {
        Rejection::new(stage, FailureKind::NoVideoStream, "the file holds audio but no video stream")
    } else if let Some(image) = other_streams.iter().find(|s| s.starts_with("image/")) {
        Rejection::new(stage, FailureKind::NotAVideo, format!("a still image ({image}), not a video"))
    } else if other_streams.is_empty() {
        Rejection::new(stage, FailureKind::NoVideoStream, "the container holds no video stream")
    } else {
        Rejection::new(stage, FailureKind::NotAVideo, format!("no video stream, only {}", other_streams.join(", ")))
    }
}

/// Presentation times on one timeline per pipeline: each buffer's timestamp, mapped to stream
/// time by the first segment the pipeline delivered. A demuxer may send a later segment with
/// another start (matroskademux does once a stream that begins earlier, such as audio, shows
/// up); times mapped by each segment in turn would jump by the difference, while the buffer
/// timestamps, which are the container's presentation times, do not.
#[derive(Default)]
struct Timeline {
    /// Stream time minus buffer time, fixed by the first segment.
    offset_ns: Option<i64>,
    /// The segment in effect, which clips buffers and which seeks are expressed in.
    current: Option<gst::FormattedSegment<gst::ClockTime>>,
}

impl Timeline {
    /// The sample's presentation time and duration, or `None` when the buffer has no
    /// timestamp or lies wholly outside its segment (e.g. before an edit list).
    fn time_of(&mut self, sample: &gst::Sample) -> Option<(i64, Option<i64>)> {
        let buffer = sample.buffer()?;
        let pts = buffer.pts()?;
        let duration = buffer.duration();
        let segment = sample.segment().and_then(|s| s.downcast_ref::<gst::ClockTime>().cloned());
        let shown = match &segment {
            Some(segment) => {
                let end = duration.map(|d| pts + d).unwrap_or(pts + gst::ClockTime::from_nseconds(1));
                segment.clip(pts, end)?;
                // A frame the segment starts within is shown from the segment's start.
                let shown = pts.max(segment.start().unwrap_or(pts));
                if self.offset_ns.is_none() {
                    let stream_time = segment.to_stream_time(shown)?;
                    self.offset_ns = Some(stream_time.nseconds() as i64 - shown.nseconds() as i64);
                }
                shown
            }
            None => pts,
        };
        self.current = segment;
        let offset = *self.offset_ns.get_or_insert(0);
        Some((shown.nseconds() as i64 + offset, duration.map(|d| d.nseconds() as i64)))
    }

    /// Where to seek for the timeline's time `time_ns`: stream time of the segment in effect.
    fn seek_position(&self, time_ns: i64) -> Option<gst::ClockTime> {
        let pts = time_ns - self.offset_ns?;
        let position = gst::ClockTime::from_nseconds(u64::try_from(pts).ok()?);
        match &self.current {
            Some(segment) => segment.to_stream_time(position),
            None => Some(position),
        }
    }
}

/// Pass 1: the presentation time of every video packet, read from the demuxer and parser
/// without decoding. Falls back to decoding when the packets carry no timestamps.
fn probe_packets(path: &str, deadline: Deadline) -> Result<Probe, Rejection> {
    match probe_times(path, deadline, false)? {
        Some(probe) => Ok(probe),
        None => probe_times(path, deadline, true)?.ok_or_else(|| {
            Rejection::new(Stage::Decode, FailureKind::Corrupt, "the video stream holds no decodable frame")
        }),
    }
}

fn probe_times(path: &str, deadline: Deadline, decode: bool) -> Result<Option<Probe>, Rejection> {
    let stage = if decode { Stage::Decode } else { Stage::Probe };
    let branch = if decode { VideoBranch::Decoded { skip: None } } else { VideoBranch::Packets };
    let (guard, state) = build_pipeline(path, branch, stage)?;
    let mut watch = BusWatch::new(&guard.0, stage);
    start(&guard.0, &mut watch)?;
    let sink = wait_for_video_sink(&guard.0, &state, &mut watch, deadline)?;

    // (time, duration, packet PTS) of every shown frame.
    let mut times: Vec<(i64, Option<i64>, u64)> = Vec::new();
    let mut timeline = Timeline::default();
    let mut untimed = 0usize;
    loop {
        if deadline.passed() {
            return Err(timeout_rejection(stage, "reading the packet times"));
        }
        watch.check(Duration::ZERO)?;
        match sink.try_pull_sample(gst::ClockTime::from_nseconds(POLL.as_nanos() as u64)) {
            Some(sample) => {
                let Some(buffer) = sample.buffer() else { continue };
                // Parsers flag a keyframe that carries in-band parameter sets as HEADER too,
                // so only buffers that are never shown are skipped.
                let never_shown = buffer.size() == 0
                    || buffer.flags().intersects(gst::BufferFlags::DECODE_ONLY | gst::BufferFlags::GAP);
                if never_shown {
                    continue;
                }
                // A stream time exists only for a buffer with a timestamp.
                match (timeline.time_of(&sample), buffer.pts()) {
                    (Some((time, duration)), Some(pts)) => times.push((time, duration, pts.nseconds())),
                    (_, None) => untimed += 1,
                    _ => {}
                }
            }
            None if sink.is_eos() => break,
            None => {}
        }
    }
    watch.check(Duration::ZERO)?;
    if untimed > 0 && !decode {
        // Some containers (raw elementary streams, some AVI and MPEG-PS files) do not
        // timestamp every packet; the decoder does.
        return Ok(None);
    }
    if times.is_empty() {
        return Ok(None);
    }
    let stated_duration_ns = guard.0.query_duration::<gst::ClockTime>().map(|d| d.nseconds() as i64);
    let packets = (!decode).then(|| times.iter().map(|t| (t.0, t.2)).collect());
    times.sort_by_key(|t| t.0);
    times.dedup_by_key(|t| t.0);
    let frame_times_ns: Vec<i64> = times.iter().map(|t| t.0).collect();
    let last_frame_duration_ns = times.last().and_then(|t| t.1).unwrap_or_else(|| average_interval(&frame_times_ns));
    let video_end_ns = frame_times_ns[frame_times_ns.len() - 1] + last_frame_duration_ns;
    if let Some(stated) = stated_duration_ns {
        // A half-uploaded file: the container promises more than the stream delivers.
        let slack = (stated / 10).max(2_000_000_000);
        if stated - video_end_ns > slack {
            return Err(Rejection::new(
                stage,
                FailureKind::Corrupt,
                format!(
                    "the video stream ends at {:.2} s but the container says {:.2} s: the file looks truncated (it is retried when it changes)",
                    video_end_ns as f64 / 1e9,
                    stated as f64 / 1e9
                ),
            ));
        }
    }
    let orientation = Orientation::from_tag(state.lock().unwrap().orientation.as_deref());
    let stream_index = PadState::video_stream_index(&state);
    Ok(Some(Probe { frame_times_ns, packets, last_frame_duration_ns, orientation, stream_index }))
}

fn average_interval(times: &[i64]) -> i64 {
    if times.len() < 2 {
        return 40_000_000; // 25 fps: a single frame still lasts a frame.
    }
    (times[times.len() - 1] - times[0]) / (times.len() as i64 - 1)
}

/// Pass 2: decodes the frames whose stream times are `targets` (sorted), seeking when the
/// next one is far, converting only those frames to RGB.
fn fetch_frames(
    path: &str,
    targets: &[i64],
    skip: Option<Arc<SkipUnwanted>>,
    deadline: Deadline,
) -> Result<Vec<(i64, RgbImage)>, Rejection> {
    let stage = Stage::Decode;
    let (guard, state) = build_pipeline(path, VideoBranch::Decoded { skip }, stage)?;
    let mut watch = BusWatch::new(&guard.0, stage);
    start(&guard.0, &mut watch)?;
    let sink = wait_for_video_sink(&guard.0, &state, &mut watch, deadline)?;

    let mut out: Vec<(i64, RgbImage)> = Vec::with_capacity(targets.len());
    let mut converter = RgbConverter::default();
    // The latest decoded frame not after the next target: the one on screen at that time.
    let mut on_screen: Option<(i64, gst::Sample)> = None;
    let mut timeline = Timeline::default();
    while out.len() < targets.len() {
        if deadline.passed() {
            return Err(timeout_rejection(stage, "decoding the sampled frames"));
        }
        watch.check(Duration::ZERO)?;
        let Some(sample) = sink.try_pull_sample(gst::ClockTime::from_nseconds(POLL.as_nanos() as u64)) else {
            if sink.is_eos() {
                break;
            }
            continue;
        };
        let Some((time, _)) = timeline.time_of(&sample) else { continue };
        // A frame after the target means the previous frame was on screen at the target.
        while out.len() < targets.len() && time > targets[out.len()] {
            let (shown_time, shown) = on_screen.take().unwrap_or((time, sample.clone()));
            out.push((shown_time, converter.convert(&shown)?));
        }
        if out.len() < targets.len() {
            let target = targets[out.len()];
            if time == target {
                out.push((time, converter.convert(&sample)?));
                on_screen = None;
            } else {
                on_screen = Some((time, sample));
            }
        }
        if let Some(&next) = targets.get(out.len())
            && next - time > SEEK_GAP_NS
        {
            let flags = gst::SeekFlags::FLUSH | gst::SeekFlags::ACCURATE;
            // A failed seek is harmless: decoding simply continues to the target.
            if let Some(position) = timeline.seek_position(next)
                && guard.0.seek_simple(flags, position).is_ok()
            {
                on_screen = None;
            }
        }
    }
    if out.len() < targets.len()
        && let Some((time, sample)) = on_screen.take()
    {
        out.push((time, converter.convert(&sample)?));
    }
    watch.check(Duration::ZERO)?;
    if out.len() < targets.len() {
        return Err(Rejection::new(
            stage,
            FailureKind::Corrupt,
            format!(
                "the decoder stopped before the frame at {:.3} s ({} of {} sampled frames decoded)",
                targets[out.len()] as f64 / 1e9 - targets[0] as f64 / 1e9,
                out.len(),
                targets.len()
            ),
        ));
    }
    Ok(out)
}

/// Converts decoded frames to packed RGB with GStreamer's converter, reusing it while the
/// caps stay the same.
#[derive(Default)]
struct RgbConverter {
    cached: Option<(gst::Caps, gst_video::VideoInfo, gst_video::VideoInfo, gst_video::VideoConverter)>,
}

impl RgbConverter {
    fn convert(&mut self, sample: &gst::Sample) -> Result<RgbImage, Rejection> {
        let failed = |what: &str| {
            Rejection::new(Stage::Decode, FailureKind::Corrupt, format!("cannot convert a decoded frame: {what}"))
        };
        let caps = sample.caps_owned().ok_or_else(|| failed("no caps"))?;
        if self.cached.as_ref().is_none_or(|c| c.0 != caps) {
            let decoded = gst_video::VideoInfo::from_caps(&caps).map_err(|_| failed("unreadable caps"))?;
            let input = with_assumed_colorimetry(&caps, &decoded).map_err(|_| failed("bad colorimetry"))?;
            // As ffmpeg converts (swscale, which PyAV's `to_ndarray` uses too): an interlaced
            // frame as one picture, both fields together, and each chroma sample applied to the
            // pixels it covers, not interpolated. GStreamer's defaults (per-field chroma,
            // interpolated 4:2:2 and 10-bit chroma) move those frames by 3 to 7 levels on average.
            let input = gst_video::VideoInfo::builder_from_info(&input)
                .interlace_mode(gst_video::VideoInterlaceMode::Progressive)
                .build()
                .map_err(|_| failed("cannot describe the frame"))?;
            let output = gst_video::VideoInfo::builder(gst_video::VideoFormat::Rgb, input.width(), input.height())
                .fps(input.fps())
                .build()
                .map_err(|_| failed("cannot describe RGB output"))?;
            let mut config = gst_video::VideoConverterConfig::new();
            config.set_chroma_mode(gst_video::VideoChromaMode::None);
            let converter =
                gst_video::VideoConverter::new(&input, &output, Some(config)).map_err(|_| failed("no converter"))?;
            self.cached = Some((caps, input, output, converter));
        }
        let (_, input, output, converter) = self.cached.as_ref().expect("filled above");
        let buffer = sample.buffer_owned().ok_or_else(|| failed("no buffer"))?;
        let frame = gst_video::VideoFrame::from_buffer_readable(buffer, input).map_err(|_| failed("cannot map"))?;
        let out_buffer = gst::Buffer::with_size(output.size()).map_err(|_| failed("out of memory"))?;
        let mut out_frame =
            gst_video::VideoFrame::from_buffer_writable(out_buffer, output).map_err(|_| failed("cannot map output"))?;
        converter.frame(&frame, &mut out_frame);
        let (width, height) = (output.width(), output.height());
        let stride = output.stride()[0] as usize;
        let plane = out_frame.plane_data(0).map_err(|_| failed("no RGB plane"))?;
        let row = width as usize * 3;
        let mut data = Vec::with_capacity(row * height as usize);
        for y in 0..height as usize {
            data.extend_from_slice(&plane[y * stride..y * stride + row]);
        }
        Ok(RgbImage { width, height, data })
    }
}

/// The decoded stream's colorimetry, with BT.601 where the stream does not say (ffmpeg's
/// assumption; GStreamer would guess BT.709 for HD sizes and move the colours).
fn with_assumed_colorimetry(
    caps: &gst::Caps,
    info: &gst_video::VideoInfo,
) -> Result<gst_video::VideoInfo, glib::BoolError> {
    // What the stream says, read from the caps string: `VideoInfo` replaces a colorimetry
    // whose matrix is unknown with the default for the size, losing a stated full range.
    let stated = caps
        .structure(0)
        .and_then(|s| s.get::<String>("colorimetry").ok())
        .and_then(|text| text.parse::<gst_video::VideoColorimetry>().ok());
    let colorimetry = info.colorimetry();
    let matrix_known = stated.as_ref().is_some_and(|c| c.matrix() != gst_video::VideoColorMatrix::Unknown);
    if !info.is_yuv() || matrix_known {
        return Ok(info.clone());
    }
    let range = match stated.as_ref().map(|c| c.range()) {
        Some(range) if range != gst_video::VideoColorRange::Unknown => range,
        _ => gst_video::VideoColorRange::Range16_235,
    };
    let assumed = gst_video::VideoColorimetry::new(
        range,
        gst_video::VideoColorMatrix::Bt601,
        colorimetry.transfer(),
        colorimetry.primaries(),
    );
    gst_video::VideoInfo::builder_from_info(info).colorimetry(&assumed).build()
}

/// The container's display rotation, applied to RGB frames as players do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Orientation {
    #[default]
    Identity,
    /// Rotate clockwise by 90°, 180° or 270°, after an optional horizontal flip.
    Rotate { flip: bool, quarter_turns: u8 },
}

impl Orientation {
    /// Parses GStreamer's `image-orientation` tag (`rotate-90`, `flip-rotate-270`, …).
    pub fn from_tag(tag: Option<&str>) -> Orientation {
        let Some(tag) = tag else { return Orientation::Identity };
        let (flip, rest) = match tag.strip_prefix("flip-") {
            Some(rest) => (true, rest),
            None => (false, tag),
        };
        let quarter_turns = match rest {
            "rotate-90" => 1,
            "rotate-180" => 2,
            "rotate-270" => 3,
            _ => 0,
        };
        if !flip && quarter_turns == 0 { Orientation::Identity } else { Orientation::Rotate { flip, quarter_turns } }
    }

    pub fn apply(self, image: RgbImage) -> RgbImage {
        let Orientation::Rotate { flip, quarter_turns } = self else { return image };
        let (w, h) = (image.width as usize, image.height as usize);
        let (out_w, out_h) = if quarter_turns % 2 == 1 { (h, w) } else { (w, h) };
        let mut data = vec![0u8; image.data.len()];
        for y in 0..out_h {
            for x in 0..out_w {
                // Where output pixel (x, y) comes from in the (flipped) source.
                let (sx, sy) = match quarter_turns {
                    1 => (y, h - 1 - x),
                    2 => (w - 1 - x, h - 1 - y),
                    3 => (w - 1 - y, x),
                    _ => (x, y),
                };
                let sx = if flip { w - 1 - sx } else { sx };
                let src = (sy * w + sx) * 3;
                let dst = (y * out_w + x) * 3;
                data[dst..dst + 3].copy_from_slice(&image.data[src..src + 3]);
            }
        }
        RgbImage { width: out_w as u32, height: out_h as u32, data }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fetches the sampled frames of `path` with and without leaving unreferenced pictures out,
    /// checks that they are the same, and returns how many pictures were left out.
    fn frames_agree_when_pictures_are_left_out(path: &Path) -> usize {
        let path = path.to_str().unwrap();
        let name = path;
        let deadline = Deadline { at: Instant::now() + Duration::from_secs(60) };
        let probe = probe_packets(path, deadline).unwrap();
        let packets = probe.packets.as_ref().expect("these packets carry timestamps");
        let first = probe.frame_times_ns[0];
        let relative: Vec<i64> = probe.frame_times_ns.iter().map(|t| t - first).collect();
        let targets: Vec<i64> =
            choose_frames(&relative, &SamplingConfig::default()).iter().map(|&i| probe.frame_times_ns[i]).collect();
        let skip = Arc::new(SkipUnwanted::new(packets, &targets));
        let every_picture = fetch_frames(path, &targets, None, deadline).unwrap();
        let skipping = fetch_frames(path, &targets, Some(skip.clone()), deadline).unwrap();
        assert_eq!(every_picture.len(), targets.len(), "{name}");
        assert!(every_picture == skipping, "{name}: the sampled frames differ when pictures are left out");
        skip.left_out.load(Ordering::Relaxed)
    }

    fn fixture_video(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("sample/videos").join(name)
    }

    /// Leaving unreferenced pictures out must not change a single sampled pixel or time, and on
    /// x264 clips with B-frames it must actually leave some out.
    #[test]
    fn leaving_out_unwanted_unreferenced_pictures_changes_no_sampled_frame() {
        init().unwrap();
        let left_out: usize = ["short_h264.mp4", "vfr_h264.mp4", "rotated90_h264.mp4", "carphone_pristine.mp4"]
            .into_iter()
            .map(|name| frames_agree_when_pictures_are_left_out(&fixture_video(name)))
            .sum();
        assert!(left_out > 0, "no picture was left out of these B-frame clips");
    }

    /// The same in an MPEG transport stream, whose H.264 comes as an Annex B byte-stream with
    /// its own timestamps: the fixture clip remuxed (not re-encoded) by GStreamer.
    #[test]
    fn leaving_out_pictures_of_an_annex_b_stream_changes_no_sampled_frame() {
        init().unwrap();
        let dir = std::env::temp_dir().join(format!("vtr-index-annexb-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ts = dir.join("short_h264.ts");
        let remux = gst::parse::launch(&format!(
            "filesrc location={} ! qtdemux ! h264parse ! video/x-h264,stream-format=byte-stream,alignment=au ! mpegtsmux ! filesink location={}",
            fixture_video("short_h264.mp4").display(),
            ts.display()
        ))
        .unwrap();
        remux.set_state(gst::State::Playing).unwrap();
        let bus = remux.bus().unwrap();
        let message = bus
            .timed_pop_filtered(gst::ClockTime::from_seconds(30), &[gst::MessageType::Eos, gst::MessageType::Error])
            .expect("the remux finishes");
        remux.set_state(gst::State::Null).unwrap();
        assert_eq!(message.type_(), gst::MessageType::Eos, "remux failed: {message:?}");
        let left_out = frames_agree_when_pictures_are_left_out(&ts);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(left_out > 0, "no picture was left out of the transport stream");
    }

    /// Every one of GStreamer's eight `image-orientation` values on a 3 × 2 image whose pixels
    /// are all distinct, against the displayed image drawn by hand from the tag's definition
    /// ("flip-" mirrors left to right, then the image turns clockwise).
    #[test]
    fn each_of_the_eight_orientations_gives_its_own_picture() {
        // a b c
        // d e f   (the red channel holds the letter; the others tell pixels apart too)
        let source = RgbImage { width: 3, height: 2, data: (1..=6u8).flat_map(|v| [v, 10 * v, 255 - v]).collect() };
        let (a, b, c, d, e, f) = (1, 2, 3, 4, 5, 6);
        let cases: [(&str, (u32, u32), Vec<u8>); 8] = [
            ("rotate-0", (3, 2), vec![a, b, c, d, e, f]),
            ("rotate-90", (2, 3), vec![d, a, e, b, f, c]),
            ("rotate-180", (3, 2), vec![f, e, d, c, b, a]),
            ("rotate-270", (2, 3), vec![c, f, b, e, a, d]),
            ("flip-rotate-0", (3, 2), vec![c, b, a, f, e, d]),
            ("flip-rotate-90", (2, 3), vec![f, c, e, b, d, a]),
            ("flip-rotate-180", (3, 2), vec![d, e, f, a, b, c]),
            ("flip-rotate-270", (2, 3), vec![a, d, b, e, c, f]),
        ];
        for (tag, size, letters) in cases {
            let shown = Orientation::from_tag(Some(tag)).apply(source.clone());
            assert_eq!((shown.width, shown.height), size, "{tag}");
            let want: Vec<u8> = letters.iter().flat_map(|&v| [v, 10 * v, 255 - v]).collect();
            assert_eq!(shown.data, want, "{tag}");
        }
        assert_eq!(Orientation::from_tag(None), Orientation::Identity);
    }

    #[test]
    fn the_reason_of_a_debug_string_is_its_last_line_cut_at_a_character() {
        let debug = "../gst/isomp4/qtdemux.c(7012): gst_qtdemux_loop (): /GstPipeline:p/GstQTDemux:q:\nstreaming stopped, reason error (-5)";
        assert_eq!(reason_line(debug), "streaming stopped, reason error (-5)");
        // Three-byte characters: byte 200 falls inside one, so the cut is at 198.
        let long = "€".repeat(100);
        assert_eq!(reason_line(&long), "€".repeat(66));
    }
}
