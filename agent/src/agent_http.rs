//! The one HTTP request the agent's own command-line clients (`fanout top`, `fanout advise`)
//! make: a GET on the agent's endpoint over HTTP/1.0, no HTTP client library, the connection
//! closed by the server after the body. Where the endpoint is protected the way Prometheus
//! exporters are (`--web.config.file`: TLS, a client certificate, basic authentication), the
//! request is made the same way: TLS with rustls, and the user's `Authorization` header.

use std::{
    io::{Read, Write},
    net::{TcpStream, ToSocketAddrs},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use rustls::pki_types::ServerName;

use crate::export::{
    otlp_config::OtlpTls,
    otlp_tls::{TlsError, TlsFiles},
    web_config::basic_authorization,
};

/// The agent's default address (its default listen port).
pub const DEFAULT_ADDRESS: &str = "127.0.0.1:9464";

/// The environment variable a password may come from instead of `--password-file`.
pub const PASSWORD_ENV: &str = "FANOUT_AGENT_PASSWORD";

/// How `fanout top` and `fanout advise` reach the agent.
#[derive(Debug, Clone, clap::Args)]
pub struct EndpointArgs {
    /// The agent to read: HOST:PORT of its Prometheus endpoint, or https://HOST:PORT where it
    /// serves TLS (--web.config.file).
    #[arg(long, default_value = DEFAULT_ADDRESS)]
    pub address: String,
    /// CA certificate(s), PEM, that signed the agent's certificate (default: the system's
    /// roots). Implies TLS.
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// The name the agent's certificate must carry (default: the host of --address).
    #[arg(long, value_name = "NAME")]
    pub tls_server_name: Option<String>,
    /// Client certificate, PEM, for an endpoint that requires one. Implies TLS.
    #[arg(long, value_name = "FILE", requires = "client_key")]
    pub client_certificate: Option<PathBuf>,
    /// The client certificate's key, PEM.
    #[arg(long, value_name = "FILE", requires = "client_certificate")]
    pub client_key: Option<PathBuf>,
    /// User of the endpoint's basic authentication; the password comes from --password-file
    /// or FANOUT_AGENT_PASSWORD.
    #[arg(long, value_name = "NAME")]
    pub user: Option<String>,
    /// File whose first line is the password.
    #[arg(long, value_name = "FILE", requires = "user")]
    pub password_file: Option<PathBuf>,
}

impl EndpointArgs {
    /// Plain HTTP to `address`, nothing else.
    pub fn plain(address: &str) -> Self {
        Self {
            address: address.to_string(),
            ca_file: None,
            tls_server_name: None,
            client_certificate: None,
            client_key: None,
            user: None,
            password_file: None,
        }
    }
}

/// What is wrong with the way the agent is to be reached.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("--address {0:?}: expected HOST:PORT, http://HOST:PORT or https://HOST:PORT")]
    Address(String),
    #[error("--address {0}: plain http:// with TLS settings (--ca-file, --client-certificate); use https://")]
    PlainWithTls(String),
    #[error("{0}")]
    Tls(TlsError),
    #[error("no trusted root certificate: the system has none readable; give the CA that signed the agent's certificate with --ca-file")]
    NoRoots,
    #[error("--tls-server-name {0:?} is neither a DNS name nor an IP address")]
    ServerName(String),
    #[error("cannot read the password file {path}: {source}")]
    PasswordFile {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "--user {0} needs a password: --password-file FILE, or {PASSWORD_ENV} in the environment"
    )]
    NoPassword(String),
}

impl From<TlsError> for EndpointError {
    fn from(e: TlsError) -> Self {
        match e {
            TlsError::NoRoots => Self::NoRoots,
            other => Self::Tls(other),
        }
    }
}

/// The agent's endpoint, ready to be asked.
#[derive(Clone)]
pub struct Endpoint {
    /// HOST:PORT.
    address: String,
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    /// The `Authorization` header's value.
    authorization: Option<String>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the credentials.
        f.debug_struct("Endpoint")
            .field("address", &self.address)
            .field("tls", &self.tls.is_some())
            .field("authorization", &self.authorization.is_some())
            .finish()
    }
}

impl Endpoint {
    /// Reads and checks the files and the password `args` name: a wrong path or a file
    /// without a certificate is an error before any request.
    pub fn new(args: &EndpointArgs) -> Result<Self, EndpointError> {
        let bad_address = || EndpointError::Address(args.address.clone());
        let trimmed = args.address.trim().trim_end_matches('/');
        let (scheme_tls, address) = if let Some(rest) = trimmed.strip_prefix("https://") {
            (Some(true), rest)
        } else if let Some(rest) = trimmed.strip_prefix("http://") {
            (Some(false), rest)
        } else {
            (None, trimmed)
        };
        let (host, port) = address.rsplit_once(':').ok_or_else(bad_address)?;
        if host.is_empty() || port.parse::<u16>().is_err() || address.contains('/') {
            return Err(bad_address());
        }
        let wants_tls = args.ca_file.is_some() || args.client_certificate.is_some();
        if scheme_tls == Some(false) && wants_tls {
            return Err(EndpointError::PlainWithTls(args.address.clone()));
        }
        let tls = if scheme_tls.unwrap_or(wants_tls) {
            let settings = OtlpTls {
                certificate: args.ca_file.clone(),
                client_certificate: args.client_certificate.clone(),
                client_key: args.client_key.clone(),
            };
            let config = TlsFiles::read(&settings)?.client_config(&settings)?;
            let name = args
                .tls_server_name
                .clone()
                .unwrap_or_else(|| host.trim_start_matches('[').trim_end_matches(']').into());
            let server_name =
                ServerName::try_from(name.clone()).map_err(|_| EndpointError::ServerName(name))?;
            Some((Arc::new(config), server_name))
        } else {
            None
        };
        let authorization = match &args.user {
            None => None,
            Some(user) => {
                let password = match &args.password_file {
                    Some(path) => std::fs::read_to_string(path)
                        .map_err(|source| EndpointError::PasswordFile {
                            path: path.display().to_string(),
                            source,
                        })?
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .to_string(),
                    None => std::env::var(PASSWORD_ENV)
                        .map_err(|_| EndpointError::NoPassword(user.clone()))?,
                };
                Some(basic_authorization(user, &password))
            }
        };
        Ok(Self {
            address: address.to_string(),
            tls,
            authorization,
        })
    }

    /// Plain HTTP to `address` (HOST:PORT).
    pub fn plain(address: &str) -> Self {
        Self {
            address: address.to_string(),
            tls: None,
            authorization: None,
        }
    }

    /// The endpoint as messages name it: HOST:PORT, with `https://` where it is TLS.
    pub fn name(&self) -> String {
        match self.tls {
            Some(_) => format!("https://{}", self.address),
            None => self.address.clone(),
        }
    }

    /// Whether the request carries a user's credentials.
    pub fn has_user(&self) -> bool {
        self.authorization.is_some()
    }

    /// Why the endpoint answered 401 (HTTP basic authentication refused), for messages.
    pub fn unauthorized_reason(&self) -> &'static str {
        if self.has_user() {
            "a wrong user or password"
        } else {
            "its endpoint has users: give --user and --password-file"
        }
    }
}

/// Why the agent could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// Nothing answered at the address: says how to start an agent.
    #[error("no Fanout agent answers at {address} ({reason}); start one with `sudo fanout run` (or `sudo cargo xtask run`), or give its --address")]
    NoAgent { address: String, reason: String },
    #[error("TLS with the agent at {address} failed: {reason}; give the CA that signed its certificate with --ca-file, --tls-server-name if the certificate names another host, and --client-certificate and --client-key if the endpoint requires one")]
    Tls { address: String, reason: String },
    #[error("the agent at {address} does not answer in plain HTTP: if its endpoint serves TLS (--web.config.file), give --address https://{address}")]
    NotHttp { address: String },
}

/// The connection to the agent: plain, or TLS over it.
enum Connection {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Connection {
    /// The alert a TLS server sent before it closed, if it sent one: why it refused the
    /// handshake (no client certificate, under TLS 1.3, shows only once the request is being
    /// written). Read from the socket directly: the stream would first retry the write.
    fn alert(&mut self) -> Option<String> {
        let Self::Tls(stream) = self else {
            return None;
        };
        loop {
            match stream.conn.read_tls(&mut stream.sock) {
                Ok(0) | Err(_) => return None,
                Ok(_) => {
                    if let Err(e) = stream.conn.process_new_packets() {
                        return Some(e.to_string());
                    }
                }
            }
        }
    }
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Plain(s) => s.read(buf),
            Self::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::Plain(s) => s.write(buf),
            Self::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Self::Plain(s) => s.flush(),
            Self::Tls(s) => s.flush(),
        }
    }
}

/// One GET of `path` on `endpoint`: the status and the body.
pub fn get(
    endpoint: &Endpoint,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String), RequestError> {
    let address = &endpoint.address;
    let no_agent = |reason: String| RequestError::NoAgent {
        address: endpoint.name(),
        reason,
    };
    let socket = address
        .to_socket_addrs()
        .map_err(|e| no_agent(e.to_string()))?
        .next()
        .ok_or_else(|| no_agent("the address resolves to nothing".into()))?;
    let tcp = TcpStream::connect_timeout(&socket, timeout).map_err(|e| no_agent(e.to_string()))?;
    tcp.set_read_timeout(Some(timeout))
        .and_then(|()| tcp.set_write_timeout(Some(timeout)))
        .map_err(|e| no_agent(e.to_string()))?;
    let mut stream = match &endpoint.tls {
        Some((config, server_name)) => {
            let connection = rustls::ClientConnection::new(config.clone(), server_name.clone())
                .map_err(|e| RequestError::Tls {
                    address: endpoint.name(),
                    reason: e.to_string(),
                })?;
            Connection::Tls(Box::new(rustls::StreamOwned::new(connection, tcp)))
        }
        None => Connection::Plain(tcp),
    };
    let authorization = endpoint
        .authorization
        .as_deref()
        .map(|value| format!("Authorization: {value}\r\n"))
        .unwrap_or_default();
    // Past the connect, something listens: a plain request it cuts short is one it did not
    // take for HTTP (a TLS endpoint closes on the first bytes).
    let failed = |e: std::io::Error| match (&endpoint.tls, tls_reason(&e)) {
        (Some(_), Some(reason)) => RequestError::Tls {
            address: endpoint.name(),
            reason,
        },
        (None, _)
            if matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ) =>
        {
            RequestError::NotHttp {
                address: address.clone(),
            }
        }
        _ => no_agent(e.to_string()),
    };
    // One write (over TLS, the handshake happens before it).
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: {address}\r\nAccept: application/json\r\n{authorization}\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .and_then(|()| stream.flush())
        .map_err(|e| match stream.alert() {
            Some(reason) => RequestError::Tls {
                address: endpoint.name(),
                reason,
            },
            None => failed(e),
        })?;
    let mut response = Vec::new();
    if let Err(e) = stream.read_to_end(&mut response) {
        // A server that closes without TLS's close_notify after a whole response: keep what
        // came. Anything else is a failed request.
        let whole = e.kind() == std::io::ErrorKind::UnexpectedEof && !response.is_empty();
        if !whole {
            return Err(failed(e));
        }
    }
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.split(' ').nth(1))
        .and_then(|s| s.parse().ok());
    match status {
        Some(status) => Ok((status, body.to_string())),
        None => Err(RequestError::NotHttp {
            address: address.clone(),
        }),
    }
}

/// What went wrong in TLS, when an I/O error of a rustls stream is a TLS error.
fn tls_reason(e: &std::io::Error) -> Option<String> {
    let inner = e.get_ref()?;
    inner
        .downcast_ref::<rustls::Error>()
        .map(|tls| tls.to_string())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(address: &str) -> Result<Endpoint, EndpointError> {
        Endpoint::new(&EndpointArgs::plain(address))
    }

    #[test]
    fn addresses_with_and_without_a_scheme() {
        let plain = endpoint("127.0.0.1:9464").unwrap();
        assert_eq!(plain.name(), "127.0.0.1:9464");
        assert_eq!(
            endpoint("http://localhost:9464/").unwrap().name(),
            "localhost:9464"
        );
        // https:// alone: the system's roots, the host's name (none here may be readable).
        match endpoint("https://[::1]:9464") {
            Ok(e) => assert_eq!(e.name(), "https://[::1]:9464"),
            Err(e) => assert!(matches!(e, EndpointError::NoRoots), "{e}"),
        }
        for bad in [
            "",
            "9464",
            "host:",
            ":9464",
            "host:port",
            "http://h:1/metrics",
            "h:70000",
        ] {
            let err = endpoint(bad).unwrap_err().to_string();
            assert!(err.contains("expected HOST:PORT"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn tls_settings_on_plain_http_and_missing_passwords_are_refused_before_any_request() {
        let mut args = EndpointArgs::plain("http://127.0.0.1:9464");
        args.ca_file = Some("/nonexistent/ca.pem".into());
        let err = Endpoint::new(&args).unwrap_err().to_string();
        assert!(err.contains("use https://"), "{err}");
        args.address = "127.0.0.1:9464".into();
        let err = Endpoint::new(&args).unwrap_err().to_string();
        assert!(
            err.starts_with("cannot read CA file /nonexistent/ca.pem"),
            "{err}"
        );

        let dir = tempfile::tempdir().unwrap();
        let mut args = EndpointArgs::plain("127.0.0.1:9464");
        args.user = Some("prometheus".into());
        args.password_file = Some(dir.path().join("missing"));
        let err = Endpoint::new(&args).unwrap_err().to_string();
        assert!(err.starts_with("cannot read the password file"), "{err}");
        let file = dir.path().join("password");
        std::fs::write(&file, "s3cret\nsecond line\n").unwrap();
        args.password_file = Some(file);
        let e = Endpoint::new(&args).unwrap();
        assert!(e.has_user());
        assert_eq!(
            e.authorization.as_deref(),
            Some(basic_authorization("prometheus", "s3cret").as_str()),
            "the first line, without its newline"
        );
        assert!(
            !format!("{e:?}").contains("Basic"),
            "no credentials in Debug"
        );
    }

    #[test]
    fn a_server_that_is_not_http_is_said_so() {
        use std::io::Write as _;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = [0u8; 512];
            let _ = stream.read(&mut request);
            // What a TLS server sends to a plain request: an alert record.
            stream
                .write_all(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x46])
                .unwrap();
        });
        let err = get(
            &Endpoint::plain(&address),
            "/metrics",
            Duration::from_secs(5),
        )
        .unwrap_err()
        .to_string();
        server.join().unwrap();
        assert!(
            err.contains(&format!("give --address https://{address}")),
            "{err}"
        );
    }
}
