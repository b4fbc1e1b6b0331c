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
    assert_eq!(ingest(&index, &[&fixtures().join("videos/nested")], &[]).0, 0);
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
    assert_eq!(ingest(&index, &[&fixtures().join("videos/nested")], &[]).0, 0);
    for args in [&["info", "--index"][..], &["verify", "--index"], &["search", "a clock", "--index"]] {
        let out = TestCommand::new(args).arg(&index).output_to_a_closed_pipe();
        let stderr = summary(&out);
        assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{args:?}: {:?}\n{stderr}", out.status);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}
