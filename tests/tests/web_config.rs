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
    // Prometheus's first verdict on each job is the one checked: an endpoint not open yet
    // would be "down" for the right password too.
    agent.wait_listening();
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
    assert_eq!(
        verdicts[0].0,
        "up",
        "over TLS with the password: {verdicts:?}\n{}",
        agent.log()
    );
    assert_eq!(verdicts[1].0, "down", "{verdicts:?}");
    assert!(
        verdicts[1].1.contains("401"),
        "a wrong password is a 401: {verdicts:?}"
    );
    assert_eq!(
        verdicts[2].0, "down",
        "plain HTTP to a TLS endpoint: {verdicts:?}"
    );
    // The series came through: the agent's own.
    let result =
        prometheus.api("/api/v1/query?query=fanout_processes_tracked%7Bjob%3D%22fanout%22%7D");
    assert_eq!(result["status"], "success");
    let up = prometheus.api("/api/v1/query?query=up%7Bjob%3D%22fanout%22%7D");
    assert_eq!(up["data"]["result"][0]["value"][1], "1", "{up}");
    assert!(agent.log().contains("tls=true"), "{}", agent.log());
}

/// `fanout top` and `fanout advise` read the same protected endpoint: TLS with the CA that
/// signed it, a client certificate, a user. Each missing or wrong piece is a one-line error
/// that names the flag to give.
#[test]
fn fanout_top_and_advise_read_an_endpoint_with_tls_a_client_certificate_and_a_user() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let ca = TestCa::new("fanout endpoint CA");
    let server = ca.issue(&["127.0.0.1", "localhost"]);
    let client = ca.issue(&["fanout-cli"]);
    let other_ca = TestCa::new("someone else's CA");
    for (name, pem) in [
        ("server.crt", &server.cert_pem),
        ("server.key", &server.key_pem),
        ("client.crt", &client.cert_pem),
        ("client.key", &client.key_pem),
        ("ca.pem", &ca.cert_pem()),
        ("other-ca.pem", &other_ca.cert_pem()),
    ] {
        std::fs::write(path(name), pem).unwrap();
    }
    std::fs::write(path("password"), "s3cret\n").unwrap();
    let hash = bcrypt::hash("s3cret", 6).unwrap();
    std::fs::write(
        path("web.yml"),
        format!(
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.pem\nbasic_auth_users:\n  sre: '{hash}'\n"
        ),
    )
    .unwrap();
    let agent = Agent::start_unready(&["--web.config.file", &path("web.yml")]);
    let https = format!("https://127.0.0.1:{}", agent.port);
    let run = |args: &[String], password_env: Option<&str>| {
        let mut cmd = std::process::Command::new(integration_tests::fanout_bin());
        cmd.args(args).env_remove("FANOUT_AGENT_PASSWORD");
        if let Some(p) = password_env {
            cmd.env("FANOUT_AGENT_PASSWORD", p);
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ca_file, client_crt, client_key, password) = (
        path("ca.pem"),
        path("client.crt"),
        path("client.key"),
        path("password"),
    );
    let everything: Vec<&str> = vec![
        "--address",
        &https,
        "--ca-file",
        &ca_file,
        "--client-certificate",
        &client_crt,
        "--client-key",
        &client_key,
        "--user",
        "sre",
    ];
    let with = |command: &[&str], extra: &[&str]| -> Vec<String> {
        command
            .iter()
            .chain(everything.iter())
            .chain(extra.iter())
            .map(|s| s.to_string())
            .collect()
    };

    // The agent may still be starting: top answers once its endpoint does.
    let top = with(
        &["top", "--once", "--interval", "0.2"],
        &["--password-file", &password],
    );
    let (_, stdout, stderr) = wait_for("fanout top over TLS", Duration::from_secs(20), || {
        let r = run(&top, None);
        r.0.then_some(r)
    });
    assert!(
        stdout.starts_with(&format!("fanout top: agent ")) && stdout.contains(&https),
        "{stdout}{stderr}"
    );
    let advise = with(&["advise", "--format", "json"], &[]);
    let (ok, stdout, stderr) = run(&advise, Some("s3cret"));
    assert!(
        ok,
        "advise with the password from the environment: {stderr}"
    );
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(json.is_object(), "{stdout}");

    // No user: the endpoint's 401, with the flags to give.
    let no_user: Vec<String> = with(&["top", "--once"], &[])
        .into_iter()
        .filter(|a| a != "--user" && a != "sre")
        .collect();
    let (ok, _, stderr) = run(&no_user, None);
    assert!(!ok);
    assert!(
        stderr.contains("HTTP 401") && stderr.contains("give --user and --password-file"),
        "{stderr}"
    );
    // A wrong password.
    let (ok, _, stderr) = run(&with(&["advise"], &[]), Some("guess"));
    assert!(!ok);
    assert!(
        stderr.contains("HTTP 401") && stderr.contains("a wrong user or password"),
        "{stderr}"
    );
    // A user without a password anywhere.
    let (ok, _, stderr) = run(&with(&["top", "--once"], &[]), None);
    assert!(!ok);
    assert!(stderr.contains("--user sre needs a password"), "{stderr}");
    // Another CA.
    let other: Vec<String> = with(&["top", "--once"], &["--password-file", &password])
        .into_iter()
        .map(|a| {
            if a == ca_file {
                path("other-ca.pem")
            } else {
                a
            }
        })
        .collect();
    let (ok, _, stderr) = run(&other, None);
    assert!(!ok);
    assert!(
        stderr.contains(&format!("TLS with the agent at {https} failed"))
            && stderr.contains("--ca-file"),
        "{stderr}"
    );
    // No client certificate: the server refuses the handshake.
    let strings = |args: &[&str]| args.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let (ok, _, stderr) = run(
        &strings(&[
            "top",
            "--once",
            "--address",
            &https,
            "--ca-file",
            &ca_file,
            "--user",
            "sre",
            "--password-file",
            &password,
        ]),
        None,
    );
    assert!(!ok);
    assert!(
        stderr.contains("TLS with the agent") && stderr.contains("--client-certificate"),
        "{stderr}"
    );
    // Plain HTTP to the TLS endpoint.
    let plain = format!("127.0.0.1:{}", agent.port);
    let (ok, _, stderr) = run(&strings(&["advise", "--address", &plain]), None);
    assert!(!ok);
    assert!(
        stderr.contains(&format!("give --address https://{plain}")),
        "{stderr}"
    );
}
