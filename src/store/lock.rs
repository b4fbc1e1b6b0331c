//! One writer at a time: an advisory lock on `INDEX/lock`, taken by every command that
//! commits (ingest, encode-text, merge).
//!
//! The lock is `flock(LOCK_EX | LOCK_NB)` on an open file, so the kernel drops it when the
//! holder exits, however it exits: a lock left by a killed process is free again, and the
//! next writer takes it over and says so. The file holds the holder's description (pid,
//! command, start time) so that a refused writer can name who holds the index.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

use super::{StoreError, io_error};

pub const LOCK_FILE: &str = "lock";

/// Held while it lives; dropping it (or the process ending) releases the lock.
#[derive(Debug)]
pub struct WriterLock {
    file: File,
    /// What the file said when we took the lock: the previous holder, which has since died
    /// (a stale lock), or `None` when the last holder finished cleanly.
    pub taken_over_from: Option<String>,
}

impl WriterLock {
    /// Takes the lock on `index` (which must exist) or fails at once naming the holder.
    pub fn acquire(index: &Path, command: &str) -> Result<WriterLock, StoreError> {
        let path = index.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_error(&path))?;
        // SAFETY: flock on a file descriptor we own; it touches no memory.
        let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        let mut previous = String::new();
        let _ = file.read_to_string(&mut previous);
        let previous = previous.trim().to_string();
        if !locked {
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(StoreError::Io { path, source: error });
            }
            return Err(StoreError::Locked { index: index.to_path_buf(), holder: describe_holder(&previous) });
        }
        let me = format!(
            "pid {} ({}), started at unix time {}",
            std::process::id(),
            command,
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
        );
        write_holder(&mut file, &path, &me)?;
        Ok(WriterLock { file, taken_over_from: (!previous.is_empty()).then_some(previous) })
    }
}

impl Drop for WriterLock {
    fn drop(&mut self) {
        // Clear the holder so the next writer does not mistake a clean exit for a crash.
        let _ = self.file.set_len(0);
    }
}

fn write_holder(file: &mut File, path: &Path, text: &str) -> Result<(), StoreError> {
    file.set_len(0).map_err(io_error(path))?;
    file.seek(SeekFrom::Start(0)).map_err(io_error(path))?;
    file.write_all(text.as_bytes()).map_err(io_error(path))?;
    file.flush().map_err(io_error(path))
}

fn describe_holder(text: &str) -> String {
    if text.is_empty() { "another vtr-index process".to_string() } else { text.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_writer_is_refused_with_the_holder_named_and_a_released_lock_is_free() {
        let dir = tempfile::tempdir().unwrap();
        let first = WriterLock::acquire(dir.path(), "ingest").unwrap();
        assert!(first.taken_over_from.is_none());
        let err = WriterLock::acquire(dir.path(), "encode-text").unwrap_err().to_string();
        assert!(err.contains(&format!("pid {} (ingest)", std::process::id())), "{err}");
        drop(first);
        let again = WriterLock::acquire(dir.path(), "ingest").unwrap();
        assert!(again.taken_over_from.is_none(), "a clean release leaves no stale holder");
    }
}
