//! Presentation times on one timeline per pipeline, and where to seek for one of them.

use gstreamer as gst;

/// Presentation times on one timeline per pipeline: each buffer's timestamp, mapped to stream
/// time by the first segment the pipeline delivered. A demuxer may send a later segment with
/// another start (matroskademux does once a stream that begins earlier, such as audio, shows
/// up); times mapped by each segment in turn would jump by the difference, while the buffer
/// timestamps, which are the container's presentation times, do not.
#[derive(Default)]
pub(super) struct PresentationTimeline {
    /// Stream time minus buffer time, fixed by the first segment.
    pub(super) offset_ns: Option<i64>,
    /// The segment in effect, which clips buffers and which seeks are expressed in.
    pub(super) current: Option<gst::FormattedSegment<gst::ClockTime>>,
}

impl PresentationTimeline {
    /// The sample's presentation time and duration, or `None` when the buffer has no
    /// timestamp or lies wholly outside its segment (e.g. before an edit list).
    pub(super) fn time_of(&mut self, sample: &gst::Sample) -> Option<(i64, Option<i64>)> {
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
    pub(super) fn seek_position(&self, time_ns: i64) -> Option<gst::ClockTime> {
        let pts = time_ns - self.offset_ns?;
        let position = gst::ClockTime::from_nseconds(u64::try_from(pts).ok()?);
        match &self.current {
            Some(segment) => segment.to_stream_time(position),
            None => Some(position),
        }
    }
}
