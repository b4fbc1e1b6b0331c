//! The two pipelines' construction and start: `filesrc ! parsebin` (probe) or `! decodebin`
//! (fetch), the video branch linked to an app sink as its pad appears, the H.264 pictures left
//! out before decoding, and the waits for the video stream with their deadline.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gstreamer as gst;
use gstreamer::glib;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;

use super::bus::{BusWatch, no_video_rejection, timeout_rejection};
use super::nal::{NalFraming, is_unreferenced_picture};
use super::{Deadline, POLL};
use crate::failure::{FailureKind, Rejection, Stage};

/// Sets the pipeline to `Null` on every exit path, so no streaming thread outlives a file.
pub(super) struct PipelineGuard(pub(super) gst::Pipeline);

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
pub(super) struct PadState {
    /// A `pad-added` call has taken the video stream and is linking it (outside this lock).
    pub(super) video_claimed: bool,
    pub(super) video_sink: Option<gst_app::AppSink>,
    pub(super) other_streams: Vec<String>,
    pub(super) no_more_pads: bool,
    pub(super) orientation: Option<String>,
    /// The chosen video pad's stream id, which its demuxer pad carries too.
    pub(super) video_stream_id: Option<String>,
    /// The first demuxer parsebin plugged (a container inside a container is not counted), and
    /// its source pads in the order it created them: the container's stream order. Weak: the
    /// demuxer's own pad-added handler holds this state, and a strong reference back would keep
    /// the demuxer, and every object it holds, alive after the pipeline is gone.
    pub(super) demuxer: Option<glib::WeakRef<gst::Element>>,
    pub(super) demuxer_pads: Vec<glib::WeakRef<gst::Pad>>,
}

impl PadState {
    /// The chosen stream's position among the demuxer's streams (ffmpeg's stream number where
    /// GStreamer exposes every stream); 0 for a bare stream with no demuxer. Called once the
    /// stream has ended, while the pads still hold their stream-start events.
    pub(super) fn video_stream_index(state: &Mutex<PadState>) -> Option<u32> {
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
pub(super) enum VideoBranch {
    Packets,
    Decoded { skip: Option<Arc<SkipUnwanted>> },
}

/// Which pictures the fetch may leave out before the decoder: H.264 access units that hold an
/// unreferenced picture (see [`nal`]) and are not sampled. With frames sampled a second
/// apart from a 30 fps x264 stream, about half the pictures are such B-frames; leaving them out
/// cut the decode's CPU time by about 30 % on the benchmark's clips. Other codecs pass
/// untouched.
pub(super) struct SkipUnwanted {
    /// Packet timestamps (buffer PTS) of the sampled frames, sorted.
    pub(super) wanted: Vec<u64>,
    /// How many buffers were dropped (the tests check that some are).
    pub(super) left_out: AtomicUsize,
}

impl SkipUnwanted {
    /// `packets`: every shown packet's (stream time, PTS); `targets`: the sampled stream times,
    /// sorted. Every packet at a sampled time is wanted (two can share one where an edit list
    /// clips the first).
    pub(super) fn new(packets: &[(i64, u64)], targets: &[i64]) -> Self {
        let mut wanted: Vec<u64> =
            packets.iter().filter(|(time, _)| targets.binary_search(time).is_ok()).map(|&(_, pts)| pts).collect();
        wanted.sort_unstable();
        SkipUnwanted { wanted, left_out: AtomicUsize::new(0) }
    }

    pub(super) fn leaves_out(&self, buffer: &gst::BufferRef, framing: NalFraming) -> bool {
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
pub(super) fn build_pipeline(
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

pub(super) fn is_video_structure(s: &gst::StructureRef) -> bool {
    let name = s.name();
    if name.starts_with("video/") {
        return true;
    }
    // Motion JPEG and friends: image caps that carry a real frame rate are a video stream;
    // a lone PNG or JPEG has none (or 0/1).
    name.starts_with("image/") && s.get::<gst::Fraction>("framerate").is_ok_and(|f| f.numer() > 0 && f.denom() > 0)
}

pub(super) fn new_appsink(decode: bool) -> gst_app::AppSink {
    let builder = gst_app::AppSink::builder().sync(false).max_buffers(4).drop(false).enable_last_sample(false);
    if decode { builder.caps(&gst::Caps::builder("video/x-raw").build()).build() } else { builder.build() }
}

pub(super) fn link_video(pipeline: &gst::Pipeline, pad: &gst::Pad, branch: &VideoBranch) -> Option<gst_app::AppSink> {
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
pub(super) fn leave_out_unwanted(pad: &gst::Pad, skip: Arc<SkipUnwanted>) {
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
pub(super) fn h264_framing(caps: &gst::CapsRef) -> Option<NalFraming> {
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
pub(super) fn drain(pipeline: &gst::Pipeline, pad: &gst::Pad) {
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
pub(super) fn watch_orientation(pad: &gst::Pad, state: Arc<Mutex<PadState>>) {
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

pub(super) fn start(pipeline: &gst::Pipeline, watch: &mut BusWatch) -> Result<(), Rejection> {
    if pipeline.set_state(gst::State::Playing).is_err() {
        // The reason is on the bus; fall back to a generic message if it is not.
        watch.check(Duration::from_millis(100))?;
        return Err(Rejection::new(watch.stage, FailureKind::Corrupt, "GStreamer could not start reading the file"));
    }
    Ok(())
}

/// Waits for the video appsink to appear, or for evidence that there is no video stream.
pub(super) fn wait_for_video_sink(
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
pub(super) const STALLED_POLLS: u32 = 10;

/// Whether every streaming thread of the pipeline has stopped for good: some pad has a paused
/// task and none has a running one. A demuxer that hits an error pauses its task and posts the
/// error, but parsebin drops errors from an element it is still adding (a race in GStreamer),
/// so without this the pipeline would sit there until the deadline. A slow read keeps its task
/// running, so it is never mistaken for this.
pub(super) fn streaming_stopped(pipeline: &gst::Pipeline) -> bool {
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
