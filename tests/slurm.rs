//! The shipped Slurm scripts (`pipelines/slurm/`) against a real one-node Slurm cluster: the
//! ingest array, the merge chained on it, a task killed mid-run and the chain resubmitted, an
//! index equal to a single run's, and the captions' score split in three parts, for every
//! revision, equal to a single-machine score of that index (contract §7). Ignored unless asked for: CI starts a
//! cluster (`scripts/slurm-cluster.sh start`) and runs them with `--ignored slurm::`; asked for
//! without a cluster, they fail.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::shards::{assert_same_rows, assert_same_scores, ingest_roots, rows, two_roots};
use crate::util::*;

fn repository() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A command of Slurm's, run to completion; its stdout.
fn slurm(program: &str, args: &[&str], env: &[(&str, String)], dir: &Path) -> String {
    let out = Command::new(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (is Slurm installed and started? scripts/slurm-cluster.sh start)"));
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until job `id` (every task of an array) has left the queue; its states, one per task.
fn wait_for(id: &str) -> Vec<String> {
    let started = Instant::now();
    while !slurm("squeue", &["-h", "-j", id], &[], repository()).trim().is_empty() {
        assert!(started.elapsed() < Duration::from_secs(180), "job {id} still queued after 3 minutes");
        std::thread::sleep(Duration::from_millis(300));
    }
    let shown = slurm("scontrol", &["show", "job", id, "-o"], &[], repository());
    shown
        .lines()
        .filter_map(|line| line.split_whitespace().find_map(|f| f.strip_prefix("JobState=")).map(str::to_string))
        .collect()
}

#[test]
#[ignore = "needs a Slurm cluster: CI starts one (scripts/slurm-cluster.sh) and runs these with --ignored"]
fn the_slurm_chain_resumes_a_killed_task_and_builds_a_single_runs_index() {
    assert!(slurm("sinfo", &["-h", "-o", "%T"], &[], repository()).contains("idle"), "the cluster's node is up");
    let dir = Dir::new();
    let (a, b) = two_roots(&dir);
    let single = dir.join("single");
    assert_eq!(ingest_roots(&single, &[&a, &b], &[], &[]).0, 2);
    let work = dir.join("work");
    let logs = work.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let env = [
        ("VTR_PARTS", "3".to_string()),
        ("VTR_ROOTS", format!("{} {}", a.display(), b.display())),
        ("VTR_WORK", work.display().to_string()),
        ("VTR_MODEL", sample().join("model").display().to_string()),
        ("VTR_BIN", env!("CARGO_BIN_EXE_vtr-index").to_string()),
        ("VTR_CAPTIONS", fixtures().join("videos_captions.csv").display().to_string()),
        ("VTR_SCORE_PARTS", "3".to_string()),
        ("VTR_SCORE_ARGS", "--revise dsl-sym".to_string()),
    ];
    // Task 1 of the array dies by kill -9 as its first batch is encoded, before any commit.
    let script = repository().join("pipelines/slurm/ingest.sbatch");
    let killed = slurm(
        "sbatch",
        &[
            "--parsable",
            "--array=1",
            "--cpus-per-task=1",
            "--export=ALL,VTR_INDEX_KILL_AT=encode",
            &script.to_string_lossy(),
        ],
        &env,
        &logs,
    );
    let states = wait_for(killed.trim());
    assert!(states.iter().all(|s| s != "COMPLETED"), "the killed task failed: {states:?}");
    assert!(!work.join("parts/part-1/manifest.json").exists(), "it died before committing");

    // The chain, submitted as users do, once more after the failure.
    let submit = repository().join("pipelines/slurm/submit.sh");
    let printed = slurm("bash", &[&submit.to_string_lossy(), "--cpus-per-task=1"], &env, repository());
    let job = |name: &str| -> String {
        printed.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).unwrap_or_else(|| panic!("{printed}")).into()
    };
    let ingest_states = wait_for(&job("ingest"));
    assert!(ingest_states.iter().all(|s| s == "COMPLETED"), "every part: {ingest_states:?}");
    assert_eq!(wait_for(&job("merge")), ["COMPLETED"], "the merge ran once the array succeeded");
    assert_same_rows(&rows(&work.join("index")), &rows(&single), "Slurm chain vs single run");
    for name in ["encode", "stats", "rank", "finish"] {
        let states = wait_for(&job(name));
        assert!(states.iter().all(|s| s == "COMPLETED"), "{name}: {states:?}");
    }
    // The other revisions' stages, submitted as the chain submits them, side by side.
    let stage_script = repository().join("pipelines/slurm/score-stage.sbatch").to_string_lossy().into_owned();
    let others =
        [("none", "--revise none"), ("dsl", "--revise dsl"), ("qbnorm", "--revise qbnorm --bank videos_captions")];
    for (label, settings) in others {
        let mut env = env.to_vec();
        env.push(("VTR_SCORE_ARGS", settings.to_string()));
        env.push(("VTR_SCORE_LABEL", label.to_string()));
        let mut previous: Option<String> = None;
        for stage in ["stats", "rank", "finish"] {
            env.push(("VTR_STAGE", stage.to_string()));
            let mut args = vec!["--parsable".to_string(), "--cpus-per-task=1".to_string()];
            if stage != "finish" {
                args.push("--array=0-2".to_string());
            }
            if let Some(id) = &previous {
                args.push(format!("--dependency=afterok:{id}"));
                args.push("--kill-on-invalid-dep=yes".to_string());
            }
            args.push(stage_script.clone());
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            previous = Some(slurm("sbatch", &args, &env, &logs).trim().to_string());
            env.pop();
        }
        let states = wait_for(previous.as_deref().unwrap());
        assert_eq!(states, ["COMPLETED"], "{label}: the finish job");
    }
    for (label, settings) in [
        ("videos_captions", "--revise dsl-sym"),
        ("none", "--revise none"),
        ("dsl", "--revise dsl"),
        ("qbnorm", "--revise qbnorm --bank videos_captions"),
    ] {
        let here = dir.join(&format!("scored-here-{label}"));
        let settings: Vec<&str> = settings.split_whitespace().collect();
        TestCommand::new(&["score", "--index"])
            .arg(work.join("index"))
            .args(&["--texts", "videos_captions"])
            .args(&settings)
            .arg("--out")
            .arg(&here)
            .expect_code(0);
        assert_same_scores(&work.join("scores").join(label), &here, label);
    }
}
