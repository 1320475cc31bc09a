//! Names: a Redis key as the job system calls its queue, and the new shard queues' names.

use std::collections::BTreeSet;

/// Sidekiq's key for queue `NAME`: `queue:NAME`, or `NS:queue:NAME` under a redis-namespace
/// (GitLab before 17.0: `resque:gitlab:queue:NAME`).
const SIDEKIQ_QUEUE_PREFIX: &str = "queue:";

/// The queue a Redis key is, as the job system names it: Sidekiq's `queue:NAME` (with or
/// without a namespace before it) is `NAME`; any other key is its own name.
pub fn queue_name(key: &str) -> &str {
    if let Some(name) = key.strip_prefix(SIDEKIQ_QUEUE_PREFIX) {
        return name;
    }
    match key.find(":queue:") {
        Some(at) => &key[at + 1 + SIDEKIQ_QUEUE_PREFIX.len()..],
        None => key,
    }
}

/// A shard queue's name from its group's: lowercase, every character outside `[a-z0-9_]`
/// as `_`, and `shard_` before it when it would start with a digit or be empty (some job
/// systems' configs take a leading digit for a number).
pub fn shard_queue_name(group: &str) -> String {
    let name: String = group
        .chars()
        .flat_map(char::to_lowercase)
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        format!("shard_{name}")
    } else {
        name
    }
}

/// A Kubernetes name (an RFC 1123 label: `[a-z0-9-]`, starting and ending alphanumeric, at
/// most 63 characters) from a group's name, for the Helm chart's Sidekiq pods.
pub fn kubernetes_name(group: &str) -> String {
    /// The chart puts a release prefix before it; keep room under the 63-character label.
    const MAX_LEN: usize = 40;
    let mapped: String = group
        .chars()
        .flat_map(char::to_lowercase)
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    let trimmed: String = mapped
        .trim_matches('-')
        .chars()
        .take(MAX_LEN)
        .collect::<String>()
        .trim_end_matches('-')
        .to_string();
    if trimmed.is_empty() {
        "shard".to_string()
    } else {
        trimmed
    }
}

/// `base`, or `base` + `{separator}2`, `{separator}3`, ... : the first that is not `taken`,
/// which it then takes.
pub fn unique(base: String, separator: char, taken: &mut BTreeSet<String>) -> String {
    let mut name = base.clone();
    let mut n = 2;
    while taken.contains(&name) {
        name = format!("{base}{separator}{n}");
        n += 1;
    }
    taken.insert(name.clone());
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sidekiq_keys_are_their_queue_and_other_keys_stay_as_they_are() {
        assert_eq!(queue_name("queue:default"), "default");
        assert_eq!(
            queue_name("resque:gitlab:queue:pipeline_processing:build_finished"),
            "pipeline_processing:build_finished"
        );
        assert_eq!(queue_name("jobs"), "jobs");
        assert_eq!(queue_name("myqueue:x"), "myqueue:x");
    }

    #[test]
    fn shard_names_are_sanitized_and_never_start_with_a_digit() {
        assert_eq!(shard_queue_name("Sidekiq-Default"), "sidekiq_default");
        assert_eq!(shard_queue_name("catch all.2"), "catch_all_2");
        assert_eq!(shard_queue_name("9lives"), "shard_9lives");
        assert_eq!(shard_queue_name(""), "shard_");
        assert_eq!(shard_queue_name("Émile"), "_mile");
    }

    #[test]
    fn kubernetes_names_are_labels() {
        assert_eq!(kubernetes_name("Sidekiq_Urgent"), "sidekiq-urgent");
        assert_eq!(kubernetes_name("--x--"), "x");
        assert_eq!(kubernetes_name("__"), "shard");
        assert!(kubernetes_name(&"a".repeat(100)).len() <= 63);
    }

    #[test]
    fn unique_names_get_a_number() {
        let mut taken = BTreeSet::new();
        assert_eq!(unique("a".into(), '_', &mut taken), "a");
        assert_eq!(unique("a".into(), '_', &mut taken), "a_2");
        assert_eq!(unique("a".into(), '_', &mut taken), "a_3");
    }
}
