//! A real Prometheus (Debian's package) for the tests, on a free loopback port, with a
//! configuration the test writes, in a temporary directory it owns.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use crate::{free_port, http_get, wait_for, Proc};

pub struct Prometheus {
    _proc: Proc,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus with the configuration `config(dir)` returns (the text of
    /// prometheus.yml; `dir` is where it may put files it names) and waits until it is ready.
    pub fn start(config: impl FnOnce(&Path) -> String) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let text = config(dir.path());
        std::fs::write(dir.path().join("prometheus.yml"), text).unwrap();
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (Debian package prometheus)");
        let prom = Prometheus {
            _proc: Proc {
                child,
                name: "prometheus".into(),
            },
            port,
            dir,
        };
        wait_for("Prometheus to be ready", Duration::from_secs(30), || {
            (http_get(port, "/-/ready").ok()?.0 == 200).then_some(())
        });
        prom
    }

    /// A GET on its HTTP API, parsed.
    pub fn api(&self, path: &str) -> serde_json::Value {
        let (status, body) = http_get(self.port, path).unwrap();
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    /// The active target of scrape job `job`: (health, last error).
    pub fn target(&self, job: &str) -> Option<(String, String)> {
        let targets = self.api("/api/v1/targets?state=active");
        targets["data"]["activeTargets"]
            .as_array()?
            .iter()
            .find(|t| t["labels"]["job"] == job)
            .map(|t| {
                (
                    t["health"].as_str().unwrap_or("").to_string(),
                    t["lastError"].as_str().unwrap_or("").to_string(),
                )
            })
    }
}
