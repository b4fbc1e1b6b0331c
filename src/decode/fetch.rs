//! Pass 2, the fetch: decodes only the frames sampling chose, seeking when the next one is far,
//! and converts only those to RGB.

use std::sync::Arc;
use std::time::Duration;

use gstreamer as gst;
use gstreamer::prelude::*;

use super::bus::{BusWatch, timeout_rejection};
use super::pipeline::{SkipUnwanted, VideoBranch, build_pipeline, start, wait_for_video_sink};
use super::rgb::RgbConverter;
use super::timeline::PresentationTimeline;
use super::{Deadline, POLL, SEEK_GAP_NS};
use crate::failure::{FailureKind, Rejection, Stage};
use crate::types::RgbImage;

/// Pass 2: decodes the frames whose stream times are `targets` (sorted), seeking when the
/// next one is far, converting only those frames to RGB.
pub(super) fn fetch_frames(
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
    let mut timeline = PresentationTimeline::default();
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

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};

    use super::super::probe::probe_packets;
    use super::super::{Deadline, init};
    use super::*;
    use crate::sampling::{SamplingConfig, choose_frames};

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
}
