//! The README's event catalog and the code's catalog agree, and the code emits exactly the
//! events the catalog lists.

use std::collections::BTreeSet;
use std::path::Path;

use keel_scraper::events::{catalog_markdown, CATALOG};

const BEGIN: &str = "<!-- event-catalog:begin -->";
const END: &str = "<!-- event-catalog:end -->";

#[test]
fn readme_event_catalog_matches_the_code() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md is readable");
    let start = readme
        .find(BEGIN)
        .expect("README has the event catalog begin marker")
        + BEGIN.len();
    let end = readme
        .find(END)
        .expect("README has the event catalog end marker");
    let documented = readme[start..end].trim();
    let expected = catalog_markdown();
    assert_eq!(
        documented,
        expected.trim(),
        "the README's event catalog is out of date; replace it with:\n{expected}"
    );
}

/// Every `events::Name { .. }.emit()` in the sources names an event of the catalog, and
/// every catalog event is emitted somewhere.
#[test]
fn every_catalog_event_has_an_emit_site_and_no_other_event_is_logged() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut sources = String::new();
    let mut stack = vec![src];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") && !path.ends_with("events.rs") {
                sources.push_str(&std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    // Type names of the catalog's events, from the event names (snake -> Camel).
    let camel = |name: &str| -> String {
        name.split('_')
            .map(|w| {
                let mut c = w.chars();
                c.next().map_or(String::new(), |f| {
                    f.to_ascii_uppercase().to_string() + c.as_str()
                })
            })
            .collect()
    };
    let mut never_emitted = BTreeSet::new();
    for e in CATALOG {
        if !sources.contains(&format!("events::{} {{", camel(e.name))) {
            never_emitted.insert(e.name);
        }
    }
    assert!(
        never_emitted.is_empty(),
        "catalog events with no emit site: {never_emitted:?}"
    );
    // No log line outside the catalog: nothing else calls tracing's macros directly.
    for mac in [
        "tracing::info!",
        "tracing::warn!",
        "tracing::error!",
        "tracing::event!",
        "info!(",
        "warn!(",
        "error!(",
    ] {
        assert!(
            !sources.contains(mac),
            "a log line outside the event catalog: {mac}"
        );
    }
}

#[test]
fn catalog_fields_are_unique_per_event() {
    for e in CATALOG {
        let set: BTreeSet<_> = e.fields.iter().collect();
        assert_eq!(set.len(), e.fields.len(), "{}", e.name);
    }
}
