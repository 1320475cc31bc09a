//! The metrics endpoint with an exporter-toolkit web config (`--web.config.file`): TLS and
//! basic auth, scraped by a real Prometheus over TLS with the right password, and refused
//! with a wrong one or without TLS. Root only; run with `sudo cargo xtask test`.

use std::time::Duration;

use integration_tests::{
    otlp_receiver::TestCa, prometheus::Prometheus, require_root, wait_for, Agent,
};

#[test]
fn prometheus_scrapes_over_tls_with_basic_auth_and_a_wrong_password_is_refused() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("fanout endpoint CA");
    let server = ca.issue(&["127.0.0.1", "localhost"]);
    std::fs::write(dir.path().join("server.crt"), &server.cert_pem).unwrap();
    std::fs::write(dir.path().join("server.key"), &server.key_pem).unwrap();
    let hash = bcrypt::hash("s3cret", 6).unwrap();
    // Relative paths: exporter-toolkit reads them from the web config's directory.
    let web = dir.path().join("web.yml");
    std::fs::write(
        &web,
        format!(
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  min_version: TLS12\nbasic_auth_users:\n  prometheus: '{hash}'\n"
        ),
    )
    .unwrap();
    let agent = Agent::start_unready(&["--web.config.file", web.to_str().unwrap()]);
    let port = agent.port;
    let ca_pem = ca.cert_pem();
    let prometheus = Prometheus::start(|prom_dir| {
        let ca_file = prom_dir.join("ca.pem");
        std::fs::write(&ca_file, &ca_pem).unwrap();
        let job = |name: &str, scheme: &str, password: &str| {
            format!(
                "  - job_name: {name}\n    scheme: {scheme}\n    tls_config:\n      ca_file: {}\n    basic_auth:\n      username: prometheus\n      password: {password}\n    static_configs:\n      - targets: [\"127.0.0.1:{port}\"]\n",
                ca_file.display()
            )
        };
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n{}{}{}",
            job("fanout", "https", "s3cret"),
            job("wrong_password", "https", "guess"),
            job("plain_http", "http", "s3cret"),
        )
    });
    let verdicts = wait_for(
        "Prometheus to have scraped every job",
        Duration::from_secs(30),
        || {
            let jobs = ["fanout", "wrong_password", "plain_http"];
            let all: Vec<(String, String)> = jobs
                .iter()
                .map(|j| prometheus.target(j))
                .collect::<Option<_>>()?;
            all.iter()
                .all(|(health, _)| health != "unknown")
                .then_some(all)
        },
    );
    assert_eq!(verdicts[0].0, "up", "over TLS with the password: {verdicts:?}\n{}", agent.log());
    assert_eq!(verdicts[1].0, "down", "{verdicts:?}");
    assert!(verdicts[1].1.contains("401"), "a wrong password is a 401: {verdicts:?}");
    assert_eq!(verdicts[2].0, "down", "plain HTTP to a TLS endpoint: {verdicts:?}");
    // The series came through: the agent's own.
    let result = prometheus.api("/api/v1/query?query=fanout_processes_tracked%7Bjob%3D%22fanout%22%7D");
    assert_eq!(result["status"], "success");
    let up = prometheus.api("/api/v1/query?query=up%7Bjob%3D%22fanout%22%7D");
    assert_eq!(up["data"]["result"][0]["value"][1], "1", "{up}");
    assert!(agent.log().contains("tls=true"), "{}", agent.log());
}
