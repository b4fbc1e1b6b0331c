//! Search segments (contract §4): one immutable file beside each `videos` shard, written in the
//! same commit and listed in the manifest with it, that holds what a query reads in a layout a
//! reader maps without decoding: the shard's video embeddings as one row-aligned f16 array, the
//! ids in the same order, and each video's frame embeddings (f16) and times, found by offset.
//! This module owns the file's layout, its streamed writer, its mapped reader, the check of its
//! contents against the shard ([`deep_check`]) and the building of the segments an index of an
//! older format lacks ([`add_missing_segments`]).
//!
//! Layout (all little-endian): a 128-byte header (the magic `VTRSEG1\0`, then the u64 fields of
//! [`Field`]), then the sections at the offsets it records, each 64-byte aligned: frame
//! embeddings (`frames × D` f16), frame times (`frames` f64), frame starts (`videos + 1` u64: the
//! frames of video `i` are `starts[i]..starts[i+1]`), video embeddings (`videos × D` f16), id
//! ends (`videos` u64) and the ids' UTF-8 bytes. A video's frames are in `frame_index` order
//! (the order they were sampled in), whatever order the frames table's shards hold them in.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::f16;
use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use super::shard::{for_each_batch, verify_recorded};
use super::tables::{FrameRow, TableRows, VideoRow};
use super::{Manifest, ShardInfo, StoreError, io_error, read_table};

#[cfg(not(target_endian = "little"))]
compile_error!("search segments are mapped as little-endian arrays");

/// The folder of the segments, beside the table folders.
pub const SEGMENTS: &str = "segments";
/// The first format whose `videos` shards each have a segment.
pub const SEGMENTS_SINCE_FORMAT: u32 = 5;
/// What a segment file's name ends with.
pub const SEGMENT_EXTENSION: &str = "vseg";
const MAGIC: [u8; 8] = *b"VTRSEG1\0";
const HEADER_BYTES: u64 = 128;
/// Every section starts on a cache line, so a mapped array is aligned for its type and for
/// vector loads.
const ALIGN: u64 = 64;

/// The largest difference between a cosine computed from a segment's f16 embeddings and the
/// same cosine from the f32 embeddings of the tables, for unit vectors (contract §6). Rounding
/// each element to f16 moves it by at most 2⁻¹¹ of itself (or 2⁻²⁵ below f16's normal range),
/// so the dot product moves by at most 2⁻¹¹ · Σ|qᵢ·vᵢ| ≤ 2⁻¹¹ ≈ 4.9e-4 (Cauchy–Schwarz),
/// plus √D · 2⁻²⁵ and the f32 sum's own rounding (≤ D · 2⁻²⁴ ≈ 3e-5 at D = 512).
pub const F16_COSINE_ERROR: f64 = 6e-4;

/// The header's u64 fields, in order after the magic.
#[derive(Clone, Copy)]
enum Field {
    Dim = 1,
    Videos,
    Frames,
    FrameEmbeddings,
    FrameTimes,
    FrameStarts,
    VideoEmbeddings,
    IdEnds,
    IdBytes,
    Length,
}

/// A segment as the manifest lists it, beside its shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentInfo {
    /// Relative to the index folder, `/`-separated.
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
}

/// The segment's path for the `videos` shard at `shard_path`: `segments/<shard stem>.vseg`.
pub fn segment_path_of(shard_path: &str) -> String {
    let name = shard_path.rsplit('/').next().unwrap_or(shard_path);
    let stem = name.strip_suffix(".parquet").unwrap_or(name);
    format!("{SEGMENTS}/{stem}.{SEGMENT_EXTENSION}")
}

/// An embedding handed to the writer: the tables' f32, or the f16 bits of another segment.
#[derive(Clone, Copy)]
pub enum Values<'a> {
    F32(&'a [f32]),
    F16(&'a [u16]),
}

impl Values<'_> {
    fn len(&self) -> usize {
        match self {
            Values::F32(v) => v.len(),
            Values::F16(v) => v.len(),
        }
    }

    fn extend_f16(&self, out: &mut Vec<u16>) {
        match self {
            Values::F32(v) => out.extend(v.iter().map(|&x| f16::from_f32(x).to_bits())),
            Values::F16(v) => out.extend_from_slice(v),
        }
    }
}

/// Writes one segment: frames stream to its temporary file as videos are pushed; the video
/// array, the ids and the offsets (a few bytes per video besides `D` halves) are held until
/// [`SegmentWriter::finish`] appends them and publishes the file.
pub struct SegmentWriter {
    index: PathBuf,
    rel: String,
    tmp: PathBuf,
    file: Option<BufWriter<File>>,
    dim: usize,
    scratch: Vec<u16>,
    times: Vec<f64>,
    starts: Vec<u64>,
    videos: Vec<u16>,
    id_ends: Vec<u64>,
    ids: Vec<u8>,
}

impl SegmentWriter {
    /// A writer of the segment beside the `videos` shard `shard_path` (not yet written).
    pub fn create(index: &Path, shard_path: &str, dim: usize) -> Result<SegmentWriter, StoreError> {
        let rel = segment_path_of(shard_path);
        let path = index.join(&rel);
        let folder = path.parent().expect("a segment path has a folder");
        std::fs::create_dir_all(folder).map_err(io_error(folder))?;
        let tmp = super::temporary_path(&path);
        let mut file = BufWriter::with_capacity(1 << 20, super::create_temporary(&tmp).map_err(io_error(&tmp))?);
        file.write_all(&[0; HEADER_BYTES as usize]).map_err(io_error(&tmp))?;
        Ok(SegmentWriter {
            index: index.to_path_buf(),
            rel,
            tmp,
            file: Some(file),
            dim,
            scratch: Vec::new(),
            times: Vec::new(),
            starts: vec![0],
            videos: Vec::new(),
            id_ends: Vec::new(),
            ids: Vec::new(),
        })
    }

    /// The rows pushed so far.
    pub fn rows(&self) -> u64 {
        self.id_ends.len() as u64
    }

    /// Appends one video: its id, its embedding and its frames' `(time, embedding)` in
    /// `frame_index` order. A width other than the index's is refused, and nothing is appended.
    pub fn push<'a>(
        &mut self,
        video_id: &str,
        embedding: Values<'_>,
        frames: impl IntoIterator<Item = (f64, Values<'a>)>,
    ) -> Result<(), StoreError> {
        let wrong_width = |what: &str, len: usize| StoreError::Corrupt {
            path: self.tmp.clone(),
            message: format!("{what} of {video_id:?} has {len} values where the index has {}", self.dim),
        };
        if embedding.len() != self.dim {
            return Err(wrong_width("the embedding", embedding.len()));
        }
        self.scratch.clear();
        let first_time = self.times.len();
        for (time, frame) in frames {
            if frame.len() != self.dim {
                self.times.truncate(first_time);
                return Err(wrong_width("a frame", frame.len()));
            }
            frame.extend_f16(&mut self.scratch);
            self.times.push(time);
        }
        let file = self.file.as_mut().expect("open until finish");
        file.write_all(bytemuck::cast_slice(&self.scratch)).map_err(io_error(&self.tmp))?;
        self.starts.push(self.times.len() as u64);
        embedding.extend_f16(&mut self.videos);
        self.ids.extend_from_slice(video_id.as_bytes());
        self.id_ends.push(self.ids.len() as u64);
        Ok(())
    }

    /// Appends the sections held in memory and the header, syncs the file and renames it into
    /// place (it becomes part of the index only when a manifest lists it).
    pub fn finish(mut self) -> Result<SegmentInfo, StoreError> {
        let tmp = self.tmp.clone();
        let mut file = self.file.take().expect("open until finish");
        let written = (|| -> std::io::Result<File> {
            let mut header = [0u64; Field::Length as usize + 1];
            let mut at = HEADER_BYTES + (self.times.len() * self.dim * 2) as u64;
            header[Field::FrameEmbeddings as usize] = HEADER_BYTES;
            let sections: [(Field, &[u8]); 5] = [
                (Field::FrameTimes, bytemuck::cast_slice(&self.times)),
                (Field::FrameStarts, bytemuck::cast_slice(&self.starts)),
                (Field::VideoEmbeddings, bytemuck::cast_slice(&self.videos)),
                (Field::IdEnds, bytemuck::cast_slice(&self.id_ends)),
                (Field::IdBytes, &self.ids),
            ];
            for (field, bytes) in sections {
                let padding = at.next_multiple_of(ALIGN) - at;
                file.write_all(&vec![0; padding as usize])?;
                at += padding;
                header[field as usize] = at;
                file.write_all(bytes)?;
                at += bytes.len() as u64;
            }
            header[Field::Dim as usize] = self.dim as u64;
            header[Field::Videos as usize] = self.id_ends.len() as u64;
            header[Field::Frames as usize] = self.times.len() as u64;
            header[Field::Length as usize] = at;
            file.seek(SeekFrom::Start(0))?;
            file.write_all(&MAGIC)?;
            file.write_all(bytemuck::cast_slice(&header[1..]))?;
            let file = file.into_inner().map_err(|e| e.into_error())?;
            super::sync_temporary(&file)?;
            Ok(file)
        })();
        let published = written.map_err(io_error(&tmp)).and_then(|file| {
            drop(file);
            crate::fault::point("segment-written");
            super::publish(&[(tmp.clone(), self.index.join(&self.rel))])
        });
        if let Err(e) = published {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        crate::fault::point("segment-renamed");
        let path = self.index.join(&self.rel);
        let (bytes, sha256) = crate::checksum::sha256_file(&path).map_err(io_error(&path))?;
        Ok(SegmentInfo { path: std::mem::take(&mut self.rel), bytes, sha256 })
    }
}

impl Drop for SegmentWriter {
    fn drop(&mut self) {
        // An abandoned segment was never listed; remove its temporary file now.
        if let Some(file) = self.file.take() {
            drop(file);
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// One segment, mapped: nothing is read until a query touches it.
#[derive(Debug)]
pub struct Segment {
    file: File,
    map: Mmap,
    path: PathBuf,
    dim: usize,
    videos: usize,
    header: [u64; Field::Length as usize + 1],
}

impl Segment {
    /// Maps the segment a manifest lists beside a shard of `rows` rows at width `dim`, after
    /// checking that its header describes a file of its size with sections that fit.
    pub fn open(index: &Path, info: &SegmentInfo, dim: usize, rows: u64) -> Result<Segment, StoreError> {
        let path = index.join(&info.path);
        let file = File::open(&path).map_err(io_error(&path))?;
        // SAFETY: segments are immutable: written once under a temporary name, renamed into
        // place, never changed, and removed only once no manifest lists them.
        let map = unsafe { Mmap::map(&file) }.map_err(io_error(&path))?;
        let corrupt = |message: String| StoreError::Corrupt { path: path.clone(), message };
        if map.len() < HEADER_BYTES as usize || map[..8] != MAGIC {
            return Err(corrupt("not a vtr-index search segment".into()));
        }
        let mut header = [0u64; Field::Length as usize + 1];
        for (i, field) in header.iter_mut().enumerate().skip(1) {
            *field = u64::from_le_bytes(map[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        }
        let segment = Segment { file, map, path: path.clone(), dim, videos: rows as usize, header };
        segment.check(dim as u64, rows).map_err(corrupt)?;
        Ok(segment)
    }

    fn check(&self, dim: u64, rows: u64) -> Result<(), String> {
        let h = |f: Field| self.header[f as usize];
        if h(Field::Length) != self.map.len() as u64 {
            return Err(format!("{} bytes, its header says {}", self.map.len(), h(Field::Length)));
        }
        if (h(Field::Dim), h(Field::Videos)) != (dim, rows) {
            return Err(format!(
                "{} videos of width {}, where its shard has {rows} of width {dim}",
                h(Field::Videos),
                h(Field::Dim)
            ));
        }
        let frames = h(Field::Frames);
        let row_bytes = dim.checked_mul(2);
        let sections = [
            (Field::FrameEmbeddings, row_bytes.and_then(|b| frames.checked_mul(b))),
            (Field::FrameTimes, frames.checked_mul(8)),
            (Field::FrameStarts, rows.checked_add(1).and_then(|n| n.checked_mul(8))),
            (Field::VideoEmbeddings, row_bytes.and_then(|b| rows.checked_mul(b))),
            (Field::IdEnds, rows.checked_mul(8)),
        ];
        let mut end = HEADER_BYTES;
        for (field, bytes) in sections {
            let start = h(field);
            let bytes = bytes.ok_or("a section's size overflows")?;
            if start < end || start % ALIGN != 0 || start.checked_add(bytes).is_none_or(|e| e > h(Field::IdBytes)) {
                return Err("its sections overlap, are misaligned or run past the file".into());
            }
            end = start + bytes;
        }
        if h(Field::IdBytes) > h(Field::Length) {
            return Err("its ids run past the file".into());
        }
        let starts = self.u64s(Field::FrameStarts, rows as usize + 1);
        if starts[0] != 0 || starts[rows as usize] != frames || starts.windows(2).any(|w| w[0] > w[1]) {
            return Err("its frame offsets are out of order".into());
        }
        let id_bytes = h(Field::Length) - h(Field::IdBytes);
        let ends = self.u64s(Field::IdEnds, rows as usize);
        let mut start = 0;
        for &end in ends {
            if end < start || end > id_bytes {
                return Err("its id offsets are out of order".into());
            }
            let at = (h(Field::IdBytes) + start) as usize..(h(Field::IdBytes) + end) as usize;
            std::str::from_utf8(&self.map[at]).map_err(|_| "an id is not UTF-8".to_string())?;
            start = end;
        }
        Ok(())
    }

    fn bytes(&self, field: Field, len: usize) -> &[u8] {
        let start = self.header[field as usize] as usize;
        &self.map[start..start + len]
    }

    fn u64s(&self, field: Field, count: usize) -> &[u64] {
        bytemuck::cast_slice(self.bytes(field, count * 8))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> usize {
        self.videos
    }

    pub fn is_empty(&self) -> bool {
        self.videos == 0
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Every video embedding, row-major, as f16 bits.
    pub fn video_embeddings(&self) -> &[u16] {
        bytemuck::cast_slice(self.bytes(Field::VideoEmbeddings, self.videos * self.dim * 2))
    }

    /// The id of row `row`.
    pub fn id(&self, row: usize) -> &str {
        let ends = self.u64s(Field::IdEnds, self.videos);
        let start = if row == 0 { 0 } else { ends[row - 1] } as usize;
        let base = self.header[Field::IdBytes as usize] as usize;
        let bytes = &self.map[base + start..base + ends[row] as usize];
        // SAFETY: `open` checked that each id's bytes are UTF-8, and the file never changes.
        unsafe { std::str::from_utf8_unchecked(bytes) }
    }

    /// Row `row`'s frames: their times and their embeddings (row-major f16 bits), in the order
    /// the frames table holds them.
    pub fn frames(&self, row: usize) -> (&[f64], &[u16]) {
        let starts = self.u64s(Field::FrameStarts, self.videos + 1);
        let (first, end) = (starts[row] as usize, starts[row + 1] as usize);
        let frames = self.header[Field::Frames as usize] as usize;
        let times: &[f64] = bytemuck::cast_slice(self.bytes(Field::FrameTimes, frames * 8));
        let embeddings: &[u16] = bytemuck::cast_slice(self.bytes(Field::FrameEmbeddings, frames * self.dim * 2));
        (&times[first..end], &embeddings[first * self.dim..end * self.dim])
    }

    /// Row `row`'s frames as [`Segment::frames`] gives them, read from the file by offset
    /// (`pread`) rather than through the map: the page cache's large folios would otherwise map
    /// megabytes of other videos' frames into the reader for each video it looks at.
    pub fn read_frames(&self, row: usize) -> Result<(Vec<f64>, Vec<u16>), StoreError> {
        let starts = self.u64s(Field::FrameStarts, self.videos + 1);
        let (first, end) = (starts[row], starts[row + 1]);
        let count = (end - first) as usize;
        let mut times = vec![0f64; count];
        let mut embeddings = vec![0u16; count * self.dim];
        let at = |field: Field, size: u64| self.header[field as usize] + first * size;
        let read =
            self.file.read_exact_at(bytemuck::cast_slice_mut(&mut times), at(Field::FrameTimes, 8)).and_then(|()| {
                let offset = at(Field::FrameEmbeddings, self.dim as u64 * 2);
                self.file.read_exact_at(bytemuck::cast_slice_mut(&mut embeddings), offset)
            });
        read.map_err(io_error(&self.path))?;
        Ok((times, embeddings))
    }

    /// Row `row`'s frames as the writer takes them.
    pub fn frame_values(&self, row: usize) -> impl Iterator<Item = (f64, Values<'_>)> {
        let (times, embeddings) = self.frames(row);
        times.iter().zip(embeddings.chunks_exact(self.dim.max(1))).map(|(&t, e)| (t, Values::F16(e)))
    }
}

/// The manifest's videos shards, each with its segment mapped; `None` for an index of a format
/// before [`SEGMENTS_SINCE_FORMAT`] (read and never upgraded, as readers never do). A shard of a
/// later format without its segment is a damaged index.
pub fn open_segments(index: &Path, manifest: &Manifest) -> Result<Option<Vec<Arc<Segment>>>, StoreError> {
    open_segments_reusing(index, manifest, |_| None)
}

/// [`open_segments`], taking from `held` the segments already mapped (by their manifest entry),
/// so that a process that follows an index's commits maps each segment once.
pub fn open_segments_reusing(
    index: &Path,
    manifest: &Manifest,
    held: impl Fn(&SegmentInfo) -> Option<Arc<Segment>>,
) -> Result<Option<Vec<Arc<Segment>>>, StoreError> {
    if manifest.format_version < SEGMENTS_SINCE_FORMAT {
        return Ok(None);
    }
    let mut segments = Vec::new();
    for shard in manifest.shards("videos") {
        let info = shard.segment.as_ref().ok_or_else(|| StoreError::Corrupt {
            path: index.join(&shard.path),
            message: "no search segment beside this videos shard".into(),
        })?;
        let segment = match held(info) {
            Some(segment) if segment.len() as u64 == shard.rows => segment,
            _ => Arc::new(Segment::open(index, info, manifest.model.embed_dim, shard.rows)?),
        };
        segments.push(segment);
    }
    Ok(Some(segments))
}

/// Compares each segment's contents with what it was made from: its shard's ids in order and
/// embeddings rounded to f16, and, for each of those videos, its frames in the frames table by
/// `frame_index`, times equal and embeddings rounded to f16. Returns every difference found
/// (after a row whose id differs, the comparison stops).
pub fn deep_check(index: &Path, manifest: &Manifest) -> Result<Vec<String>, StoreError> {
    let mut problems = Vec::new();
    let Some(segments) = open_segments(index, manifest)? else { return Ok(problems) };
    // Where each video lives, and how many of its frames the frames table has shown so far (each
    // frame is compared at its `frame_index`; the count then shows none is missing or doubled).
    let mut place: HashMap<String, (usize, usize, usize)> = HashMap::new();
    for ((s, segment), shard) in segments.iter().enumerate().zip(manifest.shards("videos")) {
        let rows = read_table::<VideoRow>(index, std::slice::from_ref(shard))?;
        for (row, video) in rows.iter().enumerate() {
            let stored = &segment.video_embeddings()[row * segment.dim..(row + 1) * segment.dim];
            if segment.id(row) != video.video_id {
                problems.push(format!(
                    "{}: row {row} is {:?}, its shard's {:?}",
                    shard.path,
                    segment.id(row),
                    video.video_id
                ));
                return Ok(problems);
            }
            if !same_in_f16(&video.embedding, stored) {
                problems
                    .push(format!("{}: the embedding of {:?} differs from its shard's", shard.path, video.video_id));
            }
            place.insert(video.video_id.clone(), (s, row, 0));
        }
    }
    for shard in manifest.shards("frames") {
        for_each_batch(index, shard, |batch| {
            for frame in FrameRow::from_batch(batch)? {
                let Some((s, row, seen)) = place.get_mut(&frame.video_id) else {
                    problems.push(format!("{}: frames of {:?}, a video no segment holds", shard.path, frame.video_id));
                    continue;
                };
                let segment = &segments[*s];
                let (times, embeddings) = segment.frames(*row);
                let at = frame.frame_index as usize;
                let stored = embeddings.chunks_exact(segment.dim.max(1)).nth(at);
                let same =
                    stored.is_some_and(|stored| times[at] == frame.pts_s && same_in_f16(&frame.embedding, stored));
                if !same {
                    problems.push(format!(
                        "{}: frame {at} of {:?} differs from the frames table's",
                        segment.path.display(),
                        frame.video_id
                    ));
                }
                *seen += 1;
            }
            Ok(())
        })?;
    }
    for (id, (s, row, seen)) in &place {
        let held = segments[*s].frames(*row).0.len();
        if held != *seen {
            problems
                .push(format!("{}: {id:?} has {held} frames, the frames table {seen}", segments[*s].path.display()));
        }
    }
    problems.sort();
    Ok(problems)
}

fn same_in_f16(values: &[f32], stored: &[u16]) -> bool {
    values.len() == stored.len() && values.iter().zip(stored).all(|(&x, &h)| f16::from_f32(x).to_bits() == h)
}

/// Writes a segment for each `videos` shard `manifest` lists without one (an index of a format
/// before 5), for the writer upgrading it, and lists them in `manifest`. The frames table is
/// read once: each frame goes, as f16, to a temporary spill file in `segments/` (removed after;
/// a dead writer's is collected as any temporary), whose offsets per video the segments are
/// then filled from, each video's frames put in `frame_index` order. Memory: the spill's offsets
/// and one shard's rows; disk: the spill, about the size of the segments' frames.
pub fn add_missing_segments(index: &Path, manifest: &mut Manifest) -> Result<(), StoreError> {
    let dim = manifest.model.embed_dim;
    if manifest.shards("videos").iter().all(|s| s.segment.is_some()) {
        return Ok(());
    }
    let folder = index.join(SEGMENTS);
    std::fs::create_dir_all(&folder).map_err(io_error(&folder))?;
    let spill_path = super::temporary_path(&folder.join("frames.spill"));
    let result = (|| {
        // A record: the time (f64), the frame index (u64), the embedding (f16 halves).
        let record = dim * 2 + 16;
        let mut spill = BufWriter::new(super::create_temporary(&spill_path).map_err(io_error(&spill_path))?);
        let mut runs: HashMap<String, Vec<(u64, u64)>> = HashMap::new();
        let mut next = 0u64;
        let mut buffer = Vec::with_capacity(record);
        for shard in manifest.shards("frames") {
            for_each_batch(index, shard, |batch| {
                for frame in FrameRow::from_batch(batch)? {
                    if frame.embedding.len() != dim {
                        return Err(format!("a frame of width {} where the index has {dim}", frame.embedding.len()));
                    }
                    buffer.clear();
                    buffer.extend_from_slice(&frame.pts_s.to_le_bytes());
                    buffer.extend_from_slice(&u64::from(frame.frame_index).to_le_bytes());
                    for &x in &frame.embedding {
                        buffer.extend_from_slice(&f16::from_f32(x).to_bits().to_le_bytes());
                    }
                    spill.write_all(&buffer).map_err(|e| format!("{}: {e}", spill_path.display()))?;
                    let video = runs.entry(frame.video_id).or_default();
                    match video.last_mut() {
                        Some((start, count)) if *start + *count == next => *count += 1,
                        _ => video.push((next, 1)),
                    }
                    next += 1;
                }
                Ok(())
            })?;
        }
        spill.flush().map_err(io_error(&spill_path))?;
        drop(spill);
        let spill = File::open(&spill_path).map_err(io_error(&spill_path))?;
        let mut tables = manifest.tables.clone();
        for shard in tables.get_mut("videos").into_iter().flatten().filter(|s| s.segment.is_none()) {
            let mut writer = SegmentWriter::create(index, &shard.path, dim)?;
            for video in read_table::<VideoRow>(index, std::slice::from_ref(shard))? {
                let mut frames: Vec<(u64, f64, Vec<u16>)> = Vec::new();
                for &(start, count) in runs.get(&video.video_id).into_iter().flatten() {
                    let mut bytes = vec![0u8; record * count as usize];
                    spill.read_exact_at(&mut bytes, start * record as u64).map_err(io_error(&spill_path))?;
                    for chunk in bytes.chunks_exact(record) {
                        let time = f64::from_le_bytes(chunk[..8].try_into().expect("8 bytes"));
                        let frame_index = u64::from_le_bytes(chunk[8..16].try_into().expect("8 bytes"));
                        let halves = chunk[16..].chunks_exact(2).map(|h| u16::from_le_bytes([h[0], h[1]])).collect();
                        frames.push((frame_index, time, halves));
                    }
                }
                frames.sort_by_key(|f| f.0);
                let frames = frames.iter().map(|(_, t, e)| (*t, Values::F16(e)));
                writer.push(&video.video_id, Values::F32(&video.embedding), frames)?;
            }
            shard.segment = Some(writer.finish()?);
        }
        manifest.tables = tables;
        Ok(())
    })();
    let _ = std::fs::remove_file(&spill_path);
    result
}

/// The segment's half of `verify`: present, of the recorded size and checksum, and a header
/// that fits the shard beside it.
pub fn verify_segment(index: &Path, shard: &ShardInfo, dim: usize) -> Result<(), String> {
    let Some(info) = &shard.segment else { return Err(format!("{}: no search segment beside it", shard.path)) };
    verify_recorded(index, &info.path, info.bytes, &info.sha256)?;
    Segment::open(index, info, dim, shard.rows).map(drop).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_segment_holds_what_was_pushed() {
        let index = tempfile::tempdir().unwrap();
        let mut writer = SegmentWriter::create(index.path(), "videos/part-1-00000.parquet", 3).unwrap();
        writer.push("a/é", Values::F32(&[1.0, 0.0, 0.0]), [(0.5, Values::F32(&[0.0, 1.0, 0.0]))]).unwrap();
        writer.push("b", Values::F32(&[0.6, 0.8, 0.0]), []).unwrap();
        let halves = [f16::from_f32(0.25).to_bits(); 3];
        let frames = [(1.0, Values::F16(&halves)), (2.0, Values::F32(&[0.0, 0.0, 1.0]))];
        writer.push("c", Values::F16(&halves), frames).unwrap();
        let info = writer.finish().unwrap();
        assert_eq!(info.path, "segments/part-1-00000.vseg");
        let segment = Segment::open(index.path(), &info, 3, 3).unwrap();
        assert_eq!((segment.id(0), segment.id(1), segment.id(2)), ("a/é", "b", "c"));
        let video = |row: usize| -> Vec<f32> {
            segment.video_embeddings()[row * 3..row * 3 + 3].iter().map(|&h| f16::from_bits(h).to_f32()).collect()
        };
        assert_eq!(video(1), [f16::from_f32(0.6).to_f32(), f16::from_f32(0.8).to_f32(), 0.0]);
        assert_eq!(video(2), [0.25; 3]);
        assert_eq!(segment.frames(0).0, [0.5]);
        assert!(segment.frames(1).0.is_empty());
        assert_eq!(segment.frames(2).0, [1.0, 2.0]);
        assert_eq!(segment.frames(2).1[3..], [0, 0, f16::ONE.to_bits()]);
        for row in 0..3 {
            let (times, embeddings) = segment.read_frames(row).unwrap();
            assert_eq!((times.as_slice(), embeddings.as_slice()), segment.frames(row), "row {row}");
        }
        assert!(Segment::open(index.path(), &info, 3, 4).is_err(), "another shard's row count");
        assert!(Segment::open(index.path(), &info, 4, 3).is_err(), "another width");
        // Cut short, or its header damaged: refused, never mapped past its end.
        let path = index.path().join(&info.path);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        assert!(Segment::open(index.path(), &info, 3, 3).unwrap_err().to_string().contains("header says"));
        let mut damaged = bytes.clone();
        damaged[8 * Field::FrameStarts as usize] = 7;
        std::fs::write(&path, &damaged).unwrap();
        assert!(Segment::open(index.path(), &info, 3, 3).is_err());
    }

    #[test]
    fn the_segment_of_a_shard_is_named_after_it() {
        assert_eq!(segment_path_of("videos/part-17-3-00002.parquet"), "segments/part-17-3-00002.vseg");
    }
}
