//! The query engine: one text embedding against every video of an index, answered from the
//! mapped search segments (`store::segment`). `search` uses it for one query; a resident
//! process keeps it open and asks many.
//!
//! A query is an exact scan: every video embedding's cosine with the query (f16 halves widened
//! in registers, f32 sums; parallel over blocks of rows), a bounded selection of the best `k`
//! per block (not a sort of all), and for each of those the frame whose embedding matches the
//! query best, its frames read from the segment's file by offset. Ranking is by cosine, ties by
//! ascending `video_id` bytes; the cosines differ from those of the tables' f32 embeddings by at
//! most [`F16_COSINE_ERROR`](crate::store::segment::F16_COSINE_ERROR). What a search reports
//! ([`Hit`]: ranks from 1, `scale · cosine`) and how it embeds a query are here too, shared by
//! `search` and the service.

use std::collections::BinaryHeap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::Path;
use std::sync::Arc;

use half::f16;
use rayon::prelude::*;

use crate::model::tokenizer::ClipTokenizer;
use crate::model::{Clip, ModelError};
use crate::store::segment::{Segment, SegmentInfo, open_segments_reusing};
use crate::store::{Manifest, NotUnit, StoreError, UNIT_NORM_TOLERANCE};

/// Rows one parallel task scans: large enough that a task's overhead is small next to its
/// reads (2,048 × 512 halves = 2 MiB), small enough that two threads share the work evenly.
const BLOCK_ROWS: usize = 2048;

/// The videos of an index, mapped, ready for queries.
pub struct SearchEngine {
    segments: Vec<Arc<Segment>>,
    /// Each segment's manifest entry, by which a later engine reuses it.
    infos: Vec<SegmentInfo>,
    dim: usize,
    /// `(hash of the id, segment, row)` sorted, once [`SearchEngine::with_id_lookup`] built it:
    /// 16 bytes a video where a map of the ids themselves would copy them.
    by_id: Vec<(u64, u32, u32)>,
}

/// Where a video is: the engine's segments are the manifest's `videos` shards in order, and a
/// segment's rows are its shard's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VideoAt {
    pub segment: usize,
    pub row: usize,
}

/// One of a query's top videos.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineHit<'a> {
    pub video_id: &'a str,
    /// The cosine of the query and the video's embedding.
    pub cosine: f32,
    /// The video's sampled frame whose embedding has the highest cosine with the query (the
    /// first such by `frame_index`); none for a video without frames.
    pub best_frame: Option<BestFrame>,
}

/// One of a ranking's videos, before its best frame is read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ranked<'a> {
    pub video_id: &'a str,
    pub cosine: f32,
    pub at: VideoAt,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BestFrame {
    /// Its presentation time, in seconds.
    pub time_s: f64,
    pub cosine: f32,
}

impl SearchEngine {
    /// Maps the segments of the index `manifest` describes. `None` for an index whose `videos`
    /// shards have no segments (a format before 5 that no writer has upgraded yet).
    pub fn open(index: &Path, manifest: &Manifest) -> Result<Option<SearchEngine>, StoreError> {
        SearchEngine::open_reusing(index, manifest, None)
    }

    /// [`SearchEngine::open`], sharing with `previous` (an engine of an earlier manifest of the
    /// same index) the segments both list, so that following a commit maps only its new ones.
    pub fn open_reusing(
        index: &Path,
        manifest: &Manifest,
        previous: Option<&SearchEngine>,
    ) -> Result<Option<SearchEngine>, StoreError> {
        let held = |info: &SegmentInfo| {
            let previous = previous?;
            let at = previous.infos.iter().position(|held| held == info)?;
            Some(Arc::clone(&previous.segments[at]))
        };
        let Some(segments) = open_segments_reusing(index, manifest, held)? else { return Ok(None) };
        let infos = manifest.shards("videos").iter().filter_map(|shard| shard.segment.clone()).collect();
        Ok(Some(SearchEngine { segments, infos, dim: manifest.model.embed_dim, by_id: Vec::new() }))
    }

    /// The engine with its lookup of videos by id ([`SearchEngine::find`]) built: one pass over
    /// the ids, 16 bytes a video.
    pub fn with_id_lookup(mut self) -> SearchEngine {
        let mut by_id = Vec::with_capacity(self.videos());
        for (s, segment) in self.segments.iter().enumerate() {
            for row in 0..segment.len() {
                by_id.push((id_hash(segment.id(row)), s as u32, row as u32));
            }
        }
        by_id.par_sort_unstable();
        self.by_id = by_id;
        self
    }

    /// Where the video `id` is; `None` if the index has no such video (or the lookup was not
    /// built).
    pub fn find(&self, id: &str) -> Option<VideoAt> {
        let hash = id_hash(id);
        let first = self.by_id.partition_point(|&(h, _, _)| h < hash);
        self.by_id[first..]
            .iter()
            .take_while(|&&(h, _, _)| h == hash)
            .map(|&(_, s, row)| VideoAt { segment: s as usize, row: row as usize })
            .find(|at| self.segments[at.segment].id(at.row) == id)
    }

    /// The video's id at `at`.
    pub fn id(&self, at: VideoAt) -> &str {
        self.segments[at.segment].id(at.row)
    }

    /// The video's embedding at `at`, widened to f32 and normalised again (the f16 rounding
    /// moves its norm by up to 2⁻¹¹): a query for the videos like it.
    pub fn video_embedding(&self, at: VideoAt) -> Vec<f32> {
        let halves = &self.segments[at.segment].video_embeddings()[at.row * self.dim..(at.row + 1) * self.dim];
        let mut v: Vec<f32> = halves.iter().map(|&h| f16::from_bits(h).to_f32()).collect();
        let norm = v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        if norm > 0.0 {
            v.iter_mut().for_each(|x| *x = (f64::from(*x) / norm) as f32);
        }
        v
    }

    /// The presentation times of the video's sampled frames, in seconds, by `frame_index`.
    pub fn frame_times(&self, at: VideoAt) -> Result<Vec<f64>, StoreError> {
        Ok(self.segments[at.segment].read_frames(at.row)?.0)
    }

    /// Each segment's video array (row-major f16 halves): what a query scans.
    pub fn video_arrays(&self) -> impl Iterator<Item = &[u16]> {
        self.segments.iter().map(|s| s.video_embeddings())
    }

    /// How many videos a query ranks.
    pub fn videos(&self) -> usize {
        self.segments.iter().map(|s| s.len()).sum()
    }

    /// The first video whose embedding is not a unit vector, and why: a NaN would rank first.
    /// One pass over the video arrays; a resident process makes it once.
    pub fn first_not_unit(&self) -> Option<(&str, NotUnit)> {
        self.blocks().into_par_iter().find_map_first(|(s, rows)| {
            let segment = &self.segments[s];
            rows.into_iter().find_map(|row| {
                let v = &segment.video_embeddings()[row * self.dim..(row + 1) * self.dim];
                // A finite f32 sum within the tolerance (some margin for its rounding) is a unit
                // row; anything else is looked at closely, in f64.
                let squares = squared_norm_f16(v);
                if squares.is_finite() && (f64::from(squares).sqrt() - 1.0).abs() <= 0.5 * UNIT_NORM_TOLERANCE {
                    return None;
                }
                not_unit(v).map(|why| (segment.id(row), why))
            })
        })
    }

    /// The `k` videos whose embeddings have the highest cosine with `query` (an L2-normalised
    /// embedding of the index's width: another width panics), best first, each with its best
    /// frame. The caller has refused non-unit rows ([`SearchEngine::first_not_unit`]): a NaN
    /// would rank anywhere. The frames are read from the files by offset, not through the maps,
    /// so a process that keeps the engine open holds the video arrays and nothing more (the
    /// page cache may keep more, as it will).
    pub fn search(&self, query: &[f32], k: usize) -> Result<Vec<EngineHit<'_>>, StoreError> {
        let hits = self.rank(query, k).into_iter().map(|ranked| {
            let best_frame = self.best_frame(query, ranked.at)?;
            Ok(EngineHit { video_id: ranked.video_id, cosine: ranked.cosine, best_frame })
        });
        hits.collect()
    }

    /// [`SearchEngine::search`] without the best frames: the `k` best videos and where they
    /// are, so that a caller showing a page of them reads the frames of that page only
    /// ([`SearchEngine::best_frame`]).
    pub fn rank(&self, query: &[f32], k: usize) -> Vec<Ranked<'_>> {
        assert_eq!(query.len(), self.dim, "a query of the index's width");
        // A `k` past the videos asks for them all; the heaps are sized by what they can hold.
        let k = k.min(self.videos());
        if k == 0 {
            return Vec::new();
        }
        let top = self
            .blocks()
            .into_par_iter()
            .fold(
                || BinaryHeap::with_capacity(k + 1),
                |mut top, (s, rows)| {
                    let segment = &self.segments[s];
                    let videos = segment.video_embeddings();
                    for row in rows {
                        let cosine = dot_f16(query, &videos[row * self.dim..(row + 1) * self.dim]);
                        // Most rows lose to the running k-th at once; only the others' ids are read.
                        if top.len() < k || top.peek().is_some_and(|worst: &Candidate| cosine >= worst.cosine) {
                            offer(&mut top, k, Candidate { cosine, id: segment.id(row), segment: s, row });
                        }
                    }
                    top
                },
            )
            .reduce(BinaryHeap::new, |mut a, b| {
                for candidate in b {
                    offer(&mut a, k, candidate);
                }
                a
            });
        // The heap's greatest is its worst: ascending order is best first.
        let ranked = top.into_sorted_vec().into_iter();
        ranked
            .map(|c| Ranked { video_id: c.id, cosine: c.cosine, at: VideoAt { segment: c.segment, row: c.row } })
            .collect()
    }

    /// The video's sampled frame whose embedding has the highest cosine with `query` (the first
    /// such by `frame_index`), its frames read by offset; none for a video without frames.
    pub fn best_frame(&self, query: &[f32], at: VideoAt) -> Result<Option<BestFrame>, StoreError> {
        let (times, embeddings) = self.segments[at.segment].read_frames(at.row)?;
        let mut best: Option<BestFrame> = None;
        for (&time_s, embedding) in times.iter().zip(embeddings.chunks_exact(self.dim.max(1))) {
            let cosine = dot_f16(query, embedding);
            if best.is_none_or(|b| cosine > b.cosine) {
                best = Some(BestFrame { time_s, cosine });
            }
        }
        Ok(best)
    }

    /// The scan's tasks: `(segment, rows)` blocks of at most [`BLOCK_ROWS`].
    fn blocks(&self) -> Vec<(usize, std::ops::Range<usize>)> {
        let mut blocks = Vec::new();
        for (s, segment) in self.segments.iter().enumerate() {
            let mut start = 0;
            while start < segment.len() {
                let end = (start + BLOCK_ROWS).min(segment.len());
                blocks.push((s, start..end));
                start = end;
            }
        }
        blocks
    }
}

/// One of a search's top videos, as `search --json` prints it and the service's API sends it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Hit {
    pub rank: usize,
    pub video_id: String,
    /// `scale · cos(query, video)`.
    pub score: f64,
    /// The presentation time of the best-matching sampled frame, in seconds.
    pub best_frame_s: Option<f64>,
    pub best_frame_cosine: Option<f64>,
}

/// The query's text embedding (L2-normalised), as every search embeds it.
pub fn embed_query(clip: &Clip, text: &str) -> Result<Vec<f32>, ModelError> {
    let tokens = ClipTokenizer::new(clip.max_text_tokens()).encode(text);
    clip.embed_texts(&[tokens])
}

/// The factor from a cosine to a search score: the model's `exp(logit_scale)`.
pub fn logit_scale(manifest: &Manifest) -> f64 {
    f64::from(manifest.model.logit_scale).exp()
}

/// The engine's hits as search reports them, ranked from 1.
pub fn hits_of(hits: Vec<EngineHit<'_>>, scale: f64) -> Vec<Hit> {
    let hits = hits.into_iter().enumerate().map(|(i, hit)| Hit {
        rank: i + 1,
        video_id: hit.video_id.to_string(),
        score: scale * f64::from(hit.cosine),
        best_frame_s: hit.best_frame.map(|b| b.time_s),
        best_frame_cosine: hit.best_frame.map(|b| f64::from(b.cosine)),
    });
    hits.collect()
}

/// The id lookup's hash: SipHash with fixed keys, the same in every process.
fn id_hash(id: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    id.hash(&mut hasher);
    hasher.finish()
}

/// Why the f16 row `v` is not a unit vector, if it is not.
fn not_unit(v: &[u16]) -> Option<NotUnit> {
    NotUnit::of(v.iter().map(|&h| f16::from_bits(h).to_f32()))
}

/// A video in the running selection. Ordered worst first (greatest): a lower cosine, or the
/// same cosine and a later id, so that a max-heap of `k` keeps the best `k` with its worst on top.
#[derive(Debug, Clone, Copy)]
struct Candidate<'a> {
    cosine: f32,
    id: &'a str,
    segment: usize,
    row: usize,
}

impl Ord for Candidate<'_> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // `+ 0.0` makes −0 and +0 one value, so that they tie and the ids decide.
        let (mine, theirs) = (self.cosine + 0.0, other.cosine + 0.0);
        theirs.total_cmp(&mine).then_with(|| self.id.as_bytes().cmp(other.id.as_bytes()))
    }
}

impl PartialOrd for Candidate<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Candidate<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for Candidate<'_> {}

/// Keeps `candidate` if it is among the best `k` seen.
#[inline]
fn offer<'a>(top: &mut BinaryHeap<Candidate<'a>>, k: usize, candidate: Candidate<'a>) {
    if top.len() < k {
        top.push(candidate);
    } else if let Some(mut worst) = top.peek_mut()
        && candidate.cosine >= worst.cosine
        && candidate < *worst
    {
        *worst = candidate;
    }
}

/// `Σ query[i] · v[i]` with `v` in f16 halves.
#[inline]
pub fn dot_f16(query: &[f32], v: &[u16]) -> f32 {
    debug_assert_eq!(query.len(), v.len());
    sum_of_products::<false>(v, &query[..v.len()])
}

/// `Σ v[i]²` with `v` in f16 halves.
#[inline]
pub fn squared_norm_f16(v: &[u16]) -> f32 {
    sum_of_products::<true>(v, &[])
}

/// `Σ v[i] · query[i]`, or `Σ v[i]²` when `SQUARES` (a constant, so the kernel has no branch):
/// the halves widened eight at a time (F16C) into four FMA chains where the CPU has them, one
/// f32 chain otherwise.
#[inline]
fn sum_of_products<const SQUARES: bool>(v: &[u16], query: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            // SAFETY: the CPU has the features the kernel is compiled for (checked above).
            return unsafe { sum_of_products_f16c::<SQUARES>(v, query) };
        }
    }
    v.iter().enumerate().fold(0.0f32, |sum, (i, &h)| {
        let x = f16::from_bits(h).to_f32();
        (if SQUARES { x } else { query[i] }).mul_add(x, sum)
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn sum_of_products_f16c<const SQUARES: bool>(v: &[u16], query: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = v.len();
    assert!(SQUARES || query.len() == n);
    let (h, q) = (v.as_ptr(), query.as_ptr());
    let mut sums = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY (every load below): `at + 8 ≤ n` elements of `v`, and of the query where it is
    // read (its length is `n`, asserted above), are in bounds.
    unsafe {
        let add = |at: usize, sum: &mut __m256| {
            let halves = _mm256_cvtph_ps(_mm_loadu_si128(h.add(at).cast()));
            let other = if SQUARES { halves } else { _mm256_loadu_ps(q.add(at)) };
            *sum = _mm256_fmadd_ps(halves, other, *sum);
        };
        while i + 32 <= n {
            for (lane, sum) in sums.iter_mut().enumerate() {
                add(i + 8 * lane, sum);
            }
            i += 32;
        }
        while i + 8 <= n {
            add(i, &mut sums[0]);
            i += 8;
        }
    }
    let sum = _mm256_add_ps(_mm256_add_ps(sums[0], sums[1]), _mm256_add_ps(sums[2], sums[3]));
    let half = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
    let pairs = _mm_add_ps(half, _mm_movehl_ps(half, half));
    let mut total = _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1)));
    for (j, &h) in v.iter().enumerate().skip(i) {
        let x = f16::from_bits(h).to_f32();
        total = (if SQUARES { x } else { query[j] }).mul_add(x, total);
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_f16_dot_product_is_the_sum_of_its_terms() {
        for n in [0, 1, 7, 8, 31, 32, 33, 512, 515] {
            let query: Vec<f32> = (0..n).map(|i| ((i * 37 % 11) as f32 - 5.0) / 16.0).collect();
            let v: Vec<u16> = (0..n).map(|i| f16::from_f32(((i * 13 % 7) as f32 - 3.0) / 8.0).to_bits()).collect();
            let exact: f64 =
                query.iter().zip(&v).map(|(&q, &h)| f64::from(q) * f64::from(f16::from_bits(h).to_f32())).sum();
            // Every term and partial sum is a multiple of 2⁻⁷ well inside f32's range: exact.
            assert_eq!(f64::from(dot_f16(&query, &v)), exact, "n = {n}");
        }
    }

    #[test]
    fn the_squared_norm_is_the_sum_of_squares() {
        for n in [0, 5, 8, 40, 512] {
            let v: Vec<u16> = (0..n).map(|i| f16::from_f32(((i * 5 % 9) as f32 - 4.0) / 4.0).to_bits()).collect();
            let exact: f64 = v.iter().map(|&h| f64::from(f16::from_bits(h).to_f32()).powi(2)).sum();
            assert_eq!(f64::from(squared_norm_f16(&v)), exact, "n = {n}");
        }
        let one = [f16::ONE.to_bits(), 0, 0];
        assert!(not_unit(&one).is_none());
        assert!(matches!(not_unit(&[f16::NAN.to_bits(), 0]), Some(NotUnit::NonFinite { position: 0, .. })));
        assert!(matches!(not_unit(&[f16::from_f32(2.0).to_bits()]), Some(NotUnit::Norm(n)) if n == 2.0));
    }

    #[test]
    fn the_selection_keeps_the_best_and_breaks_ties_by_id() {
        let mut top = BinaryHeap::new();
        let ids = ["e", "b", "d", "a", "c"];
        for (i, (&id, cosine)) in ids.iter().zip([0.5, 0.9, 0.9, 0.1, 0.9]).enumerate() {
            offer(&mut top, 3, Candidate { cosine, id, segment: 0, row: i });
        }
        let kept: Vec<&str> = top.into_sorted_vec().iter().map(|c| c.id).collect();
        assert_eq!(kept, ["b", "c", "d"]);
    }
}
