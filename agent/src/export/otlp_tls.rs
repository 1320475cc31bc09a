//! TLS of the OTLP client: one rustls configuration (ring; the given CA or the system's
//! roots; an optional client identity for mTLS), read and checked when the exporter is built,
//! so a wrong path or a file without a certificate is a clear error at start, not a failed
//! push every interval. HTTP uses it as is; gRPC gets the same files through tonic's own
//! configuration.

use std::{path::Path, sync::Arc};

use rustls::pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer};

use super::otlp_config::OtlpTls;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{what} {path} holds no PEM {expected}")]
    Empty {
        what: &'static str,
        path: String,
        expected: &'static str,
    },
    #[error("{what} {path}: {message}")]
    Invalid {
        what: &'static str,
        path: String,
        message: String,
    },
    #[error("no trusted root certificate: the system has none readable and no CA file was given (OTEL_EXPORTER_OTLP_CERTIFICATE)")]
    NoRoots,
    #[error("TLS settings: {0}")]
    Config(String),
}

/// The PEM files, read.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// The CA file's contents, when one was given.
    pub ca_pem: Option<Vec<u8>>,
    /// Client certificate (chain) and key, PEM.
    pub identity_pem: Option<(Vec<u8>, Vec<u8>)>,
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.display().to_string(),
        source,
    })
}

fn certificates(
    what: &'static str,
    path: &str,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Invalid {
            what,
            path: path.to_string(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_string(),
            expected: "certificate",
        });
    }
    Ok(certs)
}

impl TlsFiles {
    /// Reads the files `tls` names.
    pub fn read(tls: &OtlpTls) -> Result<Self, TlsError> {
        let ca_pem = tls
            .certificate
            .as_deref()
            .map(|p| read("CA file", p))
            .transpose()?;
        let identity_pem = match (&tls.client_certificate, &tls.client_key) {
            (Some(cert), Some(key)) => {
                Some((read("client certificate", cert)?, read("client key", key)?))
            }
            _ => None,
        };
        let files = Self {
            ca_pem,
            identity_pem,
        };
        // Parse once now: a bad file fails at start.
        files.client_config(tls)?;
        Ok(files)
    }

    /// The rustls client configuration.
    pub fn client_config(&self, tls: &OtlpTls) -> Result<rustls::ClientConfig, TlsError> {
        let name = |p: &Option<std::path::PathBuf>| {
            p.as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        };
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca_pem {
            Some(pem) => {
                let path = name(&tls.certificate);
                for cert in certificates("CA file", &path, pem)? {
                    roots.add(cert).map_err(|e| TlsError::Invalid {
                        what: "CA file",
                        path: path.clone(),
                        message: e.to_string(),
                    })?;
                }
            }
            None => {
                // Unreadable entries of the system store are skipped, as every client does.
                for cert in rustls_native_certs::load_native_certs().certs {
                    let _ = roots.add(cert);
                }
                if roots.is_empty() {
                    return Err(TlsError::NoRoots);
                }
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots);
        match &self.identity_pem {
            Some((cert_pem, key_pem)) => {
                let cert_path = name(&tls.client_certificate);
                let key_path = name(&tls.client_key);
                let chain = certificates("client certificate", &cert_path, cert_pem)?;
                let key =
                    PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Invalid {
                        what: "client key",
                        path: key_path.clone(),
                        message: e.to_string(),
                    })?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| TlsError::Invalid {
                        what: "client certificate and key",
                        path: format!("{cert_path}, {key_path}"),
                        message: e.to_string(),
                    })
            }
            None => Ok(builder.with_no_client_auth()),
        }
    }

    /// The same settings for tonic (gRPC).
    pub fn tonic_config(&self) -> tonic::transport::ClientTlsConfig {
        let mut config = tonic::transport::ClientTlsConfig::new();
        config = match &self.ca_pem {
            Some(pem) => config.ca_certificate(tonic::transport::Certificate::from_pem(pem)),
            None => config.with_native_roots(),
        };
        if let Some((cert, key)) = &self.identity_pem {
            config = config.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_empty_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = OtlpTls {
            certificate: Some(dir.path().join("nope.pem")),
            ..Default::default()
        };
        let err = TlsFiles::read(&missing).unwrap_err().to_string();
        assert!(err.starts_with("cannot read CA file"), "{err}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let err = TlsFiles::read(&OtlpTls {
            certificate: Some(empty),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("holds no PEM certificate"), "{err}");
    }
}
