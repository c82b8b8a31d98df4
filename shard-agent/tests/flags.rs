//! Bad flags are clear errors with a non-zero exit, never a panic.

mod common;

use common::run_to_end;

fn etcd() -> String {
    ste_testkit::etcd_binary()
        .expect("etcd binary")
        .display()
        .to_string()
}

fn assert_fails(args: &[&str], code: i32, message: &str) {
    let (status, stderr) = run_to_end(args);
    assert_eq!(
        status,
        Some(code),
        "exit code of {args:?}; stderr:\n{stderr}"
    );
    assert!(
        stderr.contains(message),
        "{args:?}: expected {message:?} in stderr:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{args:?} panicked:\n{stderr}");
}

#[test]
fn invalid_flags_are_refused_with_clear_messages() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = format!("--data-dir={}", dir.path().join("data").display());
    let etcd = format!("--etcd-binary={}", etcd());

    assert_fails(
        &["run", &etcd, &data, "--no-register"],
        2,
        "no shard name: pass --shard-name",
    );
    assert_fails(
        &["run", &etcd, &data, "--shard-name=Worker_1"],
        2,
        "invalid shard name \"Worker_1\"",
    );
    assert_fails(
        &["run", &etcd, &data, "--shard-name=-a"],
        2,
        "invalid shard name",
    );
    assert_fails(
        &[
            "run",
            &data,
            "--shard-name=a",
            "--etcd-binary=/nonexistent/etcd",
        ],
        2,
        "etcd binary \"/nonexistent/etcd\" is not an executable file",
    );
    assert_fails(
        &[
            "run",
            &data,
            "--shard-name=a",
            "--etcd-binary=no-such-etcd-here",
        ],
        2,
        "not found on PATH",
    );
    assert_fails(&["run", &etcd, "--shard-name=a"], 2, "--data-dir");
    assert_fails(
        &["run", &etcd, &data, "--shard-name=a", "--quota-bytes=2GB"],
        2,
        "unknown unit",
    );
    assert_fails(
        &[
            "run",
            &etcd,
            &data,
            "--shard-name=a",
            "--health-interval=soon",
        ],
        2,
        "--health-interval",
    );
    assert_fails(
        &[
            "run",
            &etcd,
            &data,
            "--shard-name=a",
            "--listen-client=https://127.0.0.1:2379",
        ],
        2,
        "no --cert-file/--key-file",
    );
    assert_fails(
        &[
            "run",
            &etcd,
            &data,
            "--shard-name=a",
            "--listen-client=127.0.0.1:2379",
        ],
        2,
        "invalid --listen-client",
    );
    assert_fails(
        &[
            "run",
            &etcd,
            &data,
            "--shard-name=a",
            "--listen-peer=http://127.0.0.1:2379",
        ],
        2,
        "another port than --listen-client",
    );
    assert_fails(
        &[
            "run",
            &etcd,
            &data,
            "--shard-name=a",
            "--cert-file=/nonexistent.pem",
            "--key-file=/nonexistent.key",
            "--listen-client=https://127.0.0.1:2379",
        ],
        2,
        "--cert-file file \"/nonexistent.pem\" is not readable",
    );
    assert!(
        !dir.path().join("data").exists(),
        "nothing is created before the flags are valid"
    );
}

#[test]
fn runtime_setup_errors_exit_1_with_the_cause() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = format!("--data-dir={}", dir.path().join("data").display());
    let etcd = format!("--etcd-binary={}", etcd());
    let missing = dir.path().join("missing-kubeconfig");
    assert_fails(
        &[
            "run",
            &etcd,
            &data,
            "--shard-name=a",
            &format!("--kubeconfig={}", missing.display()),
        ],
        1,
        "reading kubeconfig",
    );
    // No kubeconfig anywhere and not in a cluster.
    let out = std::process::Command::new(common::AGENT)
        .args(["run", &etcd, &data, "--shard-name=a"])
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("HOME", dir.path())
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no Kubernetes configuration") && stderr.contains("--no-register"),
        "{stderr}"
    );
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let admin = format!("--admin-listen={}", taken.local_addr().expect("addr"));
    assert_fails(
        &[
            "run",
            &etcd,
            &data,
            "--shard-name=a",
            "--no-register",
            &admin,
        ],
        1,
        "binding the admin server",
    );
}

#[test]
fn help_and_crd() {
    let out = std::process::Command::new(common::AGENT)
        .args(["run", "--help"])
        .output()
        .expect("run --help");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--shard-name",
        "--etcd-binary",
        "--data-dir",
        "--quota-bytes",
        "--trusted-ca-file",
        "--etcd-arg",
        "--kubeconfig",
        "--drain-timeout",
        "--admin-listen",
        "PR_SET_PDEATHSIG",
    ] {
        assert!(help.contains(flag), "--help mentions {flag}:\n{help}");
    }
    let out = std::process::Command::new(common::AGENT)
        .arg("crd")
        .output()
        .expect("crd");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("shards.ste.dev"));
}
