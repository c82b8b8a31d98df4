//! The real ste-router binary with the real etcdctl as its client.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use ste_testkit::{etcdctl_binary, free_port, start_shards, Etcd};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct RouterProcess {
    child: Child,
    endpoint: String,
    admin: String,
}

impl Drop for RouterProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await.ok()?;
    let code = body.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body))
}

async fn start_router(shards: &[Etcd]) -> RouterProcess {
    let listen = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let shard_list: Vec<String> = shards
        .iter()
        .map(|s| format!("{}={}", s.name, s.endpoint()))
        .collect();
    let child = Command::new(env!("CARGO_BIN_EXE_ste-router"))
        .args([
            "--listen",
            &listen,
            "--admin-listen",
            &admin,
            "--shards",
            &shard_list.join(","),
        ])
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("starting ste-router");
    let router = RouterProcess {
        child,
        endpoint: listen,
        admin,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some((200, _)) = http_get(&router.admin, "/readyz").await {
            return router;
        }
        assert!(Instant::now() < deadline, "ste-router not ready within 30s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn etcdctl(endpoint: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(etcdctl_binary().expect("etcdctl"))
        .arg(format!("--endpoints={endpoint}"))
        .arg("--command-timeout=10s")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running etcdctl");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

/// Runs etcdctl and returns stdout, failing the test with stderr if it failed.
fn ok(endpoint: &str, args: &[&str]) -> String {
    let out = etcdctl(endpoint, args, None);
    assert!(
        out.status.success(),
        "etcdctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_works_against_the_router() {
    let shards = start_shards(3).await.unwrap();
    let router = start_router(&shards).await;
    let ep = router.endpoint.as_str();

    // put / get / prefix / keys-only
    for i in 0..10 {
        assert_eq!(
            ok(
                ep,
                &["put", &format!("/registry/pods/ns/p{i}"), &format!("v{i}")]
            ),
            "OK\n"
        );
    }
    assert_eq!(
        ok(ep, &["get", "/registry/pods/ns/p3"]),
        "/registry/pods/ns/p3\nv3\n"
    );
    let listed = json(&ok(
        ep,
        &["get", "/registry/pods/", "--prefix", "-w", "json"],
    ));
    assert_eq!(listed["count"], 10);
    let keys = ok(ep, &["get", "/registry/pods/", "--prefix", "--keys-only"]);
    let keys: Vec<&str> = keys.lines().filter(|l| !l.is_empty()).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "keys come back sorted across shards");
    assert_eq!(keys.len(), 10);
    let page = json(&ok(
        ep,
        &[
            "get",
            "/registry/pods/",
            "--prefix",
            "--limit=4",
            "-w",
            "json",
        ],
    ));
    assert_eq!(page["kvs"].as_array().unwrap().len(), 4);
    assert_eq!(page["more"], true);
    assert_eq!(page["count"], 10);

    // watch sees a put
    let mut watcher = Command::new(etcdctl_binary().unwrap())
        .args([
            format!("--endpoints={ep}").as_str(),
            "watch",
            "/registry/pods/",
            "--prefix",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watcher.stdout.take().unwrap()).lines();
    // The watch is up once a put made after starting it shows up; retry the put until then.
    let reader = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for line in lines.by_ref() {
            let line = line.unwrap();
            seen.push(line);
            if seen.ends_with(&[
                "PUT".into(),
                "/registry/pods/ns/watched".into(),
                "hello".into(),
            ]) {
                return seen;
            }
        }
        seen
    });
    let deadline = Instant::now() + Duration::from_secs(15);
    while !reader.is_finished() {
        assert!(
            Instant::now() < deadline,
            "etcdctl watch saw nothing within 15s"
        );
        ok(ep, &["put", "/registry/pods/ns/watched", "hello"]);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let seen = reader.join().unwrap();
    assert!(seen.contains(&"PUT".to_string()), "{seen:?}");
    let _ = watcher.kill();
    let _ = watcher.wait();

    // txn: the kube-apiserver update shape, through etcdctl's txn syntax
    let rev = json(&ok(ep, &["get", "/registry/pods/ns/p1", "-w", "json"]))["kvs"][0]
        ["mod_revision"]
        .as_i64()
        .unwrap();
    let script = format!("mod(\"/registry/pods/ns/p1\") = \"{rev}\"\n\nput /registry/pods/ns/p1 updated\n\nget /registry/pods/ns/p1\n\n");
    let out = etcdctl(ep, &["txn"], Some(&script));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "SUCCESS\n\nOK\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stale = etcdctl(ep, &["txn"], Some(&script));
    assert_eq!(
        String::from_utf8_lossy(&stale.stdout),
        "FAILURE\n\n/registry/pods/ns/p1\nupdated\n"
    );
    // a txn across shards is refused with a clear message
    let spanning = (0..10)
        .map(|i| format!("put /registry/pods/ns/p{i} x\n"))
        .collect::<String>();
    let out = etcdctl(ep, &["txn"], Some(&format!("\n{spanning}\n\n")));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("spans shards"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // delete
    assert_eq!(ok(ep, &["del", "/registry/pods/ns/p9"]), "1\n");
    assert_eq!(ok(ep, &["del", "/registry/pods/ns/p9"]), "0\n");

    // leases
    let granted = ok(ep, &["lease", "grant", "60"]);
    let id = granted.split_whitespace().nth(1).unwrap().to_string();
    assert!(granted.contains("granted with TTL(60s)"), "{granted}");
    ok(ep, &["put", "--lease", &id, "/registry/events/e1", "event"]);
    let ttl = ok(ep, &["lease", "timetolive", &id, "--keys"]);
    assert!(ttl.contains("/registry/events/e1"), "{ttl}");
    assert!(ok(ep, &["lease", "keep-alive", "--once", &id]).contains("keepalived with TTL(60)"));
    assert!(ok(ep, &["lease", "list"]).contains(&id));
    assert!(ok(ep, &["lease", "revoke", &id]).contains("revoked"));
    assert_eq!(ok(ep, &["get", "/registry/events/e1"]), "");

    // compaction
    let current = json(&ok(ep, &["get", "/registry/pods/ns/p0", "-w", "json"]))["header"]
        ["revision"]
        .as_i64()
        .unwrap();
    assert_eq!(
        ok(ep, &["compaction", &(current - 2).to_string()]),
        format!("compacted revision {}\n", current - 2)
    );
    let old = etcdctl(
        ep,
        &[
            "get",
            "/registry/pods/ns/p0",
            &format!("--rev={}", current - 5),
        ],
        None,
    );
    assert!(String::from_utf8_lossy(&old.stderr).contains("required revision has been compacted"));

    // endpoint status, health, member list
    let status = json(&ok(ep, &["endpoint", "status", "-w", "json"]));
    let version = status[0]["Status"]["version"].as_str().unwrap().to_string();
    let parts: Vec<u64> = version.split('.').map(|p| p.parse().unwrap()).collect();
    assert!(parts >= vec![3, 5, 13], "reported version {version}");
    assert!(status[0]["Status"]["dbSize"].as_i64().unwrap() > 0);
    let health = etcdctl(ep, &["endpoint", "health"], None);
    assert!(
        String::from_utf8_lossy(&health.stdout).contains("is healthy")
            || String::from_utf8_lossy(&health.stderr).contains("is healthy")
    );
    assert!(ok(ep, &["member", "list"]).contains("ste-router"));

    // the admin port
    let (code, body) = http_get(&router.admin, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    assert!(body.contains("ste_router_rpcs_total"), "{body}");
    assert!(body.contains("ste_router_shard_keys{shard=\"shard-0\"}"));
    assert_eq!(http_get(&router.admin, "/livez").await.unwrap().0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_flags_fail_with_a_clear_message() {
    let out = Command::new(env!("CARGO_BIN_EXE_ste-router"))
        .args(["--shards", "127.0.0.1:2379"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("must start with http://"));
    let help = Command::new(env!("CARGO_BIN_EXE_ste-router"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("--shards") && help.contains("STE_ROUTER_SHARDS"),
        "{help}"
    );
}
