//! The proposal as GitLab configuration, ready to paste: routing rules and Sidekiq processes
//! for /etc/gitlab/gitlab.rb (the Linux package) and for the GitLab Helm chart's values.
//!
//! GitLab's "Processing specific job classes": `routing_rules` is an ordered list of
//! `[query, queue]` pairs, the first match wins; a query is a worker matching query, where
//! `name=a,b` matches queue `a` or `b` (`,` is OR within one attribute, `|` OR between
//! queries, `&` AND). `queue_groups` has one entry per Sidekiq process: the queues it listens
//! to, comma-separated.

use std::collections::BTreeSet;

use super::{comment_safe, window};
use crate::advise::{
    names::{kubernetes_name, queue_name, unique},
    plan::{Advice, Proposal, ServerAdvice, Verdict},
};

/// GitLab never routes mailer jobs: they always go to `mailers`, and some process must keep
/// listening to it.
pub const MAILERS_QUEUE: &str = "mailers";

/// The rake tasks that move jobs already queued, scheduled or retrying to the queues the new
/// rules name (GitLab's "Sidekiq job migration Rake tasks").
const MIGRATE_JOBS: &str = "gitlab:sidekiq:migrate_jobs:retry \\\n\
                            #     gitlab:sidekiq:migrate_jobs:schedule gitlab:sidekiq:migrate_jobs:queued";

/// One group's Sidekiq processes.
#[derive(Clone, Debug, PartialEq)]
pub struct Processes {
    pub group: String,
    /// The Helm chart's pod name for them.
    pub pod_name: String,
    /// The queues each process listens to.
    pub queues: Vec<String>,
    pub count: u32,
}

/// A proposal in GitLab's terms.
#[derive(Clone, Debug, PartialEq)]
pub struct GitlabRules {
    /// `[query, queue]` in order, the `*` rule last.
    pub rules: Vec<(String, String)>,
    pub processes: Vec<Processes>,
    /// Queue names no worker matching query can name (they hold an operator character):
    /// left to the catch-all.
    pub unnameable: Vec<String>,
    /// The group that keeps listening to `mailers`, when the workers listened to it.
    pub mailers_group: Option<String>,
}

/// Whether a queue name can stand in a `name=` term: GitLab's query syntax has no escape for
/// its operators (`,` `|` `&` `=` `!`), and `*` alone means every worker.
pub fn nameable(name: &str) -> bool {
    !name.is_empty()
        && name != "*"
        && !name
            .chars()
            .any(|c| matches!(c, ',' | '|' | '&' | '=' | '!') || c.is_whitespace())
}

pub fn gitlab_rules(proposal: &Proposal) -> GitlabRules {
    let mut rules = Vec::new();
    let mut unnameable = Vec::new();
    let mut mailers_group = None;
    for route in &proposal.routes {
        let mut names = Vec::new();
        for name in route.queue_names() {
            if name == MAILERS_QUEUE {
                mailers_group = Some(route.group.clone());
            } else if nameable(name) {
                names.push(name);
            } else {
                unnameable.push(name.to_string());
            }
        }
        if !names.is_empty() {
            rules.push((format!("name={}", names.join(",")), route.to.clone()));
        }
    }
    let catch_all = proposal.catch_all();
    if catch_all
        .assigned
        .iter()
        .any(|key| queue_name(key) == MAILERS_QUEUE)
    {
        mailers_group = Some(catch_all.group.clone());
    }
    rules.push(("*".to_string(), catch_all.shard_queue.clone()));

    let mut pod_names = BTreeSet::new();
    let processes = proposal
        .groups
        .iter()
        .map(|g| {
            let mut queues = vec![g.shard_queue.clone()];
            if mailers_group.as_deref() == Some(g.group.as_str()) && g.shard_queue != MAILERS_QUEUE
            {
                queues.push(MAILERS_QUEUE.to_string());
            }
            Processes {
                group: g.group.clone(),
                pod_name: unique(kubernetes_name(&g.group), '-', &mut pod_names),
                queues,
                // A group seen with no process left still needs one to serve its shard.
                count: g.processes.max(1),
            }
        })
        .collect();
    GitlabRules {
        rules,
        processes,
        unnameable,
        mailers_group,
    }
}

/// A Ruby single-quoted string: only `\` and `'` are special in it.
pub fn ruby_string(text: &str) -> String {
    format!("'{}'", text.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// A YAML double-quoted string (JSON's escapes are YAML's).
pub fn yaml_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Comment lines that open a server's block; `None` when there is nothing to paste (then
/// the lines say why).
fn header(advice: &Advice, server: &ServerAdvice, apply: &str) -> (String, Option<GitlabRules>) {
    let mut out = format!(
        "# Sidekiq routing from `fanout advise`: Redis {}, window {}.\n",
        comment_safe(&server.server),
        window(advice.window_seconds, advice.since_start)
    );
    let proposal = match &server.verdict {
        Verdict::Insufficient(reason) => {
            out.push_str(&format!("# No advice: {}\n", comment_safe(reason)));
            return (out, None);
        }
        Verdict::Proposal(p) => p,
    };
    if !advice.names_real {
        out.push_str(
            "# No rules: the agent folds queue names (key_0, ...) for a client on another host;\n\
             # run `fanout advise` on the agent's host to get rules with the real names.\n",
        );
        return (out, None);
    }
    let rules = gitlab_rules(proposal);
    out.push_str(&format!("# {apply}\n"));
    out.push_str(&migration_comment(proposal));
    if let Some(group) = &rules.mailers_group {
        out.push_str(&format!(
            "# GitLab never routes mailer jobs: '{MAILERS_QUEUE}' stays with group {} (2 keys per pop).\n",
            comment_safe(group)
        ));
    }
    if !rules.unnameable.is_empty() {
        out.push_str(&format!(
            "# No worker query can name these queues, so '*' sends them to {}: {}\n",
            proposal.catch_all().shard_queue,
            comment_safe(&rules.unnameable.join(" "))
        ));
    }
    (out, Some(rules))
}

fn migration_comment(proposal: &Proposal) -> String {
    format!(
        "# '*' sends every queue no rule names, queues never seen too, to the catch-all {}.\n\
         # Jobs already queued stay in the old queues: listen to old and new queues while you\n\
         # switch; then move the old queues' jobs (or wait until the old queues are empty)\n\
         #   sudo gitlab-rake {MIGRATE_JOBS}\n\
         # before the processes below drop the old queues.\n",
        proposal.catch_all().shard_queue
    )
}

const SEVERAL_SERVERS: &str =
    "# The workers use several Redis servers; GitLab has one Redis for Sidekiq, typically:\n\
                               # keep the block of that one.\n";

/// Every server's block, `separator` between two, with the comments that say when there
/// are several servers or none.
fn per_server(
    advice: &Advice,
    separator: &str,
    block: fn(&Advice, &ServerAdvice) -> String,
) -> String {
    let mut out = String::new();
    if advice.servers.len() > 1 {
        out.push_str(SEVERAL_SERVERS);
    }
    if advice.servers.is_empty() {
        out.push_str("# No advice: the agent saw no Redis server with worker groups.\n");
    }
    for (i, server) in advice.servers.iter().enumerate() {
        if i > 0 {
            out.push_str(separator);
        }
        out.push_str(&block(advice, server));
    }
    out
}

/// For /etc/gitlab/gitlab.rb: every server's block.
pub fn gitlab_rb(advice: &Advice) -> String {
    per_server(advice, "\n", gitlab_rb_server)
}

/// One server's gitlab.rb block.
pub fn gitlab_rb_server(advice: &Advice, server: &ServerAdvice) -> String {
    let (mut out, rules) = header(
        advice,
        server,
        "Paste into /etc/gitlab/gitlab.rb, then `sudo gitlab-ctl reconfigure`.",
    );
    let Some(rules) = rules else {
        return out;
    };
    out.push_str("sidekiq['routing_rules'] = [\n");
    let lines: Vec<String> = rules
        .rules
        .iter()
        .map(|(query, queue)| format!("  [{}, {}]", ruby_string(query), ruby_string(queue)))
        .collect();
    out.push_str(&lines.join(",\n"));
    out.push_str("\n]\n");
    let groups: Vec<String> = rules
        .processes
        .iter()
        .flat_map(|p| {
            let queues = ruby_string(&p.queues.join(","));
            std::iter::repeat_n(queues, p.count as usize)
        })
        .collect();
    let one_line = format!("sidekiq['queue_groups'] = [{}]\n", groups.join(", "));
    if one_line.len() <= LINE_WIDTH {
        out.push_str(&one_line);
    } else {
        out.push_str("sidekiq['queue_groups'] = [\n");
        out.push_str(&packed(&groups, "  ", LINE_WIDTH));
        out.push_str("]\n");
    }
    out
}

/// Lines are kept to this width where the syntax allows (a terminal of 100 columns).
const LINE_WIDTH: usize = 100;

/// `items` as a comma-separated list over lines of at most `width` (an item longer than
/// that gets a line of its own), each line after `indent`.
fn packed(items: &[String], indent: &str, width: usize) -> String {
    let mut out = String::new();
    let mut line = String::new();
    for (i, item) in items.iter().enumerate() {
        let piece = if i + 1 < items.len() {
            format!("{item},")
        } else {
            item.clone()
        };
        if !line.is_empty() && indent.len() + line.len() + 1 + piece.len() > width {
            out.push_str(&format!("{indent}{line}\n"));
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(&piece);
    }
    if !line.is_empty() {
        out.push_str(&format!("{indent}{line}\n"));
    }
    out
}

/// Values for the GitLab Helm chart: every server's block, one YAML document each.
pub fn helm(advice: &Advice) -> String {
    per_server(advice, "---\n", helm_server)
}

/// One server's Helm values.
pub fn helm_server(advice: &Advice, server: &ServerAdvice) -> String {
    let (mut out, rules) = header(
        advice,
        server,
        "Merge into the GitLab chart's values, then `helm upgrade` with them.",
    );
    let Some(rules) = rules else {
        return out;
    };
    out.push_str("global:\n  appConfig:\n    sidekiq:\n      routingRules:\n");
    for (query, queue) in &rules.rules {
        out.push_str(&format!(
            "        - [{}, {}]\n",
            yaml_string(query),
            yaml_string(queue)
        ));
    }
    out.push_str("gitlab:\n  sidekiq:\n    pods:\n");
    for p in &rules.processes {
        out.push_str(&format!(
            "      - name: {}\n        queues: {}\n        minReplicas: {}\n        maxReplicas: {}\n",
            yaml_string(&p.pod_name),
            yaml_string(&p.queues.join(",")),
            p.count,
            p.count
        ));
    }
    out
}

#[cfg(test)]
mod tests;
