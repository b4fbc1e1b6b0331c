//! The container's display rotation (GStreamer's `image-orientation` tag) applied to RGB
//! frames as players do. Bytes only: no GStreamer here.

use crate::types::RgbImage;

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
}
