//! How Redis servers and workers are found: the listening port of a Redis picked up at exec,
//! a Redis that daemonizes (found from the kernel's fork event), children Redis forks (not
//! servers), children a worker forks (workers), a renamed copy of the Redis binary, and the
//! exclusion rule. Root only; run with `sudo cargo xtask test`.

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use integration_tests::{
    free_port, redis_server_command, require_root,
    resp::{Conn, Reply},
    wait_for, Agent, Proc, Redis,
};

/// The probe points of a Redis process as the agent reports them: (probe, state) pairs.
fn probe_points(agent: &Agent, pid: u32) -> Vec<(String, String)> {
    let pid = pid.to_string();
    agent
        .scrape()
        .find("fanout_probe_points", &[("process_pid", &pid)])
        .filter(|s| s.value == 1.0)
        .map(|s| (s.labels["probe"].clone(), s.labels["state"].clone()))
        .collect()
}

fn block_for_keys_state(agent: &Agent, pid: u32) -> Option<String> {
    probe_points(agent, pid)
        .into_iter()
        .find(|(probe, _)| probe == "blockForKeys")
        .map(|(_, state)| state)
}

/// Whether the agent exports per-thread CPU for `pid`, i.e. tracks it.
fn tracked(agent: &Agent, pid: u32) -> bool {
    agent
        .scrape()
        .find(
            "process_thread_cpu_time_seconds_total",
            &[("process_pid", &pid.to_string())],
        )
        .next()
        .is_some()
}

/// One BRPOP that times out after 0.1 s: a blocking call, which brings blockForKeys to `live`.
fn blocking_call(port: u16) {
    let mut conn = Conn::connect(port).expect("connect to Redis");
    let reply = conn.call(&["BRPOP", "fanout:discovery:nothing", "0.1"]);
    assert!(matches!(reply, Ok(ref r) if r.is_nil()), "{reply:?}");
}

fn ping(port: u16) -> bool {
    Conn::connect(port)
        .and_then(|mut c| c.call(&["PING"]))
        .is_ok_and(|r| matches!(r, Reply::Simple(ref s) if s == "PONG"))
}

/// (pid, ppid, comm) of every process, from /proc.
fn processes() -> Vec<(u32, u32, String)> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let (head, rest) = stat.rsplit_once(") ")?;
            let comm = head.split_once(" (")?.1.to_string();
            let ppid = rest.split_whitespace().nth(1)?.parse().ok()?;
            Some((pid, ppid, comm))
        })
        .collect()
}

/// A process the test did not spawn itself (a daemon): terminated on drop.
struct Daemon(u32);

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: signalling a process this test started (through redis-server's fork).
        unsafe { libc::kill(self.0 as i32, libc::SIGTERM) };
        let start = Instant::now();
        while Path::new(&format!("/proc/{}", self.0)).exists()
            && start.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Debian's redis-server is a symlink to redis-check-rdb: the file itself.
fn debian_redis_binary() -> PathBuf {
    std::fs::canonicalize("/usr/bin/redis-server")
        .expect("Debian's redis-server (cargo xtask setup installs it)")
}

/// A copy of the Redis binary under a versioned name, as someone might install it.
fn versioned_copy(dir: &Path) -> PathBuf {
    let copy = dir.join("redis-server-7.4.1");
    std::fs::copy(debian_redis_binary(), &copy).unwrap();
    copy
}

/// Starts `binary` as a Redis on a free loopback port, waiting until it answers.
fn start_redis_binary(binary: &Path, dir: &Path) -> (Proc, u16) {
    let port = free_port();
    let child = redis_server_command(binary, port, Some(dir))
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", binary.display()));
    let proc = Proc {
        child,
        name: "redis-server-copy".into(),
    };
    wait_for("the copy to answer PING", Duration::from_secs(10), || {
        ping(port).then_some(())
    });
    (proc, port)
}

#[test]
fn a_redis_started_after_the_agent_gets_its_port_and_address_on_every_series() {
    require_root();
    let agent = Agent::start(&["--rescan-interval", "600"]);
    // `-` as the last argument: Redis reads more configuration from stdin, until EOF, before
    // it binds its port or sets its title. Holding stdin open holds it there, as a Redis
    // picked up at exec is, deterministically.
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir.path())
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server");
    let stdin = child.stdin.take().unwrap();
    let redis = Proc {
        child,
        name: "redis-server".into(),
    };
    let pid = redis.pid().to_string();
    wait_for(
        "the Redis to be tracked before it listens",
        Duration::from_secs(2),
        || block_for_keys_state(&agent, redis.pid()),
    );
    let s = agent.scrape();
    let by_pid = [("process_pid", pid.as_str())];
    let points: Vec<_> = s.find("fanout_probe_points", &by_pid).collect();
    assert!(
        points.iter().all(|p| !p.labels.contains_key("server_port")),
        "no port before it listens: {points:?}"
    );
    // Let it go on: it binds its port.
    let released = Instant::now();
    drop(stdin);
    wait_for("the Redis to answer", Duration::from_secs(2), || {
        ping(port).then_some(())
    });
    blocking_call(port);
    let port = port.to_string();
    let elapsed = wait_for(
        "server_port and server_address on the Redis series",
        Duration::from_secs(2),
        || {
            let s = agent.scrape();
            let with = [
                ("process_pid", pid.as_str()),
                ("server_port", port.as_str()),
                ("server_address", "127.0.0.1"),
            ];
            let points = s.find("fanout_probe_points", &with).count();
            let keys = s.sum("redis_blocking_keys_count", &with);
            (points > 0 && keys >= 1.0).then(|| released.elapsed())
        },
    );
    eprintln!("port and address on the series {elapsed:?} after the Redis went on to listen");
    // And on all of them: none is left without.
    let s = agent.scrape();
    for name in ["fanout_probe_points", "redis_blocking_keys_count"] {
        for sample in s.find(name, &[("process_pid", &pid)]) {
            assert_eq!(
                sample.labels.get("server_port"),
                Some(&port),
                "{name} {:?}",
                sample.labels
            );
        }
    }
    assert!(agent.log().contains("Redis listening address found"));
}

#[test]
fn a_daemonized_redis_is_tracked_from_its_fork_within_2s() {
    require_root();
    // A rescan cannot be what finds it.
    let agent = Agent::start(&["--rescan-interval", "600"]);
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("redis.pid");
    let port = free_port();
    let started = Instant::now();
    // The parent execs redis-server, forks the server and exits at once.
    let status = Command::new("redis-server")
        .args(["--daemonize", "yes", "--port", &port.to_string()])
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--pidfile")
        .arg(&pidfile)
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("redis-server");
    assert!(status.success());
    let pid: u32 = wait_for("the pidfile", Duration::from_secs(5), || {
        std::fs::read_to_string(&pidfile).ok()?.trim().parse().ok()
    });
    let _daemon = Daemon(pid);
    let tracked_after = wait_for(
        "the daemonized Redis to be tracked with its probes",
        Duration::from_secs(2),
        || block_for_keys_state(&agent, pid).map(|_| started.elapsed()),
    );
    wait_for("the Redis to answer", Duration::from_secs(2), || {
        ping(port).then_some(())
    });
    blocking_call(port);
    let live_after = wait_for("blockForKeys to be live", Duration::from_secs(2), || {
        (block_for_keys_state(&agent, pid)? == "live").then(|| started.elapsed())
    });
    eprintln!(
        "daemonized Redis: tracked {tracked_after:?} after the start, probes live {live_after:?}"
    );
    assert!(
        live_after < Duration::from_millis(2500),
        "{live_after:?} (2 s plus the 0.1 s blocking call)"
    );
    let s = agent.scrape();
    assert!(
        s.find(
            "fanout_probe_points",
            &[
                ("process_pid", &pid.to_string()),
                ("server_port", &port.to_string())
            ]
        )
        .next()
        .is_some(),
        "its port"
    );
    assert!(
        agent.log().contains("forked processes to look at"),
        "found from the fork event"
    );
}

#[test]
fn a_bgsave_child_is_not_tracked_as_a_redis() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start(&["--dir", dir.path().to_str().unwrap()]);
    let agent = Agent::start(&["--rescan-interval", "600"]);
    wait_for("the Redis probes", Duration::from_secs(10), || {
        block_for_keys_state(&agent, redis.pid())
    });
    // 20 keys at 100 ms each: the child lives about 2 s.
    for i in 0..20 {
        redis.command(&["SET", &format!("fanout:bgsave:{i}"), "x"]);
    }
    redis.command(&["CONFIG", "SET", "rdb-key-save-delay", "100000"]);
    let tracked_before = agent
        .scrape()
        .sum("fanout_processes_tracked", &[("process_group", "redis")]);
    let reply = redis.command(&["BGSAVE"]);
    assert!(reply.starts_with("+Background saving started"), "{reply}");
    let child = wait_for("the BGSAVE child", Duration::from_secs(2), || {
        processes()
            .into_iter()
            .find(|(_, ppid, comm)| *ppid == redis.pid() && comm == "redis-server")
            .map(|(pid, _, _)| pid)
    });
    // Over most of its life: never tracked, and the Redis count does not move.
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        let s = agent.scrape();
        assert!(
            s.find(
                "process_thread_cpu_time_seconds_total",
                &[("process_pid", &child.to_string())]
            )
            .next()
            .is_none(),
            "the BGSAVE child {child} is tracked"
        );
        assert!(s
            .find(
                "fanout_probe_points",
                &[("process_pid", &child.to_string())]
            )
            .next()
            .is_none());
        assert_eq!(
            s.sum("fanout_processes_tracked", &[("process_group", "redis")]),
            tracked_before,
            "Redis servers tracked"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = agent.log();
    assert!(
        log.lines()
            .any(|l| l.contains("forked processes to look at") && l.contains(&child.to_string())),
        "the agent looked at the child from its fork event:\n{log}"
    );
    assert!(
        !log.contains(&format!("tracking process pid={child} ")),
        "{log}"
    );
    redis.command(&["CONFIG", "SET", "rdb-key-save-delay", "0"]);
}

/// A worker that forks a child without exec (as Resque does per job) when told to on stdin,
/// and prints the child's pid.
const FORKER: &str = r#"
import os, sys, time
sys.stdin.readline()
pid = os.fork()
if pid == 0:
    time.sleep(5)
    os._exit(0)
print(pid, flush=True)
time.sleep(6)
"#;

#[test]
fn a_child_a_worker_forks_is_tracked_from_its_fork_within_2s() {
    require_root();
    let agent = Agent::start(&[
        "--rescan-interval",
        "600",
        "--worker-rule",
        "forker:cmdline=fanout-fork-test",
    ]);
    let mut child = Command::new("python3")
        .args(["-c", FORKER, "fanout-fork-test"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3");
    let mut stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let parent = Proc {
        child,
        name: "forker".into(),
    };
    wait_for("the worker to be tracked", Duration::from_secs(2), || {
        tracked(&agent, parent.pid()).then_some(())
    });
    let forked_at = Instant::now();
    stdin.write_all(b"\n").unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let forked: u32 = line.trim().parse().expect("the child's pid");
    let _child = Daemon(forked);
    let elapsed = wait_for(
        "the forked child to be tracked",
        Duration::from_secs(2),
        || tracked(&agent, forked).then(|| forked_at.elapsed()),
    );
    eprintln!("forked worker child tracked {elapsed:?} after the fork");
    assert_eq!(
        agent
            .scrape()
            .sum("fanout_processes_tracked", &[("process_group", "forker")]),
        2.0
    );
    drop(parent);
}

#[test]
fn a_renamed_copy_of_redis_is_tracked_by_what_its_binary_is() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let copy = versioned_copy(dir.path());
    let agent = Agent::start(&["--rescan-interval", "600"]);
    // Its task name is "redis-server-7." (15 bytes), its exe "redis-server-7.4.1".
    let (redis, port) = start_redis_binary(&copy, dir.path());
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", redis.pid())).unwrap();
    assert_eq!(comm.trim(), "redis-server-7.");
    wait_for("the copy to be tracked", Duration::from_secs(2), || {
        block_for_keys_state(&agent, redis.pid())
    });
    blocking_call(port);
    wait_for("blockForKeys to be live", Duration::from_secs(2), || {
        (block_for_keys_state(&agent, redis.pid())? == "live").then_some(())
    });
    let s = agent.scrape();
    let exe = s.label_values(
        "process_thread_cpu_time_seconds_total",
        &[("process_pid", &redis.pid().to_string())],
        "process_group",
    );
    assert_eq!(
        exe.into_iter().collect::<Vec<_>>(),
        vec!["redis".to_string()]
    );
}

#[test]
fn a_redis_exclusion_rule_keeps_a_server_untracked() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let copy = versioned_copy(dir.path());
    let (excluded, _) = start_redis_binary(&copy, dir.path());
    let control = Redis::start(&[]);
    let agent = Agent::start(&[
        "--rescan-interval",
        "600",
        "--redis-exclude",
        "exe=redis-server-7.4.1",
    ]);
    // Started after the agent too: the exec path applies the rule as well.
    let (excluded_later, _) = start_redis_binary(&copy, dir.path());
    wait_for(
        "the other Redis to be tracked",
        Duration::from_secs(5),
        || block_for_keys_state(&agent, control.pid()),
    );
    std::thread::sleep(Duration::from_millis(500));
    for pid in [excluded.pid(), excluded_later.pid()] {
        assert!(!tracked(&agent, pid), "excluded Redis {pid} is tracked");
        assert!(probe_points(&agent, pid).is_empty());
    }
}

/// A redis-server started on a port another server holds, left unreaped: it exits at once
/// and stays a zombie while its parent does not wait for it. Started through Debian's
/// `redis-server` link, so that the zombie's name is `redis-server` (as the file's own name,
/// `redis-check-rdb`, it would pass for the checker).
fn start_zombie_redis(port: u16, dir: &Path) -> Proc {
    let child = redis_server_command(Path::new("/usr/bin/redis-server"), port, Some(dir))
        .spawn()
        .unwrap();
    let pid = child.id();
    wait_for(
        "the second server on a taken port to exit",
        Duration::from_secs(10),
        || {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            stat.rsplit_once(") ")?.1.starts_with('Z').then_some(())
        },
    );
    Proc {
        child,
        name: "redis-server on a taken port".into(),
    }
}

#[test]
fn a_redis_that_exited_and_awaits_its_reaping_is_not_tracked() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let control = Redis::start(&[]);
    // One exits before the agent starts (its first scan meets it), one after (its exec event
    // and each rescan meet it).
    let before = start_zombie_redis(control.port, dir.path());
    let agent = Agent::start(&["--rescan-interval", "1"]);
    let after = start_zombie_redis(control.port, dir.path());
    wait_for("the live Redis probed", Duration::from_secs(10), || {
        (block_for_keys_state(&agent, control.pid())? == "idle").then_some(())
    });
    // Past two rescans.
    std::thread::sleep(Duration::from_millis(2500));
    for zombie in [&before, &after] {
        let pid = zombie.pid();
        assert!(!tracked(&agent, pid), "exited Redis {pid} is tracked");
        assert_eq!(
            probe_points(&agent, pid),
            Vec::<(String, String)>::new(),
            "exited Redis {pid} is reported"
        );
    }
    assert!(tracked(&agent, control.pid()));
}

#[test]
fn an_invalid_redis_exclusion_is_a_one_line_error_with_exit_code_2() {
    require_root();
    let out = Command::new(integration_tests::fanout_bin())
        .args(["run", "--redis-exclude", "port=6379"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.trim_end(),
        "fanout: error: invalid --redis-exclude \"port=6379\": expected comm=NAME, exe=NAME or cmdline=REGEX"
    );
}
