//! Per-input failures: the typed record a bad file becomes instead of stopping the run.
//!
//! Every stage that can reject one input (walk, probe, decode, encode, write) produces a
//! [`Failure`]; the ingest pipeline carries it as data to the `failures` table and prints
//! one line for it. Nothing here knows how a failure was detected.

use std::fmt;

/// The pipeline stage at which an input was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    Walk,
    Probe,
    Decode,
    Encode,
    Write,
}

impl Stage {
    pub const ALL: [Stage; 5] = [Stage::Walk, Stage::Probe, Stage::Decode, Stage::Encode, Stage::Write];

    pub fn parse(s: &str) -> Option<Stage> {
        Stage::ALL.into_iter().find(|stage| stage.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Walk => "walk",
            Stage::Probe => "probe",
            Stage::Decode => "decode",
            Stage::Encode => "encode",
            Stage::Write => "write",
        }
    }
}

/// Why an input cannot be indexed (contract §4, "Failure kinds").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FailureKind {
    Empty,
    NotAVideo,
    NoVideoStream,
    UnsupportedCodec,
    Corrupt,
    Timeout,
    CrashedDecoder,
    /// The decode worker grew past `--decode-memory-mib` and was stopped.
    MemoryLimit,
    Io,
    DuplicateId,
    SymlinkLoop,
}

impl FailureKind {
    pub const ALL: [FailureKind; 11] = [
        FailureKind::Empty,
        FailureKind::NotAVideo,
        FailureKind::NoVideoStream,
        FailureKind::UnsupportedCodec,
        FailureKind::Corrupt,
        FailureKind::Timeout,
        FailureKind::CrashedDecoder,
        FailureKind::MemoryLimit,
        FailureKind::Io,
        FailureKind::DuplicateId,
        FailureKind::SymlinkLoop,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Empty => "empty",
            FailureKind::NotAVideo => "not_a_video",
            FailureKind::NoVideoStream => "no_video_stream",
            FailureKind::UnsupportedCodec => "unsupported_codec",
            FailureKind::Corrupt => "corrupt",
            FailureKind::Timeout => "timeout",
            FailureKind::CrashedDecoder => "crashed_decoder",
            FailureKind::MemoryLimit => "memory_limit",
            FailureKind::Io => "io",
            FailureKind::DuplicateId => "duplicate_id",
            FailureKind::SymlinkLoop => "symlink_loop",
        }
    }

    pub fn parse(s: &str) -> Option<FailureKind> {
        FailureKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why one file was rejected, before we know which root it belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub stage: Stage,
    pub kind: FailureKind,
    pub message: String,
}

impl Rejection {
    pub fn new(stage: Stage, kind: FailureKind, message: impl Into<String>) -> Self {
        Rejection { stage, kind, message: message.into() }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

/// One row of the `failures` table: an input that currently cannot be indexed.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// The root folder as the user gave it.
    pub root: String,
    /// Path relative to `root`, `/`-separated.
    pub path: String,
    pub stage: Stage,
    pub kind: FailureKind,
    pub message: String,
    /// Unix time in microseconds when this failure was first recorded.
    pub first_seen_us: i64,
    pub attempts: u32,
    /// The file's size and modification time when it failed: it is retried when they change.
    pub size_bytes: u64,
    pub mtime_ns: i64,
}
