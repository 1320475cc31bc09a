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
