//! mTLS on both sides of the router, with certificates read from files and
//! re-read when they change, so a rotated Secret takes effect on the next
//! connection without a restart (open connections keep their session).
//!
//! - Server side (kube-apiserver → router): `ServerTls` builds a rustls
//!   server config per accepted connection from the current files; with a CA
//!   given, clients must present a certificate it signed.
//! - Client side (router → shards): `ClientTls` is a connector for tonic
//!   channels; each new connection uses the current CA and client certificate.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tracing::{debug, warn};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM {what}")]
    Empty { path: PathBuf, what: &'static str },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Certificate, key and (optionally) the CA that signs the peers' certificates.
#[derive(Clone, Debug, Default)]
pub struct TlsFiles {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub ca: Option<PathBuf>,
}

impl TlsFiles {
    pub fn is_empty(&self) -> bool {
        self.cert.is_none() && self.key.is_none() && self.ca.is_none()
    }

    fn paths(&self) -> Vec<&Path> {
        [&self.cert, &self.key, &self.ca]
            .into_iter()
            .flatten()
            .map(PathBuf::as_path)
            .collect()
    }

    fn stamp(&self) -> Vec<Option<SystemTime>> {
        self.paths()
            .into_iter()
            .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            .collect()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            path: path.to_path_buf(),
            what: "certificate",
        });
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| TlsError::Empty {
        path: path.to_path_buf(),
        what: "private key",
    })
}

fn roots(path: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(path)? {
        roots.add(cert).map_err(|e| TlsError::Invalid {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// A config rebuilt from its files when their modification times change
/// (checked at most once a second); a broken rotation keeps the last good one.
struct Reloading<T> {
    files: TlsFiles,
    build: fn(&TlsFiles) -> Result<T, TlsError>,
    state: Mutex<(Instant, Vec<Option<SystemTime>>, Arc<T>)>,
}

impl<T> Reloading<T> {
    fn new(files: TlsFiles, build: fn(&TlsFiles) -> Result<T, TlsError>) -> Result<Self, TlsError> {
        let stamp = files.stamp();
        let config = Arc::new(build(&files)?);
        Ok(Reloading {
            files,
            build,
            state: Mutex::new((Instant::now(), stamp, config)),
        })
    }

    fn current(&self) -> Arc<T> {
        let mut state = self.state.lock().expect("tls state lock");
        if state.0.elapsed() >= Duration::from_secs(1) {
            state.0 = Instant::now();
            let stamp = self.files.stamp();
            if stamp != state.1 {
                match (self.build)(&self.files) {
                    Ok(config) => {
                        debug!(files = ?self.files.paths(), "TLS files changed: reloaded");
                        state.1 = stamp;
                        state.2 = Arc::new(config);
                    }
                    // Files are often replaced one at a time: try again on the next check.
                    Err(err) => {
                        warn!(error = %err, "TLS files changed but cannot be loaded yet; keeping the previous ones")
                    }
                }
            }
        }
        state.2.clone()
    }
}

fn server_config(files: &TlsFiles) -> Result<rustls::ServerConfig, TlsError> {
    let (Some(cert), Some(key)) = (&files.cert, &files.key) else {
        return Err(TlsError::Config(
            "serving TLS needs both --cert-file and --key-file".into(),
        ));
    };
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &files.ca {
        Some(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(ca)?),
                provider(),
            )
            .build()
            .map_err(|e| TlsError::Config(format!("client CA {}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certificates(cert)?, private_key(key)?)
        .map_err(|e| TlsError::Invalid {
            path: key.clone(),
            message: format!("does not match {}: {e}", cert.display()),
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

fn client_config(files: &TlsFiles) -> Result<rustls::ClientConfig, TlsError> {
    let Some(ca) = &files.ca else {
        return Err(TlsError::Config(
            "connecting to shards over TLS needs --shard-ca-file".into(),
        ));
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots(ca)?);
    let mut config = match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(certificates(cert)?, private_key(key)?)
            .map_err(|e| TlsError::Invalid {
                path: key.clone(),
                message: format!("does not match {}: {e}", cert.display()),
            })?,
        (None, None) => builder.with_no_client_auth(),
        _ => {
            return Err(TlsError::Config(
                "give both --shard-cert-file and --shard-key-file, or neither".into(),
            ))
        }
    };
    // etcd's gRPC server (grpc-go) refuses TLS connections that do not negotiate h2.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The server side: accepts TCP connections and completes TLS handshakes off
/// the accept loop, so a slow client cannot hold up others.
#[derive(Clone)]
pub struct ServerTls(Arc<Reloading<rustls::ServerConfig>>);

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ServerTls").field(&self.0.files).finish()
    }
}

impl ServerTls {
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        Ok(ServerTls(Arc::new(Reloading::new(files, server_config)?)))
    }

    pub fn incoming(
        &self,
        listener: Arc<TcpListener>,
    ) -> impl tokio_stream::Stream<Item = std::io::Result<tokio_rustls::server::TlsStream<TcpStream>>>
    {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let tls = self.clone();
        tokio::spawn(async move {
            let mut backoff =
                crate::retry::Backoff::new(Duration::from_millis(10), Duration::from_secs(1));
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    _ = tx.closed() => break,
                };
                let (stream, peer) = match accepted {
                    Ok(accepted) => {
                        backoff.reset();
                        accepted
                    }
                    Err(err) => {
                        // Out of file descriptors, say: wait before accepting again.
                        warn!(error = %err, "accept failed");
                        tokio::time::sleep(backoff.next_delay()).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let acceptor = TlsAcceptor::from(tls.0.current());
                let sender = tx.clone();
                tokio::spawn(async move {
                    let handshake =
                        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream))
                            .await;
                    match handshake {
                        Ok(Ok(stream)) => {
                            let _ = sender.send(Ok(stream)).await;
                        }
                        Ok(Err(err)) => debug!(%peer, error = %err, "TLS handshake refused"),
                        Err(_) => debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}

/// The client side: a connector for tonic channels to `https://` shards.
#[derive(Clone)]
pub struct ClientTls(Arc<Reloading<rustls::ClientConfig>>, Option<String>);

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ClientTls")
            .field(&self.0.files)
            .field(&self.1)
            .finish()
    }
}

impl ClientTls {
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        Ok(ClientTls(
            Arc::new(Reloading::new(files, client_config)?),
            None,
        ))
    }

    /// Verifies every shard's certificate against this name instead of the
    /// host in its URL: worker shards are reached at pod IPs that no
    /// certificate issued in advance can name.
    pub fn with_server_name(mut self, name: Option<String>) -> Self {
        self.1 = name.filter(|n| !n.is_empty());
        self
    }

    pub async fn connect(
        &self,
        uri: &tonic::transport::Uri,
    ) -> std::io::Result<hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>> {
        let invalid = |what: &str| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{what} in {uri}"))
        };
        let host = uri.host().ok_or_else(|| invalid("no host"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(2379);
        let tcp = TcpStream::connect((host.as_str(), port)).await?;
        tcp.set_nodelay(true)?;
        let name = self.1.clone().unwrap_or_else(|| host.clone());
        let name = ServerName::try_from(name).map_err(|_| invalid("invalid server name"))?;
        let stream = TlsConnector::from(self.0.current())
            .connect(name, tcp)
            .await?;
        Ok(hyper_util::rt::TokioIo::new(stream))
    }
}
