//! The decode worker: the process that decodes, samples, preprocesses and hashes files for an
//! ingest run, so that a decoder that crashes, hangs or bloats takes only this process with it,
//! and the messages it and its parent exchange over its stdin and stdout.
//!
//! The parent (`ingest/pool.rs`) starts `/proc/self/exe decode-worker --parent PID`, a hidden
//! subcommand, sends it one [`Setup`] and then one file at a time; for each file the worker
//! answers with the file's facts and its frames' pixel values, or with its typed failure. The
//! service (`serve/thumbnails.rs`) starts the same workers and asks them for one frame of a file
//! at a time as a JPEG thumbnail (`crate::thumbnail`). The
//! worker never touches the index. It dies with its parent (`PR_SET_PDEATHSIG`), leaves SIGINT
//! and SIGTERM to the parent (a terminal and Slurm signal every process of the group or step),
//! and offers itself to an OOM killer first (`oom_score_adj` 1000).
//!
//! Messages are `[tag: u8][header length: u32][header: JSON][body length: u64][body]`, numbers
//! and pixel values (f32) in the machine's byte order: both ends are this binary on one machine,
//! so frames cross the pipe as they are in memory, with no conversion.

use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::FromRawFd;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::checksum::blake3_file;
use crate::decode::{DecodeConfig, decode_video};
use crate::encode::VideoFacts;
use crate::failure::{FailureKind, Rejection, Stage};
use crate::preprocess::{PreprocessConfig, pixel_values};
use crate::sampling::SamplingConfig;
use crate::thumbnail::{Thumbnail, make_thumbnail};

/// The hidden subcommand that runs a worker.
pub const SUBCOMMAND: &str = "decode-worker";
/// `VTR_INDEX_WORKER_FAULT=KIND:FILE[:TRY]`: the worker fails as KIND (`abort`, `segv`, `hang`,
/// `alloc`, `exit-mid-frames`) on the file named FILE (its last path component; `*` for every
/// file), on every try or only on try TRY (1 is the first). For the tests.
pub const FAULT_VARIABLE: &str = "VTR_INDEX_WORKER_FAULT";

/// The largest header either side accepts: a header is a few numbers and a message.
const MAX_HEADER_BYTES: u32 = 1 << 20;
const TAG_SETUP: u8 = b'S';
const TAG_TASK: u8 = b'T';
const TAG_VIDEO: u8 = b'V';
const TAG_FAILED: u8 = b'F';
const TAG_THUMBNAIL: u8 = b'P';
const TAG_PICTURE: u8 = b'J';
/// The largest thumbnail either side accepts; one of `THUMBNAIL_MAX_SIDE` is far smaller.
const MAX_PICTURE_BYTES: u64 = 8 << 20;

/// What every file of a run is decoded with; the first message to a worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Setup {
    pub sampling: SamplingConfig,
    pub preprocess: PreprocessConfig,
    /// The in-process deadline (`--decode-timeout`), for its precise messages.
    pub timeout_s: f64,
}

impl Setup {
    /// The most body bytes a video's answer can hold: every frame's pixel values.
    fn max_body_bytes(&self) -> u64 {
        (self.sampling.max_frames as u64).saturating_mul(self.preprocess.len() as u64).saturating_mul(4)
    }
}

#[derive(Serialize, Deserialize)]
struct TaskHeader {
    /// 1 for a file's first try, 2 for its retry in a fresh worker.
    attempt: u32,
}

#[derive(Serialize, Deserialize)]
struct ThumbnailTask {
    time_s: f64,
    max_side: u32,
}

#[derive(Serialize, Deserialize)]
struct PictureHeader {
    time_s: f64,
    width: u32,
    height: u32,
}

#[derive(Serialize, Deserialize)]
struct VideoHeader {
    duration_s: f64,
    width: u32,
    height: u32,
    fps: f64,
    content_hash: String,
    stream_index: Option<u32>,
    frame_times: Vec<f64>,
}

#[derive(Serialize, Deserialize)]
struct FailedHeader {
    stage: String,
    kind: String,
    message: String,
}

/// One file's result, as the worker makes it and the parent reads it.
#[derive(Debug)]
pub enum Prepared {
    Video { facts: VideoFacts, frames: Vec<(f64, Vec<f32>)> },
    Failed(Rejection),
}

/// Decodes, samples, preprocesses and hashes the file at `path`. Public for the stage
/// benchmark (`examples/ingest_stages.rs`), which runs this stage alone.
pub fn prepare(path: &Path, decode: &DecodeConfig, preprocess: &PreprocessConfig) -> Prepared {
    let video = match decode_video(path, decode) {
        Ok(video) => video,
        Err(rejection) => return Prepared::Failed(rejection),
    };
    let mut frames = Vec::with_capacity(video.frames.len());
    for frame in &video.frames {
        match pixel_values(&frame.image, preprocess) {
            Ok(pixels) => frames.push((frame.pts_s, pixels)),
            Err(message) => return Prepared::Failed(Rejection::new(Stage::Encode, FailureKind::Corrupt, message)),
        }
    }
    let content_hash = match blake3_file(path) {
        Ok(hash) => hash,
        Err(e) => {
            return Prepared::Failed(Rejection::new(
                Stage::Decode,
                FailureKind::Io,
                format!("cannot read the file: {e}"),
            ));
        }
    };
    let facts = VideoFacts {
        duration_s: video.duration_s,
        width: video.width,
        height: video.height,
        fps: video.fps,
        content_hash,
        stream_index: video.stream_index,
    };
    Prepared::Video { facts, frames }
}

fn write_message(to: &mut impl Write, tag: u8, header: &impl Serialize, body: &[&[u8]]) -> io::Result<()> {
    let body_len = body.iter().map(|part| part.len() as u64).sum();
    write_message_declaring(to, tag, header, body_len, body)
}

/// Writes a message whose body is declared `body_len` bytes long, whatever `body` holds: only
/// the tests' `exit-mid-frames` fault declares more than it writes.
fn write_message_declaring(
    to: &mut impl Write,
    tag: u8,
    header: &impl Serialize,
    body_len: u64,
    body: &[&[u8]],
) -> io::Result<()> {
    let header = serde_json::to_vec(header).map_err(io::Error::other)?;
    to.write_all(&[tag])?;
    to.write_all(&(header.len() as u32).to_ne_bytes())?;
    to.write_all(&header)?;
    to.write_all(&body_len.to_ne_bytes())?;
    for part in body {
        to.write_all(part)?;
    }
    to.flush()
}

/// The bytes of `values` as they are in memory.
fn f32_bytes(values: &[f32]) -> &[u8] {
    // SAFETY: the same memory, read as bytes (u8 has no alignment and f32 no padding).
    unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values)) }
}

/// The bytes of `values`, to be written in place.
fn f32_bytes_mut(values: &mut [f32]) -> &mut [u8] {
    // SAFETY: as in `f32_bytes`; and every bit pattern is a valid f32, so any bytes written
    // leave valid values.
    unsafe { std::slice::from_raw_parts_mut(values.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(values)) }
}

/// A message's start: its tag, its header, and how many body bytes follow.
type Head = (u8, Vec<u8>, u64);
/// A whole message: its tag, header and body.
type Message = (u8, Vec<u8>, Vec<u8>);

/// Reads a message's start, whose body is at most `max_body_bytes`. `None` when the stream ends
/// before a message starts.
fn read_head(from: &mut impl Read, max_body_bytes: u64) -> io::Result<Option<Head>> {
    let mut tag = [0u8; 1];
    if from.read(&mut tag)? == 0 {
        return Ok(None);
    }
    let mut len = [0u8; 4];
    from.read_exact(&mut len)?;
    let header_len = u32::from_ne_bytes(len);
    if header_len > MAX_HEADER_BYTES {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("a header of {header_len} bytes")));
    }
    let mut header = vec![0u8; header_len as usize];
    from.read_exact(&mut header)?;
    let mut len = [0u8; 8];
    from.read_exact(&mut len)?;
    let body_len = u64::from_ne_bytes(len);
    if body_len > max_body_bytes {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("a body of {body_len} bytes")));
    }
    Ok(Some((tag[0], header, body_len)))
}

/// Reads one whole message whose body is at most `max_body_bytes`.
fn read_message(from: &mut impl Read, max_body_bytes: u64) -> io::Result<Option<Message>> {
    let Some((tag, header, body_len)) = read_head(from, max_body_bytes)? else { return Ok(None) };
    let mut body = vec![0u8; body_len as usize];
    from.read_exact(&mut body)?;
    Ok(Some((tag, header, body)))
}

fn parse<T: for<'de> Deserialize<'de>>(header: &[u8]) -> io::Result<T> {
    serde_json::from_slice(header).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// The parent's end: the setup message.
pub fn send_setup(to: &mut impl Write, setup: &Setup) -> io::Result<()> {
    write_message(to, TAG_SETUP, setup, &[])
}

/// The parent's end: one file to decode.
pub fn send_task(to: &mut impl Write, path: &Path, attempt: u32) -> io::Result<()> {
    write_message(to, TAG_TASK, &TaskHeader { attempt }, &[path.as_os_str().as_bytes()])
}

/// The parent's end: the answer for the file it sent last. An error or an early end means the
/// worker died or broke the protocol; the caller finds out which from the process.
pub fn receive_prepared(from: &mut impl Read, setup: &Setup) -> io::Result<Prepared> {
    let (tag, header, body_len) = read_head(from, setup.max_body_bytes())?
        .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "the worker closed its output"))?;
    match tag {
        TAG_VIDEO => {
            let header: VideoHeader = parse(&header)?;
            let per_frame = setup.preprocess.len();
            if body_len != (header.frame_times.len() * per_frame * 4) as u64 {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "frames and pixel values disagree"));
            }
            let mut frames = Vec::with_capacity(header.frame_times.len());
            for &time in &header.frame_times {
                let mut pixels = vec![0f32; per_frame];
                from.read_exact(f32_bytes_mut(&mut pixels))?;
                frames.push((time, pixels));
            }
            let facts = VideoFacts {
                duration_s: header.duration_s,
                width: header.width,
                height: header.height,
                fps: header.fps,
                content_hash: header.content_hash,
                stream_index: header.stream_index,
            };
            Ok(Prepared::Video { facts, frames })
        }
        TAG_FAILED if body_len == 0 => Ok(Prepared::Failed(parse_failed(&header)?)),
        other => Err(io::Error::new(io::ErrorKind::InvalidData, format!("an unknown message {other}"))),
    }
}

fn parse_failed(header: &[u8]) -> io::Result<Rejection> {
    let header: FailedHeader = parse(header)?;
    match (Stage::parse(&header.stage), FailureKind::parse(&header.kind)) {
        (Some(stage), Some(kind)) => Ok(Rejection::new(stage, kind, header.message)),
        _ => Err(io::Error::new(io::ErrorKind::InvalidData, "an unknown stage or failure kind")),
    }
}

/// The service's end: one frame of `path` to make a thumbnail of.
pub fn send_thumbnail_task(to: &mut impl Write, path: &Path, time_s: f64, max_side: u32) -> io::Result<()> {
    write_message(to, TAG_THUMBNAIL, &ThumbnailTask { time_s, max_side }, &[path.as_os_str().as_bytes()])
}

/// The service's end: the thumbnail it asked for last, or why the file gave none. An error or
/// an early end means the worker died or broke the protocol.
pub fn receive_thumbnail(from: &mut impl Read) -> io::Result<Result<Thumbnail, Rejection>> {
    let (tag, header, body) = read_message(from, MAX_PICTURE_BYTES)?
        .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "the worker closed its output"))?;
    match tag {
        TAG_PICTURE => {
            let header: PictureHeader = parse(&header)?;
            Ok(Ok(Thumbnail { time_s: header.time_s, width: header.width, height: header.height, jpeg: body }))
        }
        TAG_FAILED if body.is_empty() => Ok(Err(parse_failed(&header)?)),
        other => Err(io::Error::new(io::ErrorKind::InvalidData, format!("an unknown message {other}"))),
    }
}

fn send_thumbnail(to: &mut impl Write, made: &Result<Thumbnail, Rejection>) -> io::Result<()> {
    match made {
        Ok(picture) => {
            let header = PictureHeader { time_s: picture.time_s, width: picture.width, height: picture.height };
            write_message(to, TAG_PICTURE, &header, &[&picture.jpeg])
        }
        Err(rejection) => write_message(to, TAG_FAILED, &failed_header(rejection), &[]),
    }
}

fn failed_header(rejection: &Rejection) -> FailedHeader {
    FailedHeader {
        stage: rejection.stage.as_str().to_string(),
        kind: rejection.kind.as_str().to_string(),
        message: rejection.message.clone(),
    }
}

/// Sends one file's answer; `cut_short` (a fault for the tests) sends only half of its body.
fn send_prepared(to: &mut impl Write, prepared: &Prepared, cut_short: bool) -> io::Result<()> {
    match prepared {
        Prepared::Video { facts, frames } => {
            let header = VideoHeader {
                duration_s: facts.duration_s,
                width: facts.width,
                height: facts.height,
                fps: facts.fps,
                content_hash: facts.content_hash.clone(),
                stream_index: facts.stream_index,
                frame_times: frames.iter().map(|(t, _)| *t).collect(),
            };
            let parts: Vec<&[u8]> = frames.iter().map(|(_, pixels)| f32_bytes(pixels)).collect();
            if cut_short {
                let body: Vec<u8> = parts.concat();
                return write_message_declaring(to, TAG_VIDEO, &header, body.len() as u64, &[&body[..body.len() / 2]]);
            }
            write_message(to, TAG_VIDEO, &header, &parts)
        }
        Prepared::Failed(rejection) => write_message(to, TAG_FAILED, &failed_header(rejection), &[]),
    }
}

/// The fault a test asked this worker to have on one file.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    Abort,
    Segv,
    Hang,
    Alloc,
    ExitMidFrames,
}

fn fault_for(spec: Option<&str>, path: &Path, attempt: u32) -> Option<Fault> {
    let mut parts = spec?.splitn(3, ':');
    let fault = match parts.next()? {
        "abort" => Fault::Abort,
        "segv" => Fault::Segv,
        "hang" => Fault::Hang,
        "alloc" => Fault::Alloc,
        "exit-mid-frames" => Fault::ExitMidFrames,
        _ => return None,
    };
    let file = parts.next()?;
    let named = file == "*" || path.file_name() == Some(OsStr::new(file));
    let on_this_try = parts.next().is_none_or(|t| t.parse() == Ok(attempt));
    (named && on_this_try).then_some(fault)
}

/// Fails as a broken decoder would, in the middle of a file.
fn fail_as(fault: Fault) {
    match fault {
        Fault::Abort => std::process::abort(),
        // SAFETY: raising a signal at our own process with its default action, which ends it
        // (Rust's own handler, for stack overflows, would return from a raised one).
        Fault::Segv => unsafe {
            libc::signal(libc::SIGSEGV, libc::SIG_DFL);
            libc::raise(libc::SIGSEGV);
        },
        Fault::Hang => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
        Fault::Alloc => {
            let mut held: Vec<Vec<u8>> = Vec::new();
            loop {
                // Touched, so the pages are resident.
                held.push(vec![1u8; 64 << 20]);
                std::hint::black_box(&held);
            }
        }
        Fault::ExitMidFrames => {}
    }
}

/// Makes this process a worker of `parent`: dies with it, ignores the signals the parent
/// handles, runs below the parent's priority when `low_priority`, and is the OOM killer's
/// first choice. Returns false if the parent is already gone.
fn become_worker(parent: u32, low_priority: bool) -> bool {
    // SAFETY: prctl, signal, setpriority and getppid take plain integers and touch no memory of
    // ours; this runs before any other thread of the worker is started.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0);
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
        if low_priority {
            // Threads started from now on (GStreamer's) inherit it.
            libc::setpriority(libc::PRIO_PROCESS, 0, 19);
        }
        // The parent died before PR_SET_PDEATHSIG took effect: nobody would kill us.
        if libc::getppid() as u32 != parent {
            return false;
        }
    }
    // Best effort: a kernel without it leaves the default.
    let _ = std::fs::write("/proc/self/oom_score_adj", "1000");
    true
}

/// The worker's main loop: the hidden subcommand. Returns the exit code.
pub fn serve(parent: u32, low_priority: bool) -> u8 {
    if !become_worker(parent, low_priority) {
        return 1;
    }
    // The protocol has stdout to itself: anything else that writes there (a plugin, a library)
    // writes to stderr instead, which the parent drains.
    // SAFETY: dup and dup2 on the standard descriptors, which this process owns.
    let protocol = unsafe {
        let fd = libc::dup(1);
        if fd < 0 || libc::dup2(2, 1) < 0 {
            return 1;
        }
        std::fs::File::from_raw_fd(fd)
    };
    let mut to_parent = io::BufWriter::with_capacity(1 << 20, protocol);
    let mut from_parent = io::BufReader::new(io::stdin().lock());
    let setup: Setup = match read_message(&mut from_parent, 0) {
        Ok(Some((TAG_SETUP, header, _))) => match parse(&header) {
            Ok(setup) => setup,
            Err(e) => {
                eprintln!("vtr-index decode-worker: bad setup: {e}");
                return 1;
            }
        },
        _ => return 1,
    };
    if let Err(e) = crate::decode::init() {
        eprintln!("vtr-index decode-worker: {e}");
        return 1;
    }
    let decode =
        DecodeConfig::new(setup.sampling, Duration::try_from_secs_f64(setup.timeout_s).unwrap_or(Duration::MAX));
    let fault = std::env::var(FAULT_VARIABLE).ok();
    loop {
        // The parent closing our input is the end of the run.
        let (header, body) = match read_message(&mut from_parent, 1 << 16) {
            Ok(Some((TAG_TASK, header, body))) => (header, body),
            Ok(Some((TAG_THUMBNAIL, header, body))) => {
                let Ok(ThumbnailTask { time_s, max_side }) = parse(&header) else { return 1 };
                let path = Path::new(OsStr::from_bytes(&body));
                if let Some(fault) = fault_for(fault.as_deref(), path, 1) {
                    fail_as(fault);
                }
                let made = make_thumbnail(path, time_s, max_side, decode.timeout);
                if send_thumbnail(&mut to_parent, &made).is_err() {
                    return 1;
                }
                continue;
            }
            Ok(None) => return 0,
            _ => return 1,
        };
        let Ok(TaskHeader { attempt }) = parse(&header) else { return 1 };
        let path = Path::new(OsStr::from_bytes(&body));
        let fault = fault_for(fault.as_deref(), path, attempt);
        if let Some(fault) = fault {
            fail_as(fault);
        }
        let prepared = prepare(path, &decode, &setup.preprocess);
        let cut_short = fault == Some(Fault::ExitMidFrames);
        if send_prepared(&mut to_parent, &prepared, cut_short).is_err() {
            return 1;
        }
        if cut_short {
            // SAFETY: ends the process at once, as a crash would, without unwinding.
            unsafe { libc::_exit(0) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> Setup {
        Setup {
            sampling: SamplingConfig { fps: 1.0, max_frames: 3 },
            preprocess: PreprocessConfig::clip(4),
            timeout_s: 5.0,
        }
    }

    #[test]
    fn a_video_and_a_failure_cross_the_pipe_unchanged() {
        let facts = VideoFacts {
            duration_s: 2.5,
            width: 640,
            height: 360,
            fps: 29.97,
            content_hash: "ab".repeat(32),
            stream_index: Some(1),
        };
        let frames: Vec<(f64, Vec<f32>)> =
            (0..3).map(|i| (i as f64 * 0.5, (0..48).map(|v| v as f32 * -0.25 + i as f32).collect())).collect();
        let mut pipe = Vec::new();
        send_prepared(&mut pipe, &Prepared::Video { facts: facts.clone(), frames: frames.clone() }, false).unwrap();
        let rejection = Rejection::new(Stage::Probe, FailureKind::Corrupt, "bad \u{1F4FC} data");
        send_prepared(&mut pipe, &Prepared::Failed(rejection.clone()), false).unwrap();
        let mut reader = pipe.as_slice();
        match receive_prepared(&mut reader, &setup()).unwrap() {
            Prepared::Video { facts: f, frames: got } => {
                assert_eq!(f, facts);
                assert_eq!(got, frames);
            }
            other => panic!("{other:?}"),
        }
        match receive_prepared(&mut reader, &setup()).unwrap() {
            Prepared::Failed(got) => assert_eq!(got, rejection),
            other => panic!("{other:?}"),
        }
        assert!(receive_prepared(&mut reader, &setup()).is_err(), "the end of the stream is an error mid-file");
    }

    #[test]
    fn a_message_cut_short_or_oversized_is_an_error() {
        let frames = vec![(0.0, vec![0.5f32; 48]), (1.0, vec![0.25f32; 48])];
        let facts = VideoFacts {
            duration_s: 1.0,
            width: 4,
            height: 4,
            fps: 1.0,
            content_hash: String::new(),
            stream_index: None,
        };
        let mut cut = Vec::new();
        send_prepared(&mut cut, &Prepared::Video { facts: facts.clone(), frames: frames.clone() }, true).unwrap();
        assert!(receive_prepared(&mut cut.as_slice(), &setup()).is_err());
        let too_many: Vec<(f64, Vec<f32>)> = (0..4).map(|i| (i as f64, vec![0.0; 48])).collect();
        let mut big = Vec::new();
        send_prepared(&mut big, &Prepared::Video { facts, frames: too_many }, false).unwrap();
        let error = receive_prepared(&mut big.as_slice(), &setup()).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn a_fault_names_its_file_and_try() {
        let path = Path::new("/videos/a b.mp4");
        assert_eq!(fault_for(Some("abort:a b.mp4"), path, 2), Some(Fault::Abort));
        assert_eq!(fault_for(Some("hang:a b.mp4:1"), path, 1), Some(Fault::Hang));
        assert_eq!(fault_for(Some("hang:a b.mp4:1"), path, 2), None);
        assert_eq!(fault_for(Some("segv:*"), path, 1), Some(Fault::Segv));
        assert_eq!(fault_for(Some("segv:b.mp4"), path, 1), None);
        assert_eq!(fault_for(Some("exit-mid-frames:a b.mp4"), path, 1), Some(Fault::ExitMidFrames));
        assert_eq!(fault_for(None, path, 1), None);
    }
}
