//! One frame of a video as a small JPEG: what the service (`serve`) shows for a search result
//! and in a video's frame strip. It is made inside a decode worker process
//! (`ingest/worker.rs`), so a decoder that crashes or hangs on the file takes only the worker.

use std::path::Path;
use std::time::Duration;

use fast_image_resize::images::Image;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};

use crate::decode::decode_frame_at;
use crate::failure::{FailureKind, Rejection, Stage};

/// The longer side of a thumbnail, in pixels: a result grid's cell at twice the density.
pub const THUMBNAIL_MAX_SIDE: u32 = 320;
const JPEG_QUALITY: u8 = 80;

/// A frame, scaled to fit [`THUMBNAIL_MAX_SIDE`], as JPEG bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Thumbnail {
    /// The presentation time of the frame shown, in seconds from the first frame.
    pub time_s: f64,
    pub width: u32,
    pub height: u32,
    pub jpeg: Vec<u8>,
}

/// The frame on screen at `time_s` in the video at `path`, as displayed, scaled down (never
/// up) to fit a square of `max_side` and encoded as JPEG.
pub fn make_thumbnail(path: &Path, time_s: f64, max_side: u32, timeout: Duration) -> Result<Thumbnail, Rejection> {
    let frame = decode_frame_at(path, time_s, timeout)?;
    let failed = |what: String| Rejection::new(Stage::Decode, FailureKind::Corrupt, what);
    let (width, height) = fitted(frame.image.width, frame.image.height, max_side);
    let pixels = if (width, height) == (frame.image.width, frame.image.height) {
        frame.image.data
    } else {
        let src = Image::from_vec_u8(frame.image.width, frame.image.height, frame.image.data, PixelType::U8x3)
            .map_err(|e| failed(format!("a decoded frame of the wrong size: {e}")))?;
        let mut dst = Image::new(width, height, PixelType::U8x3);
        let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
        Resizer::new().resize(&src, &mut dst, &options).map_err(|e| failed(format!("cannot scale the frame: {e}")))?;
        dst.into_vec()
    };
    let mut jpeg = Vec::new();
    let encoder = jpeg_encoder::Encoder::new(&mut jpeg, JPEG_QUALITY);
    // JPEG's sides are u16: a `max_side` past that fails here, with a message.
    let side = |v: u32| u16::try_from(v).map_err(|_| failed(format!("a frame side of {v} pixels")));
    encoder
        .encode(&pixels, side(width)?, side(height)?, jpeg_encoder::ColorType::Rgb)
        .map_err(|e| failed(format!("cannot encode the frame as JPEG: {e}")))?;
    Ok(Thumbnail { time_s: frame.pts_s, width, height, jpeg })
}

/// `width × height` scaled to fit `max_side × max_side`, keeping its shape, never enlarged, at
/// least one pixel a side.
fn fitted(width: u32, height: u32, max_side: u32) -> (u32, u32) {
    let longer = width.max(height);
    if longer <= max_side {
        return (width, height);
    }
    let scale =
        |v: u32| ((u64::from(v) * u64::from(max_side) + u64::from(longer) / 2) / u64::from(longer)).max(1) as u32;
    (scale(width), scale(height))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_is_scaled_down_to_fit_keeping_its_shape() {
        assert_eq!(fitted(1920, 1080, 320), (320, 180));
        assert_eq!(fitted(1080, 1920, 320), (180, 320));
        assert_eq!(fitted(200, 100, 320), (200, 100), "never enlarged");
        assert_eq!(fitted(10_000, 1, 320), (320, 1), "at least a pixel");
    }
}
