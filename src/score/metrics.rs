//! Retrieval metrics from ranks (contract §5): R@1/5/10 in percent, median rank (the mean of
//! the two middle values for an even count) and mean rank.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub r1: f64,
    pub r5: f64,
    pub r10: f64,
    pub mdr: f64,
    pub mnr: f64,
    pub n: u64,
}

impl Metrics {
    /// `None` when there are no queries.
    pub fn from_ranks(ranks: &[u32]) -> Option<Metrics> {
        if ranks.is_empty() {
            return None;
        }
        let n = ranks.len();
        let recall = |k: u32| 100.0 * ranks.iter().filter(|&&r| r <= k).count() as f64 / n as f64;
        let mut sorted = ranks.to_vec();
        sorted.sort_unstable();
        let mdr =
            if n % 2 == 1 { sorted[n / 2] as f64 } else { (sorted[n / 2 - 1] as f64 + sorted[n / 2] as f64) / 2.0 };
        let mnr = ranks.iter().map(|&r| r as f64).sum::<f64>() / n as f64;
        Some(Metrics { r1: recall(1), r5: recall(5), r10: recall(10), mdr, mnr, n: n as u64 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_an_even_count_is_the_mean_of_the_middle_two() {
        let m = Metrics::from_ranks(&[1, 4, 12, 2]).unwrap();
        assert_eq!((m.r1, m.r5, m.r10, m.mdr, m.mnr, m.n), (25.0, 75.0, 75.0, 3.0, 4.75, 4));
        assert_eq!(Metrics::from_ranks(&[]), None);
    }
}
