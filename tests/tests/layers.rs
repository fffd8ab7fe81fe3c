//! The hub's rooms and the directions between them (DESIGN section 1, docs/DECISIONS.md
//! "Layers"), checked from the source: the ground imports nothing above it; a
//! capability imports only the ground and other capabilities; an edge or a backend
//! stands on capabilities and the ground, and never imports another edge (or, for a
//! backend, any edge). A new import that runs upward fails here, naming the file.
//!
//! Test code (a `#[cfg(test)] mod tests` block, a `tests.rs` file) may reach anywhere.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// A room of `hub/src`, by its top-level module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Room {
    /// Shared by everything: configuration, data directory, storage errors, message
    /// properties.
    Ground,
    /// The domain: each capability owns its state, its ports and its types.
    Capability,
    /// What the HTTP-based edges share (listener loop, WebSocket stream, error shape).
    EdgeSupport,
    /// Device- and service-facing protocols.
    Edge,
    /// Storage backends implementing the capabilities' ports.
    Backend,
    /// Wires everything together (`server`) and the crate root.
    Composition,
}

/// Every top-level module of the hub library and its room. A module missing here
/// fails the test, so a new one gets placed deliberately.
const ROOMS: &[(&str, Room)] = &[
    ("config", Room::Ground),
    ("data_dir", Room::Ground),
    ("storage", Room::Ground),
    ("properties", Room::Ground),
    ("registry", Room::Capability),
    ("auth", Room::Capability),
    ("delivery", Room::Capability),
    ("telemetry", Room::Capability),
    ("twins", Room::Capability),
    ("commands", Room::Capability),
    ("provisioning", Room::Capability),
    ("routing", Room::Capability),
    ("http", Room::EdgeSupport),
    ("gateway", Room::Edge),
    ("api", Room::Edge),
    ("amqp", Room::Edge),
    ("console", Room::Edge),
    ("store", Room::Backend),
    ("server", Room::Composition),
    ("lib", Room::Composition),
];

fn room(module: &str) -> Option<Room> {
    ROOMS.iter().find(|(m, _)| *m == module).map(|(_, r)| *r)
}

/// Whether a module in room `from` may import module `to` of room `to_room`.
fn allowed(from: Room, from_module: &str, to: &str, to_room: Room) -> bool {
    use Room::*;
    if from_module == to {
        return true;
    }
    match (from, to_room) {
        (Composition, _) => true,
        (_, Ground) => true,
        (Ground, _) => false,
        (Capability, Capability) => true,
        (Capability, _) => false,
        (EdgeSupport, _) => false,
        (Edge, Capability | EdgeSupport) => true,
        // No edge imports another edge; none imports a backend.
        (Edge, _) => false,
        (Backend, Capability) => true,
        (Backend, _) => false,
    }
}

fn hub_src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../hub/src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|err| panic!("cannot read {}: {err}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The source without comments and without its test module: everything from a
/// `#[cfg(test)]` attribute on a `mod` to the end of the file (test modules close
/// each file here), and every `//` comment (doc links are not imports).
fn non_test_code(source: &str) -> String {
    let mut code = String::new();
    let mut lines = source.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("#[cfg(test)]")
            && lines
                .peek()
                .is_some_and(|next| next.trim_start().starts_with("mod "))
        {
            break;
        }
        let without_comment = match line.find("//") {
            // Not inside a string literal such as "nats://": a comment starts a line
            // or follows code after whitespace.
            Some(at) if line[..at].trim().is_empty() || line[..at].ends_with(' ') => &line[..at],
            _ => line,
        };
        code.push_str(without_comment);
        code.push('\n');
    }
    code
}

/// The top-level modules `code` (in top-level module `own`, at `depth` below
/// `hub/src`'s module root) names through `crate::` or a `super::` that climbs to the
/// crate root.
fn imported_modules(code: &str, own: &str, depth: usize) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let grouped = |rest: &str, found: &mut BTreeSet<String>| {
        // `crate::{a, b::c}`: each top-level name of the group.
        let mut level = 0usize;
        let mut start = true;
        for (i, c) in rest.char_indices() {
            match c {
                '{' => {
                    level += 1;
                    start = level == 1;
                    continue;
                }
                '}' => {
                    if level == 1 {
                        break;
                    }
                    level -= 1;
                }
                ',' if level == 1 => {
                    start = true;
                    continue;
                }
                c if c.is_whitespace() => continue,
                _ => {}
            }
            if start && level == 1 {
                let name = ident(&rest[i..]);
                if !name.is_empty() {
                    found.insert(name);
                }
                start = false;
            }
        }
    };
    let mut at = 0;
    while let Some(pos) = code[at..].find("crate::") {
        let rest = &code[at + pos + "crate::".len()..];
        if rest.starts_with('{') {
            grouped(rest, &mut found);
        } else {
            found.insert(ident(rest));
        }
        at += pos + 1;
    }
    // `super::` from a module `depth` levels down climbs to the crate root after
    // `depth` steps; `super::super::x` from a depth-2 module names the root's `x`.
    if depth > 0 {
        let climb = "super::".repeat(depth);
        let mut at = 0;
        while let Some(pos) = code[at..].find(&climb) {
            let before = &code[..at + pos];
            // Not the tail of a longer `super::` chain.
            if !before.ends_with("super::") {
                let rest = &code[at + pos + climb.len()..];
                if rest.starts_with('{') {
                    grouped(rest, &mut found);
                } else {
                    found.insert(ident(rest));
                }
            }
            at += pos + 1;
        }
    }
    found.retain(|m| !m.is_empty() && m != own && m != "self");
    found
}

#[test]
fn every_import_in_the_hub_runs_down_the_layers() {
    let src = hub_src();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(files.len() > 20, "hub/src not found at {}", src.display());
    let mut violations = Vec::new();
    let mut unplaced = BTreeSet::new();
    for file in &files {
        let relative = file.strip_prefix(&src).expect("under hub/src");
        let parts: Vec<String> = relative
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        // The binary (main.rs and its cli/) is the composition root of the process.
        if parts[0] == "main.rs" || parts[0] == "cli" {
            continue;
        }
        if parts.last().is_some_and(|name| name == "tests.rs") {
            continue;
        }
        let own = parts[0].trim_end_matches(".rs").to_string();
        let Some(from) = room(&own) else {
            unplaced.insert(own);
            continue;
        };
        // How deep the file's module sits below the crate root: `x.rs` and
        // `x/mod.rs` are 1 (their `super` is the root), `x/y.rs` is 2.
        let depth = match parts.len() {
            1 => usize::from(own != "lib"),
            n if parts.last().is_some_and(|name| name == "mod.rs") => n - 1,
            n => n,
        };
        let source = std::fs::read_to_string(file).expect("readable source");
        for module in imported_modules(&non_test_code(&source), &own, depth) {
            match room(&module) {
                Some(to) if allowed(from, &own, &module, to) => {}
                Some(to) => violations.push(format!(
                    "{}: {own} ({from:?}) imports {module} ({to:?})",
                    relative.display()
                )),
                // Not a module of the crate root (a macro, a re-exported item of
                // lib.rs such as `crate::Config`): allowed only from the composition.
                None if from == Room::Composition => {}
                None => violations.push(format!(
                    "{}: {own} names crate::{module}, which is not a placed module",
                    relative.display()
                )),
            }
        }
    }
    assert!(
        unplaced.is_empty(),
        "modules of hub/src not placed in a room (add them to ROOMS): {unplaced:?}"
    );
    assert!(
        violations.is_empty(),
        "imports that run against the layers (DESIGN section 1):\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_checker_sees_grouped_nested_and_climbing_imports() {
    let code = non_test_code(
        "use crate::{gateway::topic, store::{a, b}};\n\
         use super::super::api::ApiError;\n\
         // use crate::console::x;\n\
         let url = \"nats://crate::nothing\";\n\
         fn f() { crate::routing::route(); }\n\
         #[cfg(test)]\nmod tests { use crate::amqp::X; }\n",
    );
    let found = imported_modules(&code, "twins", 2);
    assert_eq!(
        found,
        ["api", "gateway", "nothing", "routing", "store"]
            .map(String::from)
            .into(),
        "comments and the test module are skipped; groups, paths and climbs are seen"
    );
    assert!(!allowed(Room::Capability, "twins", "gateway", Room::Edge));
    assert!(!allowed(Room::Capability, "twins", "store", Room::Backend));
    assert!(!allowed(Room::Edge, "amqp", "gateway", Room::Edge));
    assert!(!allowed(Room::Backend, "store", "gateway", Room::Edge));
    assert!(!allowed(
        Room::Ground,
        "config",
        "telemetry",
        Room::Capability
    ));
    assert!(allowed(Room::Edge, "amqp", "commands", Room::Capability));
    assert!(allowed(Room::Backend, "store", "twins", Room::Capability));
}
