//! The command line's own contract: info, verify, usage errors and their exit codes.

use crate::util::*;

#[test]
fn info_describes_a_checkpoint() {
    let (stdout, _) = TestCommand::new(&["info", "--model"]).arg(sample().join("model")).expect_code(0);
    assert!(stdout.contains("width 64, layers 2, heads 1, patch 32, image size 224"), "{stdout}");
    assert!(stdout.contains("embed dim:  32"), "{stdout}");
}

#[test]
fn info_and_verify_describe_an_index_and_catch_damage() {
    let dir = Dir::new();
    let index = dir.join("index");
    assert_eq!(ingest_exit_and_stderr(&index, &[&fixtures().join("videos/nested")], &[]).0, 0);
    let (stdout, _) = TestCommand::new(&["info", "--index"]).arg(&index).expect_code(0);
    assert!(stdout.contains("videos:    1"), "{stdout}");
    assert!(stdout.contains("frames:    3"), "{stdout}");
    TestCommand::new(&["verify", "--index"]).arg(&index).expect_code(0);

    let manifest = vtr_index::store::Manifest::load(&index).unwrap().unwrap();
    let shard = index.join(&manifest.shards("frames")[0].path);
    let mut bytes = std::fs::read(&shard).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&shard, bytes).unwrap();
    let (_, stderr) = TestCommand::new(&["verify", "--index"]).arg(&index).expect_code(1);
    assert!(stderr.contains("checksum"), "{stderr}");
}

#[test]
fn a_folder_that_is_not_an_index_is_exit_1() {
    let dir = Dir::new();
    let (_, stderr) = TestCommand::new(&["info", "--index"]).arg(dir.path()).expect_code(1);
    assert!(stderr.contains("not a vtr-index index"), "{stderr}");
    TestCommand::new(&["ingest"]).expect_code(1);
}

/// `vtr-index info … | head -1`: the printing commands end as Unix tools do when their reader
/// goes away (by SIGPIPE, which the shell reports as 141), never with a panic and exit 101.
#[test]
fn a_closed_stdout_ends_the_printing_commands_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let dir = Dir::new();
    let index = dir.join("index");
    assert_eq!(ingest_exit_and_stderr(&index, &[&fixtures().join("videos/nested")], &[]).0, 0);
    for args in [&["info", "--index"][..], &["verify", "--index"], &["search", "a clock", "--index"]] {
        let out = TestCommand::new(args).arg(&index).output_to_a_closed_pipe();
        let stderr = stderr_text(&out);
        assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{args:?}: {:?}\n{stderr}", out.status);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

/// What the README promises about an existing index: another model, other sampling and another
/// dtype are refused with exit 1, and nothing changes.
#[test]
fn an_index_refuses_another_model_and_other_sampling() {
    let dir = Dir::new();
    let root = corpus(&dir, "videos", &CLIPS[..1]);
    let index = dir.join("index");
    assert_eq!(ingest_exit_and_stderr(&index, &[&root], &[]).0, 0);
    let before = file_tree(&index);

    let other = other_model(&dir);
    let refusals: [(&[&str], &str); 4] = [
        (&["--model", other.to_str().unwrap()], "is a different model"),
        (&["--fps", "2"], "built with --frames 12 --fps 1"),
        (&["--frames", "4"], "built with --frames 12 --fps 1"),
        (&["--dtype", "f16"], "built with --dtype f32"),
    ];
    for (args, message) in refusals {
        let out = TestCommand::new(&["ingest"]).arg(&root).arg("--index").arg(&index).args(args).output();
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr_text(&out));
        assert!(stderr_text(&out).contains(message), "{args:?}: {}", stderr_text(&out));
        assert_eq!(file_tree(&index), before, "{args:?} changed the index");
    }
}

#[test]
fn verify_names_a_missing_shard() {
    let dir = Dir::new();
    let index = dir.join("index");
    assert_eq!(ingest_exit_and_stderr(&index, &[&corpus(&dir, "videos", &CLIPS[..1])], &[]).0, 0);
    let manifest = vtr_index::store::Manifest::load(&index).unwrap().unwrap();
    let shard = &manifest.shards("frames")[0].path;
    std::fs::remove_file(index.join(shard)).unwrap();
    let (_, stderr) = TestCommand::new(&["verify", "--index"]).arg(&index).expect_code(1);
    assert!(stderr.contains(shard.as_str()), "{stderr}");
}

/// Exit 2 whenever the index holds failures, from this run or an earlier one, each named on
/// stderr; the re-run does not try the unchanged failed file again.
#[test]
fn every_run_lists_the_failures_the_index_holds() {
    let dir = Dir::new();
    let root = corpus(&dir, "videos", &CLIPS[..1]);
    dir.create("videos/broken.mp4", b"not a video at all");
    let index = dir.join("index");
    for run in ["first", "second"] {
        let (code, stderr) = ingest_exit_and_stderr(&index, &[&root], &[]);
        assert_eq!(code, 2, "{run}: {stderr}");
        assert!(stderr.contains("broken.mp4: not_a_video"), "{run}: {stderr}");
    }
    let (_, stderr) = ingest_exit_and_stderr(&index, &[&root], &[]);
    assert!(stderr.contains("1 unchanged"), "{stderr}");
}

/// A job stops at a step that exits 1: the later steps do not run.
#[test]
fn a_job_stops_at_a_step_that_exits_1() {
    let dir = Dir::new();
    let index = dir.join("index");
    let job = format!(
        "[ingest]\nroots = [{:?}]\nindex = {:?}\nmodel = {:?}\n[encode_text]\ncaptions = {:?}\n",
        dir.join("no-such-folder"),
        index,
        sample().join("model"),
        sample().join("captions.csv"),
    );
    let job = dir.create("job.toml", job.as_bytes());
    let (_, stderr) = TestCommand::new(&["run"]).arg(&job).expect_code(1);
    assert!(stderr.contains("does not exist"), "{stderr}");
    assert!(stderr.contains("vtr-index: run: ingest"), "{stderr}");
    assert!(!stderr.contains("vtr-index: run: encode-text"), "encode-text did not run: {stderr}");
}

/// `cargo build --no-default-features` (no OpenBLAS: the `gemm` crate does every product)
/// builds a binary that indexes and scores the sample like the default build, within the
/// tolerance of embeddings made on another CPU. `scripts/test.sh` builds it and runs this test with it;
/// without it the test is reported as ignored.
#[test]
#[ignore = "needs the --no-default-features binary in VTR_INDEX_NO_DEFAULT_FEATURES_BIN (scripts/test.sh)"]
fn the_build_without_default_features_indexes_like_the_default_one() {
    let binary = std::env::var_os("VTR_INDEX_NO_DEFAULT_FEATURES_BIN")
        .expect("VTR_INDEX_NO_DEFAULT_FEATURES_BIN names the --no-default-features binary");
    let binary = std::path::PathBuf::from(binary);
    let (version, _) = TestCommand::of_binary(&binary, &["--version"]).expect_code(0);
    assert!(version.starts_with("vtr-index "), "{version}");
    let dir = Dir::new();
    let root = corpus(&dir, "videos", &CLIPS);
    let mut indexes = Vec::new();
    for (name, command) in
        [("default", TestCommand::new(&["ingest"])), ("plain", TestCommand::of_binary(&binary, &["ingest"]))]
    {
        let index = dir.join(name);
        command.arg(&root).arg("--index").arg(&index).arg("--model").arg(sample().join("model")).expect_code(0);
        indexes.push(snapshot(&index).unwrap());
    }
    // The `gemm` crate rounds as another CPU's OpenBLAS kernels would (contract §6).
    let within = Some(crate::tolerance::OTHER_CPU_COSINE);
    assert_same_index_within(&indexes[1], &indexes[0], "without default features", within);
}
