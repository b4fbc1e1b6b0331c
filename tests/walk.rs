//! The walk as users' folders make it: links to a root's parent, to a sibling, two links to one
//! folder (`latest -> 2024-06`), and file names that are not UTF-8. Each folder is walked once,
//! only a link back to an ancestor is a `symlink_loop`, and every file is indexed under an id
//! that survives re-runs.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::symlink;

use crate::util::*;

#[test]
fn each_folder_is_walked_once_and_only_a_link_to_an_ancestor_is_a_loop() {
    let dir = Dir::new();
    corpus(&dir, "archive/videos/2024-05", &CLIPS[..1]);
    let root = corpus(&dir, "archive/videos/2024-06", &CLIPS[1..3]);
    let root = root.parent().unwrap().to_path_buf();
    // The root's parent, a sibling folder of the link, and two links to one folder.
    symlink("../..", root.join("2024-05/up")).unwrap();
    symlink("2024-06", root.join("latest")).unwrap();
    symlink("2024-06", root.join("current")).unwrap();
    symlink("../2024-06", root.join("2024-05/june")).unwrap();
    let index = dir.join("index");
    let (code, stderr) = ingest_exit_and_stderr(&index, &[&root], &[]);
    assert_eq!(code, 2, "the loop is a failure\n{stderr}");
    let state = snapshot(&index).unwrap();
    let ids: Vec<&str> = state.videos.keys().map(String::as_str).collect();
    assert_eq!(
        ids,
        ["2024-05/short_h264", "2024-06/nested/deeper/gradient_h264", "2024-06/rotated90_h264"],
        "every file once, under its real folder\n{stderr}"
    );
    let failures: Vec<(String, String)> = state.failures.into_iter().collect();
    assert_eq!(failures, [("2024-05/up".to_string(), "symlink_loop".to_string())], "recorded at the link");
    for link in ["2024-05/june", "current", "latest"] {
        let line = format!("{}/{link}: skipped, a folder this walk reaches by another path", root.display());
        assert!(stderr.contains(&line), "{line}\n{stderr}");
    }
    let report = std::fs::read_dir(index.join("runs")).unwrap().next().unwrap().unwrap().path();
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(report).unwrap()).unwrap();
    assert_eq!(report["repeated_folders"], 3);
}

/// Links into a folder outside the roots and into its sub-folder (`all -> /ext` beside
/// `a-nested -> /ext/nested` or `z-nested -> /ext/nested`, so either link comes first), and a
/// root given inside another root, in either order: the sub-folder is walked once.
#[test]
fn a_folder_reached_through_two_links_or_two_roots_is_walked_once() {
    for (link, ids, skipped) in [
        ("a-nested", ["a-nested/deeper/gradient_h264", "all/rotated90_h264", "short_h264"], "all/nested"),
        ("z-nested", ["all/nested/deeper/gradient_h264", "all/rotated90_h264", "short_h264"], "z-nested"),
    ] {
        let dir = Dir::new();
        let ext = corpus(&dir, "ext", &CLIPS[1..3]);
        let root = corpus(&dir, "videos", &CLIPS[..1]);
        symlink(&ext, root.join("all")).unwrap();
        symlink(ext.join("nested"), root.join(link)).unwrap();
        let index = dir.join("index");
        let (code, stderr) = ingest_exit_and_stderr(&index, &[&root], &[]);
        assert_eq!(code, 0, "{stderr}");
        let state = snapshot(&index).unwrap();
        let got: Vec<&str> = state.videos.keys().map(String::as_str).collect();
        assert_eq!(got, ids, "{stderr}");
        assert!(stderr.contains(&format!("/{skipped}: skipped")), "{stderr}");
    }

    // A root inside another root: its folders are walked under whichever root comes first.
    let dir = Dir::new();
    let ext = corpus(&dir, "ext", &CLIPS[1..3]);
    let inner = ext.join("nested");
    for (roots, ids, skipped) in [
        ([&ext, &inner], ["nested/deeper/gradient_h264", "rotated90_h264"], inner.display().to_string()),
        ([&inner, &ext], ["deeper/gradient_h264", "rotated90_h264"], format!("{}/nested", ext.display())),
    ] {
        let index = dir.path().join(format!("index-{}", roots[0].file_name().unwrap().to_string_lossy()));
        let (code, stderr) = ingest_exit_and_stderr(&index, &[roots[0].as_path(), roots[1].as_path()], &[]);
        assert_eq!(code, 0, "{stderr}");
        let got: Vec<String> = snapshot(&index).unwrap().videos.into_keys().collect();
        assert_eq!(got, ids, "{stderr}");
        assert!(stderr.contains(&format!("{skipped}: skipped")), "{stderr}");
    }
}

#[test]
fn files_named_in_latin1_are_indexed_under_escaped_ids_and_found_unchanged() {
    let dir = Dir::new();
    let root = dir.join("videos");
    std::fs::create_dir_all(&root).unwrap();
    // "café crème.mp4" in Latin-1, as an old file server holds it, beside a UTF-8 "café".
    let latin1 = root.join(OsStr::from_bytes(b"caf\xe9 cr\xe8me.mp4"));
    std::fs::copy(fixtures().join("videos/short_h264.mp4"), &latin1).unwrap();
    std::fs::copy(fixtures().join("videos/rotated90_h264.mp4"), root.join("café.mp4")).unwrap();
    let index = dir.join("index");
    let (code, stderr) = ingest_exit_and_stderr(&index, &[&root], &[]);
    assert_eq!(code, 0, "{stderr}");
    let state = snapshot(&index).unwrap();
    let ids: Vec<&str> = state.videos.keys().map(String::as_str).collect();
    assert_eq!(ids, ["caf%E9 cr%E8me", "café"], "{stderr}");
    let frames = state.frames.keys().filter(|(id, _)| id == "caf%E9 cr%E8me").count();
    assert!(frames >= 1, "its frames were decoded from its real bytes");

    let (code, stderr) = ingest_exit_and_stderr(&index, &[&root], &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("0 new, 0 changed, 0 reused, 2 unchanged, 0 removed"), "{stderr}");

    // A UTF-8 name that spells the escape takes the same id: a duplicate, not a second video.
    std::fs::copy(fixtures().join("videos/vfr_h264.mp4"), root.join("caf%E9 cr%E8me.mkv")).unwrap();
    let (code, stderr) = ingest_exit_and_stderr(&index, &[&root], &[]);
    assert_eq!(code, 2, "{stderr}");
    let state = snapshot(&index).unwrap();
    assert_eq!(state.videos.len(), 2);
    assert_eq!(state.failures.iter().filter(|(_, kind)| kind == "duplicate_id").count(), 1, "{stderr}");
}

#[test]
fn a_root_named_in_latin1_is_walked_by_its_bytes_and_stored_escaped() {
    let dir = Dir::new();
    // "été" in Latin-1: a folder of an old archive, given on the command line as it is.
    let root = dir.path().join(OsStr::from_bytes(b"\xe9t\xe9"));
    std::fs::create_dir_all(root.join("day 1")).unwrap();
    std::fs::copy(fixtures().join("videos/short_h264.mp4"), root.join("day 1/beach.mp4")).unwrap();
    let index = dir.join("index");
    let (code, stderr) = ingest_exit_and_stderr(&index, &[&root], &[]);
    assert_eq!(code, 0, "{stderr}");
    let stored = format!("{}/%E9t%E9", dir.path().display());
    let manifest = vtr_index::store::Manifest::load(&index).unwrap().unwrap();
    assert_eq!(manifest.roots, std::slice::from_ref(&stored));
    let videos: Vec<vtr_index::store::VideoRow> =
        vtr_index::store::read_table(&index, manifest.shards("videos")).unwrap();
    assert_eq!(videos.len(), 1);
    assert_eq!((videos[0].root.as_str(), videos[0].video_id.as_str()), (stored.as_str(), "day 1/beach"));

    let (code, stderr) = ingest_exit_and_stderr(&index, &[&root], &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("0 new, 0 changed, 0 reused, 1 unchanged, 0 removed"), "{stderr}");
}
