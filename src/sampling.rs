//! Which frames of a video to embed: the CLIP4Clip protocol on presentation times (contract §2).
//!
//! Pure arithmetic over a sorted list of frame times; the decode module supplies the times
//! (read from demuxed packets) and fetches the frames chosen here. Sampling by time rather
//! than by frame index is what keeps variable-frame-rate video right.

/// Rounding slack when comparing a frame's time with a sampling instant.
const TIMESTAMP_SLACK_NS: i64 = 1_000;

/// How frames are chosen from a video.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingConfig {
    /// Samples per second of video (`--fps`).
    pub fps: f64,
    /// At most this many frames per video (`--frames`).
    pub max_frames: usize,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig { fps: 1.0, max_frames: 12 }
    }
}

/// Chooses frames from `frame_times_ns`, the presentation times of every frame in
/// nanoseconds from the first frame, sorted ascending and distinct.
///
/// Returns indices into `frame_times_ns`: the frame on screen at `t = k / fps` for
/// `k = 0, 1, …` while `t` ≤ the last frame's time, duplicates removed, thinned to
/// `max_frames` with numpy's `linspace(0, L - 1, max_frames, dtype=int)`.
pub fn choose_frames(frame_times_ns: &[i64], config: &SamplingConfig) -> Vec<usize> {
    let Some(&last) = frame_times_ns.last() else {
        return Vec::new();
    };
    let mut chosen: Vec<usize> = Vec::new();
    let mut k: u64 = 0;
    loop {
        let t_ns = sample_time_ns(k, config.fps);
        if t_ns > last {
            break;
        }
        // The frame on screen at t is the last one whose time is <= t. Container timestamps
        // reach us rounded down to whole nanoseconds, so a frame exactly at t can appear
        // up to a few nanoseconds late after subtracting the first frame's time.
        let on_screen = frame_times_ns.partition_point(|&ft| ft <= t_ns + TIMESTAMP_SLACK_NS);
        if on_screen > 0 {
            let index = on_screen - 1;
            if chosen.last() != Some(&index) {
                chosen.push(index);
            }
        }
        k += 1;
    }
    thin_evenly(chosen, config.max_frames)
}

/// The k-th sampling instant in nanoseconds, computed in f64 as the reference does.
fn sample_time_ns(k: u64, fps: f64) -> i64 {
    (k as f64 / fps * 1e9).round() as i64
}

/// Keeps `max` of `items` at `trunc(i · (L − 1) / (max − 1))`, the last forced to `L − 1`.
pub fn thin_evenly<T: Copy>(items: Vec<T>, max: usize) -> Vec<T> {
    let len = items.len();
    if len <= max {
        return items;
    }
    if max == 1 {
        return vec![items[0]];
    }
    (0..max)
        .map(|i| {
            let position =
                if i == max - 1 { len - 1 } else { (i as f64 * (len - 1) as f64 / (max - 1) as f64) as usize };
            items[position]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn times(fps: f64, n: usize) -> Vec<i64> {
        (0..n).map(|i| (i as f64 / fps * 1e9).round() as i64).collect()
    }

    fn chosen_seconds(frame_times: &[i64], config: &SamplingConfig) -> Vec<f64> {
        choose_frames(frame_times, config).into_iter().map(|i| frame_times[i] as f64 / 1e9).collect()
    }

    #[test]
    fn one_per_second_on_constant_rate() {
        let t = times(25.0, 100); // 4 s of video, last frame at 3.96 s
        assert_eq!(chosen_seconds(&t, &SamplingConfig::default()), vec![0.0, 1.0, 2.0, 3.0]);
    }

    #[test]
    fn on_screen_means_last_frame_not_after_t() {
        // NTSC: frame 29 (0.9676 s) is on screen at t = 1.
        let t: Vec<i64> = (0..120).map(|i| i * 1_001_000_000_000 / 30_000).collect();
        let s = chosen_seconds(&t, &SamplingConfig::default());
        assert_eq!(s.len(), 4);
        assert!((s[1] - 0.967_633).abs() < 1e-6, "{s:?}");
    }

    #[test]
    fn short_clip_keeps_its_only_sample() {
        let t = times(10.0, 4); // 0.0 .. 0.3 s
        assert_eq!(choose_frames(&t, &SamplingConfig::default()), vec![0]);
    }

    #[test]
    fn long_clip_thinned_like_numpy_linspace() {
        let t = times(10.0, 205); // 21 samples at 0..=20 s
        let s = chosen_seconds(&t, &SamplingConfig::default());
        assert_eq!(s, vec![0.0, 1.0, 3.0, 5.0, 7.0, 9.0, 10.0, 12.0, 14.0, 16.0, 18.0, 20.0]);
    }

    #[test]
    fn duplicates_removed_when_sampling_faster_than_video() {
        let t = times(2.0, 4); // frames at 0, 0.5, 1.0, 1.5
        let config = SamplingConfig { fps: 4.0, max_frames: 12 };
        assert_eq!(choose_frames(&t, &config), vec![0, 1, 2, 3]);
    }

    #[test]
    fn variable_frame_rate_uses_times_not_indices() {
        // 15 fps for 2 s, then 3 fps: index-based sampling would drift.
        let mut t: Vec<i64> = (0..30).map(|i| i * 1_000_000_000 / 15).collect();
        t.extend((0..9).map(|i| 2_000_000_000 + i * 1_000_000_000 / 3));
        let s = chosen_seconds(&t, &SamplingConfig::default());
        assert_eq!(s, vec![0.0, 1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn frame_a_nanosecond_late_from_rounding_still_counts() {
        // 0.1333… s and 3.1333… s both rounded down: the difference is 2.999999999 s or
        // 3.000000001 s depending on the digits; either is the frame at t = 3.
        let t = vec![0, 1_000_000_000, 2_000_000_000, 2_933_333_333, 3_000_000_001, 3_333_333_333];
        let s = chosen_seconds(&t, &SamplingConfig::default());
        assert_eq!(s, vec![0.0, 1.0, 2.0, 3.000_000_001]);
    }

    #[test]
    fn empty_input_gives_no_frames() {
        assert!(choose_frames(&[], &SamplingConfig::default()).is_empty());
    }
}
