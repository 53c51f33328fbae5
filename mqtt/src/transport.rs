//! How a client's connection is secured and routed: TLS (the server verified against a CA
//! file or the system's roots, optionally a client certificate) and an HTTP CONNECT proxy.
//! Prepared once at start, so that a missing or broken file is an error then, naming it,
//! and not a failed connection later.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use crate::{BrokerUrl, Scheme};

/// Why a client transport could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A certificate or key file is missing or holds nothing usable.
    #[error("{what} {path}: {problem}")]
    File {
        /// Which setting.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// TLS settings that do not fit together.
    #[error("{0}")]
    Tls(String),
    /// The proxy URL is not `http://host:port`.
    #[error("proxy `{0}`: expected http://host:port")]
    Proxy(String),
}

/// TLS files a client may be configured with.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// CA certificates (PEM) the server's certificate must chain to; the system's roots
    /// when unset.
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain (PEM) for mutual TLS.
    pub client_cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub client_key: Option<PathBuf>,
}

/// Where and how a client connects, ready for every connection attempt.
#[derive(Clone, Debug)]
pub struct ClientTransport {
    url: BrokerUrl,
    /// Set exactly when the URL's scheme is TLS.
    tls: Option<Arc<ClientConfig>>,
    proxy: Option<(String, u16)>,
}

impl ClientTransport {
    /// `url` without TLS files or proxy (the system's roots for `mqtts://`/`wss://`).
    pub fn to(url: &BrokerUrl) -> Result<ClientTransport, TransportError> {
        ClientTransport::for_url(url, &TlsFiles::default(), None)
    }

    /// The broker URL.
    pub fn url(&self) -> &BrokerUrl {
        &self.url
    }

    /// What connecting to `url` needs: TLS for `mqtts://` and `wss://` (from `files`), and
    /// `proxy` (`http://host:port`) when set.
    pub fn for_url(
        url: &BrokerUrl,
        files: &TlsFiles,
        proxy: Option<&str>,
    ) -> Result<ClientTransport, TransportError> {
        let tls = match url.scheme.is_tls() {
            true => Some(Arc::new(client_config(files)?)),
            false if files.ca_file.is_some() || files.client_cert.is_some() => {
                return Err(TransportError::Tls(format!(
                    "TLS files are set but the broker URL `{url}` is not mqtts:// or wss://"
                )))
            }
            false => None,
        };
        let proxy = proxy.map(parse_proxy).transpose()?;
        Ok(ClientTransport {
            url: url.clone(),
            tls,
            proxy,
        })
    }

    /// Applies the transport to options made for its URL.
    pub(crate) fn apply(&self, opts: &mut rumqttc::MqttOptions) {
        let tls = |c: &Arc<ClientConfig>| rumqttc::TlsConfiguration::Rustls(c.clone());
        match (self.url.scheme, &self.tls) {
            (Scheme::Mqtts, Some(c)) => {
                opts.set_transport(rumqttc::Transport::Tls(tls(c)));
            }
            (Scheme::Wss, Some(c)) => {
                opts.set_transport(rumqttc::Transport::Wss(tls(c)));
            }
            (Scheme::Ws, _) => {
                opts.set_transport(rumqttc::Transport::Ws);
            }
            _ => {}
        }
        if let Some((host, port)) = &self.proxy {
            opts.set_proxy(rumqttc::Proxy {
                ty: rumqttc::ProxyType::Http,
                auth: rumqttc::ProxyAuth::None,
                addr: host.clone(),
                port: *port,
            });
        }
    }
}

fn parse_proxy(text: &str) -> Result<(String, u16), TransportError> {
    let bad = || TransportError::Proxy(text.to_string());
    let rest = text.strip_prefix("http://").ok_or_else(bad)?;
    let authority = rest.trim_end_matches('/');
    let (host, port) = authority.rsplit_once(':').ok_or_else(bad)?;
    let port = port.parse().map_err(|_| bad())?;
    if host.is_empty() || host.contains(['/', '@']) {
        return Err(bad());
    }
    Ok((host.trim_matches(['[', ']']).to_string(), port))
}

/// The crypto fleetbus uses for TLS (agent connections and the broker's listeners): ring,
/// chosen explicitly (rustls refuses to guess when two providers are compiled in, and the
/// server's S3 SDK brings aws-lc-rs along).
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate in a PEM file.
pub fn read_certificates(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let file_error = |problem: String| TransportError::File {
        what,
        path: path.to_path_buf(),
        problem,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(e.to_string()))?;
    if certs.is_empty() {
        return Err(file_error("no PEM certificate in it".into()));
    }
    Ok(certs)
}

/// Reads a private key from a PEM file.
pub fn read_private_key(
    what: &'static str,
    path: &Path,
) -> Result<PrivateKeyDer<'static>, TransportError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TransportError::File {
        what,
        path: path.to_path_buf(),
        problem: e.to_string(),
    })
}

/// rustls with fleetbus's crypto provider for a client that reaches an HTTPS or database
/// server itself (the `http` and `postgres` sinks, the agent's HTTP checks and cloud
/// metadata): the server's certificate checked against `ca_file` (named `what` in errors),
/// or else the system's CAs.
pub fn https_client_config(
    what: &'static str,
    ca_file: Option<&Path>,
) -> Result<ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in read_certificates(what, path).map_err(|e| e.to_string())? {
                roots
                    .add(cert)
                    .map_err(|e| format!("{what} {}: {e}", path.display()))?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    Ok(ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

fn client_config(files: &TlsFiles) -> Result<ClientConfig, TransportError> {
    let mut roots = RootCertStore::empty();
    match &files.ca_file {
        Some(path) => {
            for cert in read_certificates("connection.ca_file", path)? {
                roots.add(cert).map_err(|e| TransportError::File {
                    what: "connection.ca_file",
                    path: path.clone(),
                    problem: e.to_string(),
                })?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for cert in native.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(TransportError::Tls(
                    "no system CA certificates found: set connection.ca_file".into(),
                ));
            }
        }
    }
    let builder = ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TransportError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    match (&files.client_cert, &files.client_key) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(
                read_certificates("connection.client_cert", cert)?,
                read_private_key("connection.client_key", key)?,
            )
            .map_err(|e| TransportError::Tls(format!("client certificate: {e}"))),
        (None, None) => Ok(builder.with_no_client_auth()),
        _ => Err(TransportError::Tls(
            "connection.client_cert and connection.client_key go together".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxies_and_files_are_checked() {
        assert_eq!(
            parse_proxy("http://proxy.local:3128").unwrap(),
            ("proxy.local".to_string(), 3128)
        );
        assert!(parse_proxy("socks5://p:1").is_err());
        assert!(parse_proxy("http://p").is_err());
        let url: BrokerUrl = "mqtts://h".parse().unwrap();
        let files = TlsFiles {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..TlsFiles::default()
        };
        let e = ClientTransport::for_url(&url, &files, None)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.starts_with("connection.ca_file /nonexistent/ca.pem"),
            "{e}"
        );
        let plain: BrokerUrl = "mqtt://h".parse().unwrap();
        assert!(ClientTransport::for_url(&plain, &files, None).is_err());
    }
}
