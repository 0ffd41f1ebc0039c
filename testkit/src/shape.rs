//! The import graph of a crate, read from its sources, and the circle check
//! the crates' layering tests run on it: a module names another as
//! `crate::<module>` (or `crate::{a, b::X}`), and no module may reach back to
//! one that imports it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Each module of a crate and the modules of the same crate it names.
pub type Graph = BTreeMap<String, BTreeSet<String>>;

/// The import graph of the crate whose sources are in `dir`: one node per
/// `x.rs` and per `x/mod.rs` (not `lib` or `main`), with the modules its code
/// names before its unit tests (the first top-level `#[cfg(test)]`),
/// comments left out. The second value lists each `crate::<Name>` that does
/// not go through a module (a root re-export), with the line it is on.
pub fn module_graph(dir: &Path) -> std::io::Result<(Graph, Vec<String>)> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(stem) = path.file_stem().map(|s| s.to_string_lossy().into_owned()) else {
            continue;
        };
        if stem == "lib" || stem == "main" {
            continue;
        }
        if path.is_dir() && path.join("mod.rs").is_file() {
            files.insert(stem, std::fs::read_to_string(path.join("mod.rs"))?);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.insert(stem, std::fs::read_to_string(&path)?);
        }
    }
    let modules: BTreeSet<String> = files.keys().cloned().collect();
    let mut graph = Graph::new();
    let mut root_paths = Vec::new();
    for (module, source) in &files {
        let (mut named, unknown) = named_modules(source, &modules);
        named.remove(module);
        graph.insert(module.clone(), named);
        root_paths.extend(unknown.into_iter().map(|line| format!("{module}: {line}")));
    }
    Ok((graph, root_paths))
}

/// The modules (of `modules`) that `source` names as `crate::<module>`
/// before its unit tests, comments left out, and the lines that name
/// `crate::<Name>` for a name that is not a module.
pub fn named_modules(source: &str, modules: &BTreeSet<String>) -> (BTreeSet<String>, Vec<String>) {
    let mut found = BTreeSet::new();
    let mut unknown = Vec::new();
    for line in source
        .lines()
        .take_while(|l| !l.starts_with("#[cfg(test)]"))
    {
        let code = line.split("//").next().unwrap_or_default();
        for (at, _) in code.match_indices("crate::") {
            let rest = &code[at + "crate::".len()..];
            let names: Vec<&str> = match rest.strip_prefix('{') {
                Some(list) => list
                    .split('}')
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .map(|n| n.trim().split("::").next().unwrap_or_default())
                    .collect(),
                None => vec![
                    rest.split(|c: char| !c.is_alphanumeric() && c != '_')
                        .next()
                        .unwrap_or_default(),
                ],
            };
            for name in names.into_iter().filter(|n| !n.is_empty()) {
                if modules.contains(name) {
                    found.insert(name.to_owned());
                } else {
                    unknown.push(format!("`crate::{name}` in `{}`", line.trim()));
                }
            }
        }
    }
    (found, unknown)
}

/// A circle of `graph`, as the modules around it (the first repeated at the
/// end), if there is one.
pub fn circle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(
        graph: &Graph,
        node: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut around = path.get(at..).unwrap_or_default().to_vec();
            around.push(node.to_owned());
            return Some(around);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(found) = visit(graph, next, path, done) {
                return Some(found);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(graph, node, &mut Vec::new(), &mut done))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_check_finds_circles_and_root_paths() {
        let modules: BTreeSet<String> = ["a", "b", "c"].map(String::from).into();
        let (named, unknown) = named_modules(
            "use crate::a::X;\n// crate::c\nfn f() { crate::b::g() }\n#[cfg(test)]\nuse crate::c;",
            &modules,
        );
        assert_eq!(named, ["a", "b"].map(String::from).into());
        assert!(unknown.is_empty());
        let (named, _) = named_modules("use crate::{a::X, b};", &modules);
        assert_eq!(named, ["a", "b"].map(String::from).into());
        let (_, unknown) = named_modules("fn f() -> crate::X {}", &modules);
        assert_eq!(unknown, ["`crate::X` in `fn f() -> crate::X {}`"]);
    }

    #[test]
    fn the_circle_check_finds_a_circle() {
        let graph: Graph = [("a", &["b"][..]), ("b", &["c"]), ("c", &["a"]), ("d", &[])]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.iter().map(|s| s.to_string()).collect()))
            .collect();
        assert_eq!(circle(&graph).unwrap(), ["a", "b", "c", "a"]);
        let mut acyclic = graph.clone();
        acyclic.get_mut("c").unwrap().clear();
        assert_eq!(circle(&acyclic), None);
    }

    #[test]
    fn the_graph_has_file_and_folder_modules_but_not_the_root() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("lib.rs"), "mod a;\nmod b;\n").unwrap();
        std::fs::write(
            dir.path().join("a.rs"),
            "use crate::b::Y;\nuse crate::Root;\n",
        )
        .unwrap();
        std::fs::create_dir(dir.path().join("b")).unwrap();
        std::fs::write(dir.path().join("b/mod.rs"), "pub struct Y;\n").unwrap();
        let (graph, root_paths) = module_graph(dir.path()).unwrap();
        assert_eq!(graph.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(graph["a"], ["b".to_owned()].into());
        assert_eq!(root_paths, ["a: `crate::Root` in `use crate::Root;`"]);
    }
}
