//! mTLS end to end with real etcd shards: the router serves TLS and requires
//! client certificates, talks to shards that require its client certificate,
//! refuses clients without one, and picks up a rotated certificate without a
//! restart.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use ste_etcd_proto::pb::{kv_client::KvClient, PutRequest, RangeRequest};
use ste_router::tls::{ClientTls, ServerTls, TlsFiles};
use ste_testkit::{wait_until, Etcd, EtcdTls, Router};
use tonic::transport::{Channel, Endpoint};

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        Ca {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    /// Writes `<name>.crt` / `<name>.key` for the given SANs, and the CA as `<name>-ca.crt`.
    fn issue(&self, dir: &Path, name: &str, sans: &[&str]) -> (PathBuf, PathBuf, PathBuf) {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let paths = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
            dir.join(format!("{name}-ca.crt")),
        );
        std::fs::write(&paths.0, cert.pem()).unwrap();
        std::fs::write(&paths.1, key.serialize_pem()).unwrap();
        std::fs::write(&paths.2, self.issuer.pem()).unwrap();
        paths
    }
}

/// A gRPC channel through the router's own TLS connector (CA + optional client cert).
async fn tls_channel(url: &str, files: TlsFiles) -> Result<Channel, String> {
    let tls = ClientTls::load(files).map_err(|e| e.to_string())?;
    Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |uri| {
            let tls = tls.clone();
            async move { tls.connect(&uri).await }
        }))
        .await
        .map_err(|e| format!("{e:?}"))
}

async fn put_and_get(channel: Channel, key: &str) -> Result<Vec<u8>, String> {
    let mut kv = KvClient::new(channel);
    kv.put(PutRequest {
        key: key.as_bytes().to_vec().into(),
        value: b"v".to_vec().into(),
        ..Default::default()
    })
    .await
    .map_err(|e| e.to_string())?;
    let got = kv
        .range(RangeRequest {
            key: key.as_bytes().to_vec().into(),
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    Ok(got
        .kvs
        .first()
        .map(|kv| kv.value.to_vec())
        .unwrap_or_default())
}

#[tokio::test]
async fn router_and_shards_require_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("ste-test-ca");
    let (shard_cert, shard_key, ca_file) =
        ca.issue(dir.path(), "shard", &["127.0.0.1", "localhost"]);
    let (router_cert, router_key, _) = ca.issue(dir.path(), "router", &["127.0.0.1", "localhost"]);
    let (router_client_cert, router_client_key, _) = ca.issue(dir.path(), "router-client", &[]);
    let (apiserver_cert, apiserver_key, _) = ca.issue(dir.path(), "apiserver-client", &[]);

    let shard_tls = EtcdTls {
        cert: shard_cert,
        key: shard_key,
        ca: ca_file.clone(),
    };
    let shards = vec![
        Etcd::start_tls("tls-a", shard_tls.clone(), &["--unsafe-no-fsync"])
            .await
            .unwrap(),
        Etcd::start_tls("tls-b", shard_tls, &["--unsafe-no-fsync"])
            .await
            .unwrap(),
    ];
    let mut config = Router::test_config(ste_testkit::shard_specs(&shards));
    config.server_tls = Some(
        ServerTls::load(TlsFiles {
            cert: Some(router_cert),
            key: Some(router_key),
            ca: Some(ca_file.clone()),
        })
        .unwrap(),
    );
    config.store.shard_tls = Some(
        ClientTls::load(TlsFiles {
            cert: Some(router_client_cert.clone()),
            key: Some(router_client_key.clone()),
            ca: Some(ca_file.clone()),
        })
        .unwrap(),
    );
    let router = Router::start_with(config).await.unwrap();
    assert!(router.endpoint().starts_with("https://"));

    // A client with a certificate from the CA (kube-apiserver's --etcd-certfile) is served.
    let trusted = TlsFiles {
        cert: Some(apiserver_cert),
        key: Some(apiserver_key),
        ca: Some(ca_file.clone()),
    };
    for i in 0..20 {
        let channel = tls_channel(&router.endpoint(), trusted.clone())
            .await
            .unwrap();
        assert_eq!(
            put_and_get(channel, &format!("/registry/pods/default/p{i}"))
                .await
                .unwrap(),
            b"v"
        );
    }

    // Without a client certificate: refused by the router, and by each shard.
    let anonymous = TlsFiles {
        cert: None,
        key: None,
        ca: Some(ca_file.clone()),
    };
    let refused = match tls_channel(&router.endpoint(), anonymous.clone()).await {
        Err(err) => err,
        Ok(channel) => put_and_get(channel, "/registry/pods/default/x")
            .await
            .unwrap_err(),
    };
    assert!(!refused.is_empty());
    for shard in &shards {
        let refused = match tls_channel(&shard.endpoint(), anonymous.clone()).await {
            Err(err) => err,
            Ok(channel) => put_and_get(channel, "/x").await.unwrap_err(),
        };
        assert!(
            !refused.is_empty(),
            "shard {} served a client without a certificate",
            shard.name
        );
        // Plain text is refused too.
        let plain = shard.endpoint().replace("https://", "http://");
        let plain = Endpoint::from_shared(plain)
            .unwrap()
            .timeout(Duration::from_secs(3))
            .connect()
            .await;
        if let Ok(channel) = plain {
            assert!(
                put_and_get(channel, "/x").await.is_err(),
                "shard {} served plain text",
                shard.name
            );
        }
    }
    // The router's client certificate works on the shards directly: the keys are there.
    let mut stored = 0;
    for shard in &shards {
        let channel = tls_channel(
            &shard.endpoint(),
            TlsFiles {
                cert: Some(router_client_cert.clone()),
                key: Some(router_client_key.clone()),
                ca: Some(ca_file.clone()),
            },
        )
        .await
        .unwrap();
        let answer = KvClient::new(channel)
            .range(RangeRequest {
                key: b"/registry/pods/".to_vec().into(),
                range_end: b"/registry/pods0".to_vec().into(),
                count_only: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        stored += answer.count;
    }
    assert_eq!(stored, 20);
    router.stop().await.unwrap();
}

#[tokio::test]
async fn a_rotated_server_certificate_applies_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let old_ca = Ca::new("old-ca");
    let new_ca = Ca::new("new-ca");
    let (cert, key, old_ca_file) = old_ca.issue(dir.path(), "router", &["127.0.0.1"]);
    let (client_cert, client_key, _) = old_ca.issue(dir.path(), "client", &[]);
    let shards = ste_testkit::start_shards(1).await.unwrap();
    let mut config = Router::test_config(ste_testkit::shard_specs(&shards));
    config.server_tls = Some(
        ServerTls::load(TlsFiles {
            cert: Some(cert.clone()),
            key: Some(key.clone()),
            ca: Some(old_ca_file.clone()),
        })
        .unwrap(),
    );
    let router = Router::start_with(config).await.unwrap();

    let rotated = dir.path().join("rotated");
    std::fs::create_dir(&rotated).unwrap();
    let (new_cert, new_key, new_ca_file) = new_ca.issue(&rotated, "router", &["127.0.0.1"]);
    let trusting = |ca: &PathBuf| TlsFiles {
        cert: Some(client_cert.clone()),
        key: Some(client_key.clone()),
        ca: Some(ca.clone()),
    };

    let channel = tls_channel(&router.endpoint(), trusting(&old_ca_file))
        .await
        .unwrap();
    put_and_get(channel, "/k/before").await.unwrap();
    assert!(
        match tls_channel(&router.endpoint(), trusting(&new_ca_file)).await {
            Err(_) => true,
            Ok(channel) => put_and_get(channel, "/k/early").await.is_err(),
        },
        "a client trusting only the new CA was served before the rotation"
    );

    // Rotate like a Secret update: replace the files.
    std::fs::copy(&new_key, &key).unwrap();
    std::fs::copy(&new_cert, &cert).unwrap();
    let url = router.endpoint();
    wait_until(
        "the router serves the rotated certificate",
        Duration::from_secs(20),
        || {
            let files = trusting(&new_ca_file);
            let url = url.clone();
            async move {
                match tls_channel(&url, files).await {
                    Ok(channel) => put_and_get(channel, "/k/after").await.is_ok(),
                    Err(_) => false,
                }
            }
        },
    )
    .await;
    router.stop().await.unwrap();
}

#[tokio::test]
async fn shards_are_verified_against_one_name_when_their_addresses_are_not_in_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("ste-test-ca");
    // Like worker shards reached at pod IPs: the certificate names only the service.
    let (shard_cert, shard_key, ca_file) = ca.issue(dir.path(), "shard", &["ste-shard"]);
    let (client_cert, client_key, _) = ca.issue(dir.path(), "router-client", &[]);
    let shard_tls = EtcdTls {
        cert: shard_cert,
        key: shard_key,
        ca: ca_file.clone(),
    };
    let shards = vec![Etcd::start_tls("named", shard_tls, &["--unsafe-no-fsync"])
        .await
        .unwrap()];
    let client = |name: Option<&str>| {
        ClientTls::load(TlsFiles {
            cert: Some(client_cert.clone()),
            key: Some(client_key.clone()),
            ca: Some(ca_file.clone()),
        })
        .unwrap()
        .with_server_name(name.map(str::to_string))
    };
    // Checked against the URL's host (127.0.0.1), the shard is refused.
    let refused = match tls_channel(
        &shards[0].endpoint(),
        TlsFiles {
            cert: Some(client_cert.clone()),
            key: Some(client_key.clone()),
            ca: Some(ca_file.clone()),
        },
    )
    .await
    {
        Err(err) => err,
        Ok(channel) => put_and_get(channel, "/x").await.unwrap_err(),
    };
    assert!(!refused.is_empty());

    let mut config = Router::test_config(ste_testkit::shard_specs(&shards));
    config.store.shard_tls = Some(client(Some("ste-shard")));
    let router = Router::start_with(config).await.unwrap();
    let channel = Endpoint::from_shared(router.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    assert_eq!(
        put_and_get(channel, "/registry/pods/default/p")
            .await
            .unwrap(),
        b"v"
    );
    router.stop().await.unwrap();
}
