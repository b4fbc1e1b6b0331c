//! The k best columns of one row, scanned in ascending column order: a later column enters
//! only with a strictly greater score, so equal scores keep the lower column (the lower
//! `video_id`) first, as DESIGN §4 asks of `topk.parquet`.

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

    /// Offers `row[j]` for column `first_column + j`, in ascending column order.
    #[inline(always)]
    pub fn scan(&mut self, row: &[f64], first_column: u32) {
        if self.k == 0 {
            return;
        }
        // Once the list is full few values pass the bar: test a chunk at a time, with a loop
        // that vectorises, and look at single values only in chunks that hold a candidate.
        const CHUNK: usize = 32;
        let mut bar = self.bar();
        for (c, chunk) in row.chunks(CHUNK).enumerate() {
            if !chunk.iter().fold(false, |any, &score| any | (score > bar)) {
                continue;
            }
            for (j, &score) in chunk.iter().enumerate() {
                if score > bar {
                    // After every equal score already held: those have lower columns.
                    let at = self.items.partition_point(|&(s, _)| s >= score);
                    self.items.insert(at, (score, first_column + (c * CHUNK + j) as u32));
                    self.items.truncate(self.k);
                    bar = self.bar();
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
}
