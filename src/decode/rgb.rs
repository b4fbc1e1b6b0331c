//! Decoded frames to packed RGB, with the stream's colour matrix, or BT.601 where the stream
//! says nothing (as ffmpeg assumes).

use gstreamer as gst;
use gstreamer::glib;
use gstreamer_video as gst_video;

use crate::failure::{FailureKind, Rejection, Stage};
use crate::types::RgbImage;

/// Converts decoded frames to packed RGB with GStreamer's converter, reusing it while the
/// caps stay the same.
#[derive(Default)]
pub(super) struct RgbConverter {
    pub(super) cached: Option<(gst::Caps, gst_video::VideoInfo, gst_video::VideoInfo, gst_video::VideoConverter)>,
}

impl RgbConverter {
    pub(super) fn convert(&mut self, sample: &gst::Sample) -> Result<RgbImage, Rejection> {
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
pub(super) fn with_assumed_colorimetry(
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
