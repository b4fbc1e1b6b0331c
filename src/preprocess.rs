//! RGB frame → CLIP's input tensor values, exactly as `CLIPImageProcessor` makes them.
//!
//! Shorter side resized to `resize` with Pillow's antialiased bicubic (Catmull-Rom, a = −0.5,
//! 8-bit rounding between and after the passes: fast_image_resize's convolution resizer),
//! centre crop, scale to [0, 1], per-channel mean and std. Knows nothing of video or models.

use fast_image_resize::images::Image;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use serde::{Deserialize, Serialize};

use crate::types::RgbImage;

/// OpenAI CLIP's normalisation constants, used when a checkpoint names none (written as
/// published, even where f32 cannot hold every digit).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// The preprocessing a checkpoint expects; recorded in the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreprocessConfig {
    /// The shorter side after resizing.
    #[serde(rename = "shortest_edge")]
    pub resize: u32,
    /// The square centre crop.
    pub crop: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl PreprocessConfig {
    pub fn clip(image_size: u32) -> Self {
        PreprocessConfig { resize: image_size, crop: image_size, mean: CLIP_MEAN, std: CLIP_STD }
    }

    /// Values per image: 3 × crop × crop.
    pub fn len(&self) -> usize {
        3 * (self.crop as usize) * (self.crop as usize)
    }

    pub fn is_empty(&self) -> bool {
        self.crop == 0
    }
}

/// The size of the resized image: shorter side `target`, longer side `trunc(target · long / short)`.
pub fn resized_size(width: u32, height: u32, target: u32) -> (u32, u32) {
    let scale = |long: u32, short: u32| ((target as u64 * long as u64) / short as u64) as u32;
    if width <= height { (target, scale(height, width)) } else { (scale(width, height), target) }
}

/// Makes the CHW float tensor values CLIP takes for one RGB image.
pub fn pixel_values(image: &RgbImage, config: &PreprocessConfig) -> Result<Vec<f32>, String> {
    if image.width == 0 || image.height == 0 {
        return Err("the frame has no pixels".into());
    }
    let (rw, rh) = resized_size(image.width, image.height, config.resize);
    let src = Image::from_vec_u8(image.width, image.height, image.data.clone(), PixelType::U8x3)
        .map_err(|e| format!("bad frame buffer: {e}"))?;
    // Pillow resamples horizontally, rounds and clips to 8 bits, then vertically.
    // fast_image_resize would do the vertical pass first when both change, which clips
    // bicubic overshoot on the other axis and moves high-contrast pixels by several levels,
    // so the two passes are asked for one at a time.
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::CatmullRom));
    let mut resizer = Resizer::new();
    let resize_error = |e: fast_image_resize::ResizeError| format!("resize failed: {e}");
    let mut horizontal = Image::new(rw, image.height, PixelType::U8x3);
    resizer.resize(&src, &mut horizontal, &options).map_err(resize_error)?;
    let mut resized = Image::new(rw, rh, PixelType::U8x3);
    resizer.resize(&horizontal, &mut resized, &options).map_err(resize_error)?;

    let crop = config.crop as usize;
    if (rw as usize) < crop || (rh as usize) < crop {
        return Err(format!("resized frame {rw}×{rh} is smaller than the {crop}-pixel crop"));
    }
    let left = (rw as usize - crop) / 2;
    let top = (rh as usize - crop) / 2;
    let pixels = resized.buffer();
    let row_bytes = rw as usize * 3;
    let plane = crop * crop;
    let mut out = vec![0f32; 3 * plane];
    for c in 0..3 {
        let scale = 1.0 / (255.0 * config.std[c]);
        let shift = config.mean[c] / config.std[c];
        for y in 0..crop {
            let row = &pixels[(top + y) * row_bytes..];
            let dst = &mut out[c * plane + y * crop..c * plane + (y + 1) * crop];
            for (x, value) in dst.iter_mut().enumerate() {
                *value = row[(left + x) * 3 + c] as f32 * scale - shift;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shorter_side_becomes_target_longer_truncated() {
        assert_eq!(resized_size(320, 240, 224), (298, 224));
        assert_eq!(resized_size(360, 640, 224), (224, 398));
        assert_eq!(resized_size(100, 60, 224), (373, 224));
        assert_eq!(resized_size(200, 200, 224), (224, 224));
    }

    #[test]
    fn uniform_grey_normalises_per_channel() {
        let image = RgbImage { width: 300, height: 250, data: vec![128; 300 * 250 * 3] };
        let config = PreprocessConfig::clip(224);
        let values = pixel_values(&image, &config).unwrap();
        assert_eq!(values.len(), config.len());
        for c in 0..3 {
            let expected = (128.0 / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c];
            let v = values[c * 224 * 224 + 1000];
            assert!((v - expected).abs() < 1e-5, "channel {c}: {v} vs {expected}");
        }
    }
}
