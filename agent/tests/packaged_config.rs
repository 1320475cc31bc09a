//! The default config the Debian package installs as /etc/fanout/fanout.toml
//! (deploy/systemd/fanout.toml) is one `fanout run --config` accepts, both as shipped (all
//! commented out) and with every example line (`#key = value`, `#[table]`) uncommented, so
//! that none of its examples names a key or value the agent would refuse.

use std::path::Path;

use fanout::{
    cli::RunArgs,
    config::{Config, FileConfig},
};

fn shipped() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/systemd/fanout.toml");
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The file with its example lines uncommented: `#x` where x is not a space or `#` (prose
/// comments are `# text`).
fn uncommented(text: &str) -> String {
    text.lines()
        .map(|line| match line.strip_prefix('#') {
            Some(rest) if !rest.is_empty() && !rest.starts_with([' ', '#']) => rest,
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn resolve(text: &str) -> Config {
    let file = FileConfig::parse(Path::new("fanout.toml"), text).unwrap_or_else(|e| panic!("{e}"));
    Config::resolve(&RunArgs::default(), file, &|_| None).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn shipped_config_is_the_defaults() {
    let config = resolve(&shipped());
    let defaults = Config::resolve(&RunArgs::default(), FileConfig::default(), &|_| None).unwrap();
    assert_eq!(format!("{config:?}"), format!("{defaults:?}"));
}

#[test]
fn every_example_line_is_accepted() {
    let text = uncommented(&shipped());
    let examples = text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count();
    assert!(examples > 20, "only {examples} example lines:\n{text}");
    let config = resolve(&text);
    assert_eq!(
        config.rules.groups().next(),
        Some("billing"),
        "the example worker rule"
    );
    let otlp = config.otlp.expect("the example OTLP endpoint");
    assert_eq!(otlp.endpoint, "http://127.0.0.1:4317");
}
