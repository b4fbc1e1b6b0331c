//! A pipeline's bus: the first error classified into a typed [`Rejection`], the deadline's
//! timeout, and what a file without a video stream holds instead.

use std::time::Duration;

use gstreamer as gst;
use gstreamer::prelude::*;

use crate::failure::{FailureKind, Rejection, Stage};

/// Why a pipeline stopped: the first error on the bus, classified.
pub(super) fn classify_error(err: &gst::message::Error, stage: Stage, missing_plugin: Option<&str>) -> Rejection {
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
pub(super) fn reason_line(debug: &str) -> &str {
    let line = debug.lines().last().unwrap_or(debug);
    let end = (0..=line.len().min(200)).rev().find(|&i| line.is_char_boundary(i)).unwrap_or(0);
    &line[..end]
}

/// Watches the bus of one pipeline: the first error, the end of stream, missing plugins.
pub(super) struct BusWatch {
    pub(super) bus: gst::Bus,
    pub(super) stage: Stage,
    pub(super) missing_plugin: Option<String>,
    pub(super) eos: bool,
}

impl BusWatch {
    pub(super) fn new(pipeline: &gst::Pipeline, stage: Stage) -> Self {
        BusWatch { bus: pipeline.bus().expect("a pipeline has a bus"), stage, missing_plugin: None, eos: false }
    }

    /// Drains pending messages, waiting at most `wait` for the first one.
    pub(super) fn check(&mut self, wait: Duration) -> Result<(), Rejection> {
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

pub(super) fn timeout_rejection(stage: Stage, deadline_passed_during: &str) -> Rejection {
    Rejection::new(
        stage,
        FailureKind::Timeout,
        format!(
            "gave up after the per-file deadline while {deadline_passed_during} (raise --decode-timeout if the file is merely slow)"
        ),
    )
}

pub(super) fn no_video_rejection(stage: Stage, other_streams: &[String]) -> Rejection {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reason_of_a_debug_string_is_its_last_line_cut_at_a_character() {
        let debug = "../gst/isomp4/qtdemux.c(7012): gst_qtdemux_loop (): /GstPipeline:p/GstQTDemux:q:\nstreaming stopped, reason error (-5)";
        assert_eq!(reason_line(debug), "streaming stopped, reason error (-5)");
        // Three-byte characters: byte 200 falls inside one, so the cut is at 198.
        let long = "€".repeat(100);
        assert_eq!(reason_line(&long), "€".repeat(66));
    }
}
