//! The revision of one element or row once its statistics are known: every revision's formula
//! on the CPU (contract §1), and the statistics it reads.

use super::column_stats::ColumnStats;
use super::kernels::{self, SoftmaxStats, argmax, dual_softmax, inverted_softmax};
use super::{Revision, ScoreOptions};

/// What the second pass needs to revise any element: the revision and its statistics.
pub(super) struct Reviser {
    pub(super) revision: Revision,
    pub(super) scale: f64,
    pub(super) inv_tau: f64,
    pub(super) beta: f64,
    /// Column statistics: of `S/τ` over texts (dual softmax), or of `β·cos` over the bank (QB-Norm).
    pub(super) col_max: Vec<f64>,
    pub(super) col_inv_sum: Vec<f64>,
    /// The dual softmax's column statistics in f32 for [`dual_softmax_bounds`]: the cosine
    /// whose `S/τ` is `col_max`, and `col_inv_sum`.
    pub(super) col_top: Vec<f32>,
    pub(super) col_inv_sum_f32: Vec<f32>,
    /// Row statistics of `S/τ` over videos, by position (symmetric dual softmax).
    pub(super) row_stats: Vec<SoftmaxStats>,
    /// QB-Norm: the columns that are some bank query's top-1 (the activation set).
    pub(super) active_columns: Vec<bool>,
}

impl Reviser {
    /// A reviser of `options`, its statistics still to be installed.
    pub(super) fn new(options: &ScoreOptions) -> Reviser {
        Reviser {
            revision: options.revision,
            scale: options.scale,
            inv_tau: 1.0 / options.temperature,
            beta: options.beta,
            col_max: Vec::new(),
            col_inv_sum: Vec::new(),
            col_top: Vec::new(),
            col_inv_sum_f32: Vec::new(),
            row_stats: Vec::new(),
            active_columns: Vec::new(),
        }
    }

    /// Whether a QB-Norm row is revised: its own top-1 video is in the activation set.
    #[inline(always)]
    pub(super) fn row_is_active(&self, s_row: &[f32]) -> bool {
        self.revision.needs().row_top && self.active_columns[argmax(s_row)]
    }

    /// [`Self::row_is_active`] of a row whose top-1 column is `top`.
    pub(super) fn is_active(&self, top: u32) -> bool {
        self.revision.needs().row_top && self.active_columns[top as usize]
    }

    #[inline(always)]
    pub(super) fn t2v_value(&self, s: f32, col: usize, active: bool) -> f64 {
        match self.revision {
            Revision::None => self.scale * s as f64,
            Revision::Dsl | Revision::DslSym => {
                dual_softmax(self.scale * s as f64, self.inv_tau, self.col_max[col], self.col_inv_sum[col])
            }
            Revision::Qbnorm if active => {
                inverted_softmax(s as f64, self.beta, self.col_max[col], self.col_inv_sum[col])
            }
            Revision::Qbnorm => s as f64,
        }
    }

    #[inline(always)]
    pub(super) fn v2t_value(&self, s: f32, col: usize, pos: usize, active: bool) -> f64 {
        self.v2t_value_in_row(s, col, self.row_stats.get(pos).copied(), active)
    }

    /// [`Self::v2t_value`] with the row's statistics given (the symmetric form's).
    #[inline(always)]
    pub(super) fn v2t_value_in_row(&self, s: f32, col: usize, row: Option<SoftmaxStats>, active: bool) -> f64 {
        match self.revision {
            Revision::DslSym => {
                let stats = row.expect("the symmetric form has row statistics");
                dual_softmax(self.scale * s as f64, self.inv_tau, stats.max, 1.0 / stats.sum)
            }
            _ => self.t2v_value(s, col, active),
        }
    }

    /// The T2V row; the loops are written per revision so that each vectorises, and each
    /// computes exactly [`Self::t2v_value`].
    #[inline(always)]
    pub(super) fn t2v_row(&self, s_row: &[f32], active: bool, out: &mut [f64]) {
        let (scale, inv_tau, beta) = (self.scale, self.inv_tau, self.beta);
        match self.revision {
            Revision::None => kernels::logits(s_row, scale, out),
            Revision::Dsl | Revision::DslSym => {
                for (((o, &s), &m), &inv) in out.iter_mut().zip(s_row).zip(&self.col_max).zip(&self.col_inv_sum) {
                    *o = dual_softmax(scale * s as f64, inv_tau, m, inv);
                }
            }
            Revision::Qbnorm if active => {
                for (((o, &s), &m), &inv) in out.iter_mut().zip(s_row).zip(&self.col_max).zip(&self.col_inv_sum) {
                    *o = inverted_softmax(s as f64, beta, m, inv);
                }
            }
            Revision::Qbnorm => {
                for (o, &s) in out.iter_mut().zip(s_row) {
                    *o = s as f64;
                }
            }
        }
    }

    /// The symmetric form's V2T row (other revisions rank V2T on the T2V row).
    #[inline(always)]
    pub(super) fn v2t_row(&self, s_row: &[f32], pos: usize, out: &mut [f64]) {
        let stats = self.row_stats[pos];
        let (scale, inv_tau, inv_sum) = (self.scale, self.inv_tau, 1.0 / stats.sum);
        for (o, &s) in out.iter_mut().zip(s_row) {
            *o = dual_softmax(scale * s as f64, inv_tau, stats.max, inv_sum);
        }
    }
}

impl Reviser {
    /// Installs the dual softmax's column statistics.
    pub(super) fn install_columns(&mut self, stats: ColumnStats) {
        (self.col_max, self.col_inv_sum, self.col_top) = stats.finish();
        self.col_inv_sum_f32 = self.col_inv_sum.iter().map(|&inv| inv as f32).collect();
    }

    /// Installs QB-Norm's bank statistics and activation set.
    pub(super) fn install_bank(&mut self, stats: ColumnStats, active: Vec<bool>) {
        (self.col_max, self.col_inv_sum, _) = stats.finish();
        self.active_columns = active;
    }
}
