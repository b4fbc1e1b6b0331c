//! `vtr-index run JOB.toml`: a job file for nightly batches, one table per step.
//!
//! `[ingest]`, `[encode_text]` and `[score]` take the long flag names of their command with
//! `-` written `_`, and the positional arguments by name (`roots`, `captions`). Each table is
//! turned into that command's arguments and parsed by the same clap definitions as the
//! command line (given by `cli`, which runs the steps), so a job file accepts exactly what the
//! flags accept. Unknown tables and keys
//! are errors naming them. `index` may be given once, in `[ingest]`, for every step. Relative
//! paths (`roots`, `index`, `model`, `captions`, `out`) are relative to the job file's folder,
//! so a job runs the same from any working folder (a cron job's home, a scheduler's).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use toml::{Table, Value};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The job file (TOML): [ingest], [encode_text] and [score] tables whose keys are the
    /// commands' long flags with _ for -, plus `roots` and `captions`.
    #[arg(value_name = "JOB.toml")]
    pub job: PathBuf,
}

/// Keys whose values are paths, resolved against the job file's folder.
const PATH_KEYS: [&str; 5] = ["roots", "index", "model", "captions", "out"];

/// The steps a job can have, in the order they run: (table, subcommand, positional key).
const STEPS: [(&str, &str, Option<&str>); 3] =
    [("ingest", "ingest", Some("roots")), ("encode_text", "encode-text", Some("captions")), ("score", "score", None)];

/// Reads a job file into its steps, in order: each one's command line and what `parse` makes
/// of it. `program` is the command-line definition whose subcommands the tables name.
pub fn steps<T>(
    path: &Path,
    program: &clap::Command,
    parse: impl Fn(&[String]) -> Result<T>,
) -> Result<Vec<(Vec<String>, T)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("{}: cannot read the job file", path.display()))?;
    let job: Table = text.parse().with_context(|| format!("{}: not a valid TOML job file", path.display()))?;
    if let Some(unknown) = job.keys().find(|k| !STEPS.iter().any(|(table, _, _)| table == k)) {
        bail!("{}: unknown table [{unknown}] (a job has [ingest], [encode_text] and [score])", path.display());
    }
    let shared_index = job.get("ingest").and_then(|t| t.get("index")).cloned();
    let mut lines = Vec::new();
    for (table, subcommand, positional) in STEPS {
        let Some(step) = job.get(table) else { continue };
        let Value::Table(step) = step else { bail!("{}: [{table}] must be a table", path.display()) };
        let mut step = step.clone();
        if let Some(index) = &shared_index {
            step.entry("index").or_insert_with(|| index.clone());
        }
        let folder = path.parent().unwrap_or(Path::new(""));
        for key in PATH_KEYS {
            if let Some(value) = step.get_mut(key) {
                relative_to(folder, value);
            }
        }
        let line = step_arguments(program, subcommand, positional, &step)
            .and_then(|line| Ok((parse(&line)?, line)))
            .with_context(|| format!("{}: [{table}]", path.display()))?;
        lines.push((line.1, line.0));
    }
    if lines.is_empty() {
        bail!("{}: the job has no steps ([ingest], [encode_text] or [score])", path.display());
    }
    Ok(lines)
}

/// One table → `vtr-index SUBCOMMAND …`, checked against the subcommand's arguments (the
/// caller parses it, so a bad value is reported before any step runs).
fn step_arguments(
    program: &clap::Command,
    subcommand: &str,
    positional: Option<&str>,
    step: &Table,
) -> Result<Vec<String>> {
    let definition = program.find_subcommand(subcommand).expect("every step is a subcommand");
    let mut line = vec!["vtr-index".to_string(), subcommand.to_string()];
    let mut positionals = Vec::new();
    for (key, value) in step {
        if Some(key.as_str()) == positional {
            positionals.extend(scalars(key, value)?);
            continue;
        }
        let flag = key.replace('_', "-");
        let known = definition.get_arguments().any(|a| a.get_long() == Some(flag.as_str()));
        if !known || key.contains('-') {
            bail!("unknown key {key:?} (keys are the long flags of `vtr-index {subcommand}` with _ for -)");
        }
        match value {
            Value::Boolean(true) => line.push(format!("--{flag}")),
            Value::Boolean(false) => {}
            other => {
                for scalar in scalars(key, other)? {
                    line.push(format!("--{flag}"));
                    line.push(scalar);
                }
            }
        }
    }
    if !positionals.is_empty() {
        line.push("--".to_string());
        line.extend(positionals);
    }
    Ok(line)
}

/// A relative path (or each of a flat array) joined to `folder`; other values are left as
/// they are, for the checks that name them.
fn relative_to(folder: &Path, value: &mut Value) {
    match value {
        Value::String(text) if Path::new(text.as_str()).is_relative() => {
            *text = folder.join(text.as_str()).to_string_lossy().into_owned();
        }
        Value::Array(values) => values.iter_mut().for_each(|v| relative_to(folder, v)),
        _ => {}
    }
}

/// A value, or each value of a flat array, as command-line text.
fn scalars(key: &str, value: &Value) -> Result<Vec<String>> {
    match value {
        Value::Array(values) => values.iter().map(|v| scalar(key, v)).collect(),
        value => Ok(vec![scalar(key, value)?]),
    }
}

fn scalar(key: &str, value: &Value) -> Result<String> {
    Ok(match value {
        Value::String(s) => s.clone(),
        Value::Integer(n) => n.to_string(),
        Value::Float(x) => x.to_string(),
        Value::Boolean(b) => b.to_string(),
        _ => bail!("{key}: expected a string, a number, a boolean or a flat array of them"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines_of(text: &str) -> Result<Vec<Vec<String>>> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("job.toml");
        std::fs::write(&path, text).unwrap();
        let parse = |line: &[String]| crate::cli::parse_step(line);
        steps(&path, &<crate::cli::Cli as clap::CommandFactory>::command(), parse)
            .map(|steps| steps.into_iter().map(|(line, _)| line).collect())
    }

    #[test]
    fn nested_arrays_are_refused_not_cut() {
        for roots in ["[[]]", "[[\"/a\", \"/b\"]]", "[{ a = 1 }]"] {
            let e = lines_of(&format!("[ingest]\nroots = {roots}\nindex = \"/i\"\n")).unwrap_err();
            assert!(format!("{e:#}").contains("flat array"), "{roots}: {e:#}");
        }
    }

    #[test]
    fn tables_become_the_command_lines_of_their_steps() {
        let lines = lines_of(
            r#"
            [ingest]
            roots = ["/a", "/b"]
            index = "/i"
            model = "/m"
            retry_failed = true
            commit_every = 100
            [encode_text]
            captions = "/c.csv"
            name = "msrvtt"
            [score]
            texts = "msrvtt"
            revise = "dsl"
            out = "/o"
            "#,
        )
        .unwrap();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0][1], "ingest");
        assert!(lines[0].ends_with(&["--".into(), "/a".into(), "/b".into()]));
        assert!(lines[0].contains(&"--retry-failed".to_string()));
        assert!(lines[1].contains(&"/i".to_string()), "index is shared: {:?}", lines[1]);
        assert!(lines[2].windows(2).any(|w| w == ["--revise", "dsl"]));
    }

    #[test]
    fn relative_paths_are_relative_to_the_job_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("job.toml");
        let text = "[ingest]\nroots = [\"videos\", \"/abs\"]\nindex = \"idx\"\nmodel = \"m\"\n[score]\ntexts = \"t\"\nout = \"o\"\n";
        std::fs::write(&path, text).unwrap();
        let parse = |line: &[String]| crate::cli::parse_step(line);
        let lines: Vec<Vec<String>> = steps(&path, &<crate::cli::Cli as clap::CommandFactory>::command(), parse)
            .unwrap()
            .into_iter()
            .map(|(line, _)| line)
            .collect();
        let under = |rel: &str| dir.path().join(rel).to_string_lossy().into_owned();
        assert!(lines[0].ends_with(&[under("videos"), "/abs".to_string()]), "{:?}", lines[0]);
        assert!(lines[0].windows(2).any(|w| w == ["--index".to_string(), under("idx")]), "{:?}", lines[0]);
        assert!(lines[0].windows(2).any(|w| w == ["--model".to_string(), under("m")]), "{:?}", lines[0]);
        assert!(lines[1].windows(2).any(|w| w == ["--out".to_string(), under("o")]), "{:?}", lines[1]);
        assert!(lines[1].windows(2).any(|w| w == ["--texts".to_string(), "t".to_string()]), "{:?}", lines[1]);
    }

    #[test]
    fn unknown_tables_keys_and_values_are_errors_naming_them() {
        let e = lines_of("[ingest]\nroots = [\"/a\"]\nindex = \"/i\"\nframez = 3\n").unwrap_err();
        assert!(format!("{e:#}").contains("\"framez\""), "{e:#}");
        let e = lines_of("[injest]\n").unwrap_err();
        assert!(format!("{e:#}").contains("[injest]"), "{e:#}");
        let e = lines_of("[score]\nindex = \"/i\"\ntexts = \"t\"\nout = \"/o\"\nrevise = \"sinkhorn\"\n").unwrap_err();
        assert!(format!("{e:#}").contains("sinkhorn"), "{e:#}");
        let e = lines_of("[ingest]\nroots = [\"/a\"]\nindex = \"/i\"\nretry-failed = true\n").unwrap_err();
        assert!(format!("{e:#}").contains("retry-failed"), "{e:#}");
    }
}
