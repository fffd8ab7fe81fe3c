//! The layer test: reads every source file of the crate, takes each module reference
//! it makes to another file (`crate::x`, `super::x`, `self::x`, a child module it
//! declares, or `firmware_sim::x` in `main.rs`), and fails — naming the file and the
//! reference — when a module imports one of a higher layer, when the references
//! between files form a loop, or when a file is missing from the table (so a new
//! file gets placed). [`LAYERS`] mirrors the map in the crate docs (`lib.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The layers, top to bottom: a module may import its own layer's modules and those
/// of the layers below, never those above; `lib` (the crate root, which only declares
/// modules), `main` (the binary) and `layers` (this test) head the table.
const LAYERS: &[(&str, &[&str])] = &[
    ("command line", &["lib", "main", "layers", "cli"]),
    (
        "scenarios",
        &[
            "scenarios",
            "scenarios::telemetry",
            "scenarios::connections",
            "scenarios::round_trips",
            "scenarios::storm",
            "flap",
            "scenario_file",
        ],
    ),
    (
        "run and fleet",
        &["run", "workers", "settings", "api", "verify", "provision"],
    ),
    ("device paths", &["lean", "sdk", "credentials", "dps"]),
    (
        "wire and net",
        &[
            "device",
            "wire",
            "net",
            "tls",
            "template",
            "generators",
            "probe",
        ],
    ),
    ("ground", &["report", "values"]),
];

/// One reference from a file to another module's file.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Import {
    /// The module referred to (its file's module path).
    module: String,
    /// The path as written, for the message.
    written: String,
}

#[test]
fn modules_import_only_their_layer_or_below_and_form_no_loop() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let files = source_files(&src);
    let file_name = |module: &str| {
        files
            .get(module)
            .map_or(String::new(), |(path, _)| path.clone())
    };
    let layer_of: BTreeMap<&str, usize> = LAYERS
        .iter()
        .enumerate()
        .flat_map(|(i, (_, modules))| modules.iter().map(move |m| (*m, i)))
        .collect();
    let mut failures = Vec::new();
    for module in files.keys() {
        if !layer_of.contains_key(module.as_str()) {
            failures.push(format!(
                "{}: module `{module}` is in no layer: add it to LAYERS (src/layers.rs) and to the map in lib.rs",
                file_name(module)
            ));
        }
    }
    for module in layer_of.keys() {
        if !files.contains_key(*module) {
            failures.push(format!(
                "LAYERS names `{module}`, which has no file: remove it"
            ));
        }
    }
    let known: BTreeSet<String> = files.keys().cloned().collect();
    let mut graph: BTreeMap<String, BTreeSet<Import>> = BTreeMap::new();
    for (module, (_, text)) in &files {
        let imports = imports(module, text, &known);
        for import in &imports {
            let (Some(&from), Some(&to)) = (
                layer_of.get(module.as_str()),
                layer_of.get(import.module.as_str()),
            ) else {
                continue;
            };
            if to < from {
                failures.push(format!(
                    "{}: `{}` reaches up from layer {:?} ({module}) to layer {:?} ({})",
                    file_name(module),
                    import.written,
                    LAYERS[from].0,
                    LAYERS[to].0,
                    import.module
                ));
            }
        }
        graph.insert(module.clone(), imports);
    }
    if let Some(cycle) = find_cycle(&graph) {
        let steps: Vec<String> = cycle
            .windows(2)
            .map(|pair| {
                let written = graph[&pair[0]]
                    .iter()
                    .find(|i| i.module == pair[1])
                    .map_or(String::new(), |i| i.written.clone());
                format!("{} imports `{written}`", file_name(&pair[0]))
            })
            .collect();
        failures.push(format!("import loop: {}", steps.join(" → ")));
    }
    assert!(
        failures.is_empty(),
        "the layers of firmware-sim (see lib.rs) are broken:\n  {}",
        failures.join("\n  ")
    );
}

#[test]
fn the_extraction_sees_every_form_of_module_reference() {
    let known: BTreeSet<String> = ["lib", "a", "b", "c", "d", "s", "s::x", "s::y"]
        .iter()
        .map(|m| (*m).to_string())
        .collect();
    let text = r#"
        //! Docs name crate::d, and so may "crate::d" in a string: neither counts.
        pub mod x;
        use crate::a::{Thing, other};
        use super::{y::Y, Z};
        fn f<'a>(s: &'a str) -> char {
            let _ = crate::b::call(s);
            let _ = x::helper();
            '"'
        }
        /* crate::d::nothing */
        #[cfg(test)]
        mod tests {
            use super::*;
            use crate::c;
        }
    "#;
    let found: Vec<(String, String)> = imports("s", text, &known)
        .into_iter()
        .map(|i| (i.module, i.written))
        .collect();
    let modules: BTreeSet<&str> = found.iter().map(|(m, _)| m.as_str()).collect();
    assert_eq!(
        modules,
        ["a", "b", "c", "lib", "s::x"].into_iter().collect(),
        "{found:?}"
    );
    let found_y: Vec<(String, String)> = imports("s::y", "use super::x::X;", &known)
        .into_iter()
        .map(|i| (i.module, i.written))
        .collect();
    assert_eq!(
        found_y,
        vec![("s::x".to_string(), "super::x::X".to_string())]
    );
}

#[test]
fn a_loop_and_a_missing_file_are_found() {
    let import = |m: &str| Import {
        module: m.to_string(),
        written: m.to_string(),
    };
    let graph: BTreeMap<String, BTreeSet<Import>> = [
        ("a", vec![import("b")]),
        ("b", vec![import("c")]),
        ("c", vec![import("a")]),
        ("d", vec![import("a")]),
    ]
    .into_iter()
    .map(|(m, i)| (m.to_string(), i.into_iter().collect()))
    .collect();
    assert_eq!(
        find_cycle(&graph),
        Some(
            vec!["a", "b", "c", "a"]
                .into_iter()
                .map(String::from)
                .collect()
        )
    );
    let mut acyclic = graph;
    acyclic.remove("c");
    assert_eq!(find_cycle(&acyclic), None);
}

/// Every `.rs` file under `src` (its path from the crate and its text), by module
/// path: `scenarios/mod.rs` is `scenarios`, `scenarios/storm.rs` `scenarios::storm`,
/// `lib.rs` `lib`.
fn source_files(src: &Path) -> BTreeMap<String, (String, String)> {
    fn walk(dir: &Path, prefix: &[String], out: &mut BTreeMap<String, (String, String)>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|err| panic!("cannot read {}: {err}", dir.display()))
            .map(|entry| entry.expect("a directory entry").path())
            .collect();
        entries.sort();
        for path in entries {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .expect("a UTF-8 file name")
                .to_string();
            if path.is_dir() {
                let mut inner = prefix.to_vec();
                inner.push(name);
                walk(&path, &inner, out);
                continue;
            }
            let Some(stem) = name.strip_suffix(".rs") else {
                continue;
            };
            let mut segments = prefix.to_vec();
            if stem != "mod" {
                segments.push(stem.to_string());
            }
            let module = segments.join("::");
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()));
            let shown = std::iter::once("src")
                .chain(prefix.iter().map(String::as_str))
                .chain(std::iter::once(name.as_str()))
                .collect::<Vec<_>>()
                .join("/");
            out.insert(module, (shown, text));
        }
    }
    let mut out = BTreeMap::new();
    walk(src, &[], &mut out);
    out
}

/// Source tokens outside comments, strings and character literals.
#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    PathSep,
    Open,
    Close,
    Comma,
    Star,
    Semi,
    Other,
}

fn tokens(text: &str) -> Vec<Token> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let at = |i: usize| chars.get(i).copied().unwrap_or('\0');
    while i < chars.len() {
        let c = chars[i];
        if c == '/' && at(i + 1) == '/' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if (c == 'r'
            && (at(i + 1) == '"' || (at(i + 1) == '#' && matches!(at(i + 2), '"' | '#'))))
            || (c == 'b' && at(i + 1) == 'r' && matches!(at(i + 2), '"' | '#'))
        {
            // A raw string: r"…", r#"…"#, br"…".
            i += if c == 'b' { 2 } else { 1 };
            let mut hashes = 0;
            while at(i) == '#' {
                hashes += 1;
                i += 1;
            }
            i += 1;
            while i < chars.len() {
                if chars[i] == '"' && (1..=hashes).all(|k| at(i + k) == '#') {
                    i += 1 + hashes;
                    break;
                }
                i += 1;
            }
            out.push(Token::Other);
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            out.push(Token::Other);
        } else if c == '\'' {
            // A character literal ('x', '\n', '\u{..}') or a lifetime ('a).
            if at(i + 1) == '\\' {
                i += 2;
                while i < chars.len() && chars[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if at(i + 2) == '\'' {
                i += 3;
            } else {
                i += 1;
                while at(i).is_alphanumeric() || at(i) == '_' {
                    i += 1;
                }
            }
            out.push(Token::Other);
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while at(i).is_alphanumeric() || at(i) == '_' {
                i += 1;
            }
            out.push(Token::Ident(chars[start..i].iter().collect()));
        } else if c == ':' && at(i + 1) == ':' {
            out.push(Token::PathSep);
            i += 2;
        } else {
            out.push(match c {
                '{' => Token::Open,
                '}' => Token::Close,
                ',' => Token::Comma,
                '*' => Token::Star,
                ';' => Token::Semi,
                c if c.is_whitespace() => {
                    i += 1;
                    continue;
                }
                _ => Token::Other,
            });
            i += 1;
        }
    }
    out
}

/// The paths a path tree starting at `tokens[i]` spells (`a::b::{c, d::e}` is three),
/// each as its segments; and the index after the tree.
fn path_tree(tokens: &[Token], mut i: usize, prefix: &[String]) -> (Vec<Vec<String>>, usize) {
    let mut path = prefix.to_vec();
    loop {
        match tokens.get(i) {
            Some(Token::Ident(name)) => {
                path.push(name.clone());
                i += 1;
            }
            Some(Token::Star) => return (vec![path], i + 1),
            Some(Token::Open) => {
                let mut paths = Vec::new();
                i += 1;
                loop {
                    match tokens.get(i) {
                        Some(Token::Close) => return (paths, i + 1),
                        Some(Token::Comma) => i += 1,
                        Some(Token::Ident(_) | Token::Star | Token::Open) => {
                            let (inner, next) = path_tree(tokens, i, &path);
                            paths.extend(inner);
                            i = next;
                            // `x as y`: skip the rename.
                            if tokens.get(i) == Some(&Token::Ident("as".into())) {
                                i += 2;
                            }
                        }
                        _ => return (paths, i),
                    }
                }
            }
            _ => return (vec![path], i),
        }
        if tokens.get(i) != Some(&Token::PathSep) {
            return (vec![path], i);
        }
        i += 1;
    }
}

/// Every reference `text` (the file of `module`) makes to another file's module of
/// `known`.
fn imports(module: &str, text: &str, known: &BTreeSet<String>) -> BTreeSet<Import> {
    let tokens = tokens(text);
    let own: Vec<String> = if module == "lib" || module == "main" {
        Vec::new()
    } else {
        module.split("::").map(String::from).collect()
    };
    let as_module = |segments: &[String]| -> String {
        if segments.is_empty() {
            "lib".to_string()
        } else {
            segments.join("::")
        }
    };
    // Child modules declared in files (`mod x;`), and inline ones (`mod tests { … }`)
    // with the brace depth at which each closes.
    let mut children = BTreeSet::new();
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut found = BTreeSet::new();
    let mut i = 0;
    while i < tokens.len() {
        match &tokens[i] {
            Token::Open => depth += 1,
            Token::Close => {
                depth = depth.saturating_sub(1);
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
            }
            Token::Ident(word) if word == "mod" => {
                if let Some(Token::Ident(name)) = tokens.get(i + 1) {
                    match tokens.get(i + 2) {
                        Some(Token::Semi) if inline.is_empty() => {
                            children.insert(name.clone());
                        }
                        Some(Token::Open) => inline.push((name.clone(), depth)),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
        let starts_path = matches!(&tokens[i], Token::Ident(_))
            && (i == 0 || tokens[i - 1] != Token::PathSep)
            && tokens.get(i + 1) == Some(&Token::PathSep);
        if !starts_path {
            i += 1;
            continue;
        }
        let (paths, next) = path_tree(&tokens, i, &[]);
        // The braces of a `use` group open and close within the tree.
        for token in &tokens[i + 1..next.max(i + 1)] {
            match token {
                Token::Open => depth += 1,
                Token::Close => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        for path in paths {
            let here: Vec<String> = own
                .iter()
                .cloned()
                .chain(inline.iter().map(|(name, _)| name.clone()))
                .collect();
            let (mut base, rest) = match path[0].as_str() {
                "crate" | "firmware_sim" => (Vec::new(), &path[1..]),
                "self" => (here.clone(), &path[1..]),
                "super" => {
                    let ups = path.iter().take_while(|s| *s == "super").count();
                    let keep = here.len().saturating_sub(ups);
                    (here[..keep].to_vec(), &path[ups..])
                }
                name if inline.is_empty() && children.contains(name) => (here.clone(), &path[..]),
                _ => continue,
            };
            base.extend(rest.iter().cloned());
            // The longest prefix that is a file's module is the file referred to.
            let target = (0..=base.len())
                .rev()
                .map(|k| as_module(&base[..k]))
                .find(|m| known.contains(m));
            if let Some(target) = target
                && target != module
            {
                found.insert(Import {
                    module: target,
                    written: path.join("::"),
                });
            }
        }
        i = next.max(i + 1);
    }
    found
}

/// A loop in `graph`, as the modules along it with the first repeated at the end.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<Import>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<Import>>,
        done: &mut BTreeSet<String>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|m| m == node) {
            let mut cycle = stack[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.to_string());
        for import in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(&import.module, graph, done, stack) {
                return Some(cycle);
            }
        }
        stack.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut done, &mut Vec::new()))
}
