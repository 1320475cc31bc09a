//! Which processes the agent tracks, and under which group name.
//!
//! Redis and Valkey servers are always tracked (group `redis`). Worker processes are matched by
//! rules: each names a group and gives one or more matchers (comm, executable basename, cmdline
//! regex), all of which must match. The first matching rule wins.

use regex::Regex;
use serde::Deserialize;

use crate::proc_reader::ProcessInfo;

/// The group label of every Redis-compatible server.
pub const REDIS_GROUP: &str = "redis";

/// Task names of the servers the agent always tracks. Matched on comm as well as on the exe's
/// basename: Debian's `/usr/bin/redis-server` is a symlink to `redis-check-rdb`, so only comm
/// says "redis-server" there, while a renamed binary may only be recognisable by its path.
const SERVER_NAMES: [&str; 2] = ["redis-server", "valkey-server"];

/// A rule as written in the config file or on the command line.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub group: String,
    pub comm: Option<String>,
    pub exe: Option<String>,
    pub cmdline: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RuleError {
    #[error("worker rule has an empty group name")]
    EmptyGroup,
    #[error("worker rule for group {0:?} uses the reserved group name \"redis\"")]
    ReservedGroup(String),
    #[error("worker rule for group {0:?} has no matcher: give at least one of comm, exe, cmdline")]
    NoMatcher(String),
    #[error("worker rule for group {group:?}: invalid cmdline regex: {message}")]
    BadRegex { group: String, message: String },
    #[error("worker rule for group {group:?}: comm {comm:?} can never match, task names are at most 15 bytes")]
    CommTooLong { group: String, comm: String },
    #[error("invalid --worker-rule {0:?}: expected GROUP:comm=NAME, GROUP:exe=NAME or GROUP:cmdline=REGEX")]
    BadFlag(String),
    #[error("group names must be short identifiers ([A-Za-z0-9_.-], at most 64 bytes): {0:?}")]
    BadGroupName(String),
}

/// A validated, compiled worker rule.
#[derive(Clone, Debug)]
pub struct WorkerRule {
    pub group: String,
    comm: Option<String>,
    exe: Option<String>,
    cmdline: Option<Regex>,
}

impl WorkerRule {
    pub fn compile(spec: &RuleSpec) -> Result<Self, RuleError> {
        let group = spec.group.trim();
        if group.is_empty() {
            return Err(RuleError::EmptyGroup);
        }
        if group == REDIS_GROUP {
            return Err(RuleError::ReservedGroup(group.to_string()));
        }
        if group.len() > 64
            || !group
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        {
            return Err(RuleError::BadGroupName(group.to_string()));
        }
        if spec.comm.is_none() && spec.exe.is_none() && spec.cmdline.is_none() {
            return Err(RuleError::NoMatcher(group.to_string()));
        }
        if let Some(comm) = &spec.comm {
            if comm.len() > 15 {
                return Err(RuleError::CommTooLong {
                    group: group.to_string(),
                    comm: comm.clone(),
                });
            }
        }
        let cmdline = spec
            .cmdline
            .as_deref()
            .map(Regex::new)
            .transpose()
            .map_err(|e| RuleError::BadRegex {
                group: group.to_string(),
                message: e.to_string().replace('\n', " "),
            })?;
        Ok(Self {
            group: group.to_string(),
            comm: spec.comm.clone(),
            exe: spec.exe.clone(),
            cmdline,
        })
    }

    /// Parses the `--worker-rule GROUP:KIND=VALUE` flag form.
    pub fn parse_flag(flag: &str) -> Result<RuleSpec, RuleError> {
        let bad = || RuleError::BadFlag(flag.to_string());
        let (group, matcher) = flag.split_once(':').ok_or_else(bad)?;
        let (kind, value) = matcher.split_once('=').ok_or_else(bad)?;
        let mut spec = RuleSpec {
            group: group.to_string(),
            ..Default::default()
        };
        match kind {
            "comm" => spec.comm = Some(value.to_string()),
            "exe" => spec.exe = Some(value.to_string()),
            "cmdline" => spec.cmdline = Some(value.to_string()),
            _ => return Err(bad()),
        }
        Ok(spec)
    }

    pub fn matches(&self, process: &ProcessInfo) -> bool {
        if let Some(comm) = &self.comm {
            if &process.comm != comm {
                return false;
            }
        }
        if let Some(exe) = &self.exe {
            if process.exe_name() != Some(exe.as_str()) {
                return false;
            }
        }
        if let Some(cmdline) = &self.cmdline {
            if process.cmdline.is_empty() || !cmdline.is_match(&process.cmdline.join(" ")) {
                return false;
            }
        }
        true
    }
}

/// Rules for the job frameworks Fanout knows. Each regex matches both the command line a worker
/// is started with and the process title the framework sets afterwards.
pub fn default_rule_specs() -> Vec<RuleSpec> {
    let cmdline = |group: &str, regex: &str| RuleSpec {
        group: group.into(),
        cmdline: Some(regex.into()),
        ..Default::default()
    };
    vec![
        // `ruby /usr/bin/sidekiq -r app.rb`, then the title "sidekiq 6.4.1 app [0 of 5 busy]".
        cmdline("sidekiq", r"(^|/)sidekiq( |$)"),
        // `rake resque:work` / `resque work`, then the title "resque-2.6.0: Waiting for ...".
        cmdline("resque", r"(^|/)resque(-pool)?( work|-[0-9])|resque:work"),
        // `rq worker high default`, `rq worker-pool`, or the title "rq:worker:<name>".
        cmdline("rq", r"(^|/)rq (worker|worker-pool)( |$)|^rq:worker"),
        // `celery -A proj worker`, `python -m celery worker`, or the title "[celeryd: ...]".
        cmdline("celery", r"(^|/| )celery( .*)? worker( |$)|^\[celeryd: "),
    ]
}

/// The compiled rule set, with Redis servers recognised first.
#[derive(Clone, Debug, Default)]
pub struct RuleSet {
    workers: Vec<WorkerRule>,
}

/// What a process is to the agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Classification {
    RedisServer,
    Worker { group: String },
}

impl Classification {
    pub fn group(&self) -> &str {
        match self {
            Classification::RedisServer => REDIS_GROUP,
            Classification::Worker { group } => group,
        }
    }
}

impl RuleSet {
    pub fn new(specs: &[RuleSpec]) -> Result<Self, RuleError> {
        Ok(Self {
            workers: specs
                .iter()
                .map(WorkerRule::compile)
                .collect::<Result<_, _>>()?,
        })
    }

    pub fn classify(&self, process: &ProcessInfo) -> Option<Classification> {
        let is_server = SERVER_NAMES.contains(&process.comm.as_str())
            || process
                .exe_name()
                .is_some_and(|name| SERVER_NAMES.contains(&name));
        if is_server {
            return Some(Classification::RedisServer);
        }
        self.workers
            .iter()
            .find(|rule| rule.matches(process))
            .map(|rule| Classification::Worker {
                group: rule.group.clone(),
            })
    }

    pub fn groups(&self) -> impl Iterator<Item = &str> {
        self.workers.iter().map(|r| r.group.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proc_reader::ProcessId;

    fn process(comm: &str, exe: Option<&str>, cmdline: &str) -> ProcessInfo {
        ProcessInfo {
            id: ProcessId {
                pid: 10,
                start_time_ticks: 5,
            },
            comm: comm.into(),
            exe: exe.map(Into::into),
            cmdline: cmdline
                .split(' ')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
        }
    }

    fn defaults() -> RuleSet {
        RuleSet::new(&default_rule_specs()).unwrap()
    }

    #[test]
    fn debian_redis_is_recognised_by_comm_although_its_exe_is_redis_check_rdb() {
        let p = process(
            "redis-server",
            Some("/usr/bin/redis-check-rdb"),
            "redis-server 127.0.0.1:6379",
        );
        assert_eq!(defaults().classify(&p), Some(Classification::RedisServer));
    }

    #[test]
    fn valkey_and_renamed_comm_are_recognised_by_exe() {
        let p = process("valkey-server", None, "valkey-server *:6379");
        assert_eq!(defaults().classify(&p), Some(Classification::RedisServer));
        let p = process("custom-title", Some("/opt/redis/bin/redis-server"), "x");
        assert_eq!(defaults().classify(&p), Some(Classification::RedisServer));
    }

    #[test]
    fn redis_cli_and_benchmark_are_not_servers() {
        assert_eq!(
            defaults().classify(&process(
                "redis-cli",
                Some("/usr/bin/redis-cli"),
                "redis-cli ping"
            )),
            None
        );
        assert_eq!(
            defaults().classify(&process("redis-benchmark", None, "redis-benchmark -t get")),
            None
        );
    }

    #[test]
    fn sidekiq_before_and_after_it_sets_its_title() {
        let rules = defaults();
        let sidekiq = Some(Classification::Worker {
            group: "sidekiq".into(),
        });
        let started = process(
            "ruby",
            Some("/usr/bin/ruby3.1"),
            "ruby /usr/bin/sidekiq -r ./jobs.rb -c 5",
        );
        assert_eq!(rules.classify(&started), sidekiq);
        let titled = process(
            "sidekiq",
            Some("/usr/bin/ruby3.1"),
            "sidekiq 6.4.1 app [0 of 5 busy]",
        );
        assert_eq!(rules.classify(&titled), sidekiq);
        // An editor opening a file named after Sidekiq is not a worker.
        assert_eq!(
            rules.classify(&process("vim", None, "vim sidekiq.yml")),
            None
        );
    }

    #[test]
    fn resque_rq_and_celery_defaults() {
        let rules = defaults();
        let group = |p: &ProcessInfo| rules.classify(p).map(|c| c.group().to_string());
        assert_eq!(
            group(&process("ruby", None, "resque-2.6.0: Waiting for default")).as_deref(),
            Some("resque")
        );
        assert_eq!(
            group(&process("rake", None, "rake resque:work QUEUE=*")).as_deref(),
            Some("resque")
        );
        assert_eq!(
            group(&process(
                "python3",
                None,
                "/usr/bin/python3 /usr/local/bin/rq worker high low"
            ))
            .as_deref(),
            Some("rq")
        );
        assert_eq!(
            group(&process("python3", None, "rq:worker:abc123")).as_deref(),
            Some("rq")
        );
        assert_eq!(
            group(&process(
                "celery",
                None,
                "/venv/bin/python /venv/bin/celery -A proj worker -l info"
            ))
            .as_deref(),
            Some("celery")
        );
        assert_eq!(
            group(&process("python", None, "python -m celery worker")).as_deref(),
            Some("celery")
        );
        assert_eq!(
            group(&process(
                "python",
                None,
                "[celeryd: celery@host:MainProcess]"
            ))
            .as_deref(),
            Some("celery")
        );
        assert_eq!(group(&process("celery", None, "celery -A proj beat")), None);
        assert_eq!(group(&process("python3", None, "python3 rqstats.py")), None);
    }

    #[test]
    fn all_matchers_of_a_rule_must_match_and_first_rule_wins() {
        let specs = vec![
            RuleSpec {
                group: "billing".into(),
                comm: Some("ruby".into()),
                cmdline: Some("billing".into()),
                ..Default::default()
            },
            RuleSpec {
                group: "any-ruby".into(),
                exe: Some("ruby3.1".into()),
                ..Default::default()
            },
        ];
        let rules = RuleSet::new(&specs).unwrap();
        let billing = process("ruby", Some("/usr/bin/ruby3.1"), "ruby billing_worker.rb");
        assert_eq!(rules.classify(&billing).unwrap().group(), "billing");
        let other = process("ruby", Some("/usr/bin/ruby3.1"), "ruby mailer.rb");
        assert_eq!(rules.classify(&other).unwrap().group(), "any-ruby");
        let no_exe = process("ruby", None, "ruby mailer.rb");
        assert_eq!(rules.classify(&no_exe), None);
    }

    #[test]
    fn kernel_threads_with_empty_cmdline_never_match_a_cmdline_rule() {
        let specs = vec![RuleSpec {
            group: "all".into(),
            cmdline: Some(".*".into()),
            ..Default::default()
        }];
        assert_eq!(
            RuleSet::new(&specs)
                .unwrap()
                .classify(&process("kworker/0:1", None, "")),
            None
        );
    }

    #[test]
    fn invalid_rules_are_rejected_with_their_reason() {
        let spec = |group: &str, cmdline: Option<&str>| RuleSpec {
            group: group.into(),
            cmdline: cmdline.map(Into::into),
            ..Default::default()
        };
        assert_eq!(
            WorkerRule::compile(&spec("", Some("x"))).unwrap_err(),
            RuleError::EmptyGroup
        );
        assert_eq!(
            WorkerRule::compile(&spec("redis", Some("x"))).unwrap_err(),
            RuleError::ReservedGroup("redis".into())
        );
        assert_eq!(
            WorkerRule::compile(&spec("w", None)).unwrap_err(),
            RuleError::NoMatcher("w".into())
        );
        assert!(matches!(
            WorkerRule::compile(&spec("w", Some("(unclosed"))).unwrap_err(),
            RuleError::BadRegex { .. }
        ));
        assert!(matches!(
            WorkerRule::compile(&spec("bad group", Some("x"))).unwrap_err(),
            RuleError::BadGroupName(_)
        ));
        let long = RuleSpec {
            group: "w".into(),
            comm: Some("a-name-longer-than-15".into()),
            ..Default::default()
        };
        assert!(matches!(
            WorkerRule::compile(&long).unwrap_err(),
            RuleError::CommTooLong { .. }
        ));
    }

    #[test]
    fn flag_form_parses_each_matcher_kind() {
        assert_eq!(
            WorkerRule::parse_flag("mailers:cmdline=mailer (worker)").unwrap(),
            RuleSpec {
                group: "mailers".into(),
                cmdline: Some("mailer (worker)".into()),
                ..Default::default()
            }
        );
        assert_eq!(
            WorkerRule::parse_flag("a:comm=ruby")
                .unwrap()
                .comm
                .as_deref(),
            Some("ruby")
        );
        assert_eq!(
            WorkerRule::parse_flag("a:exe=python3")
                .unwrap()
                .exe
                .as_deref(),
            Some("python3")
        );
        assert!(matches!(
            WorkerRule::parse_flag("a=b"),
            Err(RuleError::BadFlag(_))
        ));
        assert!(matches!(
            WorkerRule::parse_flag("a:path=b"),
            Err(RuleError::BadFlag(_))
        ));
    }
}
