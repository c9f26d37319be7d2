//! The documentation the repository carries: every relative link in the README, the
//! changelog and `docs/` points at a file that exists, and every `#anchor` at a heading.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Markdown files whose links are checked.
fn documents() -> Vec<PathBuf> {
    let mut out = vec![root().join("README.md"), root().join("CHANGELOG.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("docs/ exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    out.extend(docs);
    out
}

/// The anchor a heading gets: lower case, punctuation dropped, spaces as hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors(text: &str) -> HashSet<String> {
    let mut in_code = false;
    let mut out = HashSet::new();
    for line in text.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
        } else if !in_code && line.starts_with('#') {
            out.insert(slug(line.trim_start_matches('#')));
        }
    }
    out
}

/// Targets of inline links `[text](target)`, outside code blocks.
fn links(text: &str) -> Vec<String> {
    let mut in_code = false;
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        let mut rest = line;
        while let Some(i) = rest.find("](") {
            let after = &rest[i + 2..];
            let Some(end) = after.find(')') else { break };
            out.push(after[..end].to_string());
            rest = &after[end..];
        }
    }
    out
}

#[test]
fn slugs_follow_the_heading_rules() {
    let cases = [
        ("Client IP", "client-ip"),
        (" `[[server.certificate]]`", "servercertificate"),
        ("`[upstream_tls]`", "upstream_tls"),
        ("HTTP/2", "http2"),
        ("The decision, step by step", "the-decision-step-by-step"),
        ("GET /metrics", "get-metrics"),
    ];
    for (heading, want) in cases {
        assert_eq!(slug(heading), want, "{heading:?}");
    }
    assert_eq!(
        links("[a](x.md) and [b](y.md#z)\n```\n[c](not-a-link)\n```\n"),
        ["x.md", "y.md#z"]
    );
}

#[test]
fn relative_links_resolve_to_files_and_headings() {
    let mut broken = Vec::new();
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).expect("readable");
        let dir = doc.parent().unwrap_or(Path::new("."));
        for link in links(&text) {
            if link.contains("://") || link.starts_with("mailto:") {
                continue;
            }
            let (path, anchor) = link.split_once('#').unwrap_or((link.as_str(), ""));
            let target = if path.is_empty() { doc.clone() } else { dir.join(path) };
            if !target.exists() {
                broken.push(format!("{}: {link}: no such file", doc.display()));
                continue;
            }
            if !anchor.is_empty() && target.extension().is_some_and(|x| x == "md") {
                let heads = anchors(&std::fs::read_to_string(&target).expect("readable"));
                if !heads.contains(anchor) {
                    broken.push(format!("{}: {link}: no such heading", doc.display()));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_guides_exist() {
    for guide in ["routing", "health", "admin", "cli", "configuration"] {
        let path = root().join("docs").join(format!("{guide}.md"));
        assert!(path.exists(), "{} is missing", path.display());
        let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
        assert!(
            readme.contains(&format!("(docs/{guide}.md")),
            "README links docs/{guide}.md"
        );
    }
}
