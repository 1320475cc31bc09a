//! The text form: its sections, its arithmetic lines, its abbreviations and its width.

use super::*;
use crate::advise::{
    fixtures::{group, local_redis, observation, US},
    plan::plan,
};

fn many(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("q{i}")).collect()
}

/// Three groups: a catch-all on 440 queues, "urgent" sharing 20 of them, "Small" on its own 2.
fn busy_advice() -> Advice {
    let queues = many(440);
    let queues: Vec<&str> = queues.iter().map(String::as_str).collect();
    plan(&observation(
        Some(local_redis(2.0 * US, 0.3 * US, 3000, 440, 50.0)),
        vec![
            group("catchall", 12, 1000, &queues, &[("q0", 300), ("q5", 100)]),
            group("urgent", 2, 1000, &queues[..20], &[("q1", 100), ("q5", 50)]),
            group("Small", 2, 100, &["a", "b"], &[("a", 10)]),
        ],
    ))
}

fn position(text: &str, line: &str) -> usize {
    text.lines()
        .position(|l| l == line)
        .unwrap_or_else(|| panic!("no line {line:?} in:\n{text}"))
}

#[test]
fn the_sections_come_in_order_with_the_arithmetic_shown() {
    let text = render(&busy_advice());
    let sections: Vec<usize> = ["Today", "Cost", "Proposal", "Predicted", "Rules"]
        .iter()
        .map(|s| position(&text, s))
        .collect();
    assert!(
        sections.windows(2).all(|w| w[0] < w[1]),
        "{sections:?}\n{text}"
    );
    for line in [
        "  saved = 10.0 pops/s × 0.300 us/key × (440 − 1) keys = 1.32 ms/s   (catchall)",
        "  saved = 10.0 pops/s × 0.300 us/key × (20 − 1) keys = 57.0 us/s   (urgent)",
        "  saved in all = 1.37 ms/s",
        "              = max(4.04 ms/s − 1.37 ms/s, 2.00 us × 21.0 pops/s) = 2.67 ms/s",
        "  Per call: 2.00 us + 0.300 us × keys (a line through 2 fan-outs).",
        "  main-thread time per served job: 25.0 ms → 24.9 ms (0.3% less)",
        "    q0          3.0 catchall, urgent",
        "    urgent (2 processes): sidekiq -q urgent",
        "      ['name=a,b', 'small'],",
        "            - [\"*\", \"catchall\"]",
    ] {
        position(&text, line);
    }
    // Prose wraps anywhere: read it as one line.
    let prose = text.split_whitespace().collect::<Vec<_>>().join(" ");
    for said in [
        "The agent cannot tell what the groups are for: it split the queues they shared by \
         observed traffic, keeping each group's share of the jobs.",
        "its 439 queues need no explicit rule",
        "Migration: jobs already in the old queues must be drained. Keep the old queues in each \
         group's list until they are empty, then drop them.",
    ] {
        assert!(prose.contains(said), "{said:?} not in:\n{text}");
    }
}

#[test]
fn text_fits_100_columns_and_cuts_long_lists() {
    let text = render(&busy_advice());
    for line in text.lines() {
        assert!(
            line.chars().count() <= WIDTH,
            "{} columns: {line}",
            line.chars().count()
        );
    }
    assert!(
        text.contains("takes 439 queues: q0, q1, q10, q100, q101, q102, q103, q104, q105, q106 ... and 429 more"),
        "{text}"
    );
    assert!(
        !text.contains("q439"),
        "a cut list still named the last queue:\n{text}"
    );
}

#[test]
fn long_rules_are_summarized_in_text_and_given_whole_by_the_rule_formats() {
    let queues = many(30);
    let queues: Vec<&str> = queues.iter().map(String::as_str).collect();
    let advice = plan(&observation(
        None,
        vec![
            group("big", 4, 800, &["main"], &[("main", 400)]),
            group("side", 1, 300, &queues, &[("q3", 30)]),
        ],
    ));
    let text = render(&advice);
    assert!(
        text.contains("print them whole with `fanout advise --format gitlab-rb`"),
        "{text}"
    );
    assert!(text.contains("q0, q1, q10, q11, q12, q13, q14, q15, q16, q17 ... and 20 more → side"));
    assert!(!text.contains("sidekiq['routing_rules']"), "{text}");
    let rb = gitlab::gitlab_rb(&advice);
    let rule = rb.lines().find(|l| l.contains("'side']")).unwrap();
    let names = rule
        .split_once("'name=")
        .and_then(|(_, rest)| rest.split_once('\''))
        .map(|(names, _)| names.split(',').count());
    assert_eq!(names, Some(30), "every queue named: {rule}");
}

#[test]
fn too_little_data_says_why_instead_of_a_proposal() {
    let advice = plan(&observation(
        None,
        vec![group("g", 1, 40, &["a"], &[("a", 4)])],
    ));
    let text = render(&advice);
    assert!(
        text.contains("No advice: only 40 blocking pops in the window"),
        "{text}"
    );
    for absent in ["Proposal", "Predicted", "Rules"] {
        assert!(!text.lines().any(|l| l == absent), "{absent} in:\n{text}");
    }
}

#[test]
fn a_remote_redis_says_there_is_no_time_prediction() {
    let advice = plan(&observation(
        None,
        vec![group("g", 1, 500, &["a", "b"], &[("a", 40)])],
    ));
    let text = render(&advice);
    assert!(text.contains("(not on this host)"), "{text}");
    assert!(
        text.contains("No time prediction: this Redis is not on the agent's host"),
        "{text}"
    );
    position(
        &text,
        "  Keys per pop (over all groups, by their pops): 2 → 1",
    );
    assert!(!text.contains("saved ="), "{text}");
    assert!(text.contains("GitLab's own recommendation"), "{text}");
}

#[test]
fn wrapping_breaks_between_words_and_abbreviation_counts_the_rest() {
    let long = "word ".repeat(40);
    let wrapped = wrap(&long, "  ", "    ");
    assert!(wrapped.lines().all(|l| l.len() <= WIDTH));
    assert!(wrapped.lines().skip(1).all(|l| l.starts_with("    word")));
    assert_eq!(abbreviated(&["a", "b"]), "a, b");
    assert_eq!(
        abbreviated(&many(12)),
        "q0, q1, q2, q3, q4, q5, q6, q7, q8, q9 ... and 2 more"
    );
}
