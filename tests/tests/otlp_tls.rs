//! OTLP over TLS against real TLS receivers (rustls, certificates made by a CA created for
//! each test): HTTP/protobuf and gRPC, gzip, mTLS, and what a wrong CA or a missing client
//! certificate does (a counted failure and a clear log line, not a crash). Root only; run with
//! `sudo cargo xtask test`.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::Ordering,
    time::Duration,
};

use integration_tests::{
    fanout_bin, http_get, otlp_receiver, otlp_receiver::ServerTls, otlp_receiver::TestCa,
    require_root, wait_for, Agent,
};

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// The agent pushing every 0.5 s to `endpoint`, with `env` (the OTEL_* TLS variables; the
/// testbed clears OTEL_EXPORTER_OTLP_ENDPOINT, so the endpoint is a flag).
fn agent(protocol: &str, endpoint: &str, env: &[(&str, &str)]) -> Agent {
    Agent::start_with_env(
        &[
            "--otlp-endpoint",
            endpoint,
            "--otlp-protocol",
            protocol,
            "--otlp-interval",
            "0.5",
        ],
        env,
    )
}

fn otlp_failures(agent: &Agent) -> f64 {
    agent
        .scrape()
        .sum("fanout_export_failures_total", &[("exporter", "otlp")])
}

fn server_tls(ca: &TestCa, client_ca: Option<&TestCa>) -> ServerTls {
    let server = ca.issue(&["127.0.0.1", "localhost"]);
    ServerTls {
        cert_pem: server.cert_pem,
        key_pem: server.key_pem,
        client_ca_pem: client_ca.map(TestCa::cert_pem),
    }
}

#[test]
fn http_over_tls_trusts_the_given_ca_and_compresses_with_gzip() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("fanout test CA");
    let receiver = otlp_receiver::http_tls(server_tls(&ca, None));
    let ca_file = write(dir.path(), "ca.pem", &ca.cert_pem());
    let endpoint = format!("https://127.0.0.1:{}", receiver.addr.port());
    let agent = agent(
        "http/protobuf",
        &endpoint,
        &[
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", ca_file.to_str().unwrap()),
            ("OTEL_EXPORTER_OTLP_METRICS_COMPRESSION", "gzip"),
        ],
    );
    let request = receiver.next(Duration::from_secs(15));
    assert!(!request.resource_metrics.is_empty());
    assert!(receiver.gzipped.load(Ordering::Relaxed) >= 1, "gzip-encoded");
    assert_eq!(otlp_failures(&agent), 0.0, "{}", agent.log());
}

#[test]
fn grpc_over_mtls_presents_the_client_certificate_and_compresses_with_gzip() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("fanout test CA");
    let clients = TestCa::new("fanout clients CA");
    let receiver = otlp_receiver::grpc_tls(server_tls(&ca, Some(&clients)));
    let client = clients.issue(&["fanout-agent"]);
    let ca_file = write(dir.path(), "ca.pem", &ca.cert_pem());
    let cert_file = write(dir.path(), "client.pem", &client.cert_pem);
    let key_file = write(dir.path(), "client.key", &client.key_pem);
    // Through the flags, which win over the environment.
    let endpoint = format!("https://127.0.0.1:{}", receiver.addr.port());
    let agent = Agent::start(&[
        "--otlp-endpoint",
        &endpoint,
        "--otlp-protocol",
        "grpc",
        "--otlp-interval",
        "0.5",
        "--otlp-certificate",
        ca_file.to_str().unwrap(),
        "--otlp-client-certificate",
        cert_file.to_str().unwrap(),
        "--otlp-client-key",
        key_file.to_str().unwrap(),
        "--otlp-compression",
        "gzip",
    ]);
    let request = receiver.next(Duration::from_secs(15));
    assert!(!request.resource_metrics.is_empty());
    assert!(receiver.gzipped.load(Ordering::Relaxed) >= 1, "gzip-encoded");
    assert_eq!(otlp_failures(&agent), 0.0, "{}", agent.log());
}

#[test]
fn a_wrong_ca_or_a_missing_client_certificate_is_a_counted_failure_not_a_crash() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("the collector's CA");
    let other = TestCa::new("another CA");
    let other_file = write(dir.path(), "other.pem", &other.cert_pem());

    // HTTP, the collector's certificate signed by a CA the agent was not told to trust.
    let receiver = otlp_receiver::http_tls(server_tls(&ca, None));
    let endpoint = format!("https://127.0.0.1:{}", receiver.addr.port());
    let agent_1 = agent(
        "http/protobuf",
        &endpoint,
        &[("OTEL_EXPORTER_OTLP_CERTIFICATE", other_file.to_str().unwrap())],
    );
    // gRPC, a collector that requires a client certificate the agent does not have.
    let ca_file = write(dir.path(), "ca.pem", &ca.cert_pem());
    let clients = TestCa::new("clients CA");
    let mtls = otlp_receiver::grpc_tls(server_tls(&ca, Some(&clients)));
    let endpoint = format!("https://127.0.0.1:{}", mtls.addr.port());
    let agent_2 = agent(
        "grpc",
        &endpoint,
        &[("OTEL_EXPORTER_OTLP_CERTIFICATE", ca_file.to_str().unwrap())],
    );

    for (agent, what) in [(&agent_1, "wrong CA"), (&agent_2, "no client certificate")] {
        wait_for(
            &format!("failed pushes counted ({what})"),
            Duration::from_secs(20),
            || (otlp_failures(agent) >= 2.0).then_some(()),
        );
        // Still serving, and it says why.
        assert_eq!(http_get(agent.port, "/readyz").unwrap().0, 200);
        let log = agent.log();
        assert!(
            log.contains("OTLP push failed") || log.contains("push failed"),
            "{what}: {log}"
        );
    }
    assert!(
        agent_1.log().to_lowercase().contains("certificate")
            || agent_1.log().contains("UnknownIssuer"),
        "the wrong CA is named: {}",
        agent_1.log()
    );
    assert_eq!(receiver.gzipped.load(Ordering::Relaxed), 0);
    assert!(
        std::iter::from_fn(|| mtls_try_next(&mtls)).next().is_none(),
        "nothing reached the mTLS collector"
    );

    // A CA file that does not exist: a clear error at start, not a silent exporter.
    let out = Command::new(fanout_bin())
        .args(["run", "--no-prometheus", "--otlp-endpoint", "https://127.0.0.1:1", "--otlp-certificate"])
        .arg(dir.path().join("missing.pem"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot read CA file") && stderr.contains("missing.pem"),
        "{stderr}"
    );
}

fn mtls_try_next(receiver: &otlp_receiver::Receiver) -> Option<()> {
    receiver.try_next().map(|_| ())
}
