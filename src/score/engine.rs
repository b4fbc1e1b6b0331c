//! The CPU passes' shared machinery: the strips' cosines (one GEMM each), the cache that keeps
//! strips of the first pass for the second, QB-Norm's bank statistics, and the fixed-order
//! parallel merge that makes every sum independent of threads and scheduling.

use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::column_stats::ColumnStats;
use super::kernels::{argmax, strip_gemm};
use super::strip_layout::StripLayout;
use super::{Problem, ScoreOptions};

/// A problem being scored on the CPU: its strips and the cache of their cosines.
pub(super) struct Engine<'a> {
    pub(super) problem: &'a Problem<'a>,
    pub(super) options: &'a ScoreOptions,
    pub(super) layout: StripLayout,
    pub(super) columns: usize,
    cache: Vec<Mutex<Option<Vec<f32>>>>,
    cached_bytes: AtomicUsize,
}

impl<'a> Engine<'a> {
    /// The engine of `problem` (`columns` videos), its strips cut from `options.strip_bytes`.
    pub(super) fn new(problem: &'a Problem<'a>, options: &'a ScoreOptions, columns: usize) -> Engine<'a> {
        let layout = StripLayout::new(problem.text_video, columns, options.strip_bytes);
        Engine {
            problem,
            options,
            cache: (0..layout.strips.len()).map(|_| Mutex::new(None)).collect(),
            layout,
            columns,
            cached_bytes: AtomicUsize::new(0),
        }
    }
}

impl Engine<'_> {
    /// The cosines of one strip's rows against every video.
    pub(super) fn compute_strip(&self, range: &Range<usize>) -> Vec<f32> {
        let dim = self.problem.dim;
        let mut rows = Vec::with_capacity(range.len() * dim);
        for &text in &self.layout.order[range.clone()] {
            rows.extend_from_slice(&self.problem.texts[text * dim..(text + 1) * dim]);
        }
        let mut out = vec![0f32; range.len() * self.columns];
        strip_gemm(&rows, self.problem.videos, dim, &mut out);
        out
    }

    pub(super) fn keep_if_room(&self, strip_index: usize, strip: Vec<f32>) {
        let bytes = strip.len() * 4;
        if self.cached_bytes.fetch_add(bytes, Ordering::Relaxed) + bytes <= self.options.cache_bytes {
            *self.cache[strip_index].lock().expect("cache lock") = Some(strip);
        } else {
            self.cached_bytes.fetch_sub(bytes, Ordering::Relaxed);
        }
    }

    pub(super) fn strip(&self, strip_index: usize) -> Vec<f32> {
        let cached = self.cache[strip_index].lock().expect("cache lock").take();
        cached.unwrap_or_else(|| self.compute_strip(&self.layout.strips[strip_index]))
    }

    /// QB-Norm's bank statistics: the column statistics of `β·cos` and the activation set.
    pub(super) fn bank_statistics(&self, bank: &[f32]) -> (ColumnStats, Vec<bool>) {
        let (dim, columns, beta) = (self.problem.dim, self.columns, self.options.beta);
        let rows_per_strip = (self.options.strip_bytes / (4 * columns.max(1))).clamp(8, 1024);
        let bank_strips: Vec<&[f32]> = bank.chunks(rows_per_strip * dim).collect();
        let (stats, active) = in_fixed_order(
            bank_strips.len(),
            &|strips| {
                let (mut stats, mut active) = (ColumnStats::new(columns), vec![false; columns]);
                for rows in &bank_strips[strips] {
                    let mut strip = vec![0f32; rows.len() / dim * columns];
                    strip_gemm(rows, self.problem.videos, dim, &mut strip);
                    for s_row in strip.chunks_exact(columns) {
                        active[argmax(s_row)] = true;
                    }
                    crate::simd::with_wide_vectors(
                        #[inline(always)]
                        || stats.add_strip(&strip, columns, |c| beta * c as f64),
                    );
                }
                (stats, active)
            },
            &|(a, mut active_a): (ColumnStats, Vec<bool>), (b, active_b)| {
                for (x, y) in active_a.iter_mut().zip(active_b) {
                    *x |= y;
                }
                (a.merge(b), active_a)
            },
        );
        (stats, active)
    }
}

/// Strips one leaf of [`in_fixed_order`] takes in turn. One, so that the threads share the
/// last strips evenly; a thread holds one leaf's result per level of the tree it waits on
/// (log2 of the strips: 22 column statistics of 2 MB each at 100,000 videos on 2 threads).
const STRIPS_PER_LEAF: usize = 1;

/// Runs `leaf` over consecutive ranges of `0..count` in parallel and merges the results in a
/// binary tree fixed by `count` alone. Column sums merged this way are added in the same order
/// whatever the number of threads or the scheduling, so a score gives the same bits on every
/// run (rayon's `fold`/`reduce` merges in the order work happens to be stolen).
pub(super) fn in_fixed_order<T: Send>(
    count: usize,
    leaf: &(impl Fn(Range<usize>) -> T + Sync),
    merge: &(impl Fn(T, T) -> T + Sync),
) -> T {
    let leaves = count.div_ceil(STRIPS_PER_LEAF).max(1);
    fn tree<T: Send>(
        leaves: Range<usize>,
        count: usize,
        leaf: &(impl Fn(Range<usize>) -> T + Sync),
        merge: &(impl Fn(T, T) -> T + Sync),
    ) -> T {
        if leaves.len() == 1 {
            let first = leaves.start * STRIPS_PER_LEAF;
            return leaf(first.min(count)..(first + STRIPS_PER_LEAF).min(count));
        }
        let middle = leaves.start + leaves.len() / 2;
        let (a, b) = rayon::join(
            || tree(leaves.start..middle, count, leaf, merge),
            || tree(middle..leaves.end, count, leaf, merge),
        );
        merge(a, b)
    }
    tree(0..leaves, count, leaf, merge)
}
