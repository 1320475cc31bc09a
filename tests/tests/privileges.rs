//! Too few privileges: the agent names the missing capabilities and falls back to /proc, or
//! exits when told to require eBPF. Root only (it drops capabilities from root with setpriv);
//! run with `sudo cargo xtask test`.

use std::{process::Command, time::Duration};

use integration_tests::{fanout_bin, require_root, wait_for, Agent, Redis};

const DROP: [&str; 5] = [
    "setpriv",
    "--bounding-set",
    "-bpf,-perfmon,-sys_admin",
    "--inh-caps",
    "-bpf,-perfmon,-sys_admin",
];

#[test]
fn without_cap_bpf_and_cap_perfmon_the_agent_says_so_and_measures_from_proc() {
    require_root();
    let redis = Redis::start(&[]);
    let agent = Agent::start_wrapped(&DROP, &fanout_bin(), &[], &[]);
    let pid = redis.pid().to_string();
    let s = wait_for(
        "the Redis per-thread CPU from /proc",
        Duration::from_secs(10),
        || {
            let s = agent.scrape();
            (s.find(
                "process_thread_cpu_time_seconds_total",
                &[("process_pid", &pid), ("thread_name", "redis-server")],
            )
            .count()
                == 2)
                .then_some(s)
        },
    );
    let log = agent.log();
    assert!(
        log.contains("CAP_BPF (loading eBPF programs and maps)"),
        "the log names CAP_BPF:\n{log}"
    );
    assert!(
        log.contains("CAP_PERFMON (attaching tracepoints and uprobes)"),
        "the log names CAP_PERFMON:\n{log}"
    );
    assert!(
        !log.contains("CAP_SYS_PTRACE ("),
        "CAP_SYS_PTRACE is still there and not reported missing"
    );
    // Every probe reported as not attached, the Redis reported as unprobed, no eBPF series.
    assert!(s.find("fanout_probes_attached", &[]).count() >= 4);
    assert_eq!(s.sum("fanout_probes_attached", &[]), 0.0);
    assert_eq!(
        s.sum(
            "fanout_probe_points",
            &[("process_pid", &pid), ("state", "unavailable")]
        ),
        4.0
    );
    assert_eq!(
        s.find("process_thread_runqueue_delay_seconds_count", &[])
            .count(),
        0
    );
}

#[test]
fn with_require_ebpf_it_exits_and_names_what_is_missing() {
    require_root();
    let out = Command::new(DROP[0])
        .args(&DROP[1..])
        .arg(fanout_bin())
        .args(["run", "--require-ebpf", "--no-prometheus"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("fanout: error: --require-ebpf: missing CAP_BPF"),
        "{err}"
    );
}

/// Exactly the capabilities the DaemonSet (deploy/kubernetes/fanout.yaml) and the systemd
/// unit (deploy/systemd/fanout.service) grant.
const DEPLOYMENT_CAPS: &str = "-all,+bpf,+perfmon,+sys_ptrace,+dac_read_search";

/// A worker: three BRPOPs of 0.2 s on a queue nobody fills, from a process the rule matches.
const WORKER: &str = r#"
import socket, sys, time
MARK = "fanout-priv-worker"
time.sleep(1.0)
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
for _ in range(3):
    s.sendall(b"*3\r\n$5\r\nBRPOP\r\n$7\r\npriv:q1\r\n$3\r\n0.2\r\n")
    assert s.recv(100).startswith(b"*-1"), "timeout reply"
print("done", flush=True)
"#;

#[test]
fn with_the_deployments_capabilities_every_probe_attaches_as_root_and_as_nobody() {
    require_root();
    for uid in [None, Some(65534u32)] {
        let mut wrapper: Vec<String> = vec!["setpriv".into()];
        if let Some(uid) = uid {
            wrapper.extend(
                [
                    "--reuid",
                    &uid.to_string(),
                    "--regid",
                    &uid.to_string(),
                    "--clear-groups",
                ]
                .map(String::from),
            );
        }
        for set in ["--inh-caps", "--ambient-caps", "--bounding-set"] {
            wrapper.extend([set.to_string(), DEPLOYMENT_CAPS.to_string()]);
        }
        let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
        let who = match uid {
            None => "uid 0".to_string(),
            Some(uid) => format!("uid {uid}"),
        };
        let redis = Redis::start(&[]);
        let pid = redis.pid().to_string();
        let agent = Agent::start_wrapped(
            &wrapper,
            &fanout_bin(),
            &["--worker-rule", "priv:cmdline=fanout-priv-worker"],
            &[],
        );
        // Every Redis probe point attached (idle until a client blocks): Debian's 7.0 has
        // three (blockForKeys, unblockClient, replyToBlockedClientTimedOut).
        wait_for(
            &format!("the Redis probe points ({who})"),
            Duration::from_secs(10),
            || {
                let s = agent.scrape();
                let states: Vec<String> = s
                    .find("fanout_probe_points", &[("process_pid", &pid)])
                    .filter(|p| p.value == 1.0)
                    .map(|p| p.labels["state"].clone())
                    .collect();
                (states.len() == 3 && states.iter().all(|s| s == "idle")).then_some(())
            },
        );
        let worker = Command::new("/usr/bin/python3")
            .args(["-c", WORKER, &redis.port.to_string(), "fanout-priv-worker"])
            .output()
            .unwrap();
        assert!(
            worker.status.success(),
            "{}",
            String::from_utf8_lossy(&worker.stderr)
        );
        let s = wait_for(
            &format!("three timeouts on both sides ({who})"),
            Duration::from_secs(5),
            || {
                let s = agent.scrape();
                let redis_side = s.sum(
                    "redis_blocking_duration_seconds_count",
                    &[("process_pid", &pid), ("outcome", "timeout")],
                );
                let worker_side = s.sum(
                    "worker_blocking_pop_duration_seconds_count",
                    &[("process_group", "priv"), ("outcome", "timeout")],
                );
                (redis_side == 3.0 && worker_side == 3.0).then_some(s)
            },
        );
        let log = agent.log();
        assert!(!log.contains("lacks capabilities"), "{who}: {log}");
        // The scheduler programs are attached, and the Redis points that fired are live.
        for probe in ["sched_switch_counters", "sched_process_exec"] {
            assert_eq!(
                s.sum("fanout_probes_attached", &[("probe", probe)]),
                1.0,
                "{who}: {probe}"
            );
        }
        let live: Vec<String> = s
            .find("fanout_probe_points", &[("process_pid", &pid)])
            .filter(|p| p.value == 1.0 && p.labels["state"] == "live")
            .map(|p| p.labels["probe"].clone())
            .collect();
        assert!(
            live.iter().any(|p| p == "blockForKeys")
                && live.iter().any(|p| p == "replyToBlockedClientTimedOut"),
            "{who}: live points {live:?}"
        );
        assert!(
            s.sum(
                "process_thread_runqueue_delay_seconds_count",
                &[("process_pid", &pid)]
            ) > 0.0,
            "{who}: Redis's run-queue delay"
        );
    }
}
