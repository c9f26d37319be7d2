//! The module graph stays acyclic: no top-level module of `src/` reaches itself through
//! `crate::` paths of its production code (test modules and comments aside). A cycle is
//! reported with the lines that make it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module → (module it uses → first place it does).
type Graph = BTreeMap<String, BTreeMap<String, String>>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable").flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The file's production code: everything before its first `#[cfg(test)]` module.
fn production(text: &str) -> &str {
    let mut from = 0;
    while let Some(at) = text[from..].find("#[cfg(test)]") {
        let start = from + at;
        let rest = text[start + "#[cfg(test)]".len()..].trim_start();
        if rest.starts_with("mod ") || rest.starts_with("pub mod ") || rest.starts_with("pub(crate) mod ") {
            return &text[..start];
        }
        from = start + 1;
    }
    text
}

fn graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph = Graph::new();
    for file in files {
        let rel = file.strip_prefix(&src).expect("under src/");
        let top = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .map(|s| s.trim_end_matches(".rs").to_string())
            .expect("a file name");
        if top == "lib" || top == "main" || top == "test_fixtures" {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("source is UTF-8");
        for (n, line) in production(&text).lines().enumerate() {
            if line.trim_start().starts_with("//") {
                continue;
            }
            for (at, _) in line.match_indices("crate::") {
                let used: String = line[at + "crate::".len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                if used.is_empty() || used == top || used == "test_fixtures" {
                    continue;
                }
                graph
                    .entry(top.clone())
                    .or_default()
                    .entry(used)
                    .or_insert_with(|| format!("{}:{}", rel.display(), n + 1));
            }
        }
    }
    graph
}

/// A path from `to` back to `from`, if there is one.
fn path_back(graph: &Graph, from: &str, to: &str) -> Option<Vec<String>> {
    let mut seen = BTreeSet::new();
    let mut stack = vec![vec![to.to_string()]];
    while let Some(path) = stack.pop() {
        let last = path.last().expect("paths are not empty");
        if last == from {
            return Some(path);
        }
        if !seen.insert(last.clone()) {
            continue;
        }
        for next in graph.get(last).into_iter().flat_map(|m| m.keys()) {
            let mut longer = path.clone();
            longer.push(next.clone());
            stack.push(longer);
        }
    }
    None
}

#[test]
fn no_top_level_module_depends_on_itself() {
    let graph = graph();
    assert!(
        graph.contains_key("proxy") && graph.contains_key("route"),
        "the scan found the modules"
    );
    let mut cycles = Vec::new();
    for (module, uses) in &graph {
        for used in uses.keys() {
            if let Some(back) = path_back(&graph, module, used) {
                let mut hops = vec![format!("{module} -> {used} ({})", uses[used])];
                for pair in back.windows(2) {
                    hops.push(format!("{} -> {} ({})", pair[0], pair[1], graph[&pair[0]][&pair[1]]));
                }
                cycles.push(hops.join(", "));
            }
        }
    }
    assert!(cycles.is_empty(), "module cycles:\n{}", cycles.join("\n"));
}

#[test]
fn the_scan_sees_a_cycle_when_there_is_one() {
    let mut graph = graph();
    graph
        .entry("health".to_string())
        .or_default()
        .insert("runtime".to_string(), "made up".to_string());
    assert!(
        path_back(&graph, "health", "runtime").is_some(),
        "runtime reaches health"
    );
}
