//! Fetching the observation from the agent: `GET /api/v1/advise[?window=SECONDS]` over
//! HTTP/1.0 ([`crate::agent_http`], as `fanout top` fetches its snapshot).

use std::time::Duration;

use super::observation::{Observation, VERSION};
use crate::agent_http::Endpoint;

/// The agent's endpoint.
pub const ADVISE_PATH: &str = "/api/v1/advise";

/// What fetching the observation could not do.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Request(#[from] crate::agent_http::RequestError),
    #[error("the agent at {address} has no {ADVISE_PATH} (HTTP 404): it is older than this fanout; upgrade it to the same release")]
    NoEndpoint { address: String },
    #[error("the agent at {address} answered HTTP {status} for {ADVISE_PATH}{detail}")]
    Http {
        address: String,
        status: u16,
        detail: String,
    },
    #[error("the agent at {address} sent an observation this fanout cannot read: {reason}")]
    Malformed { address: String, reason: String },
    #[error("the agent at {address} writes advise version {found}; this fanout reads version {expected}: use a fanout of the same release as the agent")]
    Version {
        address: String,
        found: u64,
        expected: u32,
    },
}

/// The request's path: the window in whole seconds when one is asked for.
pub fn request_path(window_seconds: Option<u64>) -> String {
    match window_seconds {
        Some(s) => format!("{ADVISE_PATH}?window={s}"),
        None => ADVISE_PATH.to_string(),
    }
}

/// Reads the observation's JSON, refusing another layout version before reading the rest
/// (a newer layout could otherwise be misread as this one).
pub fn parse(text: &str, address: &str) -> Result<Observation, FetchError> {
    let malformed = |reason: String| FetchError::Malformed {
        address: address.to_string(),
        reason,
    };
    let value =
        crate::agent_http::versioned_json(text, u64::from(VERSION)).map_err(|e| match e {
            crate::agent_http::VersionedJsonError::Malformed(reason) => malformed(reason),
            crate::agent_http::VersionedJsonError::Version(found) => FetchError::Version {
                address: address.to_string(),
                found,
                expected: VERSION,
            },
        })?;
    serde_json::from_value(value).map_err(|e| malformed(e.to_string()))
}

/// Fetches the observation over `window_seconds` (since the agent started when `None`).
pub fn fetch(
    endpoint: &Endpoint,
    window_seconds: Option<u64>,
    timeout: Duration,
) -> Result<Observation, FetchError> {
    let (status, body) = crate::agent_http::get(endpoint, &request_path(window_seconds), timeout)?;
    let address = endpoint.name();
    match status {
        200 => parse(&body, &address),
        404 => Err(FetchError::NoEndpoint { address }),
        401 => Err(FetchError::Http {
            address,
            status,
            detail: format!(": {}", endpoint.unauthorized_reason()),
        }),
        _ => Err(FetchError::Http {
            address,
            status,
            // The agent says why in its body (a bad window, say): pass on its first line.
            detail: body
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .map(|l| format!(": {}", l.chars().take(200).collect::<String>()))
                .unwrap_or_default(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead as _, Write as _},
        net::TcpListener,
        thread,
    };

    use super::*;

    /// Serves one request with `response`, and hands back the request line it got.
    fn one_shot(response: &'static str) -> (String, thread::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let server = thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = std::io::BufReader::new(stream);
            let mut request_line = String::new();
            reader.read_line(&mut request_line).unwrap();
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap() > 2 {
                line.clear();
            }
            reader.get_mut().write_all(response.as_bytes()).unwrap();
            request_line
        });
        (address, server)
    }

    #[test]
    fn the_observation_is_fetched_with_its_window() {
        let (address, server) = one_shot(
            "HTTP/1.0 200 OK\r\ncontent-type: application/json\r\n\r\n\
             {\"version\":1,\"window_seconds\":300.0,\"since_start\":false,\"names_real\":true,\
             \"servers\":[]}",
        );
        let obs = fetch(
            &Endpoint::plain(&address),
            Some(300),
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(obs.window_seconds, 300.0);
        assert_eq!(
            server.join().unwrap().trim_end(),
            "GET /api/v1/advise?window=300 HTTP/1.0"
        );
    }

    #[test]
    fn an_agent_without_the_endpoint_is_said_to_be_older() {
        let (address, _server) = one_shot("HTTP/1.0 404 Not Found\r\n\r\nnot found");
        let err = fetch(&Endpoint::plain(&address), None, Duration::from_secs(5))
            .unwrap_err()
            .to_string();
        assert!(err.contains("has no /api/v1/advise"), "{err}");
        assert!(err.contains("older"), "{err}");
    }

    #[test]
    fn another_version_is_refused_by_name() {
        let err = parse(r#"{"version":2,"anything":"else"}"#, "a:1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("writes advise version 2"), "{err}");
        assert!(err.contains("reads version 1"), "{err}");
        assert!(matches!(
            parse("{\"version\":1}", "a:1"),
            Err(FetchError::Malformed { .. })
        ));
    }

    #[test]
    fn nothing_listening_says_how_to_start_an_agent() {
        let free = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = free.local_addr().unwrap().to_string();
        drop(free);
        let err = fetch(&Endpoint::plain(&address), None, Duration::from_secs(1))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(&format!("no Fanout agent answers at {address}")),
            "{err}"
        );
        assert!(err.contains("fanout run"), "{err}");
    }
}
