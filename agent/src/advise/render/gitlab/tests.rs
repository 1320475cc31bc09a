//! gitlab.rb and Helm values checked against GitLab's documented syntax: exact text for a small
//! case, and both read back by Ruby (its parser, and Psych for the YAML) when Ruby is here.

use std::{io::Write as _, process::Command};

use super::*;
use crate::advise::{
    fixtures::{group, observation},
    plan::plan,
};

/// Two groups: "Urgent" with queues whose names need escaping, "batch" (the busiest: the
/// catch-all).
fn small_advice() -> Advice {
    plan(&observation(
        None,
        vec![
            group(
                "Urgent",
                2,
                400,
                &["a", "it's", "say\"hi", "back\\slash"],
                &[("a", 100)],
            ),
            group("batch", 3, 600, &["c"], &[("c", 300)]),
        ],
    ))
}

const HEADER: &str = "\
# Sidekiq routing from `fanout advise`: Redis 127.0.0.1:6379, window 100 s, since the agent started.
";

const MIGRATION: &str = "\
# '*' sends every queue no rule names, queues never seen too, to the catch-all batch.
# Jobs already queued stay in the old queues: listen to old and new queues while you
# switch; then move the old queues' jobs (or wait until the old queues are empty)
#   sudo gitlab-rake gitlab:sidekiq:migrate_jobs:retry \\
#     gitlab:sidekiq:migrate_jobs:schedule gitlab:sidekiq:migrate_jobs:queued
# before the processes below drop the old queues.
";

#[test]
fn gitlab_rb_is_the_documented_routing_rules_and_queue_groups() {
    let expected = format!(
        "{HEADER}# Paste into /etc/gitlab/gitlab.rb, then `sudo gitlab-ctl reconfigure`.\n{MIGRATION}{}",
        r#"sidekiq['routing_rules'] = [
  ['name=a,back\\slash,it\'s,say"hi', 'urgent'],
  ['*', 'batch']
]
sidekiq['queue_groups'] = ['urgent', 'urgent', 'batch', 'batch', 'batch']
"#
    );
    assert_eq!(gitlab_rb(&small_advice()), expected);
}

#[test]
fn helm_values_are_the_documented_routing_rules_and_pods() {
    let expected = format!(
        "{HEADER}# Merge into the GitLab chart's values, then `helm upgrade` with them.\n{MIGRATION}{}",
        r#"global:
  appConfig:
    sidekiq:
      routingRules:
        - ["name=a,back\\slash,it's,say\"hi", "urgent"]
        - ["*", "batch"]
gitlab:
  sidekiq:
    pods:
      - name: "urgent"
        queues: "urgent"
        minReplicas: 2
        maxReplicas: 2
      - name: "batch"
        queues: "batch"
        minReplicas: 3
        maxReplicas: 3
"#
    );
    assert_eq!(helm(&small_advice()), expected);
}

#[test]
fn strings_are_escaped_for_ruby_and_yaml() {
    assert_eq!(ruby_string(r"it's a\b"), r"'it\'s a\\b'");
    assert_eq!(yaml_string("say \"hi\"\\\n"), r#""say \"hi\"\\\n""#);
    assert_eq!(yaml_string("\u{1}"), r#""\u0001""#);
}

/// Runs `script` with Ruby on a file holding `text`; `None` (said loudly) without Ruby.
fn ruby(script: &str, text: &str) -> Option<String> {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(text.as_bytes()).unwrap();
    let out = match Command::new("ruby")
        .args(["-ryaml", "-e", script])
        .arg(file.path())
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            eprintln!("!!! ruby is not available ({e}): the Ruby/YAML read-back is SKIPPED");
            return None;
        }
    };
    assert!(
        out.status.success(),
        "ruby failed on:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn ruby_reads_the_gitlab_rb_back_as_the_intended_strings() {
    let text = gitlab_rb(&small_advice());
    if let Some(out) = ruby("system('ruby', '-c', ARGV[0], out: :err) or exit(1)", &text) {
        assert_eq!(out, "");
    }
    // Evaluated with `sidekiq` as a Hash, the way gitlab.rb's settings are.
    let read_back = ruby(
        "sidekiq = {}; eval(File.read(ARGV[0])); \
         sidekiq['routing_rules'].each { |q, s| puts q, s }; puts sidekiq['queue_groups'].join(' ')",
        &text,
    );
    if let Some(out) = read_back {
        assert_eq!(
            out,
            "name=a,back\\slash,it's,say\"hi\nurgent\n*\nbatch\nurgent urgent batch batch batch\n"
        );
    }
}

#[test]
fn ruby_reads_the_helm_values_back_as_the_intended_structure() {
    let text = helm(&small_advice());
    let read_back = ruby(
        "v = YAML.load(File.read(ARGV[0])); \
         v['global']['appConfig']['sidekiq']['routingRules'].each { |q, s| puts q, s }; \
         v['gitlab']['sidekiq']['pods'].each { |p| puts [p['name'], p['queues'], p['minReplicas'], p['maxReplicas']].join(' ') }",
        &text,
    );
    if let Some(out) = read_back {
        assert_eq!(
            out,
            "name=a,back\\slash,it's,say\"hi\nurgent\n*\nbatch\nurgent urgent 2 2\nbatch batch 3 3\n"
        );
    }
}

#[test]
fn mailers_is_never_routed_and_keeps_a_listener() {
    let advice = plan(&observation(
        None,
        vec![
            group("mail", 1, 400, &["mailers", "x"], &[("mailers", 50)]),
            group("main", 2, 600, &["y"], &[("y", 300)]),
        ],
    ));
    let rules = gitlab_rules(advice.servers[0].proposal().unwrap());
    assert_eq!(
        rules.rules,
        [
            ("name=x".to_string(), "mail".to_string()),
            ("*".to_string(), "main".to_string())
        ]
    );
    assert_eq!(rules.processes[0].queues, ["mail", "mailers"]);
    assert_eq!(rules.mailers_group.as_deref(), Some("mail"));
    assert!(gitlab_rb(&advice).contains("'mailers' stays with group mail"));
}

#[test]
fn a_queue_no_query_can_name_is_left_to_the_catch_all_and_said() {
    let advice = plan(&observation(
        None,
        vec![
            group("small", 1, 400, &["a,b", "ok"], &[("ok", 50)]),
            group("main", 2, 600, &["y"], &[("y", 300)]),
        ],
    ));
    let rules = gitlab_rules(advice.servers[0].proposal().unwrap());
    assert_eq!(rules.rules[0].0, "name=ok");
    assert_eq!(rules.unnameable, ["a,b"]);
    assert!(helm(&advice).contains("so '*' sends them to main: a,b\n"));
}

#[test]
fn no_advice_prints_only_comments() {
    let advice = plan(&observation(None, vec![group("g", 1, 50, &["a"], &[])]));
    for text in [gitlab_rb(&advice), helm(&advice)] {
        assert!(text.lines().all(|l| l.starts_with('#')), "{text}");
        assert!(
            text.contains("# No advice: only 50 blocking pops"),
            "{text}"
        );
    }
    let mut folded = observation(None, vec![group("g", 1, 500, &["a"], &[("a", 9)])]);
    folded.names_real = false;
    let text = gitlab_rb(&plan(&folded));
    assert!(text.lines().all(|l| l.starts_with('#')), "{text}");
    assert!(text.contains("folds queue names"), "{text}");
}

#[test]
fn several_servers_say_which_block_to_keep() {
    let mut obs = observation(None, vec![group("g", 1, 500, &["a"], &[("a", 9)])]);
    let mut second = obs.servers[0].clone();
    second.server = "10.0.0.2:6379".into();
    obs.servers.push(second);
    let advice = plan(&obs);
    let rb = gitlab_rb(&advice);
    assert!(rb.starts_with(SEVERAL_SERVERS), "{rb}");
    assert_eq!(rb.matches("sidekiq['routing_rules']").count(), 2);
    assert_eq!(helm(&advice).matches("\n---\n").count(), 1);
}

#[test]
fn many_processes_wrap_the_queue_groups_and_stay_valid_ruby() {
    let advice = plan(&observation(
        None,
        vec![
            group("catchall", 30, 600, &["c"], &[("c", 300)]),
            group("other", 2, 400, &["d"], &[("d", 30)]),
        ],
    ));
    let text = gitlab_rb(&advice);
    assert!(
        text.contains("sidekiq['queue_groups'] = [\n  'catchall', 'catchall',"),
        "{text}"
    );
    assert!(text.lines().all(|l| l.len() <= 100), "{text}");
    if let Some(out) = ruby(
        "sidekiq = {}; eval(File.read(ARGV[0])); puts sidekiq['queue_groups'].tally.sort.inspect",
        &text,
    ) {
        assert_eq!(out, "[[\"catchall\", 30], [\"other\", 2]]\n");
    }
}
