//! The advice for a person at a terminal, per server: Today, Cost, Proposal, Predicted, Rules.
//! Readable at 100 columns: prose is wrapped, long queue lists are cut after `MAX_LISTED`
//! names (the rule formats never cut them).

use std::fmt::Write as _;

use super::{count, duration, gitlab, percent, rate, window as window_text};
use crate::advise::{
    fit::FitKind,
    names::queue_name,
    plan::{Advice, Proposal, ServerAdvice, Verdict},
    predict::TimePrediction,
    today::Today,
};

/// The width the text is laid out for.
pub const WIDTH: usize = 100;

/// Queue names listed before "... and N more".
pub const MAX_LISTED: usize = 10;

/// Said once per proposal: what the planner cannot know.
const SHARED_SPLIT: &str = "The agent cannot tell what the groups are for: it split the queues \
    they shared by observed traffic, keeping each group's share of the jobs. Move queues between \
    shards as you see fit.";

const MIGRATION: &str = "Migration: jobs already in the old queues must be drained. Keep the old \
    queues in each group's list until they are empty, then drop them.";

/// `names` joined, cut after `MAX_LISTED` with how many more there are.
pub fn abbreviated<S: AsRef<str>>(names: &[S]) -> String {
    let shown: Vec<&str> = names.iter().take(MAX_LISTED).map(AsRef::as_ref).collect();
    let mut text = shown.join(", ");
    if names.len() > MAX_LISTED {
        let _ = write!(text, " ... and {} more", names.len() - MAX_LISTED);
    }
    text
}

/// `text` wrapped at `WIDTH`, the first line after `first`, the others after `rest`.
pub fn wrap(text: &str, first: &str, rest: &str) -> String {
    let mut out = String::new();
    let mut line = first.to_string();
    let mut empty = true;
    for word in text.split(' ').filter(|w| !w.is_empty()) {
        if !empty && line.chars().count() + 1 + word.chars().count() > WIDTH {
            out.push_str(line.trim_end());
            out.push('\n');
            line = rest.to_string();
            empty = true;
        }
        if !empty {
            line.push(' ');
        }
        line.push_str(word);
        empty = false;
    }
    out.push_str(line.trim_end());
    out.push('\n');
    out
}

/// `n` and its noun, plural when `n` is not 1 (`1 queue`, `3 queues`).
fn counted(n: usize, noun: &str) -> String {
    match (n, noun) {
        (1, _) => format!("1 {noun}"),
        (_, "process") => format!("{n} processes"),
        _ => format!("{n} {noun}s"),
    }
}

fn fit_width(names: impl Iterator<Item = usize>, min: usize, max: usize) -> usize {
    names.fold(min, usize::max).min(max)
}

/// A cell cut to `width` characters (a `~` marks the cut).
fn cell(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        text.to_string()
    } else {
        let mut cut: String = text.chars().take(width.saturating_sub(1)).collect();
        cut.push('~');
        cut
    }
}

pub fn render(advice: &Advice) -> String {
    let mut out = String::new();
    if advice.servers.is_empty() {
        out.push_str(&wrap(
            &format!(
                "No advice: the agent saw no Redis server with worker groups (window: {}).",
                window_text(advice.window_seconds, advice.since_start)
            ),
            "",
            "",
        ));
    }
    for (i, server) in advice.servers.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        render_server(&mut out, advice, server);
    }
    out
}

fn render_server(out: &mut String, advice: &Advice, s: &ServerAdvice) {
    let where_ = if s.cost.main_thread_cpu_per_second.is_some() {
        "on this host"
    } else {
        "not on this host"
    };
    let _ = writeln!(
        out,
        "Redis {} ({where_}), window {}",
        s.server,
        window_text(advice.window_seconds, advice.since_start)
    );
    if !advice.names_real {
        out.push_str(&wrap(
            "Queue names are folded (key_0, ...): the agent folds them for a client on another \
             host. Run `fanout advise` on the agent's host for real names and rules.",
            "",
            "",
        ));
    }
    out.push('\n');
    render_today(out, &s.today);
    out.push('\n');
    render_cost(out, s, advice.window_seconds);
    out.push('\n');
    match &s.verdict {
        Verdict::Insufficient(reason) => {
            out.push_str(&wrap(&format!("No advice: {reason}."), "", "  "));
        }
        Verdict::Proposal(p) => {
            render_proposal(out, p);
            out.push('\n');
            render_predicted(out, p);
            out.push('\n');
            render_rules(out, advice, s, p);
        }
    }
}

fn render_today(out: &mut String, today: &Today) {
    out.push_str("Today\n");
    if today.groups.is_empty() {
        out.push_str("  No worker group pops from this server.\n");
        return;
    }
    let w = fit_width(today.groups.iter().map(|g| g.group.chars().count()), 5, 30);
    let _ = writeln!(
        out,
        "  {:<w$}  {:>9}  {:>6}  {:>8}  {:>8}  {:>8}",
        "group", "processes", "queues", "keys/pop", "pops/s", "served/s"
    );
    for g in &today.groups {
        let _ = writeln!(
            out,
            "  {:<w$}  {:>9}  {:>6}  {:>8}  {:>8}  {:>8}",
            cell(&g.group, w),
            g.processes,
            if g.queues.is_empty() {
                "?".to_string()
            } else {
                g.queues.len().to_string()
            },
            g.keys_per_pop().map_or("-".to_string(), count),
            rate(g.pops_per_second),
            rate(g.served_per_second),
        );
    }

    let idle: Vec<&str> = today.idle_queues().map(|q| q.name()).collect();
    let shared = today.shared_queues().count();
    let _ = writeln!(
        out,
        "  {} listened to: {} shared by groups, {} idle.",
        counted(today.queues.len(), "queue"),
        shared,
        idle.len()
    );
    let busy: Vec<_> = today.queues.iter().filter(|q| !q.is_idle()).collect();
    if !busy.is_empty() {
        out.push_str("  Busiest (served pops/s, listened to by):\n");
        let w = fit_width(
            busy.iter()
                .take(MAX_LISTED)
                .map(|q| q.name().chars().count()),
            5,
            40,
        );
        for q in busy.iter().take(MAX_LISTED) {
            // The row's cells keep their padding; only the listeners may wrap.
            out.push_str(&wrap(
                &abbreviated(&q.listeners),
                &format!(
                    "    {:<w$}  {:>8} ",
                    cell(q.name(), w),
                    rate(q.served_per_second)
                ),
                &" ".repeat(w + 15),
            ));
        }
        if busy.len() > MAX_LISTED {
            let _ = writeln!(
                out,
                "    ... and {} more that served",
                busy.len() - MAX_LISTED
            );
        }
    }
    if !idle.is_empty() {
        out.push_str(&wrap(
            &format!("Idle (listened to, served nothing): {}", abbreviated(&idle)),
            "  ",
            "    ",
        ));
    }
    if shared > 0 {
        let listed: Vec<String> = today
            .shared_queues()
            .map(|q| format!("{} ({})", q.name(), q.listeners.join(", ")))
            .collect();
        out.push_str(&wrap(
            &format!(
                "Shared (two groups or more listen): {}",
                abbreviated(&listed)
            ),
            "  ",
            "    ",
        ));
    }
    if today.unattributed_served > 0 {
        out.push_str(&wrap(
            &format!(
                "{} served pops could not be told by queue (their replies were too long for the \
                 kernel's window); the per-queue numbers leave them out.",
                today.unattributed_served
            ),
            "  ",
            "    ",
        ));
    }
}

fn render_cost(out: &mut String, s: &ServerAdvice, window_seconds: f64) {
    out.push_str("Cost\n");
    let cost = &s.cost;
    if let Some(cpu) = cost.main_thread_cpu_per_second {
        let _ = writeln!(
            out,
            "  Main thread: {} of a core ({} CPU over the window).",
            percent(cpu),
            duration(cpu * window_seconds)
        );
        if let Some(bookkeeping) = cost.bookkeeping_per_second {
            let seconds = bookkeeping * window_seconds;
            let mut line = format!(
                "Blocking bookkeeping: {} / {} = {} of a core",
                duration(seconds),
                duration(window_seconds),
                percent(bookkeeping)
            );
            if let Some(share) = cost.bookkeeping_share_of_main_thread {
                let _ = write!(
                    line,
                    "; {} / {} CPU = {} of the main thread's CPU",
                    duration(seconds),
                    duration(cpu * window_seconds),
                    percent(share)
                );
            }
            line.push('.');
            out.push_str(&wrap(&line, "  ", "    "));
        }
        if let Some(per_job) = cost.main_thread_seconds_per_job {
            let _ = writeln!(
                out,
                "  Main-thread time per served job: {}.",
                duration(per_job)
            );
        }
    }
    match &cost.fit {
        Ok(fit) => {
            let line = match fit.kind {
                FitKind::Fitted => format!(
                    "Per call: {} + {} × keys (a line through {} fan-outs).",
                    duration(fit.per_call_seconds),
                    duration(fit.per_key_seconds),
                    fit.buckets_used
                ),
                FitKind::UpperBound => format!(
                    "Per key: at most {} (one fan-out seen: the fixed part per call cannot be \
                     told apart, so all of a call's time is put on its keys).",
                    duration(fit.per_key_seconds)
                ),
            };
            out.push_str(&wrap(&line, "  ", "    "));
            if let Some(correction) = fit.correction {
                out.push_str(&wrap(&format!("({}.)", correction.explain()), "  ", "    "));
            }
        }
        Err(reason) => out.push_str(&wrap(
            &format!("No time prediction: {reason}."),
            "  ",
            "    ",
        )),
    }
}

fn render_proposal(out: &mut String, p: &Proposal) {
    out.push_str("Proposal\n");
    out.push_str(&wrap(
        "One queue per group (a shard): each group listens to its shard only, 1 key per pop; \
         routing rules send each queue's jobs to one shard.",
        "  ",
        "  ",
    ));
    let catch_all = p.catch_all();
    for (i, g) in p.groups.iter().enumerate() {
        let _ = writeln!(
            out,
            "  {} → shard {}{}: keys per pop {} → {}, {} pops/s",
            g.group,
            g.shard_queue,
            if i == p.catch_all {
                " (catch-all, '*')"
            } else {
                ""
            },
            g.keys_per_pop_now.map_or("-".to_string(), count),
            count(g.keys_per_pop_predicted),
            rate(g.pops_per_second),
        );
        let names: Vec<&str> = g.assigned.iter().map(|k| queue_name(k)).collect();
        let takes = if names.is_empty() {
            "takes no queue: its queues went to other groups; it only serves jobs routed to \
             its shard"
                .to_string()
        } else {
            format!(
                "takes {}: {}",
                counted(names.len(), "queue"),
                abbreviated(&names)
            )
        };
        out.push_str(&wrap(&takes, "      ", "        "));
    }
    let line = if p.groups.len() == 1 {
        format!(
            "A single group: one rule, '*' → {}: every job to one queue (GitLab's own \
             recommendation).",
            catch_all.shard_queue
        )
    } else {
        format!(
            "The last rule, '*' → {}, sends every queue no rule names to the catch-all {}, \
             queues never seen too: its {} need no explicit rule.",
            catch_all.shard_queue,
            catch_all.group,
            counted(catch_all.assigned.len(), "queue")
        )
    };
    out.push_str(&wrap(&line, "  ", "  "));
    if p.shared_split {
        out.push_str(&wrap(SHARED_SPLIT, "  ", "  "));
    }
    if !p.unplanned_groups.is_empty() {
        out.push_str(&wrap(
            &format!(
                "Left as they are (their queues are not known): {}.",
                abbreviated(&p.unplanned_groups)
            ),
            "  ",
            "  ",
        ));
    }
}

fn render_predicted(out: &mut String, p: &Proposal) {
    out.push_str("Predicted\n");
    let keys = &p.prediction;
    if let (Some(now), Some(after)) = (keys.keys_per_pop_now, keys.keys_per_pop_predicted) {
        let _ = writeln!(
            out,
            "  Keys per pop (over all groups, by their pops): {} → {}",
            count(now),
            count(after)
        );
    }
    match &keys.time {
        Some(t) => render_time(out, t),
        None => out.push_str("  No time prediction (see Cost).\n"),
    }
}

fn render_time(out: &mut String, t: &TimePrediction) {
    for term in &t.terms {
        let _ = writeln!(
            out,
            "  saved = {} pops/s × {}/key × ({} − {}) keys = {}/s   ({})",
            rate(term.calls_per_second),
            duration(t.per_key_seconds),
            count(term.keys_now),
            count(term.keys_predicted),
            duration(term.saved_per_second),
            term.group
        );
    }
    if t.terms.len() > 1 {
        let _ = writeln!(out, "  saved in all = {}/s", duration(t.saved_per_second));
    }
    let _ = writeln!(
        out,
        "  bookkeeping = max(now − saved, per call × calls)\n              = max({}/s − {}/s, {} × {} pops/s) = {}/s{}",
        duration(t.bookkeeping_now),
        duration(t.saved_per_second),
        duration(t.per_call_seconds),
        rate(t.calls_per_second),
        duration(t.bookkeeping_predicted),
        if t.floored {
            " (the floor: pops served at once never blocked, so the model saves more than was spent)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        out,
        "  main thread = {}/s − {}/s = {}/s of a core",
        duration(t.main_thread_cpu_now),
        duration(t.effective_saving()),
        duration(t.main_thread_cpu_predicted)
    );
    let mut share = format!(
        "  bookkeeping: {} → {} of a core",
        percent(t.bookkeeping_now),
        percent(t.bookkeeping_predicted)
    );
    if let (Some(now), Some(after)) = (t.share_of_main_thread_now, t.share_of_main_thread_predicted)
    {
        let _ = write!(
            share,
            "; {} → {} of the main thread's CPU",
            percent(now),
            percent(after)
        );
    }
    out.push_str(&share);
    out.push('\n');
    if let (Some(now), Some(after)) = (t.seconds_per_job_now, t.seconds_per_job_predicted) {
        let _ = writeln!(
            out,
            "  main-thread time per served job: {} → {} ({} less)",
            duration(now),
            duration(after),
            percent(if now > 0.0 { 1.0 - after / now } else { 0.0 })
        );
    }
}

fn render_rules(out: &mut String, advice: &Advice, s: &ServerAdvice, p: &Proposal) {
    out.push_str("Rules\n");
    if !advice.names_real {
        out.push_str("  None: queue names are folded (see above).\n");
        return;
    }
    let rules = gitlab::gitlab_rules(p);
    let long = p.routes.iter().any(|r| r.keys.len() > MAX_LISTED);
    if long {
        out.push_str(&wrap(
            "Some rules name many queues: print them whole with `fanout advise --format \
             gitlab-rb` (or `--format helm`). In short:",
            "  ",
            "  ",
        ));
        for (query, queue) in &rules.rules {
            let names: Vec<&str> = query
                .strip_prefix("name=")
                .map(|q| q.split(',').collect())
                .unwrap_or_else(|| vec![query.as_str()]);
            out.push_str(&wrap(
                &format!("{} → {queue}", abbreviated(&names)),
                "    ",
                "      ",
            ));
        }
    } else {
        out.push_str("  gitlab.rb:\n");
        code(out, &gitlab::gitlab_rb_server(advice, s));
        out.push_str("  Helm values:\n");
        code(out, &gitlab::helm_server(advice, s));
    }
    if let Some(group) = &rules.mailers_group {
        out.push_str(&wrap(
            &format!(
                "GitLab never routes mailer jobs: '{}' stays with {group}, whose processes then \
                 list 2 keys per pop.",
                gitlab::MAILERS_QUEUE
            ),
            "  ",
            "  ",
        ));
    }
    if !rules.unnameable.is_empty() {
        out.push_str(&wrap(
            &format!(
                "No GitLab worker query can name these queues, so '*' sends them to {}: {}",
                p.catch_all().shard_queue,
                abbreviated(&rules.unnameable)
            ),
            "  ",
            "  ",
        ));
    }
    out.push_str("  Each group's Sidekiq processes:\n");
    for g in &p.groups {
        let _ = writeln!(
            out,
            "    {} ({}): sidekiq -q {}",
            g.group,
            counted(g.processes.max(1) as usize, "process"),
            g.shard_queue
        );
    }
    out.push_str(&wrap(MIGRATION, "  ", "  "));
}

/// A pasteable block, its comments left out (the text says the same around it).
fn code(out: &mut String, block: &str) {
    for line in block.lines().filter(|l| !l.starts_with('#')) {
        let _ = writeln!(out, "    {line}");
    }
}

#[cfg(test)]
mod tests;
