//! Which processes the agent tracks, and under which group name.
//!
//! Redis and Valkey servers are tracked (group `redis`) unless an exclusion rule says
//! otherwise. A server is recognised by its name or by what its binary is, in steps that cost
//! the node's other processes nothing: a process whose task name, executable name or program
//! name (argv[0], or the first word of its title) contains "redis" or "valkey" is a candidate;
//! a candidate whose comm or exe is exactly `redis-server` or `valkey-server` is one by name,
//! any other has its executable's symbols checked (once per binary, see `discovery`). Then its
//! arguments say in which role the binary runs (server, checker, sentinel, or a child the
//! server forked), and only servers are tracked as Redis.
//!
//! Worker processes are matched by rules: each names a group and gives one or more matchers
//! (comm, executable basename, cmdline regex), all of which must match. The first matching
//! rule wins.

use std::collections::BTreeSet;

use regex::Regex;
use serde::Deserialize;

use crate::proc_reader::ProcessInfo;

/// The group label of every Redis-compatible server.
pub const REDIS_GROUP: &str = "redis";

/// Task names of the servers. A process whose comm or exe's basename is one of these is a
/// server without its binary being read (unless its arguments say it runs in another role);
/// others must have a binary that exports [`SERVER_SYMBOLS`]. Debian's `/usr/bin/redis-server`
/// is a symlink to `redis-check-rdb`, so only comm says "redis-server" there.
const SERVER_NAMES: [&str; 2] = ["redis-server", "valkey-server"];

/// Functions every redis-server and valkey-server (6.0 to 8.x) exports, and tools such as
/// redis-cli and redis-benchmark do not. Both are in `.dynsym` of stripped builds (Redis links
/// with `-rdynamic`).
pub const SERVER_SYMBOLS: [&str; 2] = ["blockForKeys", "processCommand"];

/// Titles Redis and Valkey give the children they fork (`redisSetProcTitle` in rdb.c, aof.c
/// and module.c, 6.0 to 7.4; `serverSetProcTitle` in Valkey 8, which uses either prefix). The
/// children keep comm "redis-server" and the binary, but are not servers.
const CHILD_TITLES: [&str; 8] = [
    "redis-rdb-bgsave",
    "redis-aof-rewrite",
    "redis-rdb-to-slaves",
    "redis-module-fork",
    "valkey-rdb-bgsave",
    "valkey-aof-rewrite",
    "valkey-rdb-to-replicas",
    "valkey-module-fork",
];

/// Program names under which the server binary runs as a file checker (`main()` in server.c
/// looks for these in argv[0]'s basename, as here).
const CHECKER_NAMES: [&str; 4] = [
    "redis-check-rdb",
    "redis-check-aof",
    "valkey-check-rdb",
    "valkey-check-aof",
];

/// Program names under which the server binary runs as Sentinel (`checkForSentinelMode`).
const SENTINEL_NAMES: [&str; 2] = ["redis-sentinel", "valkey-sentinel"];

/// What an executable's symbols say about it being a Redis-compatible server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerBinary {
    /// Exports [`SERVER_SYMBOLS`]: redis-server or valkey-server, under whatever file name
    /// (Debian's `redis-check-rdb`, a copy named `redis-server-7.4.1`).
    Server,
    /// A readable executable that does not (redis-cli, redis-benchmark, an interpreter).
    Other,
    /// Unreadable, or without any symbol table: only the names can tell ([`SERVER_NAMES`]).
    Unknown,
}

impl ServerBinary {
    /// From the [`SERVER_SYMBOLS`] a binary defines (`None`: it has no symbol table).
    pub fn from_symbols(symbols: Option<&BTreeSet<String>>) -> Self {
        match symbols {
            None => ServerBinary::Unknown,
            Some(found) if SERVER_SYMBOLS.iter().all(|s| found.contains(*s)) => {
                ServerBinary::Server
            }
            Some(_) => ServerBinary::Other,
        }
    }
}

/// The cheap first look, on facts already read: does any name of the process contain "redis"
/// or "valkey" (any case)? Only then is its binary examined.
pub fn looks_like_redis(process: &ProcessInfo) -> bool {
    let named = |name: &str| {
        let name = name.to_ascii_lowercase();
        name.contains("redis") || name.contains("valkey")
    };
    named(&process.comm)
        || process.exe_name().is_some_and(named)
        || process.argv0_name().is_some_and(named)
}

/// The role in which a Redis or Valkey binary runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedisRole {
    Server,
    /// `redis-check-rdb` / `redis-check-aof`: the same binary, checking a file.
    Checker,
    /// Sentinel (`redis-sentinel`, or `--sentinel`): it serves no keys, so nothing blocks in
    /// it. Not tracked as a Redis; a worker rule may still track it.
    Sentinel,
    /// A child the server forked (BGSAVE, AOF rewrite, replication or module fork).
    ForkedChild,
}

/// Decides the role from the process's arguments or title, the way Redis does from argv[0],
/// and tells forked children from servers: they set a title of their own, and, whatever the
/// title (a `proc-title-template` may hide it), they were forked without an exec and do not
/// lead a session. A daemonized server was forked without an exec too, but called setsid().
pub fn redis_role(process: &ProcessInfo) -> RedisRole {
    let words = || process.cmdline.iter().flat_map(|a| a.split_whitespace());
    if words().any(|w| CHILD_TITLES.contains(&w))
        || (process.forked_without_exec() && !process.session_leader())
    {
        return RedisRole::ForkedChild;
    }
    let program = process.argv0_name().unwrap_or(&process.comm);
    if CHECKER_NAMES.iter().any(|n| program.contains(n)) {
        return RedisRole::Checker;
    }
    if SENTINEL_NAMES.iter().any(|n| program.contains(n))
        || words().any(|w| w == "--sentinel" || w == "[sentinel]")
    {
        return RedisRole::Sentinel;
    }
    RedisRole::Server
}

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
    #[error("redis_exclude rule has no matcher: give at least one of comm, exe, cmdline")]
    ExcludeNoMatcher,
    #[error("redis_exclude rule: invalid cmdline regex: {0}")]
    ExcludeBadRegex(String),
    #[error("redis_exclude rule: comm {0:?} can never match, task names are at most 15 bytes")]
    ExcludeCommTooLong(String),
    #[error("invalid --redis-exclude {0:?}: expected comm=NAME, exe=NAME or cmdline=REGEX")]
    BadExcludeFlag(String),
}

/// Matchers shared by worker rules and Redis exclusions: all that are given must match.
#[derive(Clone, Debug, Default)]
struct Matcher {
    comm: Option<String>,
    exe: Option<String>,
    cmdline: Option<Regex>,
}

impl Matcher {
    fn matches(&self, process: &ProcessInfo) -> bool {
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

/// A `[[redis_exclude]]` entry or `--redis-exclude KIND=VALUE`: Redis servers it matches are
/// not tracked. Same matchers as a worker rule, without a group.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExcludeSpec {
    pub comm: Option<String>,
    pub exe: Option<String>,
    pub cmdline: Option<String>,
}

impl ExcludeSpec {
    /// Parses the `--redis-exclude KIND=VALUE` flag form.
    pub fn parse_flag(flag: &str) -> Result<Self, RuleError> {
        let bad = || RuleError::BadExcludeFlag(flag.to_string());
        let (kind, value) = flag.split_once('=').ok_or_else(bad)?;
        let mut spec = ExcludeSpec::default();
        match kind {
            "comm" => spec.comm = Some(value.to_string()),
            "exe" => spec.exe = Some(value.to_string()),
            "cmdline" => spec.cmdline = Some(value.to_string()),
            _ => return Err(bad()),
        }
        Ok(spec)
    }

    fn compile(&self) -> Result<Matcher, RuleError> {
        if self.comm.is_none() && self.exe.is_none() && self.cmdline.is_none() {
            return Err(RuleError::ExcludeNoMatcher);
        }
        if let Some(comm) = self.comm.as_ref().filter(|c| c.len() > 15) {
            return Err(RuleError::ExcludeCommTooLong(comm.clone()));
        }
        let cmdline = self
            .cmdline
            .as_deref()
            .map(Regex::new)
            .transpose()
            .map_err(|e| RuleError::ExcludeBadRegex(e.to_string().replace('\n', " ")))?;
        Ok(Matcher {
            comm: self.comm.clone(),
            exe: self.exe.clone(),
            cmdline,
        })
    }
}

/// A validated, compiled worker rule.
#[derive(Clone, Debug)]
pub struct WorkerRule {
    pub group: String,
    matcher: Matcher,
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
            matcher: Matcher {
                comm: spec.comm.clone(),
                exe: spec.exe.clone(),
                cmdline,
            },
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
        self.matcher.matches(process)
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
    redis_exclusions: Vec<Matcher>,
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
            redis_exclusions: Vec::new(),
        })
    }

    /// Adds rules that keep matching Redis servers untracked.
    pub fn with_redis_exclusions(mut self, specs: &[ExcludeSpec]) -> Result<Self, RuleError> {
        self.redis_exclusions = specs
            .iter()
            .map(ExcludeSpec::compile)
            .collect::<Result<_, _>>()?;
        Ok(self)
    }

    /// What `process` is to the agent. `binary` says what its executable is; it is asked only
    /// for processes that [`looks_like_redis`] without the exact server names, and the caller
    /// caches it per binary.
    pub fn classify(
        &self,
        process: &ProcessInfo,
        binary: impl FnOnce() -> ServerBinary,
    ) -> Option<Classification> {
        if looks_like_redis(process) {
            // The exact names suffice, without reading the binary: a binary named redis-server
            // that lacks the functions (a build this agent does not know) is then tracked, and
            // its probe points reported missing rather than the process hidden.
            let named = SERVER_NAMES.contains(&process.comm.as_str())
                || process
                    .exe_name()
                    .is_some_and(|name| SERVER_NAMES.contains(&name));
            if named || binary() == ServerBinary::Server {
                match redis_role(process) {
                    RedisRole::ForkedChild => return None,
                    RedisRole::Server
                        if !self.redis_exclusions.iter().any(|m| m.matches(process)) =>
                    {
                        return Some(Classification::RedisServer)
                    }
                    // Excluded servers, checkers and Sentinel: worker rules may still match.
                    _ => {}
                }
            }
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

    /// An exec'd process (not forked-only), leading no session.
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
            session: 1,
            flags: 0x0040_0000,
        }
    }

    /// Classification when the binary cannot be read: by names only, as before binaries
    /// were examined.
    trait ByName {
        fn by_name(&self, p: &ProcessInfo) -> Option<Classification>;
    }
    impl ByName for RuleSet {
        fn by_name(&self, p: &ProcessInfo) -> Option<Classification> {
            self.classify(p, || ServerBinary::Unknown)
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
        assert_eq!(defaults().by_name(&p), Some(Classification::RedisServer));
    }

    #[test]
    fn valkey_and_renamed_comm_are_recognised_by_exe() {
        let p = process("valkey-server", None, "valkey-server *:6379");
        assert_eq!(defaults().by_name(&p), Some(Classification::RedisServer));
        let p = process("custom-title", Some("/opt/redis/bin/redis-server"), "x");
        assert_eq!(defaults().by_name(&p), Some(Classification::RedisServer));
    }

    #[test]
    fn redis_cli_and_benchmark_are_not_servers() {
        assert_eq!(
            defaults().by_name(&process(
                "redis-cli",
                Some("/usr/bin/redis-cli"),
                "redis-cli ping"
            )),
            None
        );
        assert_eq!(
            defaults().by_name(&process("redis-benchmark", None, "redis-benchmark -t get")),
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
        assert_eq!(rules.by_name(&started), sidekiq);
        let titled = process(
            "sidekiq",
            Some("/usr/bin/ruby3.1"),
            "sidekiq 6.4.1 app [0 of 5 busy]",
        );
        assert_eq!(rules.by_name(&titled), sidekiq);
        // An editor opening a file named after Sidekiq is not a worker.
        assert_eq!(
            rules.by_name(&process("vim", None, "vim sidekiq.yml")),
            None
        );
    }

    #[test]
    fn resque_rq_and_celery_defaults() {
        let rules = defaults();
        let group = |p: &ProcessInfo| rules.by_name(p).map(|c| c.group().to_string());
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
        assert_eq!(rules.by_name(&billing).unwrap().group(), "billing");
        let other = process("ruby", Some("/usr/bin/ruby3.1"), "ruby mailer.rb");
        assert_eq!(rules.by_name(&other).unwrap().group(), "any-ruby");
        let no_exe = process("ruby", None, "ruby mailer.rb");
        assert_eq!(rules.by_name(&no_exe), None);
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
                .by_name(&process("kworker/0:1", None, "")),
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

    fn forked(mut p: ProcessInfo, session_leader: bool) -> ProcessInfo {
        p.flags |= crate::proc_reader::PF_FORKNOEXEC;
        p.session = if session_leader { p.id.pid as i32 } else { 1 };
        p
    }

    const REDIS: Option<Classification> = Some(Classification::RedisServer);

    #[test]
    fn a_renamed_or_versioned_server_is_recognised_by_its_binary() {
        let rules = defaults();
        // `cp redis-check-rdb /tmp/x/redis-server-7.4.1`: comm is cut to 15 bytes.
        let copy = process(
            "redis-server-7.",
            Some("/tmp/x/redis-server-7.4.1"),
            "/tmp/x/redis-server-7.4.1 --port 7000",
        );
        assert_eq!(rules.classify(&copy, || ServerBinary::Server), REDIS);
        assert_eq!(rules.classify(&copy, || ServerBinary::Other), None);
        assert_eq!(
            rules.classify(&copy, || ServerBinary::Unknown),
            None,
            "without the binary, only the exact names count"
        );
        // A title that says redis-server on a binary named otherwise.
        let titled = process("kv-store", Some("/opt/kv/kv-store"), "redis-server *:6379");
        assert_eq!(rules.classify(&titled, || ServerBinary::Server), REDIS);
        let valkey = process(
            "valkey-server",
            Some("/usr/bin/valkey-server"),
            "valkey-server *:6379",
        );
        assert_eq!(rules.classify(&valkey, || ServerBinary::Server), REDIS);
        assert_eq!(rules.classify(&valkey, || ServerBinary::Unknown), REDIS);
    }

    #[test]
    fn the_exact_names_need_no_binary_read_and_are_not_hidden_by_one() {
        let rules = defaults();
        let debian = process(
            "redis-server",
            Some("/usr/bin/redis-check-rdb"),
            "redis-server 127.0.0.1:6379",
        );
        assert_eq!(rules.classify(&debian, || panic!("binary read")), REDIS);
        // A redis-server whose binary lacks Redis's functions (a build this agent does not
        // know): tracked, so that its missing probe points are reported.
        let unknown_build = process(
            "redis-server",
            Some("/tmp/redis-server"),
            "/tmp/redis-server 60",
        );
        assert_eq!(
            rules.classify(&unknown_build, || ServerBinary::Other),
            REDIS
        );
    }

    #[test]
    fn only_redis_looking_processes_have_their_binary_examined() {
        let rules = defaults();
        let sidekiq = process(
            "ruby",
            Some("/usr/bin/ruby3.1"),
            "ruby /usr/bin/sidekiq -r ./jobs.rb",
        );
        let class = rules.classify(&sidekiq, || panic!("binary examined"));
        assert_eq!(class.unwrap().group(), "sidekiq");
        assert!(looks_like_redis(&process("REDIS-x", None, "x")));
        assert!(looks_like_redis(&process("x", Some("/a/Valkey"), "x")));
        assert!(looks_like_redis(&process(
            "x",
            None,
            "/opt/kv/Redis-Server --port 1"
        )));
        // Directory names do not count.
        assert!(!looks_like_redis(&process(
            "kv",
            Some("/opt/redis/bin/kv"),
            "/opt/redis/bin/kv --port 1"
        )));
        assert!(!looks_like_redis(&process(
            "python3",
            None,
            "python3 app.py --redis-url redis://x"
        )));
    }

    #[test]
    fn checkers_and_tools_are_not_servers() {
        let rules = defaults();
        let debian = Some("/usr/bin/redis-check-rdb");
        // The same binary: the server under its symlink's name, a checker under its own.
        let server = process("redis-server", debian, "redis-server 127.0.0.1:6379");
        assert_eq!(rules.classify(&server, || ServerBinary::Server), REDIS);
        let checker = process(
            "redis-check-rdb",
            debian,
            "redis-check-rdb /var/lib/redis/dump.rdb",
        );
        assert_eq!(rules.classify(&checker, || ServerBinary::Server), None);
        // `make install` links redis-check-aof to redis-server: the exe's name says server.
        let aof = process(
            "redis-check-aof",
            Some("/usr/local/bin/redis-server"),
            "redis-check-aof --fix appendonly.aof",
        );
        assert_eq!(rules.classify(&aof, || ServerBinary::Server), None);
        assert_eq!(rules.classify(&aof, || ServerBinary::Unknown), None);
        let cli = process(
            "redis-cli",
            Some("/usr/bin/redis-cli"),
            "redis-cli -p 6379 monitor",
        );
        assert_eq!(rules.classify(&cli, || ServerBinary::Other), None);
        let bench = process(
            "redis-benchmark",
            Some("/usr/bin/redis-benchmark"),
            "redis-benchmark",
        );
        assert_eq!(rules.classify(&bench, || ServerBinary::Other), None);
    }

    #[test]
    fn sentinel_is_not_a_redis_server_but_worker_rules_may_track_it() {
        let rules = defaults();
        for (comm, title) in [
            ("redis-sentinel", "redis-sentinel *:26379 [sentinel]"),
            ("redis-server", "redis-server *:26379 [sentinel]"),
            (
                "redis-server",
                "redis-server /etc/redis/sentinel.conf --sentinel",
            ),
        ] {
            let p = process(comm, Some("/usr/bin/redis-check-rdb"), title);
            assert_eq!(redis_role(&p), RedisRole::Sentinel, "{title}");
            assert_eq!(rules.classify(&p, || ServerBinary::Server), None, "{title}");
        }
        let specs = vec![RuleSpec {
            group: "sentinel".into(),
            comm: Some("redis-sentinel".into()),
            ..Default::default()
        }];
        let p = process("redis-sentinel", None, "redis-sentinel *:26379 [sentinel]");
        let class = RuleSet::new(&specs)
            .unwrap()
            .classify(&p, || ServerBinary::Server);
        assert_eq!(class.unwrap().group(), "sentinel");
    }

    #[test]
    fn children_a_server_forks_are_not_servers_but_a_daemonized_server_is() {
        let rules = defaults();
        let exe = Some("/usr/bin/redis-check-rdb");
        for title in CHILD_TITLES {
            let child = forked(
                process("redis-server", exe, &format!("{title} 127.0.0.1:6379")),
                false,
            );
            assert_eq!(redis_role(&child), RedisRole::ForkedChild, "{title}");
            assert_eq!(
                rules.classify(&child, || ServerBinary::Server),
                None,
                "{title}"
            );
        }
        // A child read before it set its title, or under a proc-title-template that hides it:
        // forked without an exec, in its parent's session.
        let early = forked(
            process("redis-server", exe, "redis-server 127.0.0.1:6379"),
            false,
        );
        assert_eq!(rules.classify(&early, || ServerBinary::Server), None);
        // `--daemonize yes`: forked without an exec too, but it called setsid().
        let daemon = forked(
            process(
                "redis-server",
                exe,
                "redis-server --daemonize yes --port 7000",
            ),
            true,
        );
        assert_eq!(rules.classify(&daemon, || ServerBinary::Server), REDIS);
    }

    #[test]
    fn redis_exclusions_keep_matching_servers_untracked() {
        let excludes = vec![ExcludeSpec::parse_flag("exe=redis-server-7.4.1").unwrap()];
        let rules = defaults().with_redis_exclusions(&excludes).unwrap();
        let copy = process(
            "redis-server-7.",
            Some("/tmp/x/redis-server-7.4.1"),
            "/tmp/x/redis-server-7.4.1 *:7000",
        );
        assert_eq!(rules.classify(&copy, || ServerBinary::Server), None);
        let debian = process(
            "redis-server",
            Some("/usr/bin/redis-check-rdb"),
            "redis-server 127.0.0.1:6379",
        );
        assert_eq!(rules.classify(&debian, || ServerBinary::Server), REDIS);
        let by_port = ExcludeSpec {
            comm: Some("redis-server".into()),
            cmdline: Some(":6379\\b".into()),
            ..Default::default()
        };
        let rules = defaults().with_redis_exclusions(&[by_port]).unwrap();
        assert_eq!(rules.classify(&debian, || ServerBinary::Server), None);
    }

    #[test]
    fn invalid_redis_exclusions_are_rejected_with_their_reason() {
        let compile = |spec: ExcludeSpec| defaults().with_redis_exclusions(&[spec]).map(|_| ());
        assert_eq!(
            compile(ExcludeSpec::default()).unwrap_err().to_string(),
            "redis_exclude rule has no matcher: give at least one of comm, exe, cmdline"
        );
        let err = compile(ExcludeSpec {
            cmdline: Some("(".into()),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("redis_exclude rule: invalid cmdline regex:"),
            "{err}"
        );
        assert!(!err.contains('\n'), "{err}");
        assert!(matches!(
            compile(ExcludeSpec {
                comm: Some("redis-server-7.4.1".into()),
                ..Default::default()
            }),
            Err(RuleError::ExcludeCommTooLong(_))
        ));
        for bad in ["redis-server", "path=x", "group:comm=x"] {
            assert_eq!(
                ExcludeSpec::parse_flag(bad).unwrap_err().to_string(),
                format!("invalid --redis-exclude {bad:?}: expected comm=NAME, exe=NAME or cmdline=REGEX")
            );
        }
        assert_eq!(
            ExcludeSpec::parse_flag("cmdline=a=b")
                .unwrap()
                .cmdline
                .as_deref(),
            Some("a=b")
        );
    }

    #[test]
    fn server_binaries_are_told_by_their_symbols() {
        let set = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(
            ServerBinary::from_symbols(Some(&set(&["blockForKeys", "processCommand"]))),
            ServerBinary::Server
        );
        assert_eq!(
            ServerBinary::from_symbols(Some(&set(&["processCommand"]))),
            ServerBinary::Other
        );
        assert_eq!(
            ServerBinary::from_symbols(Some(&set(&[]))),
            ServerBinary::Other
        );
        assert_eq!(ServerBinary::from_symbols(None), ServerBinary::Unknown);
    }
}
