//! Dense matrices as NumPy `.npy` files (score's `--dense`) (format 1.0, little-endian float32, C order), written
//! row by row at their offsets, so strips finished out of order on several threads each
//! write their own rows without holding the matrix.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub struct NpyWriter {
    file: File,
    path: PathBuf,
    data_offset: u64,
    cols: usize,
}

impl NpyWriter {
    pub fn create(path: &Path, rows: usize, cols: usize) -> std::io::Result<NpyWriter> {
        let header = npy_header("<f4", &[rows, cols]);
        let mut file = super::create_temporary(path)?;
        file.write_all(&header)?;
        file.set_len(header.len() as u64 + (rows * cols * 4) as u64)?;
        Ok(NpyWriter { file, path: path.to_path_buf(), data_offset: header.len() as u64, cols })
    }

    pub fn write_row(&self, row: usize, values: &[f64]) -> std::io::Result<()> {
        debug_assert_eq!(values.len(), self.cols);
        let bytes: Vec<u8> = values.iter().flat_map(|&v| (v as f32).to_le_bytes()).collect();
        self.file.write_all_at(&bytes, self.data_offset + (row * self.cols * 4) as u64)
    }

    pub fn finish(self) -> std::io::Result<PathBuf> {
        super::sync_temporary(&self.file)?;
        Ok(self.path)
    }
}

/// The magic, version 1.0, and a header dict padded with spaces to a multiple of 64 bytes.
pub fn npy_header(dtype: &str, shape: &[usize]) -> Vec<u8> {
    let shape = match shape {
        [n] => format!("({n},)"),
        dims => format!("({})", dims.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")),
    };
    let mut dict = format!("{{'descr': '{dtype}', 'fortran_order': False, 'shape': {shape}, }}");
    let unpadded = 10 + dict.len() + 1;
    dict.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    dict.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_aligned_and_rows_land_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.npy");
        let writer = NpyWriter::create(&path, 2, 3).unwrap();
        writer.write_row(1, &[4.0, 5.0, 6.0]).unwrap();
        writer.write_row(0, &[1.0, 2.0, 3.0]).unwrap();
        writer.finish().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + header_len) % 64, 0);
        assert!(std::str::from_utf8(&bytes[10..10 + header_len]).unwrap().contains("'shape': (2, 3)"));
        let values: Vec<f32> =
            bytes[10 + header_len..].chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(values, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    }
}
