//! The invariants of ARCHITECTURE.md that the source itself can show: which module may name
//! which outside crate, and that the crate's modules depend on each other without a cycle.
//! Read from `src/` as text; a test module (`#[cfg(test)] mod tests`) is left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `src/`, by path relative to `src/`, without its test module.
fn sources() -> BTreeMap<String, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = BTreeMap::new();
    let mut stack: Vec<PathBuf> = vec![root.clone()];
    while let Some(folder) = stack.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                let code = text.split("#[cfg(test)]\nmod tests").next().unwrap().to_string();
                out.insert(path.strip_prefix(&root).unwrap().to_string_lossy().into_owned(), code);
            }
        }
    }
    out
}

/// The top-level module a file belongs to (`store/shard.rs` → `store`).
fn module_of(file: &str) -> String {
    file.split('/').next().unwrap().trim_end_matches(".rs").to_string()
}

/// Names `word` as a path segment (`word::`, `use word`), not inside another identifier.
fn names(code: &str, word: &str) -> bool {
    code.match_indices(word).any(|(at, _)| {
        let before = code[..at].chars().next_back();
        let after = &code[at + word.len()..];
        !before.is_some_and(|c| c.is_alphanumeric() || c == '_')
            && (after.starts_with("::") || after.starts_with(';') || after.starts_with(" as "))
    })
}

#[test]
fn each_outside_crate_is_named_only_by_the_module_that_owns_it() {
    let owners: [(&str, &[&str]); 14] = [
        ("gstreamer", &["decode"]),
        ("candle_core", &["model"]),
        ("candle_nn", &["model"]),
        ("arrow", &["store"]),
        ("parquet", &["store"]),
        ("cudarc", &["gpu"]),
        ("cblas_sys", &["matmul"]),
        ("anyhow", &["commands", "cli", "main"]),
        ("axum", &["serve"]),
        ("hyper", &["serve"]),
        ("hyper_util", &["serve"]),
        ("tokio", &["serve"]),
        ("plotters", &["serve"]),
        ("lru", &["serve"]),
    ];
    for (file, code) in sources() {
        for (krate, allowed) in owners {
            if names(&code, krate) {
                assert!(allowed.contains(&module_of(&file).as_str()), "src/{file} names {krate}, owned by {allowed:?}");
            }
        }
    }
}

#[test]
fn modules_depend_on_each_other_without_a_cycle() {
    let files = sources();
    let modules: BTreeSet<String> = files.keys().map(|f| module_of(f)).filter(|m| m != "lib" && m != "main").collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (file, code) in &files {
        let from = module_of(file);
        if !modules.contains(&from) {
            continue;
        }
        for to in &modules {
            if *to != from && (code.contains(&format!("crate::{to}::")) || code.contains(&format!("crate::{to};"))) {
                edges.entry(from.clone()).or_default().insert(to.clone());
            }
        }
    }
    // Depth-first search for a path that comes back to where it started.
    fn path_back(edges: &BTreeMap<String, BTreeSet<String>>, start: &str, at: &str, seen: &mut Vec<String>) -> bool {
        for next in edges.get(at).into_iter().flatten() {
            if next == start {
                return true;
            }
            if !seen.contains(next) {
                seen.push(next.clone());
                if path_back(edges, start, next, seen) {
                    return true;
                }
                seen.pop();
            }
        }
        false
    }
    assert!(edges.contains_key("commands") && edges["cli"].contains("commands"), "the scan finds edges: {edges:?}");
    for module in &modules {
        let mut path = vec![module.clone()];
        assert!(!path_back(&edges, module, module, &mut path), "a cycle through {path:?} (all edges: {edges:?})");
    }
}

/// ARCHITECTURE.md's "a revision is described once": outside the revision's description
/// (`score/revision.rs`) and its formulas (`score/reviser.rs`), no code compares with, matches
/// on or otherwise branches on a revision by name; it reads `Revision::needs`.
#[test]
fn every_revision_is_described_once() {
    let own = ["score/revision.rs", "score/reviser.rs"];
    let mut found = 0;
    for (file, code) in sources() {
        for (at, _) in code.match_indices("Revision::") {
            let after = &code[at + "Revision::".len()..];
            if !after.starts_with(|c: char| c.is_ascii_uppercase()) || after.starts_with("ALL") {
                continue; // `Revision::needs`, `Revision::name`, `Revision::ALL`
            }
            found += 1;
            // What comes before the path (`crate::score::Revision::Dsl` too).
            let before = code[..at].trim_end_matches(|c: char| c.is_alphanumeric() || c == '_' || c == ':').trim_end();
            let line = code[..at].rsplit('\n').next().unwrap_or("");
            let variant_end = after.find(|c: char| !c.is_alphanumeric()).unwrap_or(after.len());
            let rest = after[variant_end..].trim_start();
            let branches = before.ends_with("==")
                || before.ends_with("!=")
                || rest.starts_with("=>")
                || rest.starts_with('|')
                || line.contains("matches!(")
                || line.trim_start().starts_with('(');
            assert!(
                !branches || own.contains(&file.as_str()),
                "src/{file} branches on Revision::{}: read Revision::needs instead",
                &after[..variant_end]
            );
        }
    }
    assert!(found > 0, "the scan finds the revisions");
}
