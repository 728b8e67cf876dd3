//! The layer map in `src/lib.rs` is checked: every module of the crate is listed in its
//! table, and no module's code (tests and comments aside) names a module listed above
//! it. An import that goes up, or a module left out of the map, fails here.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The modules in the order of the map's table (top first).
fn map_order(lib: &str) -> Vec<String> {
    let mut order = Vec::new();
    let mut in_layers = false;
    for line in lib.lines() {
        let Some(doc) = line.strip_prefix("//!") else { break };
        let doc = doc.trim();
        if doc.starts_with("# ") {
            in_layers = doc == "# Layers";
            continue;
        }
        if !in_layers || !doc.starts_with('|') {
            continue;
        }
        let cells: Vec<&str> = doc.split('|').map(str::trim).collect();
        // | layer | module | what |
        let Some(cell) = cells.get(2).filter(|c| c.starts_with('`') || c.starts_with("[`")) else {
            continue;
        };
        let name = cell.trim_matches(|c| c == '[' || c == ']' || c == '`');
        if !name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
            order.push(name.to_string());
        }
    }
    order
}

/// The modules `lib.rs` declares.
fn declared(lib: &str) -> Vec<String> {
    lib.lines()
        .filter_map(|l| {
            let l = l.trim();
            let rest = l.strip_prefix("pub mod ").or_else(|| l.strip_prefix("mod "))?;
            Some(rest.trim_end_matches(';').to_string())
        })
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The crate modules `code` names (`crate::x`, `use crate::{x, y::z}`), outside comments
/// and the test module at the end of a file.
fn named_modules(code: &str) -> Vec<String> {
    let code = without_test_items(code);
    let text: String = code
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut names = Vec::new();
    let mut rest = text.as_str();
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level names of the group: after `{` or `,`, up to its closing `}`.
            let mut depth = 0;
            let mut start = 0;
            for (j, b) in group.bytes().enumerate() {
                match b {
                    b'{' => depth += 1,
                    b'}' if depth == 0 => {
                        names.push(first_ident(&group[start..j]));
                        break;
                    }
                    b'}' => depth -= 1,
                    b',' if depth == 0 => {
                        names.push(first_ident(&group[start..j]));
                        start = j + 1;
                    }
                    _ => {}
                }
            }
        } else {
            names.push(first_ident(rest));
        }
    }
    names.retain(|n| !n.is_empty());
    names
}

/// `code` without its `#[cfg(test)]` items (a `mod tests;` line, or an item up to the
/// brace that closes it).
fn without_test_items(code: &str) -> String {
    let mut out = String::new();
    let mut rest = code;
    while let Some(i) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..i]);
        let item = &rest[i..];
        let (open, semi) = (item.find('{'), item.find(';'));
        let end = match (open, semi) {
            (_, Some(s)) if open.is_none_or(|o| s < o) => s + 1,
            (Some(o), _) => o + closing_brace(&item[o..]).map_or(item.len() - o, |c| c + 1),
            _ => item.len(),
        };
        rest = &item[end..];
    }
    out.push_str(rest);
    out
}

/// Where the brace that opens `s` is closed, skipping string and char literals.
fn closing_brace(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    let (mut i, mut depth) = (0, 0usize);
    while i < b.len() {
        match b[i] {
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            // A raw string: r"..." or r#"..."#.
            b'r' if matches!(b.get(i + 1), Some(b'"' | b'#')) && (i == 0 || !b[i - 1].is_ascii_alphanumeric()) => {
                let hashes = b[i + 1..].iter().take_while(|&&c| c == b'#').count();
                let close: String = std::iter::once('"').chain(std::iter::repeat_n('#', hashes)).collect();
                let body = i + 2 + hashes;
                i = s
                    .get(body..)
                    .and_then(|t| t.find(&close))
                    .map_or(b.len(), |e| body + e + close.len());
                continue;
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'\'' if b.get(i + 2) == Some(&b'\'') => i += 2,
            _ => {}
        }
        i += 1;
    }
    None
}

fn first_ident(s: &str) -> String {
    s.trim_start()
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

#[test]
fn imports_only_go_down_the_layer_map() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = std::fs::read_to_string(root.join("lib.rs")).unwrap();
    let order = map_order(&lib);
    let rank: HashMap<&str, usize> = order.iter().enumerate().map(|(i, m)| (m.as_str(), i)).collect();
    let mut missing: Vec<String> = declared(&lib).into_iter().filter(|m| !rank.contains_key(m.as_str())).collect();
    missing.sort();
    assert!(missing.is_empty(), "modules missing from the layer map in src/lib.rs: {missing:?}");

    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let mut up = Vec::new();
    for file in files {
        let rel = file.strip_prefix(&root).unwrap();
        let top = rel.iter().next().unwrap().to_string_lossy().trim_end_matches(".rs").to_string();
        if top == "lib" || top == "main" || file.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let Some(&own) = rank.get(top.as_str()) else {
            panic!("{} belongs to no module of the layer map", rel.display())
        };
        let code = std::fs::read_to_string(&file).unwrap();
        for name in named_modules(&code) {
            match rank.get(name.as_str()) {
                Some(&r) if r < own => up.push(format!("{} names {name}, listed above {top}", rel.display())),
                _ => {}
            }
        }
    }
    up.sort();
    up.dedup();
    assert!(up.is_empty(), "imports that go up the layer map:\n{}", up.join("\n"));
}

#[test]
fn the_checker_sees_grouped_and_nested_imports() {
    // A test module (with a brace inside a string) is left out; code after it is not.
    let code = concat!(
        "use crate::{auth::{A, B}, gateway::Gateway, util};\n",
        "#[cfg(test)]\nmod tests { fn f() { crate::admit::x(\"{\", r#\"}\"#); } }\n",
        "let x = crate::metrics::Metrics::new();\n// crate::server in a comment\n"
    );
    let mut names = named_modules(code);
    names.sort();
    assert_eq!(names, ["auth", "gateway", "metrics", "util"]);
    let lib = "//! # Layers\n//! | layer | module | what |\n//! |--|--|--|\n//! | entry | `server` | x |\n//! | stage | [`relay`] | y |\n//! # Next\n//! | a | `not_this` | b |\n";
    assert_eq!(map_order(lib), ["server", "relay"]);
}
