//! Where an index may be put, and whose files it may touch: no command removes or overwrites
//! a file it did not write, in any placement of `--index`, `--out` and the roots. Every test
//! compares the user's files byte for byte before and after.

use std::path::Path;

use crate::util::*;

/// `ingest` with the bundled model; returns (exit code, stderr).
fn ingest_into(index: &Path, root: &Path, extra: &[&str]) -> (i32, String) {
    ingest_exit_and_stderr(index, &[root], extra)
}

#[test]
fn an_index_over_a_folder_named_videos_is_refused_and_the_videos_stay() {
    let dir = Dir::new();
    let root = corpus(&dir, "project/videos", &CLIPS[..2]);
    let project = dir.join("project");
    let before = file_tree(&project);
    let (code, stderr) = ingest_into(&project, &root, &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("is inside the index folder"), "{stderr}");
    assert_eq!(file_tree(&project), before, "nothing created, nothing removed");

    // The same folder given with the videos elsewhere: not empty, not an index.
    let elsewhere = corpus(&dir, "elsewhere", &CLIPS[2..3]);
    let (code, stderr) = ingest_into(&project, &elsewhere, &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("not empty and holds no vtr-index index"), "{stderr}");
    assert_eq!(file_tree(&project), before);
}

#[test]
fn a_root_equal_to_the_index_videos_folder_is_refused() {
    let dir = Dir::new();
    let root = corpus(&dir, "videos", &CLIPS[..1]);
    let index = dir.join("index");
    assert_eq!(ingest_into(&index, &root, &[]).0, 0);
    let before = file_tree(&index);
    let (code, stderr) = ingest_into(&index, &index.join("videos"), &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("is inside the index folder"), "{stderr}");
    assert_eq!(file_tree(&index), before);
}

#[test]
fn an_empty_existing_folder_is_accepted() {
    let dir = Dir::new();
    let root = corpus(&dir, "videos", &CLIPS[..1]);
    let index = dir.join("index");
    std::fs::create_dir(&index).unwrap();
    let (code, stderr) = ingest_into(&index, &root, &[]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(snapshot(&index).unwrap().videos.len(), 1);
}

#[test]
fn an_index_inside_a_root_is_not_walked() {
    let dir = Dir::new();
    let root = corpus(&dir, "videos", &CLIPS[..2]);
    let index = root.join(".vtr-index");
    let (code, stderr) = ingest_into(&index, &root, &[]);
    assert_eq!(code, 0, "{stderr}");
    // A video file inside the index folder (foreign to it) is neither walked nor removed.
    std::fs::copy(root.join(CLIPS[0]), index.join("stray.mp4")).unwrap();
    let (code, stderr) = ingest_into(&index, &root, &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("0 new, 0 changed, 0 reused, 2 unchanged"), "{stderr}");
    let ids: Vec<String> = snapshot(&index).unwrap().videos.into_keys().collect();
    assert_eq!(ids, ["rotated90_h264", "short_h264"]);
    assert!(index.join("stray.mp4").is_file());
}

/// A user's files inside the index's own folders survive every command and a crashed run's
/// clean-up, and each is named in a warning.
#[test]
fn foreign_files_in_the_index_survive_ingest_encode_text_and_crash_cleanup() {
    let dir = Dir::new();
    let root = corpus(&dir, "videos", &CLIPS[..2]);
    let index = dir.join("index");
    assert_eq!(ingest_into(&index, &root, &[]).0, 0);
    let foreign = [
        "videos/README.txt",
        "videos/a.mp4",
        "frames/notes.md",
        "failures/keep.parquet",
        "texts/mine/captions.csv",
        "texts/README",
        // Shard-named, but where the index keeps no shards.
        "texts/part-1-00000.parquet",
        "runs/my-notes.txt",
    ];
    for (i, rel) in foreign.iter().enumerate() {
        dir.create(&format!("index/{rel}"), format!("user file {i}").as_bytes());
    }
    let user_files = |index: &Path| {
        let tree = file_tree(index);
        foreign.iter().map(|rel| (rel.to_string(), tree.get(*rel).cloned())).collect::<Vec<_>>()
    };
    let before = user_files(&index);
    assert!(before.iter().all(|(_, bytes)| bytes.is_some()));

    // A change, so the run rewrites and collects shards.
    std::fs::remove_file(root.join(CLIPS[0])).unwrap();
    let (code, stderr) = ingest_into(&index, &root, &[]);
    assert_eq!(code, 0, "{stderr}");
    // Named once each, however often the run collects (`runs/` holds no shards and is not collected).
    for rel in foreign.iter().filter(|rel| !rel.starts_with("runs/")) {
        assert_eq!(stderr.matches(&format!("{rel}: not a file of the index")).count(), 1, "{rel}: {stderr}");
    }
    assert_eq!(user_files(&index), before, "after ingest");

    let out = TestCommand::new(&["encode-text"]).arg(sample().join("captions.csv")).arg("--index").arg(&index).output();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_text(&out));
    // Replacing the set collects its old shards.
    let out = TestCommand::new(&["encode-text"]).arg(sample().join("captions.csv")).arg("--index").arg(&index).output();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_text(&out));
    assert_eq!(user_files(&index), before, "after encode-text");

    // A run killed after writing a shard, then the run that cleans up after it.
    corpus(&dir, "videos", &CLIPS[2..4]);
    assert_eq!(ingest_output(&index, &root, &[], Some("shard-renamed")).status.code(), None);
    let out = ingest_output(&index, &root, &[], None);
    assert_eq!(out.status.code(), Some(0), "{}", stderr_text(&out));
    assert_eq!(user_files(&index), before, "after a crash's clean-up");
    let out = TestCommand::new(&["verify", "--index"]).arg(&index).output();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_text(&out));
}

#[test]
fn score_keeps_the_other_files_of_its_output_folder() {
    let dir = Dir::new();
    let index = dir.join("index");
    let (code, stderr) = ingest_exit_and_stderr(&index, &[&sample().join("videos")], &[]);
    assert_eq!(code, 0, "{stderr}");
    let out = TestCommand::new(&["encode-text"]).arg(sample().join("captions.csv")).arg("--index").arg(&index).output();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_text(&out));
    let scores = dir.join("scores");
    for (rel, bytes) in [("notes.txt", "mine"), ("t2v.npy.bak", "my copy"), ("old/topk.parquet", "older")] {
        dir.create(&format!("scores/{rel}"), bytes.as_bytes());
    }
    let before = file_tree(&scores);
    for _ in 0..2 {
        let out = TestCommand::new(&["score", "--texts", "captions", "--revise", "dsl", "--dense", "--index"])
            .arg(&index)
            .arg("--out")
            .arg(&scores)
            .output();
        assert_eq!(out.status.code(), Some(0), "{}", stderr_text(&out));
    }
    let after = file_tree(&scores);
    for (rel, bytes) in &before {
        assert_eq!(after.get(rel), Some(bytes), "{rel}");
    }
    let written: Vec<&String> = after.keys().filter(|k| !before.contains_key(*k)).collect();
    assert_eq!(
        written,
        [
            "metrics.json",
            "run.json",
            "t2v.npy",
            "t2v_ranks.parquet",
            "topk.parquet",
            "v2t.npy",
            "v2t_ranks.parquet",
            "videos.txt"
        ]
    );
}
