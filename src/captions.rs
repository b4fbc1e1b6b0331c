//! Caption and query files read as a stream of texts: CSV or TSV with a header (a `video_id`
//! column and a `sentence`, `caption` or `text` column, as MSR-VTT's `MSRVTT_JSFUSION_test.csv`
//! has), JSON Lines with the same fields, or plain text with one query per line.
//!
//! The format follows the extension (`.csv`, `.tsv`, `.jsonl`/`.ndjson`/`.json`; anything else
//! is plain text). A row that cannot be read is an error naming its line; a row whose text is
//! empty is skipped and reported, so one blank caption never stops a job.

use std::fs::File;
use std::io::{BufRead, BufReader, Lines};
use std::path::{Path, PathBuf};

/// Header names accepted for the text column, in order of preference.
pub const TEXT_COLUMNS: &[&str] = &["sentence", "caption", "text"];
pub const VIDEO_ID_COLUMN: &str = "video_id";

#[derive(Debug, thiserror::Error)]
pub enum CaptionError {
    #[error("{path}: cannot read: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}, line {line}: {message}")]
    Malformed { path: PathBuf, line: u64, message: String },
}

/// One text to encode, with the 1-based line it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Caption {
    pub line: u64,
    pub text: String,
    pub video_id: Option<String>,
}

/// What the reader yields for each data row.
#[derive(Debug, Clone, PartialEq)]
pub enum Row {
    Caption(Caption),
    /// A CSV or JSONL row whose text is empty: skipped, with the line for the warning.
    EmptyText {
        line: u64,
    },
}

pub enum CaptionReader {
    Delimited { path: PathBuf, reader: csv::Reader<File>, text: usize, video_id: Option<usize> },
    JsonLines { path: PathBuf, lines: Lines<BufReader<File>>, line: u64 },
    Plain { path: PathBuf, lines: Lines<BufReader<File>>, line: u64 },
}

impl CaptionReader {
    pub fn open(path: &Path) -> Result<CaptionReader, CaptionError> {
        let io = |source| CaptionError::Io { path: path.to_path_buf(), source };
        let extension = path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
        let file = File::open(path).map_err(io)?;
        if file.metadata().map_err(io)?.is_dir() {
            return Err(CaptionError::Io { path: path.to_path_buf(), source: std::io::Error::other("is a folder") });
        }
        let path = path.to_path_buf();
        Ok(match extension.as_str() {
            "csv" | "tsv" => {
                let delimiter = if extension == "tsv" { b'\t' } else { b',' };
                let mut reader = csv::ReaderBuilder::new().delimiter(delimiter).from_reader(file);
                let malformed = |message: String| CaptionError::Malformed { path: path.clone(), line: 1, message };
                let headers = reader.headers().map_err(|e| malformed(format!("unreadable header: {e}")))?.clone();
                let find = |name: &str| headers.iter().position(|h| h.trim().eq_ignore_ascii_case(name));
                let text = TEXT_COLUMNS.iter().find_map(|name| find(name)).ok_or_else(|| {
                    malformed(format!(
                        "the header has no `sentence`, `caption` or `text` column (it has: {})",
                        headers.iter().collect::<Vec<_>>().join(", ")
                    ))
                })?;
                CaptionReader::Delimited { video_id: find(VIDEO_ID_COLUMN), path, reader, text }
            }
            "jsonl" | "ndjson" | "json" => {
                CaptionReader::JsonLines { path, lines: BufReader::new(file).lines(), line: 0 }
            }
            _ => CaptionReader::Plain { path, lines: BufReader::new(file).lines(), line: 0 },
        })
    }
}

impl Iterator for CaptionReader {
    type Item = Result<Row, CaptionError>;

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            CaptionReader::Delimited { path, reader, text, video_id } => {
                let mut record = csv::StringRecord::new();
                let line = reader.position().line();
                match reader.read_record(&mut record) {
                    Ok(false) => None,
                    Ok(true) => {
                        let line = record.position().map_or(line, |p| p.line());
                        let caption = record.get(*text).unwrap_or("");
                        let video_id = video_id.and_then(|i| record.get(i)).map(str::trim).filter(|v| !v.is_empty());
                        Some(Ok(make_row(line, caption, video_id.map(str::to_string))))
                    }
                    Err(e) => {
                        let line = e.position().map_or(line, |p| p.line());
                        Some(Err(CaptionError::Malformed { path: path.clone(), line, message: csv_message(&e) }))
                    }
                }
            }
            CaptionReader::JsonLines { path, lines, line } => loop {
                *line += 1;
                let text = match lines.next()? {
                    Ok(text) => text,
                    Err(e) => return Some(Err(read_error(path, *line, e))),
                };
                if text.trim().is_empty() {
                    continue;
                }
                return Some(parse_json_row(&text, *line).map_err(|message| CaptionError::Malformed {
                    path: path.clone(),
                    line: *line,
                    message,
                }));
            },
            CaptionReader::Plain { path, lines, line } => loop {
                *line += 1;
                let text = match lines.next()? {
                    Ok(text) => text,
                    Err(e) => return Some(Err(read_error(path, *line, e))),
                };
                if !text.trim().is_empty() {
                    return Some(Ok(Row::Caption(Caption { line: *line, text, video_id: None })));
                }
            },
        }
    }
}

fn make_row(line: u64, text: &str, video_id: Option<String>) -> Row {
    if text.trim().is_empty() {
        Row::EmptyText { line }
    } else {
        Row::Caption(Caption { line, text: text.to_string(), video_id })
    }
}

fn parse_json_row(text: &str, line: u64) -> Result<Row, String> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not a JSON object: {e}"))?;
    let object = value.as_object().ok_or("not a JSON object")?;
    let caption =
        TEXT_COLUMNS.iter().find_map(|name| object.get(*name)).ok_or("no `sentence`, `caption` or `text` field")?;
    let caption = caption.as_str().ok_or("the text field is not a string")?;
    let video_id = match object.get(VIDEO_ID_COLUMN) {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(id)) => Some(id.trim().to_string()).filter(|id| !id.is_empty()),
        Some(serde_json::Value::Number(id)) => Some(id.to_string()),
        Some(_) => return Err("`video_id` is neither a string nor a number".to_string()),
    };
    Ok(make_row(line, caption, video_id))
}

fn read_error(path: &Path, line: u64, e: std::io::Error) -> CaptionError {
    if e.kind() == std::io::ErrorKind::InvalidData {
        CaptionError::Malformed { path: path.to_path_buf(), line, message: "not valid UTF-8".to_string() }
    } else {
        CaptionError::Io { path: path.to_path_buf(), source: e }
    }
}

fn csv_message(e: &csv::Error) -> String {
    match e.kind() {
        csv::ErrorKind::UnequalLengths { expected_len, len, .. } => {
            format!("{len} fields where the header has {expected_len}")
        }
        csv::ErrorKind::Utf8 { .. } => "not valid UTF-8".to_string(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(name: &str, content: &str) -> Vec<Result<Row, String>> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        match CaptionReader::open(&path) {
            Ok(reader) => reader.map(|r| r.map_err(|e| e.to_string())).collect(),
            Err(e) => vec![Err(e.to_string())],
        }
    }

    fn caption(line: u64, text: &str, video_id: Option<&str>) -> Result<Row, String> {
        Ok(Row::Caption(Caption { line, text: text.to_string(), video_id: video_id.map(str::to_string) }))
    }

    #[test]
    fn msrvtt_csv_layout_reads_as_it_is() {
        let rows = read(
            "MSRVTT_JSFUSION_test.csv",
            "key,vid_key,video_id,sentence\nret0,msrvideo7020,video7020,\"a woman, talking\"\nret1,msrvideo7021,video7021,  \n",
        );
        assert_eq!(rows, vec![caption(2, "a woman, talking", Some("video7020")), Ok(Row::EmptyText { line: 3 })]);
    }

    #[test]
    fn csv_errors_name_the_line() {
        let rows = read("c.csv", "video_id,caption\na,one\nb,two,three\n");
        assert_eq!(rows[0], caption(2, "one", Some("a")));
        let err = rows[1].clone().unwrap_err();
        assert!(err.contains("line 3") && err.contains("3 fields where the header has 2"), "{err}");
        let err = read("c.csv", "id,words\n1,x\n")[0].clone().unwrap_err();
        assert!(err.contains("line 1") && err.contains("no `sentence`, `caption` or `text` column"), "{err}");
    }

    #[test]
    fn json_lines_and_plain_text() {
        let rows = read("q.jsonl", "{\"video_id\": 7, \"text\": \"a dog\"}\n\n{\"caption\": \"\"}\n{\"text\": 3}\n");
        assert_eq!(rows[0], caption(1, "a dog", Some("7")));
        assert_eq!(rows[1], Ok(Row::EmptyText { line: 3 }));
        assert!(rows[2].clone().unwrap_err().contains("line 4: the text field is not a string"));
        let err = read("q.jsonl", "{oops\n")[0].clone().unwrap_err();
        assert!(err.contains("line 1: not a JSON object"), "{err}");
        let rows = read("queries.txt", "a cat\n\n   \nthe sea\n");
        assert_eq!(rows, vec![caption(1, "a cat", None), caption(4, "the sea", None)]);
    }
}
