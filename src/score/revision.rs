//! The revisions a score applies (contract §1) and the one description of each: what it needs
//! before any row can be revised. The CPU passes, the split score, the GPU path and the `score`
//! command read [`Revision::needs`] and decide nothing else by the revision's name; only its
//! formula is written per revision (`reviser.rs`, and `kernels/score.cu` where the GPU has it).

/// The matrix revision applied before ranking (contract §1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Revision {
    /// The logits as they are.
    None,
    /// CAMoE's dual softmax: `S ⊙ softmax_over_texts(S/τ)`, one matrix for both directions.
    Dsl,
    /// CLIP2TV's symmetric form: the column prior for T2V, the row prior for V2T.
    DslSym,
    /// QB-Norm's dynamic inverted softmax with a query bank.
    Qbnorm,
}

/// What a revision needs from the whole problem before any row can be revised, and how its
/// rows can be compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Needs {
    /// Each column's softmax statistics of `S/τ` over the texts (the dual softmax's prior),
    /// gathered by the first pass.
    pub column_stats: bool,
    /// Each row's softmax statistics of `S/τ` over the videos: V2T is ranked on the row's own
    /// prior instead of the T2V values.
    pub row_stats: bool,
    /// A query bank (`--bank`), its column statistics of `β·cos` and its activation set, and
    /// `--beta`.
    pub bank: bool,
    /// Each row's top-1 column, which decides whether the row is revised at all.
    pub row_top: bool,
    /// Whether the revised value is a dual softmax, whose comparisons the second pass can
    /// decide on f32 bounds (`kernels::dual_softmax_bounds`) without every f64 value.
    pub bounds: bool,
    /// The code the GPU kernels take for it (`REVISE_<NAME>` in `kernels/score.cu`), or none
    /// where it is scored on the CPU only.
    pub kernel_code: Option<i32>,
}

impl Revision {
    /// Every revision, in the contract's order.
    pub const ALL: [Revision; 4] = [Revision::None, Revision::Dsl, Revision::DslSym, Revision::Qbnorm];

    /// The name `--revise` takes and outputs record.
    pub fn name(self) -> &'static str {
        match self {
            Revision::None => "none",
            Revision::Dsl => "dsl",
            Revision::DslSym => "dsl-sym",
            Revision::Qbnorm => "qbnorm",
        }
    }

    /// What this revision needs before a row can be revised: the one place that says it.
    pub const fn needs(self) -> Needs {
        const NOTHING: Needs = Needs {
            column_stats: false,
            row_stats: false,
            bank: false,
            row_top: false,
            bounds: false,
            kernel_code: None,
        };
        match self {
            Revision::None => Needs { kernel_code: Some(0), ..NOTHING },
            Revision::Dsl => Needs { column_stats: true, bounds: true, kernel_code: Some(1), ..NOTHING },
            Revision::DslSym => {
                Needs { column_stats: true, row_stats: true, bounds: true, kernel_code: Some(2), ..NOTHING }
            }
            Revision::Qbnorm => Needs { bank: true, row_top: true, ..NOTHING },
        }
    }
}
