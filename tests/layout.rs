//! The layers of `src/` and which way their imports run (see the map in `src/lib.rs`): the
//! contract knows no Kafka and no Delta, the table layer knows no Kafka, no stage reads the
//! configuration, and no module imports one that imports it back. A change that breaks the
//! architecture fails here with the offending import named.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each layer (a folder, or a file at the crate root) and the layers it may import besides
/// itself and the leaves.
const LAYERS: &[(&str, &[&str])] = &[
    ("contract", &[]),
    ("table", &["contract"]),
    ("ingest", &["contract", "table"]),
    ("config", &["contract", "table", "ingest"]),
    ("service", &["contract", "table", "ingest", "config"]),
    ("query", &["contract", "table", "ingest", "config"]),
    (
        "tools",
        &["contract", "table", "ingest", "config", "service", "query"],
    ),
];

/// Utilities any layer may use; they import nothing of the crate.
const LEAVES: &[&str] = &["meter", "failpoint"];

/// Every library module (`a::b`) and its file; the binary (`main.rs`, `cli/`) is left out.
fn modules() -> BTreeMap<String, PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    files
        .into_iter()
        .filter_map(|file| {
            let relative = file.strip_prefix(&src).unwrap().with_extension("");
            let mut parts: Vec<String> = relative
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
            if parts[0] == "main" || parts[0] == "cli" {
                return None;
            }
            if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
                parts.pop();
            }
            Some((parts.join("::"), file))
        })
        .collect()
}

/// The code of a file without comments and without its unit tests.
fn code(file: &Path) -> String {
    let text = std::fs::read_to_string(file).unwrap();
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => &text[..],
    };
    text.lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The modules `module`'s code names through `crate::` or `super::` paths, resolved to the
/// longest module path that exists, its own ancestors left out (a module sees its parent).
fn imports(module: &str, file: &Path, all: &BTreeMap<String, PathBuf>) -> BTreeSet<String> {
    let code = code(file);
    let is_folder_root = file.ends_with("mod.rs") || file.ends_with("lib.rs");
    let parent: Vec<&str> = if module.is_empty() {
        Vec::new()
    } else {
        let parts: Vec<&str> = module.split("::").collect();
        parts[..parts.len() - 1].to_vec()
    };
    let mut found = BTreeSet::new();
    for (prefix, base) in [("crate::", Vec::new()), ("super::", parent)] {
        if prefix == "super::" && is_folder_root && module.is_empty() {
            continue;
        }
        let mut rest = code.as_str();
        while let Some(at) = rest.find(prefix) {
            let before = rest[..at].chars().last();
            rest = &rest[at + prefix.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let path: Vec<&str> = rest
                .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .next()
                .unwrap()
                .split("::")
                .filter(|p| !p.is_empty())
                .collect();
            let mut full: Vec<&str> = base.clone();
            full.extend(path);
            let target = (1..=full.len())
                .rev()
                .map(|n| full[..n].join("::"))
                .find(|candidate| all.contains_key(candidate));
            if let Some(target) = target
                && target != module
                && !module.starts_with(&format!("{target}::"))
            {
                found.insert(target);
            }
        }
    }
    found
}

fn layer(module: &str) -> &str {
    module.split("::").next().unwrap()
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let all = modules();
    all.iter()
        .filter(|(module, _)| !module.is_empty())
        .map(|(module, file)| (module.clone(), imports(module, file, &all)))
        .collect()
}

#[test]
fn every_import_runs_down_the_layers() {
    let graph = graph();
    let mut wrong = Vec::new();
    for (module, targets) in &graph {
        let from = layer(module);
        for target in targets {
            let to = layer(target);
            let allowed = if LEAVES.contains(&from) {
                false
            } else {
                from == to
                    || LEAVES.contains(&to)
                    || LAYERS
                        .iter()
                        .find(|(name, _)| *name == from)
                        .unwrap_or_else(|| panic!("{module} is in no layer of LAYERS"))
                        .1
                        .contains(&to)
            };
            if !allowed {
                wrong.push(format!("{module} imports {target}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports that run up the layers:\n{}",
        wrong.join("\n")
    );
    // The check sees the imports it must judge.
    assert!(graph["ingest::pipeline"].contains("ingest::source"));
    assert!(graph["table::compact"].contains("table::lease"));
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let graph = graph();
    fn visit(
        module: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|m| m == module) {
            let mut circle = path[at..].to_vec();
            circle.push(module.to_string());
            return Some(circle);
        }
        if !done.insert(module.to_string()) {
            return None;
        }
        path.push(module.to_string());
        for next in graph.get(module).into_iter().flatten() {
            if let Some(circle) = visit(next, graph, path, done) {
                return Some(circle);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    for module in graph.keys() {
        let circle = visit(module, &graph, &mut Vec::new(), &mut done);
        assert!(
            circle.is_none(),
            "import circle: {}",
            circle.unwrap().join(" -> ")
        );
    }
}
