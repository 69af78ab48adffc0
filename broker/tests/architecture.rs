//! The server's seams, checked against its source: SQL and SQLite only in store modules,
//! the job engine and the core never naming a feature, and no route outside the API's
//! composition that the OpenAPI document would not know.

use std::path::{Path, PathBuf};

/// Capabilities built on the engine. The core below them never names one.
const FEATURES: &[&str] = &["run_command"];

/// The core: what features build on.
const CORE: &[&str] = &[
    "jobs", "fleet", "plugins", "audit", "events", "store", "mqtt", "api", "trust", "cli",
];

fn sources() -> Vec<(PathBuf, String)> {
    fn walk(dir: &Path, out: &mut Vec<(PathBuf, String)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                out.push((path, text));
            }
        }
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = Vec::new();
    walk(&src, &mut out);
    assert!(out.len() > 40, "found only {} source files", out.len());
    out
}

fn relative(path: &Path) -> String {
    path.strip_prefix(Path::new(env!("CARGO_MANIFEST_DIR")).join("src"))
        .unwrap()
        .display()
        .to_string()
}

/// A store module: a `store.rs`, or anything under `store/`. Test files may look
/// straight at the tables.
fn is_store(rel: &str) -> bool {
    rel.starts_with("store/") || rel.ends_with("store.rs") || rel.contains("/store/")
}

fn is_test(rel: &str) -> bool {
    rel.ends_with("tests.rs")
}

/// The code of a file without its inline test module.
fn code(text: &str) -> &str {
    match text.find("#[cfg(test)]\nmod tests {") {
        Some(i) => &text[..i],
        None => text,
    }
}

#[test]
fn sql_and_sqlite_live_only_in_store_modules() {
    let sql = [
        "SELECT ",
        "INSERT INTO",
        "INSERT OR",
        "DELETE FROM",
        "CREATE TABLE",
        "ALTER TABLE",
    ];
    let mut offenders = Vec::new();
    for (path, text) in sources() {
        let rel = relative(&path);
        if is_store(&rel) || is_test(&rel) {
            continue;
        }
        let code = code(&text);
        if code.contains("rusqlite") {
            offenders.push(format!("{rel}: names rusqlite"));
        }
        for kw in sql {
            // In a string: after a quote, possibly with whitespace.
            if code.contains(&format!("\"{kw}")) || code.contains(&format!("\"\n{kw}")) {
                offenders.push(format!("{rel}: SQL ({kw})"));
            }
        }
        for ty in ["Conn<'", ".conn()", ".begin()"] {
            if code.contains(ty) {
                offenders.push(format!("{rel}: uses the connection ({ty})"));
            }
        }
    }
    assert!(offenders.is_empty(), "{offenders:#?}");
}

#[test]
fn the_core_never_names_a_feature() {
    let mut offenders = Vec::new();
    for (path, text) in sources() {
        let rel = relative(&path);
        let Some(top) = rel.split('/').next().map(|s| s.trim_end_matches(".rs")) else {
            continue;
        };
        if !CORE.contains(&top) {
            continue;
        }
        for feature in FEATURES {
            if text.contains(&format!("crate::{feature}")) || text.contains(&format!("{feature}::"))
            {
                offenders.push(format!("{rel} names {feature}"));
            }
        }
    }
    assert!(offenders.is_empty(), "{offenders:#?}");
}

#[test]
fn every_route_is_registered_with_its_openapi_description() {
    // Capabilities register routes through utoipa-axum's `routes!`, which puts each in
    // the document; a plain `.route(` would not. Only the API's own two are plain.
    let mut plain = Vec::new();
    for (path, text) in sources() {
        let rel = relative(&path);
        for (i, line) in code(&text).lines().enumerate() {
            if line.trim_start().starts_with(".route(") {
                plain.push(format!("{rel}:{}: {}", i + 1, line.trim()));
            }
        }
    }
    assert_eq!(plain.len(), 2, "{plain:#?}");
    assert!(
        plain.iter().all(|l| l.starts_with("api/mod.rs")),
        "{plain:#?}"
    );
    assert!(plain.iter().any(|l| l.contains("/healthz")), "{plain:#?}");
    let api = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/api/mod.rs");
    let api = std::fs::read_to_string(api).unwrap();
    assert!(
        api.contains("OPENAPI_PATH,"),
        "the document's own route moved"
    );
}

#[test]
fn every_capability_lists_its_migrations_in_order() {
    // `V<n>__name` in the schema list matches a file `migrations/V<n>__name.sql`, and
    // the numbers run 1, 2, 3, ... without gaps.
    for (path, text) in sources() {
        let rel = relative(&path);
        if !rel.ends_with("store.rs") || !text.contains("pub const SCHEMA: Schema") {
            continue;
        }
        let dir = path.parent().unwrap().join("migrations");
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort_by_key(|f| {
            f.trim_start_matches('V')
                .split("__")
                .next()
                .unwrap()
                .parse::<u32>()
                .unwrap()
        });
        for (i, f) in files.iter().enumerate() {
            let name = f.trim_end_matches(".sql");
            assert!(
                name.starts_with(&format!("V{}__", i + 1)),
                "{rel}: migration {f} out of sequence"
            );
            assert!(
                text.contains(&format!("\"{name}\""))
                    && text.contains(&format!("include_str!(\"migrations/{f}\")")),
                "{rel}: migration {f} is not listed in its SCHEMA"
            );
        }
    }
}
