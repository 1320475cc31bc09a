//! Redis-side blocking probes, driven by real clients, against every Redis build of the version
//! matrix (`RedisBuild`: Redis 6.2, 7.0, 7.2, 7.4, 8.2, Valkey 8.1 and 9.1). Each scenario is a
//! function of the build, and `per_build!` makes one test of it per build, named
//! `<scenario>::v6_2` ... `<scenario>::v8_2`, `<scenario>::valkey8_1`, `<scenario>::valkey9_1`.
//! A build that is not installed fails its tests, saying how to install it. The tests about
//! Debian's 7.0 binary itself (its probe sites, a copy of it in a namespace) and the fake binary
//! run once. Root only; run with `sudo cargo xtask test`.
//!
//! Every command used exists in Redis 6.2: BLMOVE (6.2.0), decimal timeouts (6.0), XREAD BLOCK,
//! CLIENT ID and CLIENT UNBLOCK (5.0). BLMPOP and BZMPOP (7.0) are not used.

use std::{
    collections::BTreeSet,
    thread,
    time::{Duration, Instant},
};

use fanout::{ebpf::uprobe_multi::resolve_file_offsets, redis::binary::RedisBinary};
use integration_tests::{
    bpftool::{entry_bytes, map_dump, u32_at, u64_at},
    mapped_byte,
    prom::Scrape,
    require_root,
    resp::{Conn, Reply},
    wait_for, Agent, Proc, Redis, RedisBuild,
};

/// One `#[test]` per build for each scenario `fn scenario(build: RedisBuild)`, in a module of
/// the scenario's name: `cargo xtask test v7_4` (or `valkey9_1`) runs one build, `cargo xtask
/// test scenario` one scenario.
macro_rules! per_build {
    ($($scenario:ident),+ $(,)?) => {$(
        mod $scenario {
            use integration_tests::RedisBuild;

            #[test]
            fn v6_2() {
                super::$scenario(RedisBuild::V6_2)
            }

            #[test]
            fn v7_0() {
                super::$scenario(RedisBuild::V7_0)
            }

            #[test]
            fn v7_2() {
                super::$scenario(RedisBuild::V7_2)
            }

            #[test]
            fn v7_4() {
                super::$scenario(RedisBuild::V7_4)
            }

            #[test]
            fn v8_2() {
                super::$scenario(RedisBuild::V8_2)
            }

            #[test]
            fn valkey8_1() {
                super::$scenario(RedisBuild::Valkey8_1)
            }

            #[test]
            fn valkey9_1() {
                super::$scenario(RedisBuild::Valkey9_1)
            }
        }
    )+};
}

per_build!(
    fanout_and_outcomes_of_brpop_with_1_5_and_440_keys_are_counted_exactly,
    ordinary_traffic_never_hits_a_probe_and_one_served_pop_hits_each,
    blocking_durations_match_what_the_client_saw,
    disconnects_and_client_unblock_are_other_not_timeouts,
    every_outcome_is_counted_and_the_gauges_follow_each_block_back_to_zero,
    blmove_bzpopmin_and_xread_are_counted_by_block_type,
    two_redis_servers_get_separate_series,
    attaching_detaching_and_restarting_the_agent_never_disturbs_redis_clients,
    with_io_threads_forty_clients_at_once_are_counted_exactly,
    a_client_that_blocks_again_reuses_its_entry_until_it_stays_away,
);

const KEYS: &str = "redis_blocking_keys";
const DURATION: &str = "redis_blocking_duration_seconds";

fn bucket(s: &Scrape, name: &str, pid: &str, extra: &[(&str, &str)], le: &str) -> f64 {
    let mut m = vec![("process_pid", pid), ("le", le)];
    m.extend_from_slice(extra);
    s.sum(&format!("{name}_bucket"), &m)
}

fn count(s: &Scrape, name: &str, pid: &str, extra: &[(&str, &str)]) -> f64 {
    let mut m = vec![("process_pid", pid)];
    m.extend_from_slice(extra);
    s.sum(&format!("{name}_count"), &m)
}

fn sum(s: &Scrape, name: &str, pid: &str, extra: &[(&str, &str)]) -> f64 {
    let mut m = vec![("process_pid", pid)];
    m.extend_from_slice(extra);
    s.sum(&format!("{name}_sum"), &m)
}

/// `redis_blocking_phases_total` of one phase, of one timing or of both.
fn phases(s: &Scrape, pid: &str, phase: &str, timing: Option<&str>) -> f64 {
    let mut m = vec![("process_pid", pid), ("redis_blocking_phase", phase)];
    if let Some(timing) = timing {
        m.push(("timing", timing));
    }
    s.sum("redis_blocking_phases_total", &m)
}

/// Runs `n` blocking calls in parallel, each on its own connection, and returns their replies.
fn parallel(port: u16, calls: Vec<Vec<String>>) -> Vec<Reply> {
    let handles: Vec<_> = calls
        .into_iter()
        .map(|args| {
            thread::spawn(move || {
                let mut conn = Conn::connect(port).unwrap();
                let refs: Vec<&str> = args.iter().map(String::as_str).collect();
                conn.call(&refs).unwrap()
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn brpop(keys: &[String], timeout: &str) -> Vec<String> {
    let mut args = vec!["BRPOP".to_string()];
    args.extend(keys.iter().cloned());
    args.push(timeout.into());
    args
}

/// `blocked_clients` of Redis's `INFO clients`.
fn blocked_clients_in(redis: &Redis) -> Option<usize> {
    redis
        .command(&["INFO", "clients"])
        .lines()
        .find_map(|l| l.strip_prefix("blocked_clients:"))
        .and_then(|v| v.trim().parse().ok())
}

fn keys(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}:{i}")).collect()
}

/// Asserts that the probe points of `pid` in `state` are exactly `expected`, one series each.
fn assert_points(s: &Scrape, pid: &str, state: &str, expected: &[&str]) {
    let all: Vec<_> = s
        .find("fanout_probe_points", &[("process_pid", pid)])
        .filter(|p| p.value == 1.0)
        .map(|p| format!("{}={}", p.labels["probe"], p.labels["state"]))
        .collect();
    for probe in expected {
        assert_eq!(
            s.sum(
                "fanout_probe_points",
                &[("process_pid", pid), ("probe", probe), ("state", state)]
            ),
            1.0,
            "{probe} {state}; the points: {all:?}"
        );
    }
    assert_eq!(
        s.label_values(
            "fanout_probe_points",
            &[("process_pid", pid), ("state", state)],
            "probe"
        ),
        expected
            .iter()
            .map(|p| p.to_string())
            .collect::<BTreeSet<_>>(),
        "exactly these points {state}; the points: {all:?}"
    );
}

fn start(build: RedisBuild) -> (Redis, Agent, String) {
    start_with(build, &[])
}

/// `start`, with more arguments for redis-server.
fn start_with(build: RedisBuild, extra: &[&str]) -> (Redis, Agent, String) {
    let redis = Redis::start_build(build, extra);
    let agent = Agent::start(&[]);
    let pid = redis.pid().to_string();
    wait_for_probes(&agent, &pid);
    (redis, agent, pid)
}

fn wait_for_probes(agent: &Agent, pid: &str) {
    wait_for(
        "the Redis probes to be attached",
        Duration::from_secs(10),
        || {
            let s = agent.scrape();
            (s.find(
                "fanout_probe_points",
                &[("process_pid", pid), ("probe", "blockForKeys")],
            )
            .count()
                == 1)
                .then_some(())
        },
    );
}

fn fanout_and_outcomes_of_brpop_with_1_5_and_440_keys_are_counted_exactly(build: RedisBuild) {
    require_root();
    let (redis, agent, pid) = start(build);
    let port = redis.port;

    // 10 calls on 1 key and 10 on 5 keys, all timing out.
    let replies = parallel(
        port,
        (0..10)
            .map(|i| brpop(&keys(&format!("one{i}"), 1), "0.1"))
            .collect(),
    );
    assert!(replies.iter().all(Reply::is_nil));
    let replies = parallel(
        port,
        (0..10)
            .map(|i| brpop(&keys(&format!("five{i}"), 5), "0.1"))
            .collect(),
    );
    assert!(replies.iter().all(Reply::is_nil));

    // 5 clients blocked on 440 keys each (a distinct first key, 439 shared), then served.
    let shared = keys("shared", 439);
    let blocked: Vec<_> = (0..5)
        .map(|i| {
            let mut k = vec![format!("served{i}")];
            k.extend(shared.iter().cloned());
            let args = brpop(&k, "0");
            thread::spawn(move || {
                let mut conn = Conn::connect(port).unwrap();
                let refs: Vec<&str> = args.iter().map(String::as_str).collect();
                let t = Instant::now();
                let reply = conn.call(&refs).unwrap();
                (reply, t.elapsed())
            })
        })
        .collect();
    // While they wait, the gauges show 5 clients holding 5 x 440 registrations.
    let s = wait_for("5 blocked clients", Duration::from_secs(5), || {
        let s = agent.scrape();
        (s.sum("redis_clients_blocked", &[("process_pid", &pid)]) == 5.0).then_some(s)
    });
    assert_eq!(
        s.sum("redis_blocking_registrations", &[("process_pid", &pid)]),
        2200.0
    );
    thread::sleep(Duration::from_millis(200));
    for i in 0..5 {
        assert_eq!(
            redis.command(&["LPUSH", &format!("served{i}"), "job"]),
            ":1\r\n"
        );
    }
    for h in blocked {
        let (reply, waited) = h.join().unwrap();
        assert!(matches!(reply, Reply::Array(Some(_))), "{reply:?}");
        assert!(waited >= Duration::from_millis(200));
    }

    let s = agent.scrape();
    let list = [("redis_block_type", "list")];
    // Cumulative buckets: 10 calls <= 1 key, 20 <= 5, 25 <= 500.
    assert_eq!(bucket(&s, KEYS, &pid, &list, "1"), 10.0);
    assert_eq!(bucket(&s, KEYS, &pid, &list, "2"), 10.0);
    assert_eq!(bucket(&s, KEYS, &pid, &list, "5"), 20.0);
    assert_eq!(bucket(&s, KEYS, &pid, &list, "200"), 20.0);
    assert_eq!(bucket(&s, KEYS, &pid, &list, "500"), 25.0);
    assert_eq!(bucket(&s, KEYS, &pid, &list, "+Inf"), 25.0);
    assert_eq!(count(&s, KEYS, &pid, &list), 25.0);
    assert_eq!(sum(&s, KEYS, &pid, &list), (10 + 50 + 5 * 440) as f64);

    assert_eq!(count(&s, DURATION, &pid, &[("outcome", "timeout")]), 20.0);
    assert_eq!(count(&s, DURATION, &pid, &[("outcome", "served")]), 5.0);
    assert_eq!(count(&s, DURATION, &pid, &[("outcome", "other")]), 0.0);
    // Timeouts of 0.1 s fire on Redis's 100 ms cron: between 0.1 and 0.25 s each.
    let mean_timeout = sum(&s, DURATION, &pid, &[("outcome", "timeout")]) / 20.0;
    assert!(
        (0.1..0.25).contains(&mean_timeout),
        "mean timeout {mean_timeout}"
    );
    // The served clients waited at least the 200 ms pause.
    assert!(sum(&s, DURATION, &pid, &[("outcome", "served")]) / 5.0 >= 0.2);

    assert_eq!(
        s.sum("redis_clients_blocked", &[("process_pid", &pid)]),
        0.0
    );
    assert_eq!(
        s.sum("redis_blocking_registrations", &[("process_pid", &pid)]),
        0.0
    );
    let register = s.sum(
        "redis_blocking_cpu_time_seconds_total",
        &[("process_pid", &pid), ("redis_blocking_phase", "register")],
    );
    let unregister = s.sum(
        "redis_blocking_cpu_time_seconds_total",
        &[
            ("process_pid", &pid),
            ("redis_blocking_phase", "unregister"),
        ],
    );
    assert!(
        register > 0.0 && unregister > 0.0,
        "register {register}, unregister {unregister}"
    );
    // Every phase of the 25 calls is counted, timed on its CPU or at the mean.
    for phase in ["register", "unregister"] {
        assert_eq!(phases(&s, &pid, phase, None), 25.0, "{phase}");
    }
    // Timeouts and serves hit every point this build has.
    assert_points(&s, &pid, "live", build.probe_points());
}

fn ordinary_traffic_never_hits_a_probe_and_one_served_pop_hits_each(build: RedisBuild) {
    require_root();
    let (redis, agent, pid) = start(build);
    let mut conn = Conn::connect(redis.port).unwrap();
    for i in 0..2000 {
        let key = format!("plain{}", i % 10);
        conn.call(&["SET", &key, "v"]).unwrap();
        conn.call(&["GET", &key]).unwrap();
        conn.call(&["LPUSH", "nobody-waits", "x"]).unwrap();
    }
    // Every event-loop iteration of Redis 7.0 calls handleClientsBlockedOnKeys; the serving
    // window (up to 7.0) is probed on the serve functions instead, so none of these reached a
    // probe.
    let s = agent.scrape();
    assert_points(&s, &pid, "idle", build.probe_points());
    // One served pop hits every point but the timeout's; up to 7.0 it opens the serving window
    // (through the split body Redis calls directly, where GCC split the serve function).
    let waiter = thread::spawn(move || {
        Conn::connect(redis.port)
            .unwrap()
            .call(&["BRPOP", "jobs", "5"])
            .unwrap()
    });
    wait_for("the client to block", Duration::from_secs(5), || {
        (agent
            .scrape()
            .sum("redis_clients_blocked", &[("process_pid", &pid)])
            == 1.0)
            .then_some(())
    });
    conn.call(&["LPUSH", "jobs", "job"]).unwrap();
    assert!(matches!(waiter.join().unwrap(), Reply::Array(Some(_))));
    let s = agent.scrape();
    let served: Vec<&str> = build
        .probe_points()
        .iter()
        .copied()
        .filter(|p| *p != "replyToBlockedClientTimedOut")
        .collect();
    assert_points(&s, &pid, "live", &served);
    assert_eq!(count(&s, DURATION, &pid, &[("outcome", "served")]), 1.0);
}

/// Pins every thread of the process `pid` to CPU 0.
fn pin_to_cpu0(pid: &str) {
    let pin = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", "0", pid])
        .output()
        .expect("run taskset");
    assert!(pin.status.success(), "taskset: {pin:?}");
}

/// A shell loop spinning on CPU 0, settled in; stopped and reaped on drop, so a failed call
/// leaves no loop spinning.
fn busy_loop_on_cpu0() -> Proc {
    let busy_loop = Proc {
        child: std::process::Command::new("taskset")
            .args(["-c", "0", "sh", "-c", "while :; do :; done"])
            .spawn()
            .expect("start a busy loop"),
        name: "busy loop".into(),
    };
    thread::sleep(Duration::from_millis(200));
    busy_loop
}

/// Keys of the calls beside a busy loop: phases of about 10 ms, longer than the slice a woken
/// Redis gets before the loop's turn (with 10000 keys, 2.5 ms, the loop preempted none of them
/// in two runs of five).
const WIDE_KEYS: usize = 40_000;

/// `n` BRPOPs of `WIDE_KEYS` keys that time out, one after the other.
fn wide_calls(port: u16, n: usize) {
    let wide = keys("wide", WIDE_KEYS);
    let mut conn = Conn::connect(port).unwrap();
    for _ in 0..n {
        let args = brpop(&wide, "0.01");
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        assert!(conn.call(&refs).unwrap().is_nil());
    }
}

fn cpu_time(s: &Scrape, pid: &str) -> f64 {
    s.sum(
        "redis_blocking_cpu_time_seconds_total",
        &[("process_pid", pid)],
    )
}

/// A bookkeeping phase in which Redis's main thread is switched out is not timed by its wall
/// time, which is mostly another task's: it counts at the mean of the phases with as many
/// keys. Redis shares one CPU with a busy loop for the second half: its 40000-key phases
/// (milliseconds each) are then preempted, and would take about twice as long by the clock.
#[test]
fn a_phase_in_which_the_main_thread_was_switched_out_counts_at_the_mean() {
    require_root();
    let (redis, agent, pid) = start(RedisBuild::V7_0);
    pin_to_cpu0(&pid);
    let calls = |n: usize| wide_calls(redis.port, n);
    let time = |s: &Scrape| cpu_time(s, &pid);

    // Alone on its CPU, but for whatever else wakes up there (the agent, this test, kernel
    // threads): some phases leave it even so, but not all.
    calls(8);
    let quiet = agent.scrape();
    let quiet_on_cpu = phases(&quiet, &pid, "register", Some("on_cpu"))
        + phases(&quiet, &pid, "unregister", Some("on_cpu"));
    assert_eq!(phases(&quiet, &pid, "register", None), 8.0);
    assert_eq!(phases(&quiet, &pid, "unregister", None), 8.0);
    assert!(
        quiet_on_cpu >= 2.0,
        "phases ran alone: {quiet_on_cpu} of 16"
    );
    // Per call, over the phases that added time: a phase switched out before any was timed
    // adds none (`untimed`).
    let quiet_untimed = phases(&quiet, &pid, "register", Some("untimed"))
        + phases(&quiet, &pid, "unregister", Some("untimed"));
    let quiet_per_call = time(&quiet) / (16.0 - quiet_untimed) * 2.0;

    let busy_loop = busy_loop_on_cpu0();
    calls(4);
    drop(busy_loop);
    let busy = agent.scrape();
    for phase in ["register", "unregister"] {
        assert_eq!(phases(&busy, &pid, phase, None), 12.0, "{phase}");
        assert_eq!(
            phases(&busy, &pid, phase, Some("untimed")),
            phases(&quiet, &pid, phase, Some("untimed")),
            "{phase}: phases were timed before the busy part"
        );
    }
    // The busy part's phases that left the CPU (counted at the mean; `untimed` only before
    // any phase was timed, which the quiet part's on-CPU phases rule out here).
    let busy_on_cpu = phases(&busy, &pid, "register", Some("on_cpu"))
        + phases(&busy, &pid, "unregister", Some("on_cpu"))
        - quiet_on_cpu;
    let switched_out = 8.0 - busy_on_cpu;
    assert!(
        switched_out >= 1.0,
        "no phase of {WIDE_KEYS} keys was switched out beside a busy loop on its CPU (a kernel that \
         does not count arrivals on a CPU cannot tell)"
    );
    // By the clock each preempted phase would take about twice as long; at the mean it does
    // not move.
    let busy_per_call = (time(&busy) - time(&quiet)) / 4.0;
    eprintln!(
        "{quiet_per_call:.6} s per call alone ({quiet_on_cpu} of 16 phases on their CPU), \
         {busy_per_call:.6} s beside the busy loop ({switched_out} of 8 switched out)"
    );
    assert!(
        busy_per_call < 1.5 * quiet_per_call,
        "{busy_per_call:.6} s per call beside the busy loop against {quiet_per_call:.6} s alone \
         ({switched_out} phases switched out)"
    );
}

/// Redis's first blocking calls, on a CPU a busy loop holds (its workers starting, on a busy
/// node): a phase switched out before any phase was timed has no mean to count at. It adds no
/// time and is counted as `untimed`; taken by the clock, it would put milliseconds of another
/// task's time on the totals and become the mean later switched-out phases count at.
#[test]
fn a_phase_switched_out_before_any_was_timed_adds_no_time() {
    require_root();
    let agent = Agent::start(&[]);
    let by = |s: &Scrape, pid: &str, timing: &str| {
        phases(s, pid, "register", Some(timing)) + phases(s, pid, "unregister", Some(timing))
    };
    // The scheduler may let the first phases run whole (a woken Redis preempts the loop with
    // time to spare): then there is nothing to check, and a fresh Redis tries again.
    const ATTEMPTS: usize = 5;
    let (redis, pid, busy) = (1..=ATTEMPTS)
        .find_map(|attempt| {
            let redis = Redis::start_build(RedisBuild::V7_0, &[]);
            let pid = redis.pid().to_string();
            wait_for_probes(&agent, &pid);
            pin_to_cpu0(&pid);
            let busy_loop = busy_loop_on_cpu0();
            wide_calls(redis.port, 4);
            drop(busy_loop);
            let busy = agent.scrape();
            let untimed = by(&busy, &pid, "untimed");
            eprintln!("attempt {attempt}: {untimed} of 8 phases untimed");
            (untimed >= 1.0).then_some((redis, pid, busy))
        })
        .unwrap_or_else(|| {
            panic!(
                "in {ATTEMPTS} fresh Redis processes beside a busy loop on their CPU, the first \
                 phases of {WIDE_KEYS} keys were never switched out: nothing to check"
            )
        });
    let (untimed, on_cpu) = (by(&busy, &pid, "untimed"), by(&busy, &pid, "on_cpu"));
    assert_eq!(on_cpu + by(&busy, &pid, "switched_out") + untimed, 8.0);
    // Alone on the CPU now, the same calls, for what a phase costs.
    wide_calls(redis.port, 8);
    let quiet = agent.scrape();
    // A kind none of whose phases was timed yet may leave more untimed now.
    let timed_busy = 8.0 - untimed;
    let timed_quiet = 16.0 - (by(&quiet, &pid, "untimed") - untimed);
    let per_phase_quiet = (cpu_time(&quiet, &pid) - cpu_time(&busy, &pid)) / timed_quiet;
    let per_phase_busy = cpu_time(&busy, &pid) / timed_busy.max(1.0);
    eprintln!(
        "beside the busy loop: {untimed} of 8 phases untimed, {on_cpu} on their CPU, \
         {per_phase_busy:.6} s per timed phase; alone: {per_phase_quiet:.6} s per phase"
    );
    if timed_busy == 0.0 {
        assert_eq!(cpu_time(&busy, &pid), 0.0, "untimed phases add no time");
    } else {
        assert!(
            per_phase_busy < 1.5 * per_phase_quiet,
            "{per_phase_busy:.6} s per timed phase beside the busy loop against \
             {per_phase_quiet:.6} s alone: a switched-out phase's wall time was taken"
        );
    }
}

/// On a kernel that keeps no per-task counters (or whose BTF does not say where), the probes
/// cannot tell a phase that was switched out: every phase is timed by the clock and counted
/// as such, and the bookkeeping time is still exported.
#[test]
fn without_the_kernels_task_counters_every_phase_is_timed_by_the_clock() {
    require_root();
    let redis = Redis::start_build(RedisBuild::V7_0, &[]);
    let agent = Agent::start_with_env(&[], &[("FANOUT_KERNEL_COUNTERS", "absent")]);
    let pid = redis.pid().to_string();
    wait_for_probes(&agent, &pid);
    let mut conn = Conn::connect(redis.port).unwrap();
    let five = keys("clock", 5);
    for _ in 0..10 {
        let args = brpop(&five, "0.01");
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        assert!(conn.call(&refs).unwrap().is_nil());
    }
    let s = wait_for("10 unregister phases", Duration::from_secs(5), || {
        let s = agent.scrape();
        (phases(&s, &pid, "unregister", None) == 10.0).then_some(s)
    });
    for phase in ["register", "unregister"] {
        assert_eq!(phases(&s, &pid, phase, Some("wall_clock")), 10.0, "{phase}");
        assert_eq!(phases(&s, &pid, phase, None), 10.0, "{phase}");
    }
    let time = s.sum(
        "redis_blocking_cpu_time_seconds_total",
        &[("process_pid", &pid)],
    );
    assert!(
        time > 0.0 && time < 0.01,
        "bookkeeping of 20 phases: {time} s"
    );
    // The scheduler programs fell back to the clock as well.
    let log = agent.log();
    assert!(
        log.contains("timing threads with sched_switch and sched_wakeup instead"),
        "{log}"
    );
}

#[test]
fn probes_on_debians_redis_go_on_emulated_instructions_and_into_split_bodies() {
    // Reads the binary only: no root needed, but it is Debian's 7.0.15 build these numbers
    // describe (see README, "How it works").
    let path = std::fs::canonicalize("/usr/bin/redis-server")
        .expect("redis-server is installed by cargo xtask setup");
    let binary = fanout::redis::binary::RedisBinary::inspect(&path).unwrap();
    for symbol in [
        "blockForKeys",
        "unblockClient",
        "replyToBlockedClientTimedOut",
        "handleClientsBlockedOnKeys",
    ] {
        assert!(
            binary.site(symbol).emulated,
            "{symbol}: {:?}",
            binary.site(symbol)
        );
    }
    // handleClientsBlockedOnKeys starts with a RIP-relative load: the probe moves past it.
    assert!(binary.site("handleClientsBlockedOnKeys").offset > 0);
    for symbol in [
        "serveClientsBlockedOnListKey",
        "serveClientsBlockedOnSortedSetKey",
        "serveClientsBlockedOnStreamKey",
    ] {
        let body = binary
            .split_body(symbol)
            .unwrap_or_else(|| panic!("{symbol} is a wrapper around a split body"));
        assert!(body.site.emulated, "{symbol}'s body: {body:?}");
    }
    assert!(
        binary.split_body("blockForKeys").is_none(),
        "a whole function has no split body"
    );
}

fn blocking_durations_match_what_the_client_saw(build: RedisBuild) {
    require_root();
    let (redis, agent, pid) = start(build);
    // A 1 s timeout: Redis checks timeouts on its 10 Hz cron, so 1.0 to 1.1 s, plus scheduling.
    let mut conn = Conn::connect(redis.port).unwrap();
    let t = Instant::now();
    assert!(conn.call(&["BRPOP", "nothing", "1"]).unwrap().is_nil());
    let client_saw = t.elapsed().as_secs_f64();
    // Served after 300 ms.
    let port = redis.port;
    let waiter = thread::spawn(move || {
        let mut c = Conn::connect(port).unwrap();
        let t = Instant::now();
        let r = c.call(&["BLPOP", "later", "5"]).unwrap();
        (r, t.elapsed().as_secs_f64())
    });
    wait_for("the waiter to block", Duration::from_secs(5), || {
        (agent
            .scrape()
            .sum("redis_clients_blocked", &[("process_pid", &pid)])
            == 1.0)
            .then_some(())
    });
    thread::sleep(Duration::from_millis(300));
    redis.command(&["RPUSH", "later", "x"]);
    let (reply, served_client) = waiter.join().unwrap();
    assert!(!reply.is_nil());

    let s = agent.scrape();
    let timeout = sum(&s, DURATION, &pid, &[("outcome", "timeout")]);
    eprintln!("timeout: Redis-side {timeout:.4} s, client {client_saw:.4} s");
    assert!((1.0..1.15).contains(&timeout), "{timeout}");
    // The Redis side is inside the client's round trip, within a few ms of it.
    assert!(
        timeout <= client_saw && client_saw - timeout < 0.02,
        "redis {timeout}, client {client_saw}"
    );
    let served = sum(&s, DURATION, &pid, &[("outcome", "served")]);
    eprintln!("served: Redis-side {served:.4} s, client {served_client:.4} s");
    assert!(
        served >= 0.3 && served <= served_client,
        "redis {served}, client {served_client}"
    );
    // One 1 s timeout lands in the bucket bounded by 2^30 ns (1.07 s) or the next one.
    assert_eq!(
        bucket(&s, DURATION, &pid, &[("outcome", "timeout")], "0.536870912"),
        0.0
    );
    assert_eq!(
        bucket(&s, DURATION, &pid, &[("outcome", "timeout")], "2.147483648"),
        1.0
    );
}

fn disconnects_and_client_unblock_are_other_not_timeouts(build: RedisBuild) {
    require_root();
    let (redis, agent, pid) = start(build);
    let blocked = |agent: &Agent, n: f64| {
        wait_for("clients to block", Duration::from_secs(5), || {
            (agent
                .scrape()
                .sum("redis_clients_blocked", &[("process_pid", &pid)])
                == n)
                .then_some(())
        })
    };
    // A client that disconnects while blocked.
    let mut gone = Conn::connect(redis.port).unwrap();
    gone.send(&["BLPOP", "never", "0"]).unwrap();
    blocked(&agent, 1.0);
    gone.shutdown();
    blocked(&agent, 0.0);

    // CLIENT UNBLOCK (timeout reply, long before the deadline) and CLIENT UNBLOCK ERROR.
    for mode in ["TIMEOUT", "ERROR"] {
        let mut c = Conn::connect(redis.port).unwrap();
        let id = c.id();
        c.send(&["BRPOP", "never", "30"]).unwrap();
        blocked(&agent, 1.0);
        assert_eq!(
            redis.command(&["CLIENT", "UNBLOCK", &id.to_string(), mode]),
            ":1\r\n"
        );
        let reply = c.read().unwrap();
        if mode == "TIMEOUT" {
            assert!(reply.is_nil(), "{reply:?}");
        } else {
            assert!(
                matches!(reply, Reply::Error(ref e) if e.starts_with("UNBLOCKED")),
                "{reply:?}"
            );
        }
    }
    let s = agent.scrape();
    assert_eq!(count(&s, DURATION, &pid, &[("outcome", "other")]), 3.0);
    assert_eq!(count(&s, DURATION, &pid, &[("outcome", "timeout")]), 0.0);
    assert_eq!(count(&s, DURATION, &pid, &[("outcome", "served")]), 0.0);
    assert_eq!(count(&s, KEYS, &pid, &[]), 3.0);
}

/// Every way a block ends (served, timeout, disconnect, CLIENT UNBLOCK TIMEOUT and ERROR), with
/// all five clients blocked at once on NUMKEYS keys each (some shared): the gauges read exactly
/// clients and NUMKEYS x clients while they wait, lose exactly one client's worth at each end,
/// and are back at exactly 0 after every round and after a pause (no drift).
fn every_outcome_is_counted_and_the_gauges_follow_each_block_back_to_zero(build: RedisBuild) {
    require_root();
    const NUMKEYS: usize = 6;
    const ROUNDS: usize = 2;
    let (redis, agent, pid) = start(build);
    let port = redis.port;
    // Polls until (redis_clients_blocked, redis_blocking_registrations) read exactly
    // (clients, clients x NUMKEYS), and fails with what they last read.
    let gauges = |clients: usize| {
        let want = (clients as f64, (clients * NUMKEYS) as f64);
        let started = Instant::now();
        loop {
            let s = agent.scrape();
            let have = (
                s.sum("redis_clients_blocked", &[("process_pid", &pid)]),
                s.sum("redis_blocking_registrations", &[("process_pid", &pid)]),
            );
            if have == want {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "(clients blocked, key registrations) read {have:?} for 5 s, want {want:?}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    };
    for round in 0..ROUNDS {
        // Each client's first key is its own (a write to it serves that client only), the
        // other NUMKEYS - 1 are shared by all five.
        let shared = keys(&format!("shared{round}"), NUMKEYS - 1);
        let pop = |first: &str, timeout: &str| {
            let mut k = vec![format!("{first}{round}")];
            k.extend(shared.iter().cloned());
            brpop(&k, timeout)
        };
        let block = |args: Vec<String>| {
            let mut c = Conn::connect(port).unwrap();
            let id = c.id();
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            c.send(&refs).unwrap();
            (c, id)
        };
        let (mut served, _) = block(pop("served", "30"));
        let (gone, _) = block(pop("gone", "30"));
        let (mut unblocked_timeout, id_timeout) = block(pop("unblock-timeout", "30"));
        let (mut unblocked_error, id_error) = block(pop("unblock-error", "30"));
        gauges(4);
        // The one that times out blocks last, with a deadline that leaves time to see all five.
        let (mut timed_out, _) = block(pop("timeout", "2"));
        gauges(5);

        assert!(timed_out.read().unwrap().is_nil());
        gauges(4);
        assert_eq!(
            redis.command(&["LPUSH", &format!("served{round}"), "job"]),
            ":1\r\n"
        );
        let reply = served.read().unwrap();
        assert!(matches!(reply, Reply::Array(Some(_))), "{reply:?}");
        gauges(3);
        gone.shutdown();
        gauges(2);
        assert_eq!(
            redis.command(&["CLIENT", "UNBLOCK", &id_timeout.to_string(), "TIMEOUT"]),
            ":1\r\n"
        );
        let reply = unblocked_timeout.read().unwrap();
        assert!(reply.is_nil(), "{reply:?}");
        gauges(1);
        assert_eq!(
            redis.command(&["CLIENT", "UNBLOCK", &id_error.to_string(), "ERROR"]),
            ":1\r\n"
        );
        let reply = unblocked_error.read().unwrap();
        assert!(
            matches!(reply, Reply::Error(ref e) if e.starts_with("UNBLOCKED")),
            "{reply:?}"
        );
        gauges(0);
    }

    let s = agent.scrape();
    let rounds = ROUNDS as f64;
    assert_eq!(count(&s, DURATION, &pid, &[("outcome", "served")]), rounds);
    assert_eq!(count(&s, DURATION, &pid, &[("outcome", "timeout")]), rounds);
    // The disconnect and both CLIENT UNBLOCKs.
    assert_eq!(
        count(&s, DURATION, &pid, &[("outcome", "other")]),
        3.0 * rounds
    );
    assert_eq!(count(&s, KEYS, &pid, &[]), 5.0 * rounds);
    assert_eq!(sum(&s, KEYS, &pid, &[]), (5 * NUMKEYS * ROUNDS) as f64);
    // The 2 s timeouts end at their deadline, or at the latest on the next 100 ms cron tick.
    let mean_timeout = sum(&s, DURATION, &pid, &[("outcome", "timeout")]) / rounds;
    assert!((2.0..2.25).contains(&mean_timeout), "{mean_timeout}");
    // Still exactly 0 a while later.
    thread::sleep(Duration::from_millis(500));
    let s = agent.scrape();
    assert_eq!(
        s.sum("redis_clients_blocked", &[("process_pid", &pid)]),
        0.0
    );
    assert_eq!(
        s.sum("redis_blocking_registrations", &[("process_pid", &pid)]),
        0.0
    );
}

/// Servers under load run with I/O threads (reads and replies off the main thread; Redis 8 and
/// Valkey 8 hand whole clients to them): blocks and unblocks stay on the main thread, so
/// every call is still counted once, with its outcome, and the gauges come back to zero.
fn with_io_threads_forty_clients_at_once_are_counted_exactly(build: RedisBuild) {
    require_root();
    const CLIENTS: usize = 40;
    const NUMKEYS: usize = 10;
    const ROUNDS: usize = 3;
    // Redis 6.2-7.4 read with the threads only when asked; later servers ignore the option.
    let (redis, agent, pid) = start_with(
        build,
        &["--io-threads", "4", "--io-threads-do-reads", "yes"],
    );
    let port = redis.port;
    let clients_blocked = |n: usize| {
        wait_for(
            &format!("{n} clients blocked, seen by Redis and by the agent"),
            Duration::from_secs(10),
            || {
                let redis_says = blocked_clients_in(&redis);
                let agent_says = agent
                    .scrape()
                    .sum("redis_clients_blocked", &[("process_pid", &pid)]);
                (redis_says == Some(n) && agent_says == n as f64).then_some(())
            },
        )
    };
    let shared = keys("io-shared", NUMKEYS - 1);
    let pop = |first: String, timeout: &str| {
        let mut k = vec![first];
        k.extend(shared.iter().cloned());
        brpop(&k, timeout)
    };
    // Every call times out: 40 at once, twice.
    for round in 0..2 {
        let replies = parallel(
            port,
            (0..CLIENTS)
                .map(|i| pop(format!("io-timeout{round}-{i}"), "0.2"))
                .collect(),
        );
        assert!(replies.iter().all(Reply::is_nil), "{replies:?}");
    }
    // Every call is served: 40 block, then one LPUSH each to its own key, three times.
    for round in 0..ROUNDS {
        let waiting: Vec<_> = (0..CLIENTS)
            .map(|i| {
                let args = pop(format!("io-served{round}-{i}"), "0");
                thread::spawn(move || {
                    let mut conn = Conn::connect(port).unwrap();
                    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
                    conn.call(&refs).unwrap()
                })
            })
            .collect();
        clients_blocked(CLIENTS);
        let mut producer = Conn::connect(port).unwrap();
        for i in 0..CLIENTS {
            let key = format!("io-served{round}-{i}");
            let reply = producer.call(&["LPUSH", &key, "job"]).unwrap();
            assert!(matches!(reply, Reply::Integer(1)), "{reply:?}");
        }
        for h in waiting {
            let reply = h.join().unwrap();
            assert!(matches!(reply, Reply::Array(Some(_))), "{reply:?}");
        }
        clients_blocked(0);
    }

    let s = agent.scrape();
    let calls = (2 * CLIENTS + ROUNDS * CLIENTS) as f64;
    assert_eq!(
        count(&s, DURATION, &pid, &[("outcome", "timeout")]),
        (2 * CLIENTS) as f64
    );
    assert_eq!(
        count(&s, DURATION, &pid, &[("outcome", "served")]),
        (ROUNDS * CLIENTS) as f64
    );
    assert_eq!(count(&s, DURATION, &pid, &[("outcome", "other")]), 0.0);
    assert_eq!(count(&s, KEYS, &pid, &[]), calls);
    assert_eq!(sum(&s, KEYS, &pid, &[]), calls * NUMKEYS as f64);
    assert_eq!(bucket(&s, KEYS, &pid, &[], "5"), 0.0);
    assert_eq!(bucket(&s, KEYS, &pid, &[], "10"), calls);
    // 0.2 s timeouts end on Redis's 100 ms cron, or up to a tick later.
    let mean_timeout = sum(&s, DURATION, &pid, &[("outcome", "timeout")]) / (2 * CLIENTS) as f64;
    assert!((0.2..0.35).contains(&mean_timeout), "{mean_timeout}");
    assert_eq!(
        s.sum("redis_blocking_registrations", &[("process_pid", &pid)]),
        0.0
    );
    // The threads were there, and named as the agent's thread metrics name them.
    let io_threads = s
        .label_values(
            "process_thread_cpu_time_seconds_total",
            &[("process_pid", &pid)],
            "thread_name",
        )
        .into_iter()
        .filter(|name| name.starts_with("io_thd"))
        .count();
    assert!(io_threads >= 3, "{build}: {io_threads} io_thd threads");
    assert_points(&s, &pid, "live", build.probe_points());
}

fn blmove_bzpopmin_and_xread_are_counted_by_block_type(build: RedisBuild) {
    require_root();
    let (redis, agent, pid) = start(build);
    assert_block_client_entry_untouched_where_its_calls_are_probed(build, redis.pid());
    let port = redis.port;
    let mut c = Conn::connect(port).unwrap();
    assert!(c
        .call(&["BLMOVE", "src", "dst", "LEFT", "RIGHT", "0.1"])
        .unwrap()
        .is_nil());
    assert!(c
        .call(&["BZPOPMIN", "z1", "z2", "z3", "0.1"])
        .unwrap()
        .is_nil());
    assert!(c
        .call(&["XREAD", "BLOCK", "100", "STREAMS", "s1", "s2", "$", "$"])
        .unwrap()
        .is_nil());
    // Served ones.
    let w1 = thread::spawn(move || {
        Conn::connect(port)
            .unwrap()
            .call(&["BLMOVE", "src2", "dst2", "LEFT", "RIGHT", "5"])
            .unwrap()
    });
    let w2 = thread::spawn(move || {
        Conn::connect(port)
            .unwrap()
            .call(&["BZPOPMIN", "z4", "z5", "5"])
            .unwrap()
    });
    wait_for("both to block", Duration::from_secs(5), || {
        (agent
            .scrape()
            .sum("redis_clients_blocked", &[("process_pid", &pid)])
            == 2.0)
            .then_some(())
    });
    redis.command(&["LPUSH", "src2", "a"]);
    redis.command(&["ZADD", "z5", "1", "m"]);
    assert!(!w1.join().unwrap().is_nil());
    assert!(!w2.join().unwrap().is_nil());

    let s = agent.scrape();
    let list = [("redis_block_type", "list")];
    let zset = [("redis_block_type", "zset")];
    assert_eq!(count(&s, KEYS, &pid, &list), 2.0);
    assert_eq!(sum(&s, KEYS, &pid, &list), 2.0, "BLMOVE lists one key");
    assert_eq!(count(&s, KEYS, &pid, &zset), 2.0);
    assert_eq!(sum(&s, KEYS, &pid, &zset), 5.0, "3 + 2 keys");
    let stream = [("redis_block_type", "stream")];
    assert_eq!(count(&s, KEYS, &pid, &stream), 1.0);
    assert_eq!(sum(&s, KEYS, &pid, &stream), 2.0);
    assert_eq!(
        count(&s, DURATION, &pid, &[stream[0], ("outcome", "timeout")]),
        1.0
    );
    for t in [&list, &zset] {
        assert_eq!(
            count(&s, DURATION, &pid, &[t[0], ("outcome", "timeout")]),
            1.0
        );
        assert_eq!(
            count(&s, DURATION, &pid, &[t[0], ("outcome", "served")]),
            1.0
        );
    }
}

/// Where the agent found the calls to `blockClient` (7.2+), the breakpoints are on those calls
/// and none is in `blockClient` itself: a block that `blockForKeys` registers (BRPOP) traps
/// once, not a second time in the `blockClient` it calls. The blocks the compiler inlined
/// (BLMOVE on LTO builds) are then counted through the calls, as the caller checks.
fn assert_block_client_entry_untouched_where_its_calls_are_probed(build: RedisBuild, pid: u32) {
    let exe = std::fs::canonicalize(build.binary()).unwrap();
    let inspected = RedisBinary::inspect(&exe).unwrap();
    let Some(calls) = &inspected.block_client_calls else {
        assert!(
            matches!(build, RedisBuild::V6_2 | RedisBuild::V7_0),
            "{build:?}: the calls to blockClient were not all found"
        );
        return;
    };
    assert!(!calls.is_empty(), "{build:?}");
    let entry = resolve_file_offsets(&exe, &["blockClient"]).unwrap()["blockClient"];
    let file = std::fs::read(&exe).unwrap();
    for at in entry..entry + 16 {
        assert_eq!(
            mapped_byte(pid, &exe, at),
            file[at as usize],
            "{build:?}: blockClient+{} carries a breakpoint",
            at - entry
        );
    }
    for &call in calls {
        assert_eq!(
            mapped_byte(pid, &exe, call),
            0xcc,
            "{build:?}: no breakpoint on the call at {call:#x}"
        );
    }
}

fn two_redis_servers_get_separate_series(build: RedisBuild) {
    require_root();
    let a = Redis::start_build(build, &[]);
    let b = Redis::start_build(build, &[]);
    let agent = Agent::start(&[]);
    let (pa, pb) = (a.pid().to_string(), b.pid().to_string());
    wait_for("both attached", Duration::from_secs(10), || {
        let s = agent.scrape();
        (s.find("fanout_probe_points", &[("probe", "blockForKeys")])
            .count()
            >= 2)
            .then_some(())
    });
    parallel(
        a.port,
        (0..2)
            .map(|i| brpop(&keys(&format!("a{i}"), 3), "0.1"))
            .collect(),
    );
    parallel(
        b.port,
        (0..3)
            .map(|i| brpop(&keys(&format!("b{i}"), 7), "0.1"))
            .collect(),
    );
    let s = agent.scrape();
    let (port_a, port_b) = (a.port.to_string(), b.port.to_string());
    assert_eq!(count(&s, KEYS, &pa, &[("server_port", &port_a)]), 2.0);
    assert_eq!(sum(&s, KEYS, &pa, &[]), 6.0);
    assert_eq!(count(&s, KEYS, &pb, &[("server_port", &port_b)]), 3.0);
    assert_eq!(sum(&s, KEYS, &pb, &[]), 21.0);
    assert_eq!(count(&s, DURATION, &pa, &[("outcome", "timeout")]), 2.0);
    assert_eq!(count(&s, DURATION, &pb, &[("outcome", "timeout")]), 3.0);
}

#[test]
fn a_redis_binary_without_the_probe_points_is_reported_not_hidden() {
    require_root();
    // A process named redis-server whose binary has none of Redis's functions: `sleep` copied
    // under that name. The agent tracks it as a Redis and must say the points are missing.
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("redis-server");
    std::fs::copy("/bin/sleep", &fake).unwrap();
    let mut child = integration_tests::Proc {
        child: std::process::Command::new(&fake).arg("60").spawn().unwrap(),
        name: "fake".into(),
    };
    let real = Redis::start(&[]);
    let agent = Agent::start(&[]);
    let pid = child.pid().to_string();
    let rpid = real.pid().to_string();
    // Both servers' probes are prepared off the agent's loop, one after the other.
    let s = wait_for(
        "the fake and the real server's probe points",
        Duration::from_secs(10),
        || {
            let s = agent.scrape();
            (s.find("fanout_probe_points", &[("process_pid", &pid)])
                .count()
                == 4
                && s.find("fanout_probe_points", &[("process_pid", &rpid)])
                    .count()
                    > 0)
            .then_some(s)
        },
    );
    for probe in [
        "blockForKeys",
        "unblockClient",
        "replyToBlockedClientTimedOut",
        "serveClientsBlockedOnKey",
    ] {
        assert_eq!(
            s.label_values(
                "fanout_probe_points",
                &[("process_pid", &pid), ("probe", probe)],
                "state"
            )
            .into_iter()
            .collect::<Vec<_>>(),
            vec!["missing"]
        );
    }
    assert!(
        agent
            .log()
            .contains("blockForKeys is not exported by this binary"),
        "the log says what is missing"
    );
    // Nothing is exported for it, not zeros.
    for name in [
        "redis_blocking_keys_count",
        "redis_clients_blocked",
        "redis_blocking_registrations",
        "redis_blocking_cpu_time_seconds_total",
    ] {
        assert_eq!(
            s.find(name, &[("process_pid", &pid)]).count(),
            0,
            "{name} for a process without probes"
        );
    }
    // The real Redis beside it is measured as usual.
    assert_eq!(
        s.sum("redis_clients_blocked", &[("process_pid", &rpid)]),
        0.0
    );
    assert_eq!(
        s.find("redis_clients_blocked", &[("process_pid", &rpid)])
            .count(),
        1
    );
    child.stop();
}

fn attaching_detaching_and_restarting_the_agent_never_disturbs_redis_clients(build: RedisBuild) {
    require_root();
    let redis = Redis::start_build(build, &[]);
    let port = redis.port;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // A workload of plain and blocking commands, checking every reply.
    let workers: Vec<_> = (0..3)
        .map(|w| {
            let stop = stop.clone();
            thread::spawn(move || {
                let mut conn = Conn::connect(port).unwrap();
                let mut done = 0u64;
                let started = Instant::now();
                while !stop.load(std::sync::atomic::Ordering::Relaxed)
                    && started.elapsed() < Duration::from_secs(60)
                {
                    let key = format!("w{w}");
                    assert_eq!(
                        conn.call(&["SET", &key, &done.to_string()]).unwrap(),
                        Reply::Simple("OK".into())
                    );
                    assert_eq!(
                        conn.call(&["GET", &key]).unwrap(),
                        Reply::Bulk(Some(done.to_string().into_bytes()))
                    );
                    assert_eq!(
                        conn.call(&["LPUSH", &format!("q{w}"), "job"]).unwrap(),
                        Reply::Integer(1)
                    );
                    let popped = conn
                        .call(&["BRPOP", &format!("q{w}"), "other", "1"])
                        .unwrap();
                    assert!(
                        matches!(popped, Reply::Array(Some(ref v)) if v.len() == 2),
                        "{popped:?}"
                    );
                    assert!(conn
                        .call(&["BLPOP", &format!("empty{w}"), "0.01"])
                        .unwrap()
                        .is_nil());
                    done += 1;
                }
                done
            })
        })
        .collect();
    for round in 0..3 {
        let agent = Agent::start(&[]);
        let pid = redis.pid().to_string();
        wait_for("blocking calls seen", Duration::from_secs(10), || {
            (count(&agent.scrape(), KEYS, &pid, &[]) > 10.0).then_some(())
        });
        eprintln!("round {round}: attached and counting");
        drop(agent);
        thread::sleep(Duration::from_millis(300));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let total: u64 = workers
        .into_iter()
        .map(|w| w.join().expect("a client saw an error or a wrong reply"))
        .sum();
    assert!(total > 30, "workload ran {total} iterations");
    // After the last detach Redis still answers normally.
    assert_eq!(redis.command(&["PING"]), "+PONG\r\n");
}

#[test]
fn a_redis_in_its_own_mount_and_pid_namespace_is_found_and_probed_through_proc_root() {
    require_root();
    // A "container": private mount and PID namespaces, the server binary on a tmpfs that only
    // exists inside them. The agent must reach it through /proc/<pid>/root.
    let port = integration_tests::free_port();
    let script = format!(
        "mount -t tmpfs tmpfs /mnt && cp /usr/bin/redis-check-rdb /mnt/redis-server && \
         exec /mnt/redis-server --port {port} --bind 127.0.0.1 --save '' --appendonly no"
    );
    let child = std::process::Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "--pid",
            "--fork",
            "--kill-child",
            "sh",
            "-c",
            &script,
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("unshare (util-linux)");
    let _container = integration_tests::Proc {
        child,
        name: "container".into(),
    };
    assert!(
        !std::path::Path::new("/mnt/redis-server").exists(),
        "the binary is only visible inside the namespace"
    );
    wait_for(
        "the containerised redis to answer",
        Duration::from_secs(10),
        || {
            let mut c = Conn::connect(port).ok()?;
            (c.call(&["PING"]).ok()? == Reply::Simple("PONG".into())).then_some(())
        },
    );
    let agent = Agent::start(&[]);
    // Its host pid: the redis-server whose title has this port.
    let s = wait_for(
        "the containerised redis in the metrics",
        Duration::from_secs(10),
        || {
            let s = agent.scrape();
            (s.find(
                "fanout_probe_points",
                &[
                    ("server_port", &port.to_string()),
                    ("probe", "blockForKeys"),
                ],
            )
            .count()
                == 1)
                .then_some(s)
        },
    );
    let pid = s
        .label_values(
            "fanout_probe_points",
            &[("server_port", &port.to_string())],
            "process_pid",
        )
        .into_iter()
        .next()
        .unwrap();
    assert!(
        agent
            .log()
            .contains(&format!("/proc/{pid}/root/mnt/redis-server")),
        "attached through /proc/<pid>/root"
    );
    let mut c = Conn::connect(port).unwrap();
    assert!(c.call(&["BRPOP", "a", "b", "0.1"]).unwrap().is_nil());
    let s = agent.scrape();
    assert_eq!(count(&s, KEYS, &pid, &[]), 1.0);
    assert_eq!(sum(&s, KEYS, &pid, &[]), 2.0);
    assert_eq!(count(&s, DURATION, &pid, &[("outcome", "timeout")]), 1.0);
}

/// A gauge never drifts silently. A Redis stopped with SIGSTOP cannot time its blocked
/// client out, so no probe sees the unblock: 2 s past the deadline the agent stops counting
/// the client as blocked and counts a missed unblock. (The mechanism is the agent's, the same
/// for every build.) When the server resumes and times the client out, nothing is counted
/// twice.
#[test]
fn a_client_recorded_past_its_deadline_is_dropped_not_left_in_the_gauges() {
    require_root();
    let (redis, agent, pid) = start(RedisBuild::V7_0);
    let mut c = Conn::connect(redis.port).unwrap();
    c.send(&["BRPOP", "never", "x", "0.5"]).unwrap();
    wait_for("the client to block", Duration::from_secs(5), || {
        (agent
            .scrape()
            .sum("redis_clients_blocked", &[("process_pid", &pid)])
            == 1.0)
            .then_some(())
    });
    assert_eq!(
        agent
            .scrape()
            .sum("redis_blocking_registrations", &[("process_pid", &pid)]),
        2.0
    );
    // SAFETY: signalling our own child.
    unsafe { libc::kill(redis.pid() as i32, libc::SIGSTOP) };
    thread::sleep(Duration::from_millis(3000));
    let s = wait_for("the overdue client dropped", Duration::from_secs(5), || {
        let s = agent.scrape();
        (s.sum("redis_clients_blocked", &[("process_pid", &pid)]) == 0.0).then_some(s)
    });
    assert_eq!(
        s.sum("redis_blocking_registrations", &[("process_pid", &pid)]),
        0.0
    );
    assert!(
        agent.log().contains("their unblock was not seen"),
        "the log says why"
    );
    // One miss is not evidence of a bypassed unblock: the numbers stay exported.
    assert_eq!(
        s.sum(
            "fanout_probe_points",
            &[
                ("process_pid", &pid),
                ("probe", "unblockClient"),
                ("state", "unreliable")
            ]
        ),
        0.0
    );
    unsafe { libc::kill(redis.pid() as i32, libc::SIGCONT) };
    assert!(c.read().unwrap().is_nil());
    let s = agent.scrape();
    assert_eq!(
        s.sum("redis_clients_blocked", &[("process_pid", &pid)]),
        0.0
    );
    assert_eq!(count(&s, DURATION, &pid, &[("outcome", "timeout")]), 0.0);
    assert_eq!(count(&s, KEYS, &pid, &[]), 1.0);
}

/// The entries of process `tgid` in one tier of blocked clients (`BLOCKED_CLIENTS` or
/// `BLOCKED_SPILL`), as (client, block ended): the key is (tgid, pad, client) and the
/// value starts with (start_ns, ended_ns).
fn tier_entries(map: &str, tgid: u32) -> Vec<(u64, bool)> {
    map_dump(map)
        .iter()
        .filter_map(|e| {
            let key = entry_bytes(e, "key");
            let value = entry_bytes(e, "value");
            (u32_at(&key, 0) == tgid).then(|| (u64_at(&key, 8), u64_at(&value, 8) != 0))
        })
        .collect()
}

/// A client's kernel entry outlives its block, marked ended, and its next block rewrites it
/// in place: a worker's connection costs no map insert and delete per pop. Every pop is still
/// counted exactly, and the entry is let go once the client stays away (the agent's
/// `ENDED_KEEP_NS`, 5 s), after which a block is recorded anew.
fn a_client_that_blocks_again_reuses_its_entry_until_it_stays_away(build: RedisBuild) {
    require_root();
    const ROUNDS: usize = 20;
    let (redis, agent, pid) = start(build);
    let tgid = redis.pid();
    let mut waiter = Conn::connect(redis.port).unwrap();
    let blocked_in_redis = |n: usize| {
        wait_for(
            &format!("{n} clients blocked in Redis"),
            Duration::from_secs(5),
            || (blocked_clients_in(&redis) == Some(n)).then_some(()),
        )
    };
    let served_pop = |waiter: &mut Conn| {
        waiter.send(&["BRPOP", "reuse", "30"]).unwrap();
        blocked_in_redis(1);
        assert_eq!(redis.command(&["LPUSH", "reuse", "job"]), ":1\r\n");
        let reply = waiter.read().unwrap();
        assert!(matches!(reply, Reply::Array(Some(_))), "{reply:?}");
    };
    let mut clients = BTreeSet::new();
    for round in 0..ROUNDS {
        if round % 2 == 0 {
            served_pop(&mut waiter);
        } else {
            let reply = waiter.call(&["BRPOP", "reuse", "0.05"]).unwrap();
            assert!(reply.is_nil(), "{reply:?}");
        }
        let entries = tier_entries("BLOCKED_CLIENTS", tgid);
        assert_eq!(
            entries.len(),
            1,
            "round {round}: one entry, the connection's, kept: {entries:?}"
        );
        assert!(entries[0].1, "round {round}: marked ended: {entries:?}");
        clients.insert(entries[0].0);
    }
    assert_eq!(clients.len(), 1, "one client throughout: {clients:?}");
    let s = agent.scrape();
    assert_eq!(count(&s, KEYS, &pid, &[]), ROUNDS as f64);
    let half = (ROUNDS / 2) as f64;
    assert_eq!(count(&s, DURATION, &pid, &[("outcome", "served")]), half);
    assert_eq!(count(&s, DURATION, &pid, &[("outcome", "timeout")]), half);
    assert_eq!(count(&s, DURATION, &pid, &[("outcome", "other")]), 0.0);
    assert_eq!(
        s.sum("redis_clients_blocked", &[("process_pid", &pid)]),
        0.0,
        "an ended entry is not a blocked client"
    );
    assert_eq!(
        s.sum("redis_blocking_registrations", &[("process_pid", &pid)]),
        0.0
    );

    // The client stays away: a scrape after the keep period sweeps its entry.
    let stayed_away = Instant::now();
    wait_for("the ended entry let go", Duration::from_secs(15), || {
        agent.scrape();
        tier_entries("BLOCKED_CLIENTS", tgid)
            .is_empty()
            .then_some(())
    });
    assert!(
        stayed_away.elapsed() >= Duration::from_secs(4),
        "let go after {:?}, before the keep period",
        stayed_away.elapsed()
    );
    served_pop(&mut waiter);
    let s = agent.scrape();
    assert_eq!(count(&s, KEYS, &pid, &[]), ROUNDS as f64 + 1.0);
    assert_eq!(
        count(&s, DURATION, &pid, &[("outcome", "served")]),
        half + 1.0
    );
    assert_eq!(tier_entries("BLOCKED_CLIENTS", tgid).len(), 1);
}

/// More clients blocked at once than the first map of blocked clients holds: the rest are
/// recorded in the spill map (`BLOCKED_SPILL`), and every block is counted exactly, served and timed out,
/// in both (their second blocks rewrite their entries in place in whichever map holds them).
#[test]
fn clients_beyond_the_first_maps_room_are_recorded_in_the_spill_map_and_counted_exactly() {
    require_root();
    // The first map's room, as the probes were built with it; the rest go to BLOCKED_SPILL.
    const HOT_BLOCKED_CLIENTS: usize = agent_common::redis::HOT_BLOCKED_CLIENTS as usize;
    const EXTRA: usize = 100;
    const CLIENTS: usize = HOT_BLOCKED_CLIENTS + EXTRA;
    // One socket per client, in this process and in Redis (which raises its own limit to
    // its maxclients, 10000 by default).
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointer to an rlimit.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    let want = (CLIENTS as u64 + 512).min(limit.rlim_max);
    limit.rlim_cur = limit.rlim_cur.max(want);
    // SAFETY: valid pointer to an rlimit.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    assert!(
        limit.rlim_cur >= CLIENTS as u64 + 64,
        "this test needs {} open files; the hard limit is {}",
        CLIENTS + 64,
        limit.rlim_max
    );
    let (redis, agent, pid) = start(RedisBuild::V7_0);
    let tgid = redis.pid();
    let gauges = |clients: usize| {
        wait_for(
            &format!("{clients} clients blocked, seen by the agent"),
            Duration::from_secs(20),
            || {
                let s = agent.scrape();
                (s.sum("redis_clients_blocked", &[("process_pid", &pid)]) == clients as f64
                    && s.sum("redis_blocking_registrations", &[("process_pid", &pid)])
                        == clients as f64)
                    .then_some(())
            },
        )
    };
    let key = |i: usize| format!("overflow:{i}");
    let mut conns: Vec<Conn> = (0..CLIENTS)
        .map(|i| {
            let mut c = Conn::connect(redis.port).unwrap();
            c.send(&["BRPOP", &key(i), "60"]).unwrap();
            c
        })
        .collect();
    gauges(CLIENTS);
    let in_tier = |map: &str| {
        let entries = tier_entries(map, tgid);
        assert!(
            entries.iter().all(|(_, ended)| !ended),
            "{map}: all blocked"
        );
        entries.len()
    };
    assert_eq!(in_tier("BLOCKED_CLIENTS"), HOT_BLOCKED_CLIENTS);
    assert_eq!(in_tier("BLOCKED_SPILL"), EXTRA);

    for i in 0..CLIENTS {
        assert_eq!(redis.command(&["LPUSH", &key(i), "job"]), ":1\r\n");
    }
    for c in &mut conns {
        let reply = c.read().unwrap();
        assert!(matches!(reply, Reply::Array(Some(_))), "{reply:?}");
    }
    gauges(0);
    // Each blocks once more, rewriting its entry in place, and times out.
    for (i, c) in conns.iter_mut().enumerate() {
        c.send(&["BRPOP", &key(i), "1"]).unwrap();
    }
    for c in &mut conns {
        assert!(c.read().unwrap().is_nil());
    }
    gauges(0);
    let ended = |map: &str| {
        tier_entries(map, tgid)
            .iter()
            .filter(|(_, ended)| *ended)
            .count()
    };
    assert_eq!(ended("BLOCKED_CLIENTS"), HOT_BLOCKED_CLIENTS);
    assert_eq!(ended("BLOCKED_SPILL"), EXTRA);
    let s = agent.scrape();
    assert_eq!(count(&s, KEYS, &pid, &[]), 2.0 * CLIENTS as f64);
    assert_eq!(
        count(&s, DURATION, &pid, &[("outcome", "served")]),
        CLIENTS as f64
    );
    assert_eq!(
        count(&s, DURATION, &pid, &[("outcome", "timeout")]),
        CLIENTS as f64
    );
    assert_eq!(count(&s, DURATION, &pid, &[("outcome", "other")]), 0.0);
    let lost = [("reason", "blocked_client_map_full")];
    assert_eq!(s.find("fanout_events_lost_total", &lost).count(), 1);
    assert_eq!(s.sum("fanout_events_lost_total", &lost), 0.0);
}
