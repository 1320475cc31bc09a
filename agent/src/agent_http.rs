//! The one HTTP request the agent's own command-line clients (`fanout top`, `fanout advise`)
//! make: a GET on the agent's endpoint over plain HTTP/1.0, no HTTP client library, the
//! connection closed by the server after the body.

use std::{
    io::{Read, Write},
    net::{TcpStream, ToSocketAddrs},
    time::Duration,
};

/// Nothing answered at the address: says how to start an agent.
#[derive(Debug, thiserror::Error)]
#[error("no Fanout agent answers at {address} ({reason}); start one with `sudo fanout run` (or `sudo cargo xtask run`), or give its --address")]
pub struct NoAgent {
    pub address: String,
    pub reason: String,
}

/// One GET of `path` on `address` (HOST:PORT): the status and the body.
pub fn get(address: &str, path: &str, timeout: Duration) -> Result<(u16, String), NoAgent> {
    let no_agent = |reason: String| NoAgent {
        address: address.to_string(),
        reason,
    };
    let socket = address
        .to_socket_addrs()
        .map_err(|e| no_agent(e.to_string()))?
        .next()
        .ok_or_else(|| no_agent("the address resolves to nothing".into()))?;
    let mut stream =
        TcpStream::connect_timeout(&socket, timeout).map_err(|e| no_agent(e.to_string()))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| no_agent(e.to_string()))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {address}\r\nAccept: application/json\r\n\r\n"
    )
    .map_err(|e| no_agent(e.to_string()))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(|e| no_agent(e.to_string()))?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}

/// Why a versioned JSON answer could not be taken.
#[derive(Debug, PartialEq, Eq)]
pub enum VersionedJsonError {
    /// Not JSON, or no numeric `"version"`.
    Malformed(String),
    /// Another layout version than the reader's.
    Version(u64),
}

/// Parses a JSON answer and checks its `"version"` against `expected` before anything else
/// is read from it (a newer layout could otherwise be misread as this one).
pub fn versioned_json(text: &str, expected: u64) -> Result<serde_json::Value, VersionedJsonError> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| VersionedJsonError::Malformed(e.to_string()))?;
    let version = value["version"]
        .as_u64()
        .ok_or_else(|| VersionedJsonError::Malformed("no \"version\"".into()))?;
    if version != expected {
        return Err(VersionedJsonError::Version(version));
    }
    Ok(value)
}
