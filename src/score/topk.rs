//! The k best columns of one row, scanned in ascending column order: a later column enters
//! only with a strictly greater score, so equal scores keep the lower column (the lower
//! `video_id`) first, as contract §4 asks of `topk.parquet`.

use super::kernels::f32_below;

/// Values tested at once before single values are looked at.
const CHUNK: usize = 32;

#[derive(Debug, Clone, PartialEq)]
pub struct TopK {
    k: usize,
    /// Best first.
    items: Vec<(f64, u32)>,
}

impl TopK {
    pub fn new(k: usize) -> TopK {
        TopK { k, items: Vec::with_capacity(k + 1) }
    }

    /// The score a new column must beat to enter.
    #[inline]
    fn bar(&self) -> f64 {
        if self.items.len() < self.k { f64::NEG_INFINITY } else { self.items[self.k - 1].0 }
    }

    /// Offers one column, after every lower column: it enters only with a score strictly
    /// greater than the bar, so after every equal score already held. Whether it entered.
    #[inline]
    fn offer(&mut self, score: f64, column: u32) -> bool {
        if self.k == 0 {
            return false;
        }
        let enters = score > self.bar(); // never for NaN
        if !enters {
            return false;
        }
        let at = self.items.partition_point(|&(s, _)| s >= score);
        self.items.insert(at, (score, column));
        self.items.truncate(self.k);
        true
    }

    /// Offers `row[j]` for column `first_column + j`, in ascending column order.
    #[inline(always)]
    pub fn scan(&mut self, row: &[f64], first_column: u32) {
        if self.k == 0 {
            return;
        }
        // Once the list is full few values pass the bar: test a chunk at a time, with a loop
        // that vectorises, and look at single values only in chunks that hold a candidate.
        let mut bar = self.bar();
        for (c, chunk) in row.chunks(CHUNK).enumerate() {
            if !chunk.iter().fold(false, |any, &score| any | (score > bar)) {
                continue;
            }
            for (j, &score) in chunk.iter().enumerate() {
                if self.offer(score, first_column + (c * CHUNK + j) as u32) {
                    bar = self.bar();
                }
            }
        }
    }

    /// The same list as [`Self::scan`] over `score(j)` for every `j`, given an upper bound
    /// `upper[j] ≥ score(j)` of each: `score` is called only for the columns whose bound passes
    /// the bar, so the scores need not all be computed.
    #[inline(always)]
    pub fn scan_bounded(&mut self, upper: &[f32], first_column: u32, score: impl Fn(usize) -> f64) {
        if self.k == 0 {
            return;
        }
        // A score above the bar has a bound above the bar's f32 neighbour below.
        let mut bar = f32_below(self.bar());
        for (c, chunk) in upper.chunks(CHUNK).enumerate() {
            if !chunk.iter().fold(false, |any, &u| any | (u > bar)) {
                continue;
            }
            for (j, &u) in chunk.iter().enumerate() {
                let column = c * CHUNK + j;
                if u > bar && self.offer(score(column), first_column + column as u32) {
                    bar = f32_below(self.bar());
                }
            }
        }
    }

    /// `(column, score)`, best first.
    pub fn into_sorted(self) -> Vec<(u32, f64)> {
        self.items.into_iter().map(|(s, c)| (c, s)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_best_with_ties_to_the_lower_column() {
        let mut top = TopK::new(3);
        top.scan(&[0.5, 0.9, 0.5, 0.1], 0);
        top.scan(&[0.9, 0.5, 2.0], 4);
        assert_eq!(top.into_sorted(), vec![(6, 2.0), (1, 0.9), (4, 0.9)]);
        let mut top = TopK::new(5);
        top.scan(&[1.0, 1.0], 0);
        assert_eq!(top.into_sorted(), vec![(0, 1.0), (1, 1.0)]);
    }

    #[test]
    fn bounded_scan_equals_the_scan_and_computes_few_scores() {
        let scores: Vec<f64> = (0..1000u32).map(|j| f64::from((j * 7919) % 251) / 7.0).collect();
        let upper: Vec<f32> = scores.iter().map(|&s| (s as f32).next_up()).collect();
        let mut want = TopK::new(10);
        want.scan(&scores, 3);
        let computed = std::cell::Cell::new(0);
        let mut got = TopK::new(10);
        got.scan_bounded(&upper, 3, |j| {
            computed.set(computed.get() + 1);
            scores[j]
        });
        assert_eq!(got, want);
        assert!(computed.get() < 200, "{} scores computed", computed.get());
    }
}
