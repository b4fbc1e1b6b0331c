//! Digests of files, streamed: SHA-256 (the identity of model weights, the checksum of shards)
//! and BLAKE3 (a video file's content hash, which finds renamed and copied files).

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

/// The file's size in bytes and its SHA-256 as lowercase hex.
pub fn sha256_file(path: &Path) -> std::io::Result<(u64, String)> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        bytes += n as u64;
        hasher.update(&buffer[..n]);
    }
    Ok((bytes, hasher.finalize().iter().map(|b| format!("{b:02x}")).collect()))
}

/// The SHA-256 of `bytes` as lowercase hex.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The file's BLAKE3 as lowercase hex: the `content_hash` of the videos table.
pub fn blake3_file(path: &Path) -> std::io::Result<String> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(std::fs::File::open(path)?)?;
    Ok(hasher.finalize().to_hex().to_string())
}
