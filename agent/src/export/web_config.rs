//! The metrics endpoint's TLS and basic authentication, configured the way Prometheus
//! exporters are: a web configuration file as in the Prometheus exporter-toolkit
//! (`--web.config.file`), with `tls_server_config` and `basic_auth_users` (bcrypt hashes).
//! Paths in the file are relative to the file's directory, as exporter-toolkit reads them.
//!
//! Read once at start: a missing file, a certificate that does not parse, a password that is
//! not a bcrypt hash or a setting this agent does not support is an error then, naming it.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer};
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum WebConfigError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("web config {path}: {message}")]
    Invalid { path: String, message: String },
}

/// `tls_server_config` (the subset this agent supports; anything else is refused by name).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsServerConfig {
    cert_file: PathBuf,
    key_file: PathBuf,
    #[serde(default)]
    client_auth_type: Option<String>,
    #[serde(default)]
    client_ca_file: Option<PathBuf>,
    #[serde(default)]
    min_version: Option<String>,
    #[serde(default)]
    max_version: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WebConfigFile {
    #[serde(default)]
    tls_server_config: Option<TlsServerConfig>,
    #[serde(default)]
    basic_auth_users: BTreeMap<String, String>,
    /// Accepted and ignored: HTTP/2 and headers are exporter-toolkit options this agent's
    /// server has no use for.
    #[serde(default)]
    http_server_config: Option<serde_yaml::Value>,
}

/// The endpoint's settings, loaded.
#[derive(Clone)]
pub struct WebConfig {
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// User -> bcrypt hash.
    pub users: BTreeMap<String, String>,
}

impl std::fmt::Debug for WebConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebConfig")
            .field("tls", &self.tls.is_some())
            .field("users", &self.users.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, WebConfigError> {
    std::fs::read(path).map_err(|source| WebConfigError::Read {
        what,
        path: path.display().to_string(),
        source,
    })
}

impl WebConfig {
    pub fn load(path: &Path) -> Result<Self, WebConfigError> {
        let invalid = |message: String| WebConfigError::Invalid {
            path: path.display().to_string(),
            message,
        };
        let text = read("web config", path)?;
        let file: WebConfigFile =
            serde_yaml::from_slice(&text).map_err(|e| invalid(e.to_string()))?;
        let _ = file.http_server_config;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        for (user, hash) in &file.basic_auth_users {
            if user.is_empty() || user.contains(':') {
                return Err(invalid(format!(
                    "basic_auth_users: invalid user name {user:?}"
                )));
            }
            if !(hash.starts_with("$2a$") || hash.starts_with("$2b$") || hash.starts_with("$2y$"))
                || bcrypt::verify("", hash).is_err()
            {
                return Err(invalid(format!(
                    "basic_auth_users: the password of {user:?} is not a bcrypt hash (make one with `htpasswd -nBC 10 \"\" | tr -d ':\\n'`)"
                )));
            }
        }
        let tls = match file.tls_server_config {
            None => None,
            Some(tls) => Some(Arc::new(server_config(&tls, &resolve, &invalid)?)),
        };
        Ok(Self {
            tls,
            users: file.basic_auth_users,
        })
    }
}

fn server_config(
    tls: &TlsServerConfig,
    resolve: &dyn Fn(&Path) -> PathBuf,
    invalid: &dyn Fn(String) -> WebConfigError,
) -> Result<rustls::ServerConfig, WebConfigError> {
    let cert_path = resolve(&tls.cert_file);
    let key_path = resolve(&tls.key_file);
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&read("cert_file", &cert_path)?)
            .collect::<Result<_, _>>()
            .map_err(|e| invalid(format!("cert_file {}: {e}", cert_path.display())))?;
    if chain.is_empty() {
        return Err(invalid(format!(
            "cert_file {} holds no PEM certificate",
            cert_path.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_slice(&read("key_file", &key_path)?)
        .map_err(|e| invalid(format!("key_file {}: {e}", key_path.display())))?;
    let version = |v: &Option<String>, what: &str| match v.as_deref() {
        None => Ok(None),
        Some("TLS12") => Ok(Some(&rustls::version::TLS12)),
        Some("TLS13") => Ok(Some(&rustls::version::TLS13)),
        Some(other) => Err(invalid(format!(
            "{what} {other:?}: this agent supports TLS12 and TLS13"
        ))),
    };
    let min = version(&tls.min_version, "min_version")?;
    let max = version(&tls.max_version, "max_version")?;
    let versions: Vec<&'static rustls::SupportedProtocolVersion> =
        [&rustls::version::TLS12, &rustls::version::TLS13]
            .into_iter()
            .filter(|v| {
                let rank = |x: &rustls::SupportedProtocolVersion| {
                    if x.version == rustls::ProtocolVersion::TLSv1_2 {
                        0
                    } else {
                        1
                    }
                };
                min.is_none_or(|m| rank(v) >= rank(m)) && max.is_none_or(|m| rank(v) <= rank(m))
            })
            .collect();
    if versions.is_empty() {
        return Err(invalid("min_version is above max_version".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|e| invalid(e.to_string()))?;
    let auth = tls.client_auth_type.as_deref().unwrap_or("NoClientCert");
    let builder = match auth {
        "NoClientCert" => builder.with_no_client_auth(),
        "RequireAndVerifyClientCert" | "VerifyClientCertIfGiven" => {
            let ca_path = tls.client_ca_file.as_deref().map(resolve).ok_or_else(|| {
                invalid(format!("client_auth_type {auth} needs client_ca_file"))
            })?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&read("client_ca_file", &ca_path)?) {
                let cert =
                    cert.map_err(|e| invalid(format!("client_ca_file {}: {e}", ca_path.display())))?;
                roots
                    .add(cert)
                    .map_err(|e| invalid(format!("client_ca_file {}: {e}", ca_path.display())))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            );
            let verifier = if auth == "VerifyClientCertIfGiven" {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| invalid(format!("client_ca_file {}: {e}", ca_path.display())))?,
            )
        }
        other => {
            return Err(invalid(format!(
                "client_auth_type {other:?} is not supported (NoClientCert, VerifyClientCertIfGiven, RequireAndVerifyClientCert)"
            )))
        }
    };
    builder
        .with_single_cert(chain, key)
        .map_err(|e| invalid(format!("cert_file and key_file: {e}")))
}

/// Basic authentication of requests, with a small cache of credentials already verified:
/// bcrypt is slow by design (tens of ms), and a scraper sends the same header every time.
pub struct BasicAuth {
    users: BTreeMap<String, String>,
    verified: parking_lot::Mutex<std::collections::HashSet<String>>,
}

/// Most verified credentials remembered.
const VERIFIED_CACHE: usize = 64;

impl BasicAuth {
    pub fn new(users: BTreeMap<String, String>) -> Self {
        Self {
            users,
            verified: Default::default(),
        }
    }

    pub fn enabled(&self) -> bool {
        !self.users.is_empty()
    }

    /// Whether an `Authorization` header value names a user with the right password.
    pub fn allows(&self, authorization: Option<&str>) -> bool {
        let Some(encoded) = authorization.and_then(|h| h.strip_prefix("Basic ")) else {
            return false;
        };
        if self.verified.lock().contains(encoded) {
            return true;
        }
        let Some(decoded) = base64_decode(encoded.trim()) else {
            return false;
        };
        let Ok(decoded) = String::from_utf8(decoded) else {
            return false;
        };
        let Some((user, password)) = decoded.split_once(':') else {
            return false;
        };
        let ok = self
            .users
            .get(user)
            .is_some_and(|hash| bcrypt::verify(password, hash).unwrap_or(false));
        if ok {
            let mut verified = self.verified.lock();
            if verified.len() >= VERIFIED_CACHE {
                verified.clear();
            }
            verified.insert(encoded.to_string());
        }
        ok
    }
}

/// The `Authorization` header value of HTTP basic authentication for `user` and `password`:
/// what `fanout top` and `fanout advise` send to an endpoint with users.
pub fn basic_authorization(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64_encode(format!("{user}:{password}").as_bytes())
    )
}

const BASE64_ALPHABET: &[u8; 64] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 (RFC 4648, with padding).
fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let word = chunk
            .iter()
            .enumerate()
            .fold(0u32, |w, (i, b)| w | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                BASE64_ALPHABET[(word >> (18 - 6 * i) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    out
}

/// Standard base64 (RFC 4648, with padding), as HTTP basic authentication sends it.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let mut buffer = 0u32;
    let mut bits = 0;
    let trimmed = text.trim_end_matches('=');
    if text.len() - trimmed.len() > 2 {
        return None;
    }
    for c in trimmed.bytes() {
        let value = BASE64_ALPHABET.iter().position(|a| *a == c)? as u32;
        buffer = (buffer << 6) | value;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
            buffer &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_authorization_is_what_the_endpoint_accepts() {
        assert_eq!(
            basic_authorization("alice", "secret"),
            "Basic YWxpY2U6c2VjcmV0"
        );
        for text in ["", "a", "ab", "abc", "abcd", "pr:s3cret/+?", "é:ü"] {
            assert_eq!(
                base64_decode(&base64_encode(text.as_bytes())).unwrap(),
                text.as_bytes(),
                "{text:?}"
            );
        }
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let auth = BasicAuth::new([("prometheus".to_string(), hash)].into_iter().collect());
        assert!(auth.allows(Some(&basic_authorization("prometheus", "s3cret"))));
        assert!(!auth.allows(Some(&basic_authorization("prometheus", "guess"))));
    }

    #[test]
    fn base64_as_http_sends_it() {
        assert_eq!(base64_decode("YWxpY2U6c2VjcmV0").unwrap(), b"alice:secret");
        assert_eq!(base64_decode("YQ==").unwrap(), b"a");
        assert!(base64_decode("Y*==").is_none());
    }

    #[test]
    fn only_a_known_user_with_the_right_password_passes() {
        let hash = bcrypt::hash("secret", 4).unwrap();
        let auth = BasicAuth::new(BTreeMap::from([("alice".to_string(), hash)]));
        assert!(auth.allows(Some("Basic YWxpY2U6c2VjcmV0"))); // alice:secret
        assert!(
            auth.allows(Some("Basic YWxpY2U6c2VjcmV0")),
            "and from the cache"
        );
        assert!(!auth.allows(Some("Basic YWxpY2U6d3Jvbmc="))); // alice:wrong
        assert!(!auth.allows(Some("Basic Ym9iOnNlY3JldA=="))); // bob:secret
        assert!(!auth.allows(Some("Bearer x")));
        assert!(!auth.allows(None));
    }

    #[test]
    fn bad_files_are_errors_that_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let write = |text: &str| {
            let p = dir.path().join("web.yml");
            std::fs::write(&p, text).unwrap();
            p
        };
        let err = |text: &str| WebConfig::load(&write(text)).unwrap_err().to_string();
        assert!(err("basic_auth_users:\n  alice: plaintext\n").contains("not a bcrypt hash"));
        assert!(
            err("tls_server_config:\n  cert_file: nope.crt\n  key_file: nope.key\n")
                .contains("cannot read cert_file")
        );
        assert!(err("unknown_section: 1\n").contains("unknown field"));
        assert!(WebConfig::load(&dir.path().join("missing.yml"))
            .unwrap_err()
            .to_string()
            .starts_with("cannot read web config"));
        let hash = bcrypt::hash("pw", 4).unwrap();
        let ok =
            WebConfig::load(&write(&format!("basic_auth_users:\n  alice: '{hash}'\n"))).unwrap();
        assert!(ok.tls.is_none());
        assert_eq!(ok.users.len(), 1);
    }
}
