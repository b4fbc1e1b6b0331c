//! Pass 1, the probe: every video packet's presentation time, the display rotation and the
//! stream's index, read from the demuxer and parser without decoding (decoding only when the
//! packets carry no timestamps).

use std::time::Duration;

use gstreamer as gst;
use gstreamer::prelude::*;

use super::bus::{BusWatch, timeout_rejection};
use super::orientation::Orientation;
use super::pipeline::{PadState, VideoBranch, build_pipeline, start, wait_for_video_sink};
use super::timeline::PresentationTimeline;
use super::{Deadline, POLL};
use crate::failure::{FailureKind, Rejection, Stage};

/// What the probe learns from the demuxed packets, without decoding.
pub(super) struct ProbedStream {
    /// Stream times of every frame, sorted and distinct.
    pub(super) frame_times_ns: Vec<i64>,
    /// Every shown packet's stream time and timestamp (buffer PTS, as the fetch pipeline's
    /// parser gives it again); `None` when the probe had to decode to find the times.
    pub(super) packets: Option<Vec<(i64, u64)>>,
    pub(super) last_frame_duration_ns: i64,
    pub(super) orientation: Orientation,
    pub(super) stream_index: Option<u32>,
}

/// Pass 1: the presentation time of every video packet, read from the demuxer and parser
/// without decoding. Falls back to decoding when the packets carry no timestamps.
pub(super) fn probe_packets(path: &str, deadline: Deadline) -> Result<ProbedStream, Rejection> {
    match probe_times(path, deadline, false)? {
        Some(probe) => Ok(probe),
        None => probe_times(path, deadline, true)?.ok_or_else(|| {
            Rejection::new(Stage::Decode, FailureKind::Corrupt, "the video stream holds no decodable frame")
        }),
    }
}

pub(super) fn probe_times(path: &str, deadline: Deadline, decode: bool) -> Result<Option<ProbedStream>, Rejection> {
    let stage = if decode { Stage::Decode } else { Stage::Probe };
    let branch = if decode { VideoBranch::Decoded { skip: None } } else { VideoBranch::Packets };
    let (guard, state) = build_pipeline(path, branch, stage)?;
    let mut watch = BusWatch::new(&guard.0, stage);
    start(&guard.0, &mut watch)?;
    let sink = wait_for_video_sink(&guard.0, &state, &mut watch, deadline)?;

    // (time, duration, packet PTS) of every shown frame.
    let mut times: Vec<(i64, Option<i64>, u64)> = Vec::new();
    let mut timeline = PresentationTimeline::default();
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
    Ok(Some(ProbedStream { frame_times_ns, packets, last_frame_duration_ns, orientation, stream_index }))
}

pub(super) fn average_interval(times: &[i64]) -> i64 {
    if times.len() < 2 {
        return 40_000_000; // 25 fps: a single frame still lasts a frame.
    }
    (times[times.len() - 1] - times[0]) / (times.len() as i64 - 1)
}
