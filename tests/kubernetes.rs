//! The shipped Kubernetes manifests (`pipelines/kubernetes/`), without a cluster: they parse,
//! the ingest and the score stages are Indexed Jobs whose pods take their part from
//! `JOB_COMPLETION_INDEX`, the merge names every part, every command line is accepted by our
//! CLI, and running them as the Job controller would (N processes, each with its index, then
//! the next Job) gives a single run's index and a single machine's score (contract §7).

use std::path::{Path, PathBuf};

use yaml_rust2::{Yaml, YamlLoader};

use crate::shards::{assert_same_rows, assert_same_scores, ingest_roots, rows};
use crate::util::*;

fn manifest(name: &str) -> Yaml {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/kubernetes").join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    let mut documents = YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(documents.len(), 1, "{name}: one object");
    documents.remove(0)
}

/// The container's command line: the `sh -c` script's first command, or command + args.
fn command_line(job: &Yaml) -> Vec<String> {
    let container = &job["spec"]["template"]["spec"]["containers"][0];
    let words =
        |y: &Yaml| -> Vec<String> { y.as_vec().unwrap().iter().map(|w| w.as_str().unwrap().to_string()).collect() };
    let command = words(&container["command"]);
    let args = words(&container["args"]);
    if command[0] == "/bin/sh" {
        let script = &args[0];
        script.split(';').next().unwrap().split_whitespace().map(str::to_string).collect()
    } else {
        command.into_iter().chain(args).collect()
    }
}

#[test]
fn the_manifests_are_an_indexed_ingest_and_a_merge_of_every_part() {
    let ingest = manifest("ingest-job.yaml");
    assert_eq!(ingest["kind"].as_str(), Some("Job"));
    assert_eq!(ingest["spec"]["completionMode"].as_str(), Some("Indexed"));
    let parts = ingest["spec"]["completions"].as_i64().unwrap();
    assert!(ingest["spec"]["parallelism"].as_i64().unwrap() <= parts);
    let line = command_line(&ingest);
    assert!(line.windows(2).any(|w| w == ["--shard".to_string(), format!("auto/{parts}")]), "{line:?}");
    assert!(line.iter().any(|w| w.ends_with("part-$JOB_COMPLETION_INDEX")), "each pod its own part: {line:?}");
    let parsed: Vec<String> = line.iter().map(|w| w.replace("$JOB_COMPLETION_INDEX", "0")).collect();
    vtr_index::cli::parse_step(&parsed).unwrap_or_else(|e| panic!("{line:?}: {e}"));

    let merge = manifest("merge-job.yaml");
    let line = command_line(&merge);
    vtr_index::cli::parse_step(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
    let named: Vec<&String> = line.iter().filter(|w| w.contains("/parts/part-")).collect();
    let expected: Vec<String> = (0..parts).map(|i| format!("/shared/vtr/parts/part-{i}")).collect();
    assert_eq!(named, expected.iter().collect::<Vec<_>>(), "the merge names parts 0…N−1");

    for stage in ["stats", "rank"] {
        let job = manifest(&format!("score-{stage}-job.yaml"));
        assert_eq!(job["spec"]["completionMode"].as_str(), Some("Indexed"));
        let count = job["spec"]["completions"].as_i64().unwrap();
        let line = command_line(&job);
        assert!(line.windows(2).any(|w| w == ["--part".to_string(), format!("auto/{count}")]), "{line:?}");
        vtr_index::cli::parse_step(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
    }
    let line = command_line(&manifest("score-finish-job.yaml"));
    vtr_index::cli::parse_step(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));

    let volume = manifest("volume.yaml");
    assert_eq!(volume["spec"]["accessModes"][0].as_str(), Some("ReadWriteMany"));
    let claim = volume["metadata"]["name"].as_str().unwrap();
    for job in [&ingest, &merge] {
        let volumes = job["spec"]["template"]["spec"]["volumes"].as_vec().unwrap();
        assert!(volumes.iter().any(|v| v["persistentVolumeClaim"]["claimName"].as_str() == Some(claim)));
    }
}

/// The Job controller's part, played here: every pod's command line (the manifest's own, with its
/// volumes' paths mapped to test folders) run at once with its `JOB_COMPLETION_INDEX`, then the
/// merge's.
#[test]
fn the_indexed_job_run_as_its_controller_would_gives_a_single_runs_index() {
    let dir = Dir::new();
    let videos = corpus(&dir, "videos", &["short_h264.mp4", "vfr_h264.mp4", "testsrc2_h264.mp4", "bars_mpeg4.avi"]);
    let model = sample().join("model");
    let shared = dir.join("shared");
    let map = |word: &str| -> String {
        word.replace("/videos", &videos.to_string_lossy())
            .replace("/shared", &shared.to_string_lossy())
            .replace("/models/clip/pytorch_model.bin.4", &model.to_string_lossy())
    };
    // Each Job in turn: its pods at once (an Indexed Job's), or its one pod.
    let run_job = |name: &str| {
        let job = manifest(name);
        let line: Vec<String> = command_line(&job).iter().map(|w| map(w)).collect();
        let indexed = job["spec"]["completionMode"].as_str() == Some("Indexed");
        let pods = if indexed { job["spec"]["completions"].as_i64().unwrap() } else { 1 };
        let running: Vec<_> = (0..pods)
            .map(|i| {
                let words: Vec<String> =
                    line[1..].iter().map(|w| w.replace("$JOB_COMPLETION_INDEX", &i.to_string())).collect();
                let words: Vec<&str> = words.iter().map(String::as_str).collect();
                let pod = TestCommand::new(&words);
                if indexed { pod.env("JOB_COMPLETION_INDEX", &i.to_string()) } else { pod }.spawn()
            })
            .collect();
        for pod in running {
            let out = pod.wait_with_output().unwrap();
            assert_eq!(out.status.code(), Some(0), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        }
    };
    run_job("ingest-job.yaml");
    run_job("merge-job.yaml");
    let single: PathBuf = dir.join("single");
    assert_eq!(ingest_roots(&single, &[&videos], &[], &[]).0, 0);
    let index = shared.join("vtr/index");
    assert_same_rows(&rows(&index), &rows(&single), "Indexed Job vs single run");

    let captions = fixtures().join("videos_captions.csv");
    TestCommand::new(&["encode-text"])
        .arg(&captions)
        .arg("--index")
        .arg(&index)
        .args(&["--name", "captions"])
        .expect_code(0);
    for job in ["score-stats-job.yaml", "score-rank-job.yaml", "score-finish-job.yaml"] {
        run_job(job);
    }
    let here = dir.join("scored-here");
    TestCommand::new(&["score", "--index"])
        .arg(&index)
        .args(&["--texts", "captions", "--revise", "dsl", "--out"])
        .arg(&here)
        .expect_code(0);
    assert_same_scores(&shared.join("vtr/scores/captions"), &here, "Indexed Jobs' split score");
}
