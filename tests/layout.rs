//! The host crate's layout stays readable as the data flows: no import cycles between its top-level
//! modules (stats, verify, weights, controller, backend, model, decode, measure, …) or between its
//! files, and no file grows past a reviewable size. A module's references to its own submodules
//! (a facade re-exporting them) are not counted as imports; everything else is.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Files allowed past `MAX_LINES`, with the reason (none today).
const LONG_FILES: &[(&str, &str)] = &[];
const MAX_LINES: usize = 520;

type Module = Vec<String>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read host/") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn module_of(root: &Path, file: &Path) -> Module {
    let rel = file
        .strip_prefix(root)
        .expect("under host/")
        .with_extension("");
    let mut parts: Module = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
        parts.pop();
    }
    parts
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every `a::b::c` path in `code` that starts with `prefix` (`crate::`, `super::`, or a bare
/// identifier), as its segments after the prefix.
fn paths(code: &str) -> Vec<(String, Vec<String>)> {
    let chars: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let starts =
            is_ident(chars[i]) && (i == 0 || !(is_ident(chars[i - 1]) || chars[i - 1] == ':'));
        if !starts {
            i += 1;
            continue;
        }
        let mut segs = Vec::new();
        let mut j = i;
        loop {
            let s = j;
            while j < chars.len() && is_ident(chars[j]) {
                j += 1;
            }
            segs.push(chars[s..j].iter().collect::<String>());
            if j + 2 < chars.len()
                && chars[j] == ':'
                && chars[j + 1] == ':'
                && is_ident(chars[j + 2])
            {
                j += 2;
            } else {
                break;
            }
        }
        if segs.len() > 1 {
            let head = segs.remove(0);
            out.push((head, segs));
        }
        i = j.max(i + 1);
    }
    out
}

/// The module graph: file module → modules it imports (longest known prefix of each path).
fn graph(root: &Path) -> (BTreeMap<Module, BTreeSet<Module>>, BTreeMap<Module, usize>) {
    let mut files = Vec::new();
    rust_files(root, &mut files);
    let mut mods: BTreeMap<Module, String> = BTreeMap::new();
    let mut lines = BTreeMap::new();
    for f in &files {
        let m = module_of(root, f);
        if m.first().is_some_and(|p| p == "cli") {
            continue; // the binary: depends on the library only
        }
        let text = std::fs::read_to_string(f).expect("read");
        lines.insert(m.clone(), text.lines().count());
        // Unit tests may reach anywhere.
        let code = text.split("#[cfg(test)]").next().unwrap_or("").to_string();
        mods.insert(m, code);
    }
    let resolve = |base: Module, segs: &[String]| -> Option<Module> {
        let mut best = None;
        let mut m = base;
        if mods.contains_key(&m) {
            best = Some(m.clone());
        }
        for s in segs {
            m.push(s.clone());
            if mods.contains_key(&m) {
                best = Some(m.clone());
            }
        }
        best
    };
    let mut g: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (m, code) in &mods {
        let e = g.entry(m.clone()).or_default();
        for (head, segs) in paths(code) {
            let target = match head.as_str() {
                "crate" => resolve(Vec::new(), &segs),
                "super" => {
                    let mut parent = m.clone();
                    parent.pop();
                    resolve(parent, &segs)
                }
                "self" => resolve(m.clone(), &segs),
                child => {
                    let mut c = m.clone();
                    c.push(child.to_string());
                    if mods.contains_key(&c) {
                        resolve(c, &segs)
                    } else {
                        None
                    }
                }
            };
            if let Some(t) = target {
                // A module's own submodules are its implementation, not an import.
                if t != *m && !t.starts_with(m) {
                    e.insert(t);
                }
            }
        }
    }
    (g, lines)
}

/// One cycle of `g`, if any (depth-first search).
fn find_cycle<N: Ord + Clone>(g: &BTreeMap<N, BTreeSet<N>>) -> Option<Vec<N>> {
    fn visit<N: Ord + Clone>(
        n: &N,
        g: &BTreeMap<N, BTreeSet<N>>,
        state: &mut BTreeMap<N, u8>,
        stack: &mut Vec<N>,
    ) -> Option<Vec<N>> {
        state.insert(n.clone(), 1);
        stack.push(n.clone());
        for m in g.get(n).into_iter().flatten() {
            match state.get(m).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|x| x == m).unwrap_or(0);
                    let mut c = stack[at..].to_vec();
                    c.push(m.clone());
                    return Some(c);
                }
                0 => {
                    if let Some(c) = visit(m, g, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.clone(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in g.keys() {
        if state.get(n).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(n, g, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

fn host() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("host")
}

#[test]
fn no_import_cycles_between_files() {
    let (g, _) = graph(&host());
    assert!(g.len() > 20, "the scan found only {} modules", g.len());
    if let Some(c) = find_cycle(&g) {
        panic!(
            "import cycle: {}",
            c.iter()
                .map(|m| m.join("::"))
                .collect::<Vec<_>>()
                .join(" → ")
        );
    }
}

#[test]
fn no_import_cycles_between_top_level_modules() {
    let (g, _) = graph(&host());
    let top = |m: &Module| m.first().cloned().unwrap_or_else(|| "lib".to_string());
    let mut t: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (a, bs) in &g {
        for b in bs {
            if top(a) != top(b) && !a.is_empty() {
                t.entry(top(a)).or_default().insert(top(b));
            }
        }
    }
    if let Some(c) = find_cycle(&t) {
        panic!("import cycle between top-level modules: {}", c.join(" → "));
    }
    // The kernels' host sides sit below the backends, which sit below the measurements.
    for low in ["stats", "verify", "weights", "controller"] {
        assert!(
            !t.get(low).is_some_and(|d| d.contains("backend")),
            "{low} imports backend: {:?}",
            t.get(low)
        );
    }
}

#[test]
fn files_stay_reviewable() {
    let (_, lines) = graph(&host());
    for (m, n) in lines {
        let name = m.join("/");
        if n > MAX_LINES && !LONG_FILES.iter().any(|(f, _)| *f == name) {
            panic!("host/{name} has {n} lines (limit {MAX_LINES}): split it along the data flow");
        }
    }
}

#[test]
fn the_scan_sees_a_planted_cycle() {
    // The checker itself must be able to fail.
    let mut g: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    g.entry("a").or_default().insert("b");
    g.entry("b").or_default().insert("c");
    g.entry("c").or_default().insert("a");
    assert_eq!(find_cycle(&g), Some(vec!["a", "b", "c", "a"]));
    g.get_mut("c").expect("c").clear();
    assert_eq!(find_cycle(&g), None);
    let p = paths("use crate::backend::cpu::CpuBackend; super::x::Y; a.b");
    assert_eq!(
        p[0],
        (
            "crate".to_string(),
            vec!["backend".into(), "cpu".into(), "CpuBackend".into()]
        )
    );
    assert_eq!(p[1].0, "super");
}

/// Every shell script parses (`bash -n`) and every Python script compiles: the GPU bundle and
/// the setup scripts run where nobody can fix a typo, and CI does not run all of them.
#[test]
fn scripts_parse() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if !path.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let first = text.lines().next().unwrap_or("");
        let (tool, args): (&str, Vec<&str>) =
            if path.extension().is_some_and(|e| e == "py") || first.contains("python") {
                (
                    "python3",
                    vec!["-c", "import ast, sys; ast.parse(open(sys.argv[1]).read())"],
                )
            } else if first.contains("bash") || first.contains("/sh") {
                ("bash", vec!["-n"])
            } else {
                continue;
            };
        let out = std::process::Command::new(tool)
            .args(&args)
            .arg(&path)
            .output()
            .unwrap_or_else(|e| panic!("{tool}: {e}"));
        assert!(
            out.status.success(),
            "{} does not parse: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        checked += 1;
    }
    assert!(
        checked >= 5,
        "only {checked} scripts found in {}",
        dir.display()
    );
}
