//! Helpers shared by the integration tests: temporary folders, the binary, fixtures.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::Float64Type;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

/// The shared fixtures folder: `../shared/fixtures`, or `VTR_INDEX_FIXTURES` where a test
/// binary runs away from its checkout (the GPU machines).
pub fn fixtures() -> PathBuf {
    std::env::var_os("VTR_INDEX_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"))
}

/// The bundled sample corpus and model.
pub fn sample() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("sample")
}

/// A temporary folder that disappears with the test.
pub struct Dir {
    tmp: tempfile::TempDir,
}

impl Dir {
    pub fn new() -> Dir {
        Dir { tmp: tempfile::tempdir().expect("a temporary folder") }
    }

    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    pub fn join(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    /// Writes a file, creating its folders.
    pub fn create(&self, rel: &str, bytes: &[u8]) -> PathBuf {
        let path = self.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, bytes).unwrap();
        path
    }

    /// Copies a file or a folder tree into this folder under `rel`.
    pub fn copy(&self, from: &Path, rel: &str) -> PathBuf {
        let to = self.join(rel);
        copy_tree(from, &to);
        to
    }
}

fn copy_tree(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            copy_tree(&entry.path(), &to.join(entry.file_name()));
        }
    } else {
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, to).unwrap();
    }
}

/// The `vtr-index` binary with arguments, run to completion.
pub struct TestCommand {
    cmd: Command,
}

impl TestCommand {
    pub fn new(args: &[&str]) -> TestCommand {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vtr-index"));
        cmd.args(args);
        TestCommand { cmd }
    }

    pub fn arg(mut self, arg: impl AsRef<std::ffi::OsStr>) -> TestCommand {
        self.cmd.arg(arg);
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> TestCommand {
        self.cmd.env(key, value);
        self
    }

    pub fn args(mut self, args: &[&str]) -> TestCommand {
        self.cmd.args(args);
        self
    }

    pub fn output(mut self) -> Output {
        self.cmd.output().expect("the binary runs")
    }

    /// Runs and asserts the exit code; returns stdout and stderr.
    pub fn expect_code(self, code: i32) -> (String, String) {
        let out = self.output();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(code), "exit code\nstdout:\n{stdout}\nstderr:\n{stderr}");
        (stdout, stderr)
    }
}

/// Every record batch of a Parquet file.
pub fn read_parquet(path: &Path) -> Vec<RecordBatch> {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    ParquetRecordBatchReaderBuilder::try_new(file).unwrap().build().unwrap().map(|b| b.unwrap()).collect()
}

pub fn strings(batch: &RecordBatch, name: &str) -> Vec<String> {
    let a = batch.column_by_name(name).unwrap().as_string::<i32>();
    (0..a.len()).map(|i| a.value(i).to_string()).collect()
}

/// A `list<double>` column as one vector per row, in f32.
pub fn f64_lists(batch: &RecordBatch, name: &str) -> Vec<Vec<f32>> {
    let lists = batch.column_by_name(name).unwrap().as_list::<i32>();
    (0..lists.len())
        .map(|i| lists.value(i).as_primitive::<Float64Type>().values().iter().map(|&v| v as f32).collect())
        .collect()
}

/// A `list<list<double>>` column.
pub fn f64_list_lists(batch: &RecordBatch, name: &str) -> Vec<Vec<Vec<f32>>> {
    let lists = batch.column_by_name(name).unwrap().as_list::<i32>();
    (0..lists.len())
        .map(|i| {
            let inner = lists.value(i);
            let inner = inner.as_list::<i32>();
            (0..inner.len())
                .map(|j| inner.value(j).as_primitive::<Float64Type>().values().iter().map(|&v| v as f32).collect())
                .collect()
        })
        .collect()
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "embedding widths differ");
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// Ingests `roots` into `index` with the bundled tiny model and returns the exit code.
pub fn ingest(index: &Path, roots: &[&Path], extra: &[&str]) -> (i32, String) {
    let mut cmd = TestCommand::new(&["ingest"]);
    for root in roots {
        cmd = cmd.arg(root);
    }
    cmd = cmd.arg("--index").arg(index).arg("--model").arg(sample().join("model"));
    for e in extra {
        cmd = cmd.arg(e);
    }
    let out = cmd.output();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A NumPy `.npy` array (little-endian `<f4`, `<f8` or `<i8`, C order) as f64 values and its shape.
pub fn read_npy(path: &Path) -> (Vec<f64>, Vec<usize>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..6], b"\x93NUMPY", "{}: not an npy file", path.display());
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        _ => (u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize, 12),
    };
    let header = std::str::from_utf8(&bytes[start..start + header_len]).unwrap();
    assert!(header.contains("'fortran_order': False"), "{header}");
    let shape_text = header.split("'shape': (").nth(1).unwrap().split(')').next().unwrap();
    let shape: Vec<usize> =
        shape_text.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|s| s.parse().unwrap()).collect();
    let data = &bytes[start + header_len..];
    let values: Vec<f64> = if header.contains("'<f4'") {
        data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect()
    } else if header.contains("'<f8'") {
        data.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect()
    } else if header.contains("'<i8'") {
        data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64).collect()
    } else {
        panic!("{}: unsupported dtype in {header}", path.display())
    };
    assert_eq!(values.len(), shape.iter().product::<usize>());
    (values, shape)
}
