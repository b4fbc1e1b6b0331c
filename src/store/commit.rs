//! An ingest run's writes: the open shard writers of the videos and frames tables and of the
//! videos shards' search segments, the old rows carried over (whole shards listed again, or the
//! kept rows of a shard copied, a video's with its frames from the old segment), the rows of
//! renamed files written under their new identity, and the [`Committer`] that publishes the
//! run's work periodically and at the end, with the run's report.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::segment::{Segment, SegmentInfo, SegmentWriter, Values, segment_path_of};
use super::shard::shard_path;
use super::{
    FRAME_SHARD_ROWS, FrameRow, Manifest, ShardInfo, ShardWriter, StoreError, Suspect, VIDEO_SHARD_ROWS, VideoRow,
    collect_garbage, read_table, read_video_ids,
};
use crate::failure::Failure;

/// The open writers of the two per-video tables and of the `videos` shards' search segments.
/// A segment is closed with its shard, after the same number of rows (both roll over every
/// [`VIDEO_SHARD_ROWS`]), and named after it.
pub struct RowWriters {
    index: PathBuf,
    tag: String,
    videos: ShardWriter<VideoRow>,
    segment: Option<SegmentWriter>,
    segments: Vec<(u64, SegmentInfo)>,
    frames: ShardWriter<FrameRow>,
}

impl RowWriters {
    pub fn new(index: &Path, tag: &str, dim: usize) -> Result<RowWriters, StoreError> {
        Ok(RowWriters {
            index: index.to_path_buf(),
            tag: tag.to_string(),
            videos: ShardWriter::new(index, "videos", tag, dim, VIDEO_SHARD_ROWS)?,
            segment: None,
            segments: Vec::new(),
            frames: ShardWriter::new(index, "frames", tag, dim, FRAME_SHARD_ROWS)?,
        })
    }

    /// Writes one video's row and its frames' rows.
    pub fn write_video(&mut self, video: VideoRow, frames: Vec<FrameRow>) -> Result<(), StoreError> {
        self.push_video(video, frames.iter().map(|f| (f.pts_s, Values::F32(&f.embedding))))?;
        for frame in frames {
            self.frames.push(frame)?;
        }
        Ok(())
    }

    /// Writes one video's row, with its frames into its segment only (the caller writes the
    /// frames table's rows, or keeps the shards that hold them).
    fn push_video<'a>(
        &mut self,
        video: VideoRow,
        frames: impl IntoIterator<Item = (f64, Values<'a>)>,
    ) -> Result<(), StoreError> {
        let segment = match &mut self.segment {
            Some(segment) => segment,
            None => {
                let shard = shard_path("videos", &self.tag, self.segments.len());
                self.segment.insert(SegmentWriter::create(&self.index, &shard, self.videos.dim())?)
            }
        };
        segment.push(&video.video_id, Values::F32(&video.embedding), frames)?;
        let full = segment.rows() >= VIDEO_SHARD_ROWS;
        self.videos.push(video)?;
        if full {
            self.close_segment()?;
        }
        Ok(())
    }

    fn close_segment(&mut self) -> Result<(), StoreError> {
        if let Some(segment) = self.segment.take() {
            let rows = segment.rows();
            self.segments.push((rows, segment.finish()?));
        }
        Ok(())
    }

    /// Closes every writer: the `videos` shards, each with its segment, and the `frames` shards.
    fn finish(mut self) -> Result<(Vec<ShardInfo>, Vec<ShardInfo>), StoreError> {
        self.close_segment()?;
        let mut videos = self.videos.finish()?;
        let paired = videos.len() == self.segments.len()
            && videos
                .iter()
                .zip(&self.segments)
                .all(|(s, (rows, g))| s.rows == *rows && g.path == segment_path_of(&s.path));
        if !paired {
            return Err(StoreError::Corrupt {
                path: self.index.clone(),
                message: "the videos shards and their search segments were cut at different rows".into(),
            });
        }
        for (shard, (_, segment)) in videos.iter_mut().zip(self.segments.drain(..)) {
            shard.segment = Some(segment);
        }
        Ok((videos, self.frames.finish()?))
    }
}

/// Lists again the old shards of `table` whose rows all stay, and copies the kept rows of the
/// others into `writers` (a video's with its frames from the old shard's segment). Returns the
/// shards listed unchanged. When every old video stays (a run that only adds, or finds nothing
/// to do) no shard is read at all; otherwise a frames shard is read whole only if its
/// `video_id` column names a dropped video.
pub fn carry_over(
    index: &Path,
    table: &str,
    shards: &[ShardInfo],
    old_videos: &[VideoRow],
    keep_ids: &HashSet<String>,
    writers: &mut RowWriters,
) -> Result<Vec<ShardInfo>, StoreError> {
    if old_videos.iter().all(|v| keep_ids.contains(&v.video_id)) {
        return Ok(shards.to_vec());
    }
    let mut unchanged = Vec::new();
    for shard in shards {
        if read_video_ids(index, shard)?.iter().all(|id| keep_ids.contains(id)) {
            unchanged.push(shard.clone());
            continue;
        }
        let one = std::slice::from_ref(shard);
        if table == "videos" {
            let segment = open_segment(index, shard, writers.videos.dim())?;
            for (row, video) in read_table::<VideoRow>(index, one)?.into_iter().enumerate() {
                if keep_ids.contains(&video.video_id) {
                    writers.push_video(video, segment.frame_values(row))?;
                }
            }
        } else {
            for row in read_table::<FrameRow>(index, one)?.into_iter().filter(|r| keep_ids.contains(&r.video_id)) {
                writers.frames.push(row)?;
            }
        }
    }
    Ok(unchanged)
}

/// The segment beside a `videos` shard of a manifest this build wrote or upgraded.
fn open_segment(index: &Path, shard: &ShardInfo, dim: usize) -> Result<Segment, StoreError> {
    let info = shard.segment.as_ref().ok_or_else(|| StoreError::Corrupt {
        path: index.join(&shard.path),
        message: "no search segment beside this videos shard".into(),
    })?;
    Segment::open(index, info, dim, shard.rows)
}

/// Writes the rows of files whose bytes an old video already had, under their new identity:
/// each `(new row, old video_id)` pair's row, and the old video's frames under the new id (in
/// the frames table, and in the new row's segment from the old row's).
pub fn write_reused(
    index: &Path,
    old_video_shards: &[ShardInfo],
    old_frame_shards: &[ShardInfo],
    reused: Vec<(VideoRow, String)>,
    writers: &mut RowWriters,
) -> Result<(), StoreError> {
    let mut new_ids_of: HashMap<&str, Vec<&str>> = HashMap::new();
    for (new, old_id) in &reused {
        new_ids_of.entry(old_id.as_str()).or_default().push(new.video_id.as_str());
    }
    for shard in old_frame_shards {
        if !read_video_ids(index, shard)?.iter().any(|id| new_ids_of.contains_key(id.as_str())) {
            continue;
        }
        for row in read_table::<FrameRow>(index, std::slice::from_ref(shard))? {
            for new_id in new_ids_of.get(row.video_id.as_str()).into_iter().flatten() {
                writers.frames.push(FrameRow { video_id: new_id.to_string(), ..row.clone() })?;
            }
        }
    }
    let segments = old_video_shards
        .iter()
        .map(|shard| open_segment(index, shard, writers.videos.dim()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut old_rows: HashMap<&str, (usize, usize)> = HashMap::new();
    for (s, segment) in segments.iter().enumerate() {
        for row in 0..segment.len() {
            if new_ids_of.contains_key(segment.id(row)) {
                old_rows.insert(segment.id(row), (s, row));
            }
        }
    }
    for (new, old_id) in reused {
        let &(s, row) = old_rows.get(old_id.as_str()).ok_or_else(|| StoreError::Corrupt {
            path: index.to_path_buf(),
            message: format!("no search segment holds {old_id:?}, a video of the videos table"),
        })?;
        writers.push_video(new, segments[s].frame_values(row))?;
    }
    Ok(())
}

/// Every root the index has walked: the manifest's, then this run's new ones.
pub fn merged_roots(previous: Option<&Manifest>, roots: &[String]) -> Vec<String> {
    let mut merged = previous.map(|m| m.roots.clone()).unwrap_or_default();
    for root in roots {
        if !merged.contains(root) {
            merged.push(root.clone());
        }
    }
    merged
}

/// Publishes the run's work: periodically while it runs (so a crash late in a long run keeps
/// most of it), and once at the end.
pub struct Committer<'a> {
    index: &'a Path,
    /// The manifest to publish, less this run's new shards, failures and suspects.
    template: Manifest,
    pub tag: String,
    /// Journals of crashed runs, removed once a commit has recorded their counts.
    pub crashed_journals: Vec<PathBuf>,
    every_videos: u64,
    every: Duration,
    last_commit: Instant,
    pub since_commit: u64,
    pub commits: u64,
}

impl<'a> Committer<'a> {
    /// A committer for the run tagged `tag`, publishing `template` with the run's work every
    /// `every_videos` finished files or `every`, whichever comes first.
    pub fn new(
        index: &'a Path,
        template: Manifest,
        tag: String,
        crashed_journals: Vec<PathBuf>,
        every_videos: u64,
        every: Duration,
    ) -> Committer<'a> {
        Committer {
            index,
            template,
            tag,
            crashed_journals,
            every_videos: every_videos.max(1),
            every,
            last_commit: Instant::now(),
            since_commit: 0,
            commits: 0,
        }
    }

    pub fn due(&self) -> bool {
        self.since_commit >= self.every_videos || self.last_commit.elapsed() >= self.every
    }

    /// Closes the open shards, commits a manifest listing them with every shard committed
    /// before, and opens new writers. The final commit also removes what no manifest names.
    pub fn commit(
        &mut self,
        writers: &mut RowWriters,
        failures: Vec<Failure>,
        suspects: &BTreeMap<(String, String), u32>,
        run_report: impl FnOnce(u64) -> String,
        last: bool,
    ) -> Result<(), StoreError> {
        self.commits += 1;
        let dim = writers.videos.dim();
        // `TAG-N` from 1: `TAG-0` is the format upgrade's (`store::upgrade`).
        let next_tag = format!("{}-{}", self.tag, self.commits);
        let done = std::mem::replace(writers, RowWriters::new(self.index, &next_tag, dim)?);
        let (videos, frames) = done.finish()?;
        for (table, shards) in [("videos", videos), ("frames", frames)] {
            self.template.tables.entry(table.to_string()).or_default().extend(shards);
        }
        let mut manifest = self.template.clone();
        let mut failures_out = ShardWriter::<Failure>::new(self.index, "failures", &next_tag, 0, u64::MAX)?;
        for failure in failures {
            failures_out.push(failure)?;
        }
        manifest.tables.insert("failures".to_string(), failures_out.finish()?);
        manifest.suspects = suspects
            .iter()
            .map(|((root, path), &crashes)| Suspect { root: root.clone(), path: path.clone(), crashes })
            .collect();
        manifest.last_run = Some(write_run_report(self.index, &self.tag, &run_report(self.commits))?);
        manifest.committed_at_us = super::now_us();
        manifest.commit(self.index)?;
        for journal in self.crashed_journals.drain(..) {
            let _ = std::fs::remove_file(journal);
        }
        if last {
            // Shards the new manifest no longer lists (rewritten ones) can go now. Periodic
            // commits keep them: rows still to be reused may be read from them.
            collect_garbage(self.index, Some(&manifest))?;
        }
        self.last_commit = Instant::now();
        self.since_commit = 0;
        Ok(())
    }
}

/// Writes a run report (JSON) as `runs/TAG.json`; returns that path relative to the index.
pub fn write_run_report(index: &Path, tag: &str, json: &str) -> Result<String, StoreError> {
    let folder = index.join("runs");
    std::fs::create_dir_all(&folder).map_err(|source| StoreError::Io { path: folder.clone(), source })?;
    let rel = format!("runs/{tag}.json");
    super::atomic_write(&index.join(&rel), json.as_bytes())?;
    Ok(rel)
}
