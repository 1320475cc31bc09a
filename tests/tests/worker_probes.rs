//! Worker-side probes: blocking pops as real Sidekiq workers and raw-socket clients send and
//! receive them, seen from their syscalls. Root only; run with `sudo cargo xtask test`.

use std::{
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use integration_tests::{
    enqueue_sidekiq_job, prom::Scrape, require_root, wait_for, Agent, Proc, Redis, Sidekiq,
};

const DURATION: &str = "worker_blocking_pop_duration_seconds";
const KEYS: &str = "worker_blocking_pop_keys";

fn queues(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

fn m<'a>(pairs: &'a [(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    pairs.to_vec()
}

fn group_rule(group: &str) -> String {
    format!("{group}:cmdline=sidekiq.*\\b{group}\\b")
}

/// The Python scripts' RESP encoder: `enc("BRPOP", "q", "1")` is the command's bytes.
macro_rules! python_enc {
    () => {
        r#"
def enc(*args):
    out = b"*%d\r\n" % len(args)
    for a in args:
        a = a.encode()
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    return out
"#
    };
}

#[test]
fn sidekiq_fleets_on_1_20_and_440_queues_fanout_outcomes_and_latency() {
    require_root();
    let redis = Redis::start(&[]);
    let agent = Agent::start(&[
        "--worker-rule",
        &group_rule("one"),
        "--worker-rule",
        &group_rule("twenty"),
        "--worker-rule",
        &group_rule("wide"),
    ]);
    let one = Sidekiq::start_tagged(redis.port, Some("one"), &["solo"], 1);
    let twenty_q = queues("t", 20);
    let twenty = Sidekiq::start_tagged(
        redis.port,
        Some("twenty"),
        &twenty_q.iter().map(String::as_str).collect::<Vec<_>>(),
        2,
    );
    let wide_q = queues("w", 440);
    let wide = Sidekiq::start_tagged(
        redis.port,
        Some("wide"),
        &wide_q.iter().map(String::as_str).collect::<Vec<_>>(),
        2,
    );
    wait_for("all three fleets blocking", Duration::from_secs(15), || {
        let s = agent.scrape();
        ["one", "twenty", "wide"]
            .iter()
            .all(|g| s.sum(&format!("{KEYS}_count"), &[("process_group", g)]) >= 1.0)
            .then_some(())
    });

    // 12 jobs for the single-queue fleet, one every 500 ms: its one processor thread pops
    // each within a few ms of the push, after waiting about 500 ms.
    for jid in 0..12 {
        thread::sleep(Duration::from_millis(500));
        enqueue_sidekiq_job(&redis, "solo", jid);
    }
    wait_for(
        "the 12 jobs to be processed",
        Duration::from_secs(10),
        || {
            (redis.command(&["LLEN", "queue:solo"]) == ":0\r\n"
                && agent.scrape().sum(
                    &format!("{DURATION}_count"),
                    &[("process_group", "one"), ("outcome", "served")],
                ) == 12.0)
                .then_some(())
        },
    );
    let s = agent.scrape();
    let pid_note = format!(
        "one={} twenty={} wide={}",
        one.pid(),
        twenty.pid(),
        wide.pid()
    );

    // Fan-out, exactly: every pop of a fleet lists all its queues.
    for (group, keys, le_below, le_at) in [
        ("one", 1.0, None, "1"),
        ("twenty", 20.0, Some("10"), "20"),
        ("wide", 440.0, Some("200"), "500"),
    ] {
        let g = [("process_group", group), ("redis_command", "BRPOP")];
        let count = s.sum(&format!("{KEYS}_count"), &g);
        assert!(count >= 1.0, "{group}: no pops ({pid_note})");
        assert_eq!(
            s.sum(&format!("{KEYS}_sum"), &g),
            keys * count,
            "{group}: every pop lists {keys} keys"
        );
        assert_eq!(
            s.sum(&format!("{KEYS}_bucket"), &m(&[g[0], g[1], ("le", le_at)])),
            count,
            "{group}"
        );
        if let Some(below) = le_below {
            assert_eq!(
                s.sum(&format!("{KEYS}_bucket"), &m(&[g[0], g[1], ("le", below)])),
                0.0,
                "{group}"
            );
        }
    }

    // Outcomes: the single-queue fleet was served exactly the 12 jobs; the others only time
    // out (Sidekiq's BRPOP timeout is 2 s), nobody errs.
    let served = |g: &str| {
        s.sum(
            &format!("{DURATION}_count"),
            &[("process_group", g), ("outcome", "served")],
        )
    };
    let timeouts = |g: &str| {
        s.sum(
            &format!("{DURATION}_count"),
            &[("process_group", g), ("outcome", "timeout")],
        )
    };
    assert_eq!(served("one"), 12.0);
    assert_eq!(served("twenty"), 0.0);
    assert_eq!(served("wide"), 0.0);
    assert!(timeouts("twenty") >= 2.0 && timeouts("wide") >= 2.0);
    assert_eq!(
        s.sum(&format!("{DURATION}_count"), &[("outcome", "error")]),
        0.0
    );
    let mean_timeout = s.sum(
        &format!("{DURATION}_sum"),
        &[("process_group", "twenty"), ("outcome", "timeout")],
    ) / timeouts("twenty");
    assert!(
        (2.0..2.2).contains(&mean_timeout),
        "Sidekiq's 2 s timeout, seen as {mean_timeout}"
    );
    // Served pops waited for the next push: about 500 ms apart (the first may wait longer,
    // from whenever its thread started waiting).
    let mean_served = s.sum(
        &format!("{DURATION}_sum"),
        &[("process_group", "one"), ("outcome", "served")],
    ) / 12.0;
    eprintln!("served pops of the single-queue fleet: mean {mean_served:.3} s");
    assert!(
        (0.35..0.7).contains(&mean_served),
        "mean served latency {mean_served}"
    );
    // They all waited on this Redis.
    let port = redis.port.to_string();
    assert_eq!(
        s.sum(
            &format!("{DURATION}_count"),
            &[
                ("process_group", "one"),
                ("server_address", "127.0.0.1"),
                ("server_port", &port)
            ]
        ),
        s.sum(&format!("{DURATION}_count"), &[("process_group", "one")])
    );

    // Listening: one process per fleet; without --export-key-names no key is named.
    for (group, keys) in [("one", 1.0), ("twenty", 20.0), ("wide", 440.0)] {
        assert_eq!(
            s.sum(
                "redis_queue_listeners",
                &[("process_group", group), ("listener", "process")]
            ),
            1.0,
            "{group}"
        );
        assert_eq!(
            s.sum("worker_queues_listened", &[("process_group", group)]),
            keys,
            "{group}"
        );
    }
    assert_eq!(
        s.find("redis_queue_listeners", &[])
            .filter(|x| x.labels.contains_key("redis_key"))
            .count(),
        0
    );
    // Disjoint fleets share no queue.
    assert_eq!(
        s.sum(
            "worker_queues_shared",
            &[("process_group", "one"), ("peer_group", "wide")]
        ),
        0.0
    );
}

/// Sidekiq shuffles its queues before every fetch when they have weights (GitLab's
/// sidekiq-cluster gives every queue one): each BRPOP lists the same keys in another order.
/// The kernel sends a connection's key list to the agent once, not once per fetch, and every
/// count stays exact.
#[test]
fn a_weighted_fleet_that_shuffles_its_queues_sends_each_key_list_once() {
    require_root();
    const QUEUES: usize = 40;
    const JOBS: u64 = 60;
    let redis = Redis::start(&[]);
    let agent = Agent::start(&["--worker-rule", &group_rule("weighted")]);
    let weighted: Vec<String> = queues("w", QUEUES)
        .into_iter()
        .map(|q| format!("{q},1"))
        .collect();
    let fleet = Sidekiq::start_tagged(
        redis.port,
        Some("weighted"),
        &weighted.iter().map(String::as_str).collect::<Vec<_>>(),
        3,
    );
    wait_for("the fleet blocking", Duration::from_secs(15), || {
        let s = agent.scrape();
        (s.sum(&format!("{KEYS}_count"), &[("process_group", "weighted")]) >= 1.0).then_some(())
    });
    for jid in 0..JOBS {
        enqueue_sidekiq_job(&redis, &format!("w{}", jid % QUEUES as u64), jid);
        thread::sleep(Duration::from_millis(20));
    }
    let s = wait_for("the jobs to be served", Duration::from_secs(20), || {
        let s = agent.scrape();
        (s.sum(
            &format!("{DURATION}_count"),
            &[("process_group", "weighted"), ("outcome", "served")],
        ) == JOBS as f64)
            .then_some(s)
    });
    let g = [("process_group", "weighted"), ("redis_command", "BRPOP")];
    let pops = s.sum(&format!("{KEYS}_count"), &g);
    assert!(pops >= JOBS as f64, "{pops} pops (pid {})", fleet.pid());
    assert_eq!(
        s.sum(&format!("{KEYS}_sum"), &g),
        QUEUES as f64 * pops,
        "every pop lists the {QUEUES} queues"
    );
    assert_eq!(
        s.sum("worker_queues_listened", &[("process_group", "weighted")]),
        QUEUES as f64
    );
    // Sidekiq's pool has at most concurrency + 5 connections; each sent its list once.
    let lists = s.sum("fanout_worker_key_lists_total", &[]);
    assert!(
        (1.0..=8.0).contains(&lists),
        "{lists} key lists for {pops} shuffled pops"
    );
}

/// A connection whose calls list their keys in a new order each time is checked by the
/// order-free hash of its arguments alone (its bytes no longer hashed first). When it moves to
/// other keys, as many and of the same lengths (the same bytes in all, a repeat by length),
/// the new list is still told apart: sent to the agent, and its pops served by its own key.
#[test]
fn a_shuffling_connection_that_moves_to_keys_of_the_same_lengths_is_followed_on_them() {
    shuffling_connection_moves_between(["first:q", "other:q"]);
}

/// The same with keys that share their first 8 bytes and differ near their end, as GitLab's
/// queue names do (`queue:pipeline_processing:...`), and are too long (68 bytes) for the
/// tokenizer's look past its window: the key-list signature jumps to each key's last bytes.
#[test]
fn a_connection_that_moves_to_keys_with_the_same_start_and_lengths_is_followed_on_them() {
    shuffling_connection_moves_between([
        "queue:pipeline_processing:pipeline_hooks_and_notifications:first_",
        "queue:pipeline_processing:pipeline_hooks_and_notifications:other_",
    ]);
}

/// Six pops over `prefix[0]` + `q00`.. then four over `prefix[1]` + `q00`.., shuffled each
/// time, each served at once by the list's `q07`. The first call on the second list goes out
/// in one sendmsg() of four iovecs: cut after the command's name, then an empty one, then cut
/// 5 bytes before its first key's end (the key's last bytes, which its hash reads, straddle
/// them). It must be followed like the others.
fn shuffling_connection_moves_between(prefixes: [&str; 2]) {
    require_root();
    const KEYS_PER_CALL: usize = 12;
    let redis = Redis::start(&[]);
    let agent = Agent::start(&[
        "--worker-rule",
        "shuffler:cmdline=fanout-shuffling-client",
        "--export-key-names",
    ]);
    let served: Vec<String> = prefixes.iter().map(|p| format!("{p}q07")).collect();
    for (key, jobs) in [(&served[0], 6), (&served[1], 4)] {
        for _ in 0..jobs {
            redis.command(&["RPUSH", key, "job"]);
        }
    }
    let script = concat!(
        r#"
import random, socket, sys, time
port, keys, first, other = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
"#,
        python_enc!(),
        r#"time.sleep(0.5)
s = socket.create_connection(("127.0.0.1", port))
random.seed(7)
for prefix, pops in ((first, 6), (other, 4)):
    names = ["%sq%02d" % (prefix, i) for i in range(keys)]
    served = ("%sq07" % prefix).encode()
    for i in range(pops):
        random.shuffle(names)
        request = enc("BRPOP", *names, "1")
        if prefix == other and i == 0:
            first_key_end = request.index(names[0].encode()) + len(names[0])
            cut = first_key_end - 5
            name_end = request.index(b"BRPOP\r\n") + 7
            sent = s.sendmsg([request[:name_end], b"", request[name_end:cut], request[cut:]])
            assert sent == len(request), sent
        else:
            s.sendall(request)
        data = b""
        while data.count(b"\r\n") < 5:
            data += s.recv(4096)
        assert data.startswith(b"*2\r\n$%d\r\n%s" % (len(served), served)), data
print("done", flush=True)
time.sleep(30)
"#
    );
    let child = Command::new("/usr/bin/python3")
        .args([
            "-c",
            script,
            &redis.port.to_string(),
            &KEYS_PER_CALL.to_string(),
            prefixes[0],
            prefixes[1],
            "fanout-shuffling-client",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut proc = Proc {
        child,
        name: "shuffling-client".into(),
    };
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(proc.child.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "done");
    let g = [("process_group", "shuffler")];
    // Key lists reach the agent as events, pops through the kernel's histograms: both counted.
    let s = wait_for("10 pops and two key lists", Duration::from_secs(5), || {
        let s = agent.scrape();
        (s.sum(&format!("{DURATION}_count"), &g) == 10.0
            && s.sum("fanout_worker_key_lists_total", &[]) >= 2.0)
            .then_some(s)
    });
    assert_eq!(
        s.sum(
            &format!("{DURATION}_count"),
            &[("process_group", "shuffler"), ("outcome", "served")]
        ),
        10.0
    );
    assert_eq!(
        s.sum(&format!("{KEYS}_sum"), &g),
        10.0 * KEYS_PER_CALL as f64
    );
    assert_eq!(
        s.sum("fanout_worker_key_lists_total", &[]),
        2.0,
        "one key list per list the connection used"
    );
    for (key, pops) in [(&served[0], 6.0), (&served[1], 4.0)] {
        assert_eq!(
            s.sum(
                "worker_blocking_pop_served_total",
                &[("process_group", "shuffler"), ("redis_key", key.as_str())]
            ),
            pops,
            "pops served by {key}"
        );
    }
    assert_eq!(
        s.sum("fanout_events_lost_total", &[("reason", "resp_desync")]),
        0.0
    );
    proc.stop();
}

#[test]
fn overlapping_queue_sets_are_reported_and_key_names_only_with_opt_in() {
    require_root();
    let redis = Redis::start(&[]);
    let agent = Agent::start(&[
        "--worker-rule",
        &group_rule("mailers"),
        "--worker-rule",
        &group_rule("billing"),
        "--worker-rule",
        &group_rule("search"),
        "--export-key-names",
        "--max-keys-per-group",
        "2",
    ]);
    let _mailers =
        Sidekiq::start_tagged(redis.port, Some("mailers"), &["mail", "default", "low"], 1);
    let _billing = Sidekiq::start_tagged(redis.port, Some("billing"), &["billing", "default"], 1);
    let _search = Sidekiq::start_tagged(redis.port, Some("search"), &["search"], 1);
    let s = wait_for(
        "the three fleets' key lists",
        Duration::from_secs(15),
        || {
            let text = agent.metrics_text();
            let s = integration_tests::prom::Scrape::parse(&text);
            (s.sum("worker_queues_listened", &[]) == 6.0).then_some((s, text))
        },
    );
    let (s, text) = s;
    // What the assertions below look at, for their messages.
    let listening: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && (l.contains("listen") || l.contains("shared")))
        .collect();
    let shared = |a: &str, b: &str| {
        s.sum(
            "worker_queues_shared",
            &[("process_group", a), ("peer_group", b)],
        )
    };
    assert_eq!(
        shared("mailers", "billing"),
        1.0,
        "both listen to queue:default"
    );
    assert_eq!(shared("billing", "mailers"), 1.0);
    assert_eq!(shared("mailers", "search"), 0.0);
    assert_eq!(shared("billing", "search"), 0.0);
    // Key names with opt-in, at most 2 per group, the rest as "other".
    let keys = s.label_values(
        "redis_queue_listeners",
        &[("process_group", "mailers"), ("listener", "process")],
        "redis_key",
    );
    assert_eq!(keys.len(), 3, "{keys:?}");
    assert!(keys.contains("other"), "{listening:#?}");
    assert!(
        s.label_values(
            "redis_queue_listeners",
            &[("process_group", "search")],
            "redis_key"
        )
        .contains("queue:search"),
        "{listening:#?}"
    );
}

/// A raw-socket RESP client in Python (socket.sendall and recv: the sendto/recvfrom syscalls).
/// The marker in its command line is what the agent's rule matches.
const RAW_CLIENT: &str = concat!(
    r#"
import socket, sys, time, select
MARK = "fanout-raw-client"
port = int(sys.argv[1])
"#,
    python_enc!(),
    r#"def read_until(s, n):
    data = b""
    while data.count(b"\r\n") < n:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data
# Give the agent a moment to pick this process up (it does in tens of ms).
time.sleep(0.5)
s = socket.create_connection(("127.0.0.1", port))
# 1. A BRPOP split across three writes, timing out after 1 s.
req = enc("BRPOP", "split:q", "1")
s.sendall(req[:5]); time.sleep(0.05); s.sendall(req[5:12]); time.sleep(0.05); s.sendall(req[12:])
assert read_until(s, 1).startswith(b"*-1"), "timeout reply"
# 2. Pipelined: SET, BRPOP, GET in one write; the BRPOP is served by a push 300 ms later.
s.sendall(enc("SET", "k", "v") + enc("BRPOP", "piped:q", "5") + enc("GET", "k"))
print("piped-sent", flush=True)
data = read_until(s, 6)
assert data.startswith(b"+OK\r\n*2\r\n"), data
# 3. Non-blocking socket: reads return EAGAIN until the reply; served by a push 200 ms later.
s.setblocking(False)
s.sendall(enc("BLPOP", "nb:q", "5"))
print("nb-sent", flush=True)
data = b""
while data.count(b"\r\n") < 5:
    try:
        data += s.recv(65536)
    except BlockingIOError:
        time.sleep(0.005)
s.setblocking(True)
# 4. A connection that closes while its pop waits.
c = socket.create_connection(("127.0.0.1", port))
c.sendall(enc("BRPOP", "never:q", "0"))
time.sleep(0.3)
c.close()
# 5. The same BZPOPMIN five times, served at once (each write repeats the last byte for byte),
#    one of the same length on another key (its key list changes), and that one again, which
#    times out.
r = socket.create_connection(("127.0.0.1", port))
r.sendall(enc("ZADD", "rep:a", "1", "m1", "2", "m2", "3", "m3", "4", "m4", "5", "m5")
          + enc("ZADD", "rep:b", "1", "m1"))
read_until(r, 2)
for _ in range(5):
    r.sendall(enc("BZPOPMIN", "rep:a", "1"))
    assert read_until(r, 7).startswith(b"*3\r\n$5\r\nrep:a")
r.sendall(enc("BZPOPMIN", "rep:b", "1"))
assert read_until(r, 7).startswith(b"*3\r\n$5\r\nrep:b")
r.sendall(enc("BZPOPMIN", "rep:b", "1"))
assert read_until(r, 1).startswith(b"*-1")
r.close()
# 6. Plain commands between pops on one connection, one write and one reply each (the
#    shortcuts that count them without the tokenizer): statuses, integers, bulks, a nil and an
#    error. Every BLMOVE must end on its own reply, not on a neighbour's.
m = socket.create_connection(("127.0.0.1", port))
for i in range(20):
    m.sendall(enc("SET", "c:%d" % i, "v" * 40)); assert read_until(m, 1) == b"+OK\r\n"
    m.sendall(enc("INCR", "mix:n")); assert read_until(m, 1) == b":%d\r\n" % (i + 1)
    m.sendall(enc("GET", "c:%d" % i)); assert read_until(m, 2).startswith(b"$40\r\n")
    m.sendall(enc("GET", "mix:none")); assert read_until(m, 1) == b"$-1\r\n"
    m.sendall(enc("HSET", "h")); assert read_until(m, 1).startswith(b"-ERR")
    m.sendall(enc("RPUSH", "mix:q", "job%d" % i)); assert read_until(m, 1) == b":1\r\n"
    m.sendall(enc("BLMOVE", "mix:q", "mix:done", "LEFT", "RIGHT", "1"))
    job = b"job%d" % i
    assert read_until(m, 2) == b"$%d\r\n%s\r\n" % (len(job), job)
m.close()
print("done", flush=True)
"#
);

/// A RESP3 client (`HELLO 3`, as Sidekiq 7's redis-client and redis-py's `protocol=3` speak):
/// its nulls, doubles, maps and sets, and the invalidation pushes that client-side caching
/// (`CLIENT TRACKING`) sends out of band, between pops and while one waits. It waits on its
/// stdin until the agent follows it, so its first write (HELLO pipelined with a BRPOP) is seen.
const RESP3_CLIENT: &str = concat!(
    r#"
import socket, sys, time
port = int(sys.argv[1])
"#,
    python_enc!(),
    r#"def read_until(s, n):
    data = b""
    while data.count(b"\r\n") < n:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data
print("ready", flush=True)
sys.stdin.readline()
s = socket.create_connection(("127.0.0.1", port))
o = socket.create_connection(("127.0.0.1", port))
# 1. HELLO 3 (a map reply) and a BRPOP that times out (a RESP3 null), in one write.
s.sendall(enc("HELLO", "3") + enc("BRPOP", "r3:q", "0.5"))
data = b""
while not data.endswith(b"\r\n_\r\n"):
    data += s.recv(65536)
assert data.startswith(b"%"), data
# 2. Client-side caching: a tracked key, then another client writes it. The invalidation push
#    comes before the next pop, which a push 300 ms later serves.
s.sendall(enc("CLIENT", "TRACKING", "ON")); assert read_until(s, 1) == b"+OK\r\n"
s.sendall(enc("GET", "r3:k")); assert read_until(s, 1) == b"_\r\n"
o.sendall(enc("SET", "r3:k", "v")); read_until(o, 1)
time.sleep(0.1)
s.sendall(enc("BRPOP", "r3:q", "5")); time.sleep(0.3)
o.sendall(enc("LPUSH", "r3:q", "job1")); read_until(o, 1)
data = b""
while b"job1" not in data:
    data += s.recv(65536)
assert data.startswith(b">2\r\n$10\r\ninvalidate\r\n") and data.endswith(b"*2\r\n$4\r\nr3:q\r\n$4\r\njob1\r\n"), data
# 3. A BZPOPMIN served with its score as a RESP3 double.
s.sendall(enc("BZPOPMIN", "r3:z", "5")); time.sleep(0.2)
o.sendall(enc("ZADD", "r3:z", "1.5", "m")); read_until(o, 1)
assert read_until(s, 6) == b"*3\r\n$4\r\nr3:z\r\n$1\r\nm\r\n,1.5\r\n"
# 4. Plain commands whose replies are RESP3 aggregates and scalars: a map, a set, doubles,
#    a null, a boolean-free integer.
s.sendall(enc("HSET", "r3:h", "a", "1")); assert read_until(s, 1) == b":1\r\n"
s.sendall(enc("HGETALL", "r3:h")); assert read_until(s, 5) == b"%1\r\n$1\r\na\r\n$1\r\n1\r\n"
s.sendall(enc("SADD", "r3:s", "x")); assert read_until(s, 1) == b":1\r\n"
s.sendall(enc("SMEMBERS", "r3:s")); assert read_until(s, 3) == b"~1\r\n$1\r\nx\r\n"
s.sendall(enc("ZSCORE", "r3:z2", "m")); assert read_until(s, 1) == b"_\r\n"
s.sendall(enc("ZADD", "r3:z2", "2.5", "m")); read_until(s, 1)
s.sendall(enc("ZSCORE", "r3:z2", "m")); assert read_until(s, 1) == b",2.5\r\n"
# 5. The push arrives while a pop waits (200 ms in); the element 400 ms in: the pop ends on
#    its reply, not on the push.
s.sendall(enc("GET", "r3:k")); assert read_until(s, 2) == b"$1\r\nv\r\n"
s.sendall(enc("BLPOP", "r3:q", "5")); time.sleep(0.2)
o.sendall(enc("SET", "r3:k", "w")); read_until(o, 1)
time.sleep(0.2)
o.sendall(enc("LPUSH", "r3:q", "job2")); read_until(o, 1)
data = b""
while b"job2" not in data:
    data += s.recv(65536)
assert data.startswith(b">2\r\n") and data.endswith(b"$4\r\njob2\r\n"), data
# 6. A BZPOPMIN that times out: a RESP3 null again.
s.sendall(enc("BZPOPMIN", "r3:z", "0.3")); assert read_until(s, 1) == b"_\r\n"
print("done", flush=True)
"#
);

/// RESP3 on one connection, followed through the default mode beside Redis (libc uprobes):
/// every pop counted once with its outcome and its own wait, however the replies around it
/// are shaped, and nothing taken for a desync.
#[test]
fn a_resp3_connection_with_pushes_out_of_band_is_followed_exactly() {
    require_root();
    let redis = Redis::start(&[]);
    let agent = Agent::start(&["--worker-rule", "resp3:cmdline=fanout-resp3-client"]);
    let mut client = ScriptedClient::start(RESP3_CLIENT, redis.port, "fanout-resp3-client");
    client.expect_line("ready");
    client.go_when_followed(&agent);
    client.expect_line("done");
    let s = wait_for("5 pops counted", Duration::from_secs(5), || {
        let s = agent.scrape();
        (pops_of(&s, "resp3") == 5.0).then_some(s)
    });
    let by = |cmd: &str, outcome: &str| pops_by(&s, "resp3", cmd, outcome);
    let (n, t) = by("BRPOP", "timeout");
    assert_eq!(n, 1.0, "the BRPOP pipelined after HELLO 3 timed out once");
    assert!((0.5..0.7).contains(&t), "it waited {t} s");
    let (n, t) = by("BRPOP", "served");
    assert_eq!(n, 1.0, "the BRPOP after an invalidation push was served");
    assert!((0.3..0.5).contains(&t), "it waited {t} s");
    let (n, t) = by("BLPOP", "served");
    assert_eq!(n, 1.0, "the BLPOP a push arrived during was served");
    // Not the push 200 ms in: the element 400 ms in.
    assert!((0.4..0.6).contains(&t), "it waited {t} s");
    let (n, t) = by("BZPOPMIN", "served");
    assert_eq!(n, 1.0, "the BZPOPMIN whose reply ends in a double");
    assert!((0.2..0.4).contains(&t), "it waited {t} s");
    let (n, t) = by("BZPOPMIN", "timeout");
    assert_eq!(n, 1.0, "the BZPOPMIN that got a RESP3 null");
    assert!((0.3..0.5).contains(&t), "it waited {t} s");
    for (cmd, outcome) in [("BRPOP", "error"), ("BLPOP", "timeout"), ("BLPOP", "error")] {
        assert_eq!(by(cmd, outcome).0, 0.0, "no {cmd} {outcome}");
    }
    assert_eq!(
        s.sum(&format!("{KEYS}_sum"), &[("process_group", "resp3")]),
        5.0,
        "one key each"
    );
    assert_eq!(
        s.sum("fanout_events_lost_total", &[("reason", "resp_desync")]),
        0.0
    );
    client.stop();
}

/// A worker that reaches its Redis over TLS (Python's ssl module, OpenSSL writing through
/// write()): it connects when told, does 5 BRPOPs that time out, says "done", and holds its
/// connection until its stdin closes. Given a plain port too, it also does one BRPOP there
/// first (a worker whose Redis is plain and that holds a TLS connection elsewhere).
const TLS_CLIENT: &str = r#"
import socket, ssl, sys
port, ca, plain = int(sys.argv[1]), sys.argv[3], int(sys.argv[4])
brpop = b"*3\r\n$5\r\nBRPOP\r\n$5\r\ntls:q\r\n$3\r\n0.2\r\n"
sys.stdin.readline()
if plain:
    p = socket.create_connection(("127.0.0.1", plain))
    p.sendall(brpop)
    assert p.recv(64) == b"*-1\r\n"
ctx = ssl.create_default_context(cafile=ca)
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="127.0.0.1")
for _ in range(5):
    s.sendall(brpop)
    assert s.recv(64) == b"*-1\r\n"
print("done", flush=True)
sys.stdin.readline()
"#;

/// A Redis that also listens for TLS (certificates from the tests' CA, kept in `dir`): the
/// server, the CA's file and the TLS port.
fn tls_redis(dir: &std::path::Path) -> (Redis, String, u16) {
    let ca = integration_tests::otlp_receiver::TestCa::new("fanout test CA");
    let issued = ca.issue(&["127.0.0.1"]);
    let file = |name: &str, pem: &str| {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        path.to_str().unwrap().to_string()
    };
    let (ca_file, cert, key) = (
        file("ca.pem", &ca.cert_pem()),
        file("cert.pem", &issued.cert_pem),
        file("key.pem", &issued.key_pem),
    );
    let tls_port = integration_tests::free_port();
    let redis = Redis::start(&[
        "--tls-port",
        &tls_port.to_string(),
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
        "--tls-ca-cert-file",
        &ca_file,
        "--tls-auth-clients",
        "no",
    ]);
    (redis, ca_file, tls_port)
}

/// With `--no-tls-probes`, commands sent over TLS are encrypted where the probes read them:
/// the agent cannot count that worker's pops, and says so, in
/// `fanout_workers_unfollowed{reason="tls"}` and once in its log with the peer, for as long
/// as the worker holds the connection.
#[test]
fn with_tls_probes_off_a_worker_that_talks_tls_is_reported_as_not_seen() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let (redis, ca_file, tls_port) = tls_redis(dir.path());
    let tls_port = tls_port.to_string();
    let agent = Agent::start(&[
        "--worker-rule",
        "tls:cmdline=fanout-tls-client",
        "--no-tls-probes",
    ]);
    // One worker whose only Redis connection is TLS, one that also has a plain one.
    let plain_port = redis.port.to_string();
    let mut clients: Vec<ScriptedClient> = ["0", plain_port.as_str()]
        .into_iter()
        .map(|plain| {
            ScriptedClient::start_with(
                TLS_CLIENT,
                tls_port.parse().unwrap(),
                "fanout-tls-client",
                &[&ca_file, plain],
            )
        })
        .collect();
    for client in &mut clients {
        client.go_when_followed(&agent);
        client.expect_line("done");
    }
    let pid = clients[0].pid();
    let unfollowed = |s: &Scrape| {
        s.find("fanout_workers_unfollowed", &[("reason", "tls")])
            .next()
            .map_or(-1.0, |sample| sample.value)
    };
    // The second holds a followed RESP connection: its Redis is seen, so it is not counted.
    let s = wait_for("the TLS worker reported", Duration::from_secs(5), || {
        let s = agent.scrape();
        (unfollowed(&s) == 1.0 && pops_of(&s, "tls") == 1.0).then_some(s)
    });
    // What it cannot see: none of the 10 pops over TLS; the plain one is counted.
    assert_eq!(pops_of(&s, "tls"), 1.0);
    assert_eq!(
        s.sum("fanout_events_lost_total", &[("reason", "resp_desync")]),
        0.0,
        "TLS records are not taken for broken RESP"
    );
    let log = agent.log();
    let said: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("worker holds TLS connections"))
        .collect();
    assert_eq!(said.len(), 1, "said once, of one worker: {log}");
    assert!(
        said[0].contains(&format!("pid={pid}"))
            && said[0].contains(&format!("127.0.0.1:{tls_port}"))
            && said[0].contains("--no-tls-probes"),
        "{}",
        said[0]
    );
    // The connections closed, the workers gone: nothing left to report.
    for mut client in clients {
        client.stop();
    }
    wait_for("the report gone", Duration::from_secs(10), || {
        (unfollowed(&agent.scrape()) == 0.0).then_some(())
    });
    drop(redis);
}

/// A TLS client for [`workers_talking_tls_are_followed_through_openssl`], in Python (its
/// `ssl` calls `SSL_write_ex`/`SSL_read_ex`). One connection made before the agent follows
/// the worker's TLS (its descriptor learnt from its first TLS write after the OpenSSL probes
/// went in), one made after (learnt at `SSL_set_fd`).
const TLS_FOLLOWED_PY: &str = r#"
import socket, ssl, sys
port, ca, key = int(sys.argv[1]), sys.argv[3], sys.argv[4].encode()
def cmd(*args):
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)
ctx = ssl.create_default_context(cafile=ca)
def connect():
    return ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="127.0.0.1")
def call(s, request, want):
    s.sendall(request)
    got = b""
    while len(got) < len(want):
        chunk = s.recv(4096)
        assert chunk, "closed"
        got += chunk
    assert got == want, got
brpop, nil = cmd(b"BRPOP", key, b"0.2"), b"*-1\r\n"
early = connect()
sys.stdin.readline()
call(early, brpop, nil)
print("tls-seen", flush=True)
sys.stdin.readline()
call(early, brpop, nil)
call(early, brpop, nil)
late = connect()
call(late, cmd(b"LPUSH", key, b"job1", b"job2"), b":2\r\n")
for job in (b"job1", b"job2"):
    call(late, brpop, b"*2\r\n$%d\r\n%s\r\n$4\r\n%s\r\n" % (len(key), key, job))
call(early, brpop, nil)
print("done", flush=True)
sys.stdin.readline()
"#;

/// The same client in Ruby, whose `openssl` calls `SSL_write` and `SSL_read`.
const TLS_FOLLOWED_RB: &str = r#"
require "socket"
require "openssl"
port, ca, key = ARGV[0].to_i, ARGV[2], ARGV[3]
def cmd(*args) = "*#{args.size}\r\n" + args.map { |a| "$#{a.bytesize}\r\n#{a}\r\n" }.join
$ctx = OpenSSL::SSL::SSLContext.new
$ctx.ca_file = ca
$ctx.verify_mode = OpenSSL::SSL::VERIFY_PEER
def connect(port)
  s = OpenSSL::SSL::SSLSocket.new(TCPSocket.new("127.0.0.1", port), $ctx)
  s.hostname = "127.0.0.1"
  s.sync = true
  s.sync_close = true
  s.connect
  s
end
def call(s, request, want)
  s.write(request)
  got = +""
  got << s.readpartial(4096) while got.bytesize < want.bytesize
  raise "got #{got.inspect}" unless got == want
end
brpop, nil_reply = cmd("BRPOP", key, "0.2"), "*-1\r\n"
early = connect(port)
$stdin.gets
call(early, brpop, nil_reply)
puts "tls-seen"; $stdout.flush
$stdin.gets
call(early, brpop, nil_reply)
call(early, brpop, nil_reply)
late = connect(port)
call(late, cmd("LPUSH", key, "job1", "job2"), ":2\r\n")
%w[job1 job2].each { |job| call(late, brpop, "*2\r\n$#{key.bytesize}\r\n#{key}\r\n$4\r\n#{job}\r\n") }
call(early, brpop, nil_reply)
puts "done"; $stdout.flush
$stdin.gets
"#;

/// Workers that reach Redis over TLS (`rediss://`) are followed through their OpenSSL once
/// the kernel sees them write TLS records: their pops counted exactly, by outcome, on a
/// connection made before that (its descriptor learnt from its TLS writes) and on one made
/// after (learnt at `SSL_set_fd`), whichever form of the calls the language uses (Python:
/// `SSL_write_ex`/`SSL_read_ex`; Ruby: `SSL_write`/`SSL_read`). Nothing is reported unseen.
#[test]
fn workers_talking_tls_are_followed_through_openssl() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let (redis, ca_file, tls_port) = tls_redis(dir.path());
    let agent = Agent::start(&[
        "--worker-rule",
        "tlspy:cmdline=fanout-tls-py",
        "--worker-rule",
        "tlsrb:cmdline=fanout-tls-rb",
    ]);
    let mut clients = [
        (
            "tlspy",
            ScriptedClient::start_with(
                TLS_FOLLOWED_PY,
                tls_port,
                "fanout-tls-py",
                &[&ca_file, "tls:py"],
            ),
        ),
        (
            "tlsrb",
            ScriptedClient::start_ruby(
                TLS_FOLLOWED_RB,
                tls_port,
                "fanout-tls-rb",
                &[&ca_file, "tls:rb"],
            ),
        ),
    ];
    for (_, client) in &mut clients {
        client.go_when_followed(&agent);
        client.expect_line("tls-seen");
    }
    for (_, client) in &mut clients {
        let probed = format!("worker talks TLS: its TLS connections are followed through OpenSSL from their next command pid={} ", client.pid());
        let log = wait_for("OpenSSL probes attached", Duration::from_secs(10), || {
            let log = agent.log();
            log.contains(&probed).then_some(log)
        });
        assert!(!log.contains("TLS library cannot be probed"), "{log}");
        client.go();
        client.expect_line("done");
    }
    let s = wait_for("5 pops of each counted", Duration::from_secs(5), || {
        let s = agent.scrape();
        clients
            .iter()
            .all(|(group, _)| pops_of(&s, group) >= 5.0)
            .then_some(s)
    });
    for (group, _) in &clients {
        // The first pop of the early connection went before the probes: not seen.
        assert_eq!(pops_of(&s, group), 5.0, "{group}");
        let (timeouts, waited) = pops_by(&s, group, "BRPOP", "timeout");
        assert_eq!(timeouts, 3.0, "{group}");
        assert!(
            (0.55..1.5).contains(&waited),
            "{group}: 3 timeouts of 0.2 s took {waited}"
        );
        assert_eq!(pops_by(&s, group, "BRPOP", "served").0, 2.0, "{group}");
        // The served ones on the connection made after the probes, with its server.
        let port = tls_port.to_string();
        assert_eq!(
            s.sum(
                &format!("{DURATION}_count"),
                &[
                    ("process_group", group),
                    ("outcome", "served"),
                    ("server_address", "127.0.0.1"),
                    ("server_port", &port),
                ],
            ),
            2.0,
            "{group}"
        );
    }
    assert_eq!(
        s.sum("fanout_events_lost_total", &[("reason", "resp_desync")]),
        0.0
    );
    assert_eq!(
        s.find("fanout_workers_unfollowed", &[("reason", "tls")])
            .next()
            .map_or(-1.0, |sample| sample.value),
        0.0
    );
    for (_, mut client) in clients {
        client.stop();
    }
    drop(redis);
}

#[test]
fn raw_client_split_writes_pipelining_nonblocking_reads_and_closed_connections() {
    raw_client_checks(&["--worker-probe-mode", "syscalls"]);
}

/// The same client followed through uprobes on its libc (send/recv) instead of syscalls.
#[test]
fn raw_client_through_libc_uprobes() {
    raw_client_checks(&["--worker-probe-mode", "libc"]);
}

/// The same client, with the programs that follow reads where they returned refused (as a
/// kernel without BTF refuses `worker_exit_read_regs`): the agent falls back to following
/// reads at their entry and return, in both modes, and counts the same.
#[test]
fn reads_followed_at_entry_and_return_where_the_exit_programs_are_refused() {
    let refuse = [(
        "FANOUT_REFUSE_PROGRAMS",
        "worker_exit_read_regs,worker_libc_read_done",
    )];
    for mode in ["syscalls", "libc"] {
        let log = raw_client_checks_with_env(&["--worker-probe-mode", mode], &refuse);
        let fallback = if mode == "syscalls" {
            "read() and recvfrom() are followed at their entry and exit"
        } else {
            "reads are probed at their entry and return"
        };
        assert!(log.contains(fallback), "{mode}: {log}");
    }
}

fn raw_client_checks(mode: &[&str]) {
    raw_client_checks_with_env(mode, &[]);
}

/// Runs the raw client's checks under an agent started with `mode` and `env`; returns the
/// agent's log.
fn raw_client_checks_with_env(mode: &[&str], env: &[(&str, &str)]) -> String {
    require_root();
    let redis = Redis::start(&[]);
    let mut args = vec!["--worker-rule", "raw:cmdline=fanout-raw-client"];
    args.extend_from_slice(mode);
    let agent = Agent::start_with_env(&args, env);
    let mut client = ScriptedClient::start(RAW_CLIENT, redis.port, "fanout-raw-client");
    let pid = client.pid();
    client.expect_line("piped-sent");
    thread::sleep(Duration::from_millis(300));
    redis.command(&["LPUSH", "piped:q", "job"]);
    client.expect_line("nb-sent");
    thread::sleep(Duration::from_millis(200));
    redis.command(&["LPUSH", "nb:q", "job"]);
    client.expect_line("done");
    let s = wait_for("31 pops counted", Duration::from_secs(5), || {
        let s = agent.scrape();
        (pops_of(&s, "raw") == 31.0).then_some(s)
    });
    let by = |cmd: &str, outcome: &str| pops_by(&s, "raw", cmd, outcome);
    let (n, t) = by("BRPOP", "timeout");
    assert_eq!(n, 1.0, "the split BRPOP timed out once ({pid})");
    assert!((1.0..1.2).contains(&t), "split BRPOP waited {t} s");
    let (n, t) = by("BRPOP", "served");
    assert_eq!(n, 1.0, "the pipelined BRPOP was served");
    // Not the immediate +OK of the SET before it: the push 300 ms later.
    assert!((0.3..0.5).contains(&t), "pipelined BRPOP waited {t} s");
    let (n, t) = by("BLPOP", "served");
    assert_eq!(n, 1.0, "the non-blocking BLPOP was served");
    assert!((0.2..0.4).contains(&t), "non-blocking BLPOP waited {t} s");
    let (n, _) = by("BRPOP", "error");
    assert_eq!(n, 1.0, "the pop whose connection closed ends as an error");
    let (n, t) = by("BZPOPMIN", "served");
    assert_eq!(n, 6.0, "five repeats and one on another key, all served");
    assert!(t < 0.5, "served BZPOPMINs waited {t} s in all");
    let (n, t) = by("BZPOPMIN", "timeout");
    assert_eq!(n, 1.0, "the repeat of the other key timed out");
    assert!(
        (1.0..1.2).contains(&t),
        "the timed-out BZPOPMIN waited {t} s"
    );
    let (n, t) = by("BLMOVE", "served");
    assert_eq!(
        n, 20.0,
        "every BLMOVE between plain commands ended on its own reply"
    );
    assert!(t < 0.5, "served BLMOVEs waited {t} s in all");
    for outcome in ["timeout", "error"] {
        assert_eq!(by("BLMOVE", outcome).0, 0.0, "no BLMOVE {outcome}");
    }
    // Every one listed one key; nothing was lost to parsing.
    assert_eq!(
        s.sum(&format!("{KEYS}_sum"), &[("process_group", "raw")]),
        31.0
    );
    assert_eq!(
        s.sum("fanout_events_lost_total", &[("reason", "resp_desync")]),
        0.0
    );
    client.stop();
    agent.log()
}

#[test]
fn malformed_bytes_from_a_worker_are_counted_and_skipped() {
    require_root();
    let redis = Redis::start(&[]);
    let agent = Agent::start(&["--worker-rule", "raw:cmdline=fanout-raw-client"]);
    // Garbage that starts like RESP, then a valid BRPOP on a fresh connection.
    let script = r#"
import socket, sys, time
port = int(sys.argv[1])
time.sleep(0.5)
s = socket.create_connection(("127.0.0.1", port))
s.sendall(b"*2\r\n$5\r\nBRPOP\r\n+garbage\r\n")
s.recv(1024)
t = socket.create_connection(("127.0.0.1", port))
t.sendall(b"*3\r\n$5\r\nBRPOP\r\n$3\r\nq:x\r\n$3\r\n0.1\r\n")
t.recv(1024)
"#;
    let status = Command::new("/usr/bin/python3")
        .args(["-c", script, &redis.port.to_string(), "fanout-raw-client"])
        .status()
        .unwrap();
    assert!(status.success());
    let s: Scrape = wait_for("the valid pop", Duration::from_secs(5), || {
        let s = agent.scrape();
        (s.sum(&format!("{DURATION}_count"), &[("process_group", "raw")]) == 1.0).then_some(s)
    });
    assert!(
        s.sum("fanout_events_lost_total", &[("reason", "resp_desync")]) >= 1.0,
        "the malformed stream is counted"
    );
    assert_eq!(
        s.sum(
            &format!("{DURATION}_count"),
            &[("process_group", "raw"), ("outcome", "timeout")]
        ),
        1.0
    );
    // Redis itself is unharmed by the agent.
    assert_eq!(redis.command(&["PING"]), "+PONG\r\n");
}

#[test]
fn worker_probes_can_be_turned_off_and_then_cost_nothing() {
    require_root();
    let redis = Redis::start(&[]);
    let agent = Agent::start(&[
        "--worker-rule",
        "raw:cmdline=fanout-raw-client",
        "--no-worker-probes",
    ]);
    let script = r#"
import socket, sys, time
time.sleep(0.5)
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"*3\r\n$5\r\nBRPOP\r\n$3\r\nq:x\r\n$3\r\n0.1\r\n")
s.recv(1024)
"#;
    let status = Command::new("/usr/bin/python3")
        .args(["-c", script, &redis.port.to_string(), "fanout-raw-client"])
        .status()
        .unwrap();
    assert!(status.success());
    let s = agent.scrape();
    // The worker was tracked (its CPU is measured) but its syscalls were not followed.
    assert!(agent.log().contains("tracking process"), "{}", agent.log());
    assert_eq!(s.find(&format!("{DURATION}_count"), &[]).count(), 0);
    assert!(!agent.log().contains("worker syscall probes attached"));
}

#[test]
fn sidekiq_through_libc_uprobes_counts_served_pops_exactly() {
    require_root();
    let redis = Redis::start(&[]);
    let agent = Agent::start(&[
        "--worker-probe-mode",
        "libc",
        "--worker-rule",
        &group_rule("lib"),
    ]);
    let fleet = Sidekiq::start_tagged(redis.port, Some("lib"), &["a", "b", "c"], 1);
    wait_for("the fleet blocking", Duration::from_secs(15), || {
        (agent
            .scrape()
            .sum(&format!("{KEYS}_count"), &[("process_group", "lib")])
            >= 1.0)
            .then_some(())
    });
    assert!(
        agent.log().contains("worker libc probes attached"),
        "{}",
        agent.log()
    );
    assert!(
        !agent.log().contains("worker syscall probes attached"),
        "no syscall tracepoints in libc mode"
    );
    // Sidekiq's connections send through sendto(), its logs go through write(): that probe
    // goes, and the pops below are counted without it.
    wait_for(
        "the fleet's write() probe out",
        Duration::from_secs(10),
        || {
            (agent
                .scrape()
                .sum("fanout_workers_probe_off", &[("call", "write")])
                == 1.0)
                .then_some(())
        },
    );
    for jid in 0..5 {
        thread::sleep(Duration::from_millis(300));
        enqueue_sidekiq_job(&redis, "b", jid);
    }
    // Jobs that use Redis: five plain commands each on the connections that fetch, between
    // the pops. Every pop must still end on its own reply.
    for jid in 5..10 {
        thread::sleep(Duration::from_millis(300));
        let job = integration_tests::sidekiq_job_of_class("RedisWorkJob", "b", jid);
        redis.command(&["LPUSH", "queue:b", &job]);
    }
    let s = wait_for("10 served pops", Duration::from_secs(10), || {
        let s = agent.scrape();
        (s.sum(
            &format!("{DURATION}_count"),
            &[("process_group", "lib"), ("outcome", "served")],
        ) == 10.0)
            .then_some(s)
    });
    assert_eq!(
        redis.command(&["GET", "work:count"]),
        "$1\r\n5\r\n",
        "the five RedisWorkJobs ran"
    );
    let g = [("process_group", "lib")];
    assert_eq!(
        s.sum(
            &format!("{DURATION}_count"),
            &[("process_group", "lib"), ("outcome", "error")]
        ),
        0.0,
        "no pop ended on a plain command's reply"
    );
    assert_eq!(
        s.sum("fanout_events_lost_total", &[("reason", "resp_desync")]),
        0.0
    );
    assert_eq!(
        s.sum(&format!("{KEYS}_sum"), &g),
        3.0 * s.sum(&format!("{KEYS}_count"), &g),
        "every pop lists 3 keys ({})",
        fleet.pid()
    );
    assert_eq!(s.sum("worker_queues_listened", &g), 3.0);
    // Those replies were read where recvfrom's system call returned: Debian's glibc returns
    // through `syscall; cmp; ja` on both of its paths, so the probes are on those two `ja`s
    // (an int3 in the fleet's memory), and none is at the function's entry site.
    let libc = mapped_libc(fleet.pid());
    let sites = fanout::ebpf::uprobe_multi::resolve_probe_sites(&libc, &["recvfrom"]).unwrap();
    let exits = sites.syscall_exits.get("recvfrom").unwrap_or_else(|| {
        panic!(
            "{} has no probeable syscall return in recvfrom (this test expects Debian 12's glibc)",
            libc.display()
        )
    });
    assert_eq!(exits.len(), 2, "{exits:x?}");
    for exit in exits {
        assert_eq!(
            integration_tests::mapped_byte(fleet.pid(), &libc, *exit),
            0xcc,
            "probe at {exit:#x}"
        );
    }
    assert_ne!(
        integration_tests::mapped_byte(fleet.pid(), &libc, sites.entries["recvfrom"]),
        0xcc,
        "no entry probe on recvfrom"
    );
    assert!(
        agent
            .log()
            .contains(r#"reads_probed_where_they_returned=["read", "recv", "recvfrom"]"#),
        "{}",
        agent.log()
    );
}

/// The libc.so the process `pid` maps.
fn mapped_libc(pid: u32) -> std::path::PathBuf {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| {
            p.rsplit('/')
                .next()
                .is_some_and(|n| n.starts_with("libc.so"))
        })
        .map(std::path::PathBuf::from)
        .expect("libc mapped")
}

/// A worker with no libc.so (statically linked, as Go binaries are) doing 3 BRPOPs that time
/// out, in raw syscalls.
const STATIC_CLIENT: &str = r#"
#include <arpa/inet.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
int main(int argc, char **argv) {
    usleep(500000); /* the agent picks the process up in tens of ms */
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[1])) };
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(s, (struct sockaddr *)&a, sizeof a) != 0) return 1;
    const char *req = "*3\r\n$5\r\nBRPOP\r\n$8\r\nstatic:q\r\n$3\r\n0.2\r\n";
    char buf[64];
    for (int i = 0; i < 3; i++) {
        if (write(s, req, strlen(req)) != (ssize_t)strlen(req)) return 2;
        if (read(s, buf, sizeof buf) < 5 || memcmp(buf, "*-1\r\n", 5) != 0) return 3;
    }
    usleep(1500000); /* stays tracked while the other client runs */
    return 0;
}
"#;

/// Builds the static test worker; `stripped` drops its symbol table, so that it has no C
/// library functions to probe (as a Go binary has none).
fn static_worker(dir: &std::path::Path, name: &str, stripped: bool) -> std::path::PathBuf {
    let source = dir.join("static-client.c");
    let binary = dir.join(name);
    std::fs::write(&source, STATIC_CLIENT).unwrap();
    let built = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&binary)
        .arg(&source)
        .args(if stripped { &["-s"][..] } else { &[][..] })
        .status()
        .expect("gcc (installed by cargo xtask setup)");
    assert!(built.success(), "static test worker did not build");
    binary
}

/// A Python client doing `pops` BRPOPs that time out, after `delay` seconds.
fn py_client(port: u16, tag: &str, delay: f64, pops: u32) -> std::process::Child {
    let script = r#"
import socket, sys, time
time.sleep(float(sys.argv[2]))
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
for _ in range(int(sys.argv[3])):
    s.sendall(b"*3\r\n$5\r\nBRPOP\r\n$4\r\npy:q\r\n$3\r\n0.2\r\n")
    assert s.recv(64).startswith(b"*-1")
time.sleep(1.0)
"#;
    Command::new("/usr/bin/python3")
        .args([
            "-c",
            script,
            &port.to_string(),
            &delay.to_string(),
            &pops.to_string(),
            tag,
        ])
        .spawn()
        .unwrap()
}

fn pops_of(s: &Scrape, group: &str) -> f64 {
    s.sum(&format!("{DURATION}_count"), &[("process_group", group)])
}

/// Count and sum (seconds) of the pops of `group` by command and outcome.
fn pops_by(s: &Scrape, group: &str, command: &str, outcome: &str) -> (f64, f64) {
    let matchers = [
        ("process_group", group),
        ("redis_command", command),
        ("outcome", outcome),
    ];
    (
        s.sum(&format!("{DURATION}_count"), &matchers),
        s.sum(&format!("{DURATION}_sum"), &matchers),
    )
}

/// A Python (or Ruby) client script run with the Redis port and the marker its worker rule
/// matches, telling the test which step it reached by the lines it prints (and, where it
/// waits on its stdin, told when to go on).
struct ScriptedClient {
    proc: Proc,
    out: std::io::BufReader<std::process::ChildStdout>,
    stdin: std::process::ChildStdin,
}

impl ScriptedClient {
    fn start(script: &str, port: u16, marker: &str) -> Self {
        Self::start_with(script, port, marker, &[])
    }

    /// [`Self::start`] with more arguments after the marker.
    fn start_with(script: &str, port: u16, marker: &str, more: &[&str]) -> Self {
        Self::start_in(["/usr/bin/python3", "-c"], script, port, marker, more)
    }

    /// A Ruby script, its arguments as [`Self::start_with`]'s (`ARGV[0]` the port).
    fn start_ruby(script: &str, port: u16, marker: &str, more: &[&str]) -> Self {
        Self::start_in(["/usr/bin/ruby", "-e"], script, port, marker, more)
    }

    fn start_in(
        [interpreter, flag]: [&str; 2],
        script: &str,
        port: u16,
        marker: &str,
        more: &[&str],
    ) -> Self {
        let mut child = Command::new(interpreter)
            .args([flag, script, &port.to_string(), marker])
            .args(more)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        let stdin = child.stdin.take().unwrap();
        Self {
            proc: Proc {
                child,
                name: marker.into(),
            },
            out,
            stdin,
        }
    }

    fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Waits for the client's next line and checks it.
    fn expect_line(&mut self, want: &str) {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut self.out, &mut line).unwrap();
        assert_eq!(line.trim(), want, "{} said", self.proc.name);
    }

    /// Lets a client waiting on its stdin go on.
    fn go(&mut self) {
        std::io::Write::write_all(&mut self.stdin, b"go\n").unwrap();
    }

    /// Lets a client waiting on its stdin go on once `agent` has attached its libc probes to
    /// it, so that its first write is seen.
    fn go_when_followed(&mut self, agent: &Agent) {
        let attached = format!("worker libc probes attached pid={} ", self.pid());
        wait_for("the client followed", Duration::from_secs(10), || {
            agent.log().contains(&attached).then_some(())
        });
        self.go();
    }

    fn stop(&mut self) {
        self.proc.stop();
    }
}

/// Beside a Redis the agent tracks, the default mode keeps every syscall tracepoint off (Redis
/// would pay them on each request) and follows each worker through uprobes in its own code:
/// the Python one through its libc, the static one through the C library functions linked
/// into it. A stripped static worker has none: it is not followed, and says so, unless
/// `--syscall-probes-beside-redis` lets the tracepoints follow it.
#[test]
fn auto_mode_beside_redis_follows_workers_through_their_own_code_only() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let linked = static_worker(dir.path(), "fanout-static-client", false);
    let stripped = static_worker(dir.path(), "fanout-stripped-client", true);
    let redis = Redis::start(&[]);
    let rules = [
        "--worker-rule",
        "static:cmdline=fanout-static-client",
        "--worker-rule",
        "stripped:cmdline=fanout-stripped-client",
        "--worker-rule",
        "py:cmdline=fanout-py-client",
    ];
    let port = redis.port.to_string();
    for beside_redis in [false, true] {
        let mut args = rules.to_vec();
        if beside_redis {
            args.push("--syscall-probes-beside-redis");
        }
        let agent = Agent::start(&args);
        let mut a = Command::new(&linked).arg(&port).spawn().unwrap();
        let mut b = Command::new(&stripped).arg(&port).spawn().unwrap();
        let mut py = py_client(redis.port, "fanout-py-client", 0.9, 2);
        assert!(py.wait().unwrap().success());
        assert!(a.wait().unwrap().success() && b.wait().unwrap().success());
        let s = agent.scrape();
        let log = agent.log();
        assert_eq!(pops_of(&s, "static"), 3.0, "{log}");
        assert_eq!(pops_of(&s, "py"), 2.0, "{log}");
        assert!(log.contains("worker libc probes attached"), "{log}");
        assert!(
            log.contains("/exe"),
            "the static worker's own executable is probed: {log}"
        );
        if beside_redis {
            assert_eq!(pops_of(&s, "stripped"), 3.0, "{log}");
            assert!(log.contains("worker syscall probes attached"), "{log}");
        } else {
            assert_eq!(pops_of(&s, "stripped"), 0.0, "{log}");
            assert!(!log.contains("worker syscall probes attached"), "{log}");
            assert!(log.contains("this worker is not followed"), "{log}");
            // Its process is gone by now; while it lived the gauge said 1 (checked in the log
            // above); the gauge itself is exported.
            assert_eq!(
                s.find("fanout_workers_unfollowed", &[("reason", "redis_on_node")])
                    .count(),
                1
            );
        }
    }
}

/// On a node where the agent tracks no Redis (here: every `redis-server` is excluded, the
/// one the worker uses and any other on the machine), the default mode follows workers
/// through the syscall tracepoints. When a Redis appears (a copy of the server under another
/// name, found by its binary), the workers move to uprobes and the tracepoints are detached
/// at once; the pops before and after are each counted once.
#[test]
fn auto_mode_uses_the_tracepoints_without_redis_and_moves_workers_when_one_appears() {
    require_root();
    let hidden = Redis::start(&[]);
    let agent = Agent::start(&[
        "--redis-exclude",
        "comm=redis-server",
        "--worker-rule",
        "py:cmdline=fanout-py-client",
    ]);
    let script = r#"
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
time.sleep(0.8)
for _ in range(2):
    s.sendall(b"*3\r\n$5\r\nBRPOP\r\n$4\r\npy:q\r\n$3\r\n0.2\r\n")
    assert s.recv(64).startswith(b"*-1")
open(sys.argv[2], "w").close()
for _ in range(600):  # at most 30 s, so that a failed test leaves nothing behind
    if __import__("os").path.exists(sys.argv[3]):
        break
    time.sleep(0.05)
for _ in range(3):
    s.sendall(b"*3\r\n$5\r\nBRPOP\r\n$4\r\npy:q\r\n$3\r\n0.2\r\n")
    assert s.recv(64).startswith(b"*-1")
"#;
    let dir = tempfile::tempdir().unwrap();
    let (first_done, go_on) = (dir.path().join("first"), dir.path().join("go"));
    let mut py = Command::new("/usr/bin/python3")
        .args(["-c", script, &hidden.port.to_string()])
        .arg(&first_done)
        .arg(&go_on)
        .arg("fanout-py-client")
        .spawn()
        .unwrap();
    wait_for("the first pops", Duration::from_secs(10), || {
        first_done.exists().then_some(())
    });
    let s = agent.scrape();
    assert_eq!(pops_of(&s, "py"), 2.0, "{}", agent.log());
    assert!(agent.log().contains("worker syscall probes attached"));
    assert!(!agent.log().contains("worker libc probes attached"));
    // A Redis the agent tracks appears on the node.
    let copy = dir.path().join("appearing-redis-server");
    std::fs::copy(
        std::fs::canonicalize("/usr/bin/redis-server").expect("redis-server"),
        &copy,
    )
    .unwrap();
    let mut appearing = integration_tests::Proc {
        child: Command::new(&copy)
            .args(["--port", &integration_tests::free_port().to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
        name: "appearing redis".into(),
    };
    wait_for(
        "the worker moved to uprobes and the tracepoints detached",
        Duration::from_secs(10),
        || {
            let log = agent.log();
            (log.contains("worker moved from the syscall tracepoints to uprobes")
                && log.contains("through the syscall tracepoints any more"))
            .then_some(())
        },
    );
    std::fs::write(&go_on, "").unwrap();
    assert!(py.wait().unwrap().success());
    appearing.stop();
    let s = agent.scrape();
    assert_eq!(pops_of(&s, "py"), 5.0, "{}", agent.log());
    assert_eq!(
        s.sum(
            &format!("{DURATION}_count"),
            &[("process_group", "py"), ("outcome", "timeout")]
        ),
        5.0
    );
}

/// Past `--max-libc-workers`, workers beside a Redis have no uprobe target left: with
/// `--syscall-probes-beside-redis` they go through the tracepoints, and each worker's pops
/// are still counted once.
#[test]
fn past_the_uprobe_worker_limit_workers_go_through_the_tracepoints_when_allowed() {
    require_root();
    let redis = Redis::start(&[]);
    let agent = Agent::start(&[
        "--max-libc-workers",
        "1",
        "--syscall-probes-beside-redis",
        "--worker-rule",
        "first:cmdline=fanout-first-client",
        "--worker-rule",
        "second:cmdline=fanout-second-client",
    ]);
    let mut first = py_client(redis.port, "fanout-first-client", 0.5, 2);
    thread::sleep(Duration::from_millis(200));
    let mut second = py_client(redis.port, "fanout-second-client", 0.7, 2);
    assert!(second.wait().unwrap().success());
    assert!(first.wait().unwrap().success());
    let s = agent.scrape();
    for group in ["first", "second"] {
        assert_eq!(
            pops_of(&s, group),
            2.0,
            "{group}: each pop once\n{}",
            agent.log()
        );
    }
    let log = agent.log();
    assert!(log.contains("worker libc probes attached"), "{log}");
    assert!(log.contains("--max-libc-workers"), "{log}");
    assert!(log.contains("worker syscall probes attached"), "{log}");
}

/// A Python worker whose first connection sends through `send` (socket.sendall) while it
/// logs through `write` (print), then, on cue, opens a second connection and sends through
/// `write` (os.write). The test drives it through its stdin and reads its log on stdout.
const NARROW_CLIENT: &str = r#"
import os, socket, sys, time
port = int(sys.argv[1])
time.sleep(1.0)  # the agent picks the process up first
def brpop(s, send):
    send(b"*3\r\n$5\r\nBRPOP\r\n$8\r\nnarrow:q\r\n$3\r\n0.1\r\n")
    assert s.recv(64).startswith(b"*-1")
a = socket.create_connection(("127.0.0.1", port))
for i in range(3):
    brpop(a, a.sendall)
    print("popped", i, flush=True)
print("a-done", flush=True)
sys.stdin.readline()
b = socket.create_connection(("127.0.0.1", port))
print("b-connected", flush=True)
sys.stdin.readline()
for i in range(3):
    brpop(b, lambda cmd: os.write(b.fileno(), cmd))
    print("popped through write", i, flush=True)
print("b-done", flush=True)
sys.stdin.readline()
"#;

/// A worker followed through uprobe-multi links whose Redis connection sends through `send`
/// loses its probe on `write` (its log lines no longer trap), and gets it back when it opens
/// a new connection to that Redis, whose commands through `write` are then counted.
#[test]
fn write_probe_goes_for_socket_only_workers_and_comes_back_for_a_new_connection() {
    require_root();
    if !fanout::ebpf::uprobe_multi::supported() {
        panic!("this kernel has no uprobe-multi links (nothing to test here; the perf-event uprobe test covers the fallback)");
    }
    narrow_client_checks("libc", &[]);
}

/// The same where uprobe-multi links are refused (kernels before 6.6; forced here): one
/// perf-event uprobe per site, whose link carries the cookie that tells `write` from `send`
/// (Linux 5.15).
#[test]
fn write_probe_goes_for_socket_only_workers_through_perf_event_uprobes() {
    require_root();
    narrow_client_checks("libc", &[("FANOUT_UPROBE_MULTI", "0")]);
}

/// The same through the syscall tracepoints: `sys_enter_write` and `sys_exit_read`, which
/// every process on the node pays, are detached while the only followed worker uses sendto
/// and recvfrom, and attached again when it connects a second time.
#[test]
fn sys_enter_write_goes_while_followed_workers_send_through_sendto() {
    require_root();
    narrow_client_checks("syscalls", &[]);
}

fn narrow_client_checks(mode: &str, env: &[(&str, &str)]) {
    use std::io::{BufRead, BufReader, Write};
    let uprobes = mode == "libc";
    let via = if uprobes { "uprobes" } else { "tracepoints" };
    let redis = Redis::start(&[]);
    let agent = Agent::start_with_env(
        &[
            "--worker-probe-mode",
            mode,
            "--worker-rule",
            "narrow:cmdline=fanout-narrow-client",
        ],
        env,
    );
    let mut child = Command::new("/usr/bin/python3")
        .args([
            "-c",
            NARROW_CLIENT,
            &redis.port.to_string(),
            "fanout-narrow-client",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut wait_line = |want: &str| loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("the client exited before {want:?}"))
            .unwrap();
        if line == want {
            break;
        }
    };
    let _proc = Proc {
        child,
        name: "narrow-client".into(),
    };
    let gauge = |s: &Scrape| {
        s.sum(
            "fanout_workers_probe_off",
            &[("via", via), ("call", "write")],
        )
    };
    // Through the tracepoints, read() goes as well: the worker reads through recvfrom.
    let read_gauge = |s: &Scrape| {
        s.sum(
            "fanout_workers_probe_off",
            &[("via", "tracepoints"), ("call", "read")],
        )
    };
    // With uprobes: the byte at write()'s probe site in the worker's memory (an int3 while
    // the probe is in).
    let write_site = || {
        let libc = mapped_libc(pid);
        let offsets =
            fanout::ebpf::uprobe_multi::resolve_probe_site_offsets(&libc, &["write"]).unwrap();
        integration_tests::mapped_byte(pid, &libc, offsets["write"])
    };
    let (out_line, back_line) = if uprobes {
        (
            format!("write() probe taken out: its Redis connections send through send/sendto, write() carries only its logs and pipes pid={pid}"),
            "write() probe put back".to_string(),
        )
    } else {
        (
            "sys_enter_write detached: every worker followed through the tracepoints uses the socket functions".to_string(),
            "sys_enter_write attached again".to_string(),
        )
    };
    wait_line("a-done");
    if uprobes {
        // How its uprobes were made: links, or one perf event per site where they are refused.
        let per_uprobe = env.contains(&("FANOUT_UPROBE_MULTI", "0"));
        let kind = if per_uprobe {
            "kind=\"uprobe\""
        } else {
            "kind=\"uprobe-multi\""
        };
        let log = agent.log();
        assert!(
            log.lines().any(
                |l| l.contains(&format!("worker libc probes attached pid={pid} "))
                    && l.contains(kind)
            ),
            "{kind}: {log}"
        );
    }
    // The first connection sent through send(): the write() probe goes.
    wait_for(
        "the write() probe taken out",
        Duration::from_secs(10),
        || (gauge(&agent.scrape()) == 1.0).then_some(()),
    );
    assert!(agent.log().contains(&out_line), "{}", agent.log());
    if !uprobes {
        wait_for(
            "read() tracepoints detached",
            Duration::from_secs(10),
            || (read_gauge(&agent.scrape()) == 1.0).then_some(()),
        );
    }
    if uprobes {
        wait_for("no breakpoint on write()", Duration::from_secs(5), || {
            (write_site() != 0xcc).then_some(())
        });
    }
    assert_eq!(pops_of(&agent.scrape(), "narrow"), 3.0);
    // A new connection to the same Redis: the probe comes back before it is used.
    stdin.write_all(b"go\n").unwrap();
    wait_line("b-connected");
    wait_for(
        "the write() probe put back",
        Duration::from_secs(10),
        || (gauge(&agent.scrape()) == 0.0).then_some(()),
    );
    assert!(agent.log().contains(&back_line), "{}", agent.log());
    if uprobes {
        assert_eq!(write_site(), 0xcc, "the breakpoint is back on write()");
    } else {
        assert_eq!(read_gauge(&agent.scrape()), 0.0, "{}", agent.log());
    }
    stdin.write_all(b"go\n").unwrap();
    wait_line("b-done");
    let s = wait_for("6 pops", Duration::from_secs(10), || {
        let s = agent.scrape();
        (pops_of(&s, "narrow") == 6.0).then_some(s)
    });
    assert_eq!(
        s.sum(
            &format!("{DURATION}_count"),
            &[("process_group", "narrow"), ("outcome", "timeout")]
        ),
        6.0
    );
    // Its connections now write through write(): the probe stays.
    thread::sleep(Duration::from_secs(3));
    assert_eq!(gauge(&agent.scrape()), 0.0, "{}", agent.log());
    stdin.write_all(b"go\n").unwrap();
}
