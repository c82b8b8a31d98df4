//! The webhook's HTTPS listener: a TCP listener whose connections finish a
//! rustls handshake (serving certificate and key read from PEM files) before
//! axum sees them. Handshakes run in their own tasks, so a slow client never
//! holds up the next accept.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Builds the rustls server configuration from PEM files.
pub fn server_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    };
    server_config_from_pem(&read(cert)?, cert, &read(key)?, key)
}

/// A serving certificate for `ip` (and localhost) signed by a CA made on
/// the spot: (certificate PEM, key PEM, CA PEM). For a webhook on loopback
/// (tests, benchmarks), registered with that CA.
pub fn self_signed(ip: std::net::IpAddr) -> Result<(String, String, String), TlsError> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
    let bad = |e: rcgen::Error| TlsError::Pem {
        path: PathBuf::from("(self-signed)"),
        message: e.to_string(),
    };
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(bad)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let issuer =
        CertifiedIssuer::self_signed(ca, KeyPair::generate().map_err(bad)?).map_err(bad)?;
    let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).map_err(bad)?;
    leaf.subject_alt_names.push(SanType::IpAddress(ip));
    let key = KeyPair::generate().map_err(bad)?;
    let cert = leaf.signed_by(&key, &issuer).map_err(bad)?;
    Ok((cert.pem(), key.serialize_pem(), issuer.pem()))
}

/// Builds the rustls server configuration from PEM text (paths for errors).
pub fn server_config_from_pem(
    cert_pem: &[u8],
    cert: &Path,
    key_pem: &[u8],
    key: &Path,
) -> Result<rustls::ServerConfig, TlsError> {
    let pem_error = |path: &Path, e: &dyn std::fmt::Display| TlsError::Pem {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(cert, &e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert.to_path_buf(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| pem_error(key, &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// An axum listener that yields TLS streams.
pub struct TlsListener {
    local: SocketAddr,
    streams: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
}

impl TlsListener {
    pub async fn bind(addr: SocketAddr, config: rustls::ServerConfig) -> Result<Self, TlsError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| TlsError::Bind { addr, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| TlsError::Bind { addr, source })?;
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(accept_loop(listener, acceptor, tx));
        Ok(TlsListener { local, streams: rx })
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    warn!(error = %err, "webhook accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = tx.closed() => return,
        };
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    let _ = tx.send((tls, peer)).await;
                }
                Ok(Err(err)) => debug!(%peer, error = %err, "webhook TLS handshake refused"),
                Err(_) => debug!(%peer, "webhook TLS handshake timed out"),
            }
        });
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.streams.recv().await {
            Some(accepted) => accepted,
            // The accept loop only ends when this receiver is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_certificate_serves() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (cert, key, ca) = self_signed([127, 0, 0, 1].into()).unwrap();
        assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"));
        let here = Path::new("x");
        server_config_from_pem(cert.as_bytes(), here, key.as_bytes(), here).unwrap();
        assert!(matches!(
            server_config_from_pem(b"", here, key.as_bytes(), here),
            Err(TlsError::NoCertificate { .. })
        ));
        assert!(
            server_config(Path::new("/nonexistent.crt"), Path::new("/nonexistent.key")).is_err()
        );
    }
}
