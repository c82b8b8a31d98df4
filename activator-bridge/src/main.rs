//! ste-activator-bridge: pre-stages pods on Knative's scale-from-zero path,
//! Knative unchanged. See docs/activator-bridge.md.

mod admission;
mod bridge;
mod handover;
mod leader;
mod metrics;
mod placement;
mod podmeta;
mod podwrite;
mod ratelimit;
mod sweep;
mod tap;
mod tls;
mod webhook;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use clap::Parser;
use tracing::info;

/// Label Knative puts on every revision's Deployment, ReplicaSet and pods.
pub const REVISION_UID_LABEL: &str = "serving.knative.dev/revisionUID";
/// Marks the pods the bridge created.
pub const CREATED_BY_ANNOTATION: &str = "ste.dev/activator-bridge";
pub const DELETION_COST_ANNOTATION: &str = "controller.kubernetes.io/pod-deletion-cost";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Act when a revision's ReplicaSet goes from 0 to N replicas (after the
    /// Deployment controller has propagated the autoscaler's scale).
    Default,
    /// Act already when the revision's Deployment goes from 0 to N: create
    /// the pods (held by the Deployment, handed to the ReplicaSet once the
    /// ReplicaSet controller has seen the scale-up) without waiting for the
    /// Deployment and ReplicaSet controllers.
    Aggressive,
    /// Create no pods: only bind the ReplicaSet controller's pods at
    /// admission (needs --webhook-listen). No race, no duplicate.
    Webhook,
    /// Create no pods: only the stat tap's Deployment 0→1 (needs
    /// --stat-tap-listen; the tap Deployment next to Knative's autoscaler).
    Tap,
}

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Pre-stages pods on Knative's scale-from-zero path",
    long_about = "Watches Knative revision ReplicaSets (label serving.knative.dev/revisionUID), Nodes and Pods. \
When a revision scales up from zero it creates the missing pods itself from the ReplicaSet's template, \
already bound to a node that clearly fits, held by the Deployment and handed to the ReplicaSet once the \
ReplicaSet controller has seen the scale-up, so the scheduler has nothing to do. It never writes Endpoints, \
ServerlessServices, PodAutoscalers or any replicas; when in doubt it does nothing and the normal path runs. \
One replica acts at a time (coordination.k8s.io Lease). Admin: /livez /readyz /metrics."
)]
struct Args {
    /// Kubeconfig to use; in a pod, leave unset for the in-cluster config.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// When to act: on the ReplicaSet's 0→N (default) or already on the Deployment's 0→N (aggressive).
    #[arg(long, value_enum, env = "STE_BRIDGE_MODE", default_value = "default")]
    mode: Mode,
    /// Decide and log, but create nothing (a safe way to try it, or to turn it off without removing it).
    #[arg(long, env = "STE_BRIDGE_DRY_RUN")]
    dry_run: bool,
    /// Admin HTTP address (/livez, /readyz, /metrics).
    #[arg(
        long,
        env = "STE_BRIDGE_ADMIN_LISTEN",
        default_value = "127.0.0.1:9464"
    )]
    admin_listen: SocketAddr,
    /// Client-side rate limit on the bridge's API requests (requests/s, token bucket; 0 = none).
    #[arg(long, env = "STE_BRIDGE_KUBE_API_QPS", default_value_t = 50.0)]
    kube_api_qps: f64,
    /// Burst of the client-side rate limit.
    #[arg(long, env = "STE_BRIDGE_KUBE_API_BURST", default_value_t = 100)]
    kube_api_burst: u32,
    /// Namespace of the leader-election Lease.
    #[arg(
        long,
        env = "STE_BRIDGE_LEASE_NAMESPACE",
        default_value = "kube-system"
    )]
    lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(
        long,
        env = "STE_BRIDGE_LEASE_NAME",
        default_value = "ste-activator-bridge"
    )]
    lease_name: String,
    /// This replica's identity in the Lease (default: POD_NAME, else hostname and PID).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// How long a Lease stays valid without renewal.
    #[arg(long, env = "STE_BRIDGE_LEASE_DURATION", value_parser = humantime::parse_duration, default_value = "15s")]
    lease_duration: Duration,
    /// The leader stops acting when it could not renew for this long (must be < lease duration).
    #[arg(long, env = "STE_BRIDGE_RENEW_DEADLINE", value_parser = humantime::parse_duration, default_value = "10s")]
    renew_deadline: Duration,
    /// How often to renew, or to try to acquire.
    #[arg(long, env = "STE_BRIDGE_RETRY_PERIOD", value_parser = humantime::parse_duration, default_value = "2s")]
    retry_period: Duration,
    /// pod-deletion-cost on the bridge's pods: the ReplicaSet controller deletes lower costs first when it has duplicates.
    #[arg(long, env = "STE_BRIDGE_POD_DELETION_COST", default_value_t = 100)]
    pod_deletion_cost: i64,
    /// How long after acting to watch a ReplicaSet to count races and duplicates.
    #[arg(long, env = "STE_BRIDGE_SETTLE", value_parser = humantime::parse_duration, default_value = "10s")]
    settle: Duration,
    /// Attempts per scale-up before leaving it to the ReplicaSet controller.
    #[arg(long, env = "STE_BRIDGE_MAX_ATTEMPTS", default_value_t = 6)]
    max_attempts: u32,
    /// Scale-ups handled concurrently.
    #[arg(long, env = "STE_BRIDGE_WORKERS", default_value_t = 16)]
    workers: usize,
    /// HTTPS address of the mutating admission webhook (binds revision pods at
    /// creation, gates duplicates); unset = no webhook.
    #[arg(long, env = "STE_BRIDGE_WEBHOOK_LISTEN")]
    webhook_listen: Option<SocketAddr>,
    /// The webhook's serving certificate (PEM; its SAN must match how kube-apiserver reaches it).
    #[arg(long, env = "STE_BRIDGE_WEBHOOK_CERT_FILE")]
    webhook_cert_file: Option<PathBuf>,
    /// The webhook's private key (PEM).
    #[arg(long, env = "STE_BRIDGE_WEBHOOK_KEY_FILE")]
    webhook_key_file: Option<PathBuf>,
    /// CA bundle (PEM) that signed the serving certificate; put into the
    /// MutatingWebhookConfiguration when the bridge registers it.
    #[arg(long, env = "STE_BRIDGE_WEBHOOK_CA_FILE")]
    webhook_ca_file: Option<PathBuf>,
    /// Register the webhook with this URL (e.g. https://127.0.0.1:8443/mutate-pods, outside a cluster).
    #[arg(
        long,
        env = "STE_BRIDGE_WEBHOOK_URL",
        conflicts_with = "webhook_service"
    )]
    webhook_url: Option<String>,
    /// Register the webhook behind this Service, NAMESPACE/NAME[:PORT] (port 443 by default).
    #[arg(long, env = "STE_BRIDGE_WEBHOOK_SERVICE")]
    webhook_service: Option<String>,
    /// Name of the MutatingWebhookConfiguration the bridge applies.
    #[arg(
        long,
        env = "STE_BRIDGE_WEBHOOK_CONFIGURATION",
        default_value = "ste-activator-bridge"
    )]
    webhook_configuration: String,
    /// timeoutSeconds of the webhook (1-30): past it kube-apiserver creates the pod unchanged.
    #[arg(long, env = "STE_BRIDGE_WEBHOOK_TIMEOUT", value_parser = humantime::parse_duration, default_value = "2s")]
    webhook_timeout: Duration,
    /// Serve the webhook with a certificate for the listen address made at
    /// start (loopback tests and benchmarks), and register it with that CA at
    /// https://LISTEN/mutate-pods unless --webhook-url/--webhook-service say otherwise.
    #[arg(long, env = "STE_BRIDGE_WEBHOOK_SELF_SIGNED")]
    webhook_self_signed: bool,
    /// Delete the MutatingWebhookConfiguration on SIGTERM (a single bridge
    /// outside a cluster; never with several replicas sharing it).
    #[arg(long, env = "STE_BRIDGE_WEBHOOK_UNREGISTER_ON_EXIT")]
    webhook_unregister_on_exit: bool,
    /// Create pods (default/aggressive mode) only when at least this many
    /// revisions woke within --burst-window; below it the ReplicaSet
    /// controller keeps up and the webhook binds its pods (0 = always create).
    #[arg(long, env = "STE_BRIDGE_BURST_THRESHOLD", default_value_t = 0)]
    burst_threshold: usize,
    /// The window of --burst-threshold.
    #[arg(long, env = "STE_BRIDGE_BURST_WINDOW", value_parser = humantime::parse_duration, default_value = "1s")]
    burst_window: Duration,
    /// How long a surplus gated pod is left to the ReplicaSet controller before the sweep deletes it.
    #[arg(long, env = "STE_BRIDGE_GATED_GRACE", value_parser = humantime::parse_duration, default_value = "5s")]
    gated_grace: Duration,
    /// Serve the stat tap here: a websocket proxy the activator's stats to the
    /// autoscaler pass through; a stat for a revision at 0 replicas scales its
    /// Deployment 0→1 at once (opt-in; needs --stat-tap-upstream).
    #[arg(
        long,
        env = "STE_BRIDGE_STAT_TAP_LISTEN",
        requires = "stat_tap_upstream"
    )]
    stat_tap_listen: Option<SocketAddr>,
    /// The autoscaler's stat server the tap forwards to, ws://HOST:PORT[/PATH].
    #[arg(
        long,
        env = "STE_BRIDGE_STAT_TAP_UPSTREAM",
        requires = "stat_tap_listen"
    )]
    stat_tap_upstream: Option<String>,
    /// A Deployment back at 0 within this long of the tap's 0→1 is counted as a revert.
    #[arg(long, env = "STE_BRIDGE_STAT_TAP_REVERT_WINDOW", value_parser = humantime::parse_duration, default_value = "5s")]
    stat_tap_revert_window: Duration,
}

struct AppState {
    bridge: Arc<bridge::Bridge>,
    leading: Arc<AtomicBool>,
}

async fn metrics_handler(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.bridge.metrics.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            e.to_string(),
        ),
    }
}

async fn readyz(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let role = if state.leading.load(Ordering::SeqCst) {
        "leader"
    } else {
        "standby"
    };
    if state.bridge.synced() {
        (StatusCode::OK, format!("ok ({role})\n"))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("caches not synced ({role})\n"),
        )
    }
}

async fn kube_client(args: &Args) -> anyhow::Result<kube::Client> {
    let mut config = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .with_context(|| format!("loading kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no kubeconfig given and no in-cluster config")?,
    };
    // kube-rs sends no user agent: this one names the bridge in audit logs.
    config.headers.push((
        axum::http::header::USER_AGENT,
        axum::http::HeaderValue::from_static(concat!(
            "ste-activator-bridge/",
            env!("CARGO_PKG_VERSION")
        )),
    ));
    let builder =
        kube::client::ClientBuilder::try_from(config).context("building the kube client")?;
    Ok(builder
        .with_layer(&ratelimit::RateLimitLayer::new(
            args.kube_api_qps,
            args.kube_api_burst,
        ))
        .build())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    // Both rustls providers are compiled in (workspace features); pick ring as ste-router does.
    let _ = rustls::crypto::ring::default_provider().install_default();
    if args.renew_deadline >= args.lease_duration {
        anyhow::bail!(
            "--renew-deadline ({:?}) must be shorter than --lease-duration ({:?})",
            args.renew_deadline,
            args.lease_duration
        );
    }
    if args.kube_api_qps.is_nan() || args.kube_api_qps < 0.0 {
        anyhow::bail!("--kube-api-qps must be 0 (no limit) or positive");
    }
    if args.mode == Mode::Webhook && args.webhook_listen.is_none() {
        anyhow::bail!("--mode=webhook needs --webhook-listen");
    }
    if args.mode == Mode::Tap && args.stat_tap_listen.is_none() {
        anyhow::bail!("--mode=tap needs --stat-tap-listen and --stat-tap-upstream");
    }
    let client = kube_client(&args).await?;
    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap_or_else(|_| "unknown".into());
        format!("{}-{}", host.trim(), std::process::id())
    });
    let leading = Arc::new(AtomicBool::new(false));
    let metrics = Arc::new(metrics::Metrics::new());
    let settings = bridge::Settings {
        mode: args.mode,
        dry_run: args.dry_run,
        deletion_cost: args.pod_deletion_cost,
        settle: args.settle,
        max_attempts: args.max_attempts.max(1),
        workers: args.workers,
        webhook: args.webhook_listen.is_some(),
        gated_grace: args.gated_grace,
        burst_threshold: args.burst_threshold,
        burst_window: args.burst_window,
        tap: args.stat_tap_listen.is_some(),
        tap_revert_window: args.stat_tap_revert_window,
    };
    let lease = leader::Config {
        namespace: args.lease_namespace.clone(),
        name: args.lease_name.clone(),
        identity: identity.clone(),
        lease_duration: args.lease_duration,
        renew_deadline: args.renew_deadline,
        retry_period: args.retry_period,
    };
    let listener = tokio::net::TcpListener::bind(args.admin_listen)
        .await
        .with_context(|| format!("binding the admin address {}", args.admin_listen))?;
    let tap = match (&args.stat_tap_listen, &args.stat_tap_upstream) {
        (Some(listen), Some(upstream)) => {
            let upstream = tap::upstream_addr(upstream)?;
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding the stat tap address {listen}"))?;
            Some((listener, upstream))
        }
        _ => None,
    };
    let bridge = bridge::Bridge::start(client.clone(), settings, metrics, leading.clone());
    let stop = tokio_util::sync::CancellationToken::new();
    if let Some((listener, upstream)) = tap {
        info!(tap = %listener.local_addr()?, upstream = %upstream, "stat tap listening");
        let sink = Arc::new(tap::wake::TapSink(bridge.clone()));
        tokio::spawn(tap::serve(listener, upstream, sink, stop.clone()));
    }
    tokio::spawn(leader::run(client.clone(), lease.clone(), leading.clone()));
    let registered = match args.webhook_listen {
        Some(addr) => start_webhook(&args, addr, client.clone(), bridge.clone()).await?,
        None => None,
    };
    let app = axum::Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
        .with_state(Arc::new(AppState {
            bridge: bridge.clone(),
            leading: leading.clone(),
        }));
    info!(admin = %listener.local_addr()?, mode = ?args.mode, dry_run = args.dry_run, identity = %identity, "ste-activator-bridge started");
    let server = axum::serve(listener, app);
    tokio::select! {
        result = server => result.context("admin server")?,
        _ = shutdown_signal() => {
            info!("shutting down; handing the held pods to their ReplicaSets, releasing the lease");
            stop.cancel();
            bridge.hand_over(true).await;
            leading.store(false, Ordering::SeqCst);
            if let (Some(name), true) = (registered, args.webhook_unregister_on_exit) {
                webhook::unregister(client.clone(), &name).await;
            }
            leader::release(client, &lease).await;
        }
    }
    Ok(())
}

/// Serves the admission webhook and, when asked, registers it; returns the
/// name of the configuration it applied.
async fn start_webhook(
    args: &Args,
    addr: SocketAddr,
    client: kube::Client,
    bridge: Arc<bridge::Bridge>,
) -> anyhow::Result<Option<String>> {
    let (config, mut ca) = if args.webhook_self_signed {
        let ip = if addr.ip().is_unspecified() {
            std::net::IpAddr::from([127, 0, 0, 1])
        } else {
            addr.ip()
        };
        let (cert, key, ca) = tls::self_signed(ip)?;
        let here = std::path::Path::new("(self-signed)");
        let config = tls::server_config_from_pem(cert.as_bytes(), here, key.as_bytes(), here)?;
        (config, Some(ca.into_bytes()))
    } else {
        let (Some(cert), Some(key)) = (&args.webhook_cert_file, &args.webhook_key_file) else {
            anyhow::bail!("--webhook-listen needs --webhook-cert-file and --webhook-key-file (or --webhook-self-signed)");
        };
        if !cert.exists() || !key.exists() {
            // The manifests mount the Secret as optional: no certificate, no
            // webhook, and the normal path runs (failurePolicy Ignore).
            tracing::error!(cert = %cert.display(), key = %key.display(), "webhook disabled: no serving certificate or key");
            return Ok(None);
        }
        (tls::server_config(cert, key)?, None)
    };
    let listener = tls::TlsListener::bind(addr, config).await?;
    let local = axum::serve::Listener::local_addr(&listener)?;
    info!(webhook = %local, "admission webhook listening (HTTPS)");
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, webhook::router(bridge)).await {
            tracing::error!(error = %err, "webhook server stopped");
        }
    });
    let endpoint = match (&args.webhook_url, &args.webhook_service) {
        (Some(url), _) => webhook::Endpoint::Url(url.clone()),
        (None, Some(svc)) => webhook::Endpoint::parse_service(svc)?,
        (None, None) if args.webhook_self_signed => {
            let host = if local.ip().is_unspecified() {
                SocketAddr::from(([127, 0, 0, 1], local.port()))
            } else {
                local
            };
            webhook::Endpoint::Url(format!("https://{host}{}", webhook::PATH))
        }
        (None, None) => return Ok(None),
    };
    if let Some(path) = &args.webhook_ca_file {
        ca = Some(webhook::read_ca(path)?);
    }
    let Some(ca) = ca else {
        anyhow::bail!("registering the webhook needs --webhook-ca-file (or --webhook-self-signed)");
    };
    let configuration = webhook::configuration(
        &args.webhook_configuration,
        &endpoint,
        ca,
        args.webhook_timeout,
    );
    let mut attempt = 0;
    loop {
        match webhook::register(client.clone(), &configuration).await {
            Ok(()) => {
                info!(name = %args.webhook_configuration, endpoint = ?endpoint, "MutatingWebhookConfiguration applied");
                return Ok(Some(args.webhook_configuration.clone()));
            }
            Err(err) if attempt < 5 => {
                attempt += 1;
                tracing::warn!(error = %err, attempt, "registering the webhook failed; retrying");
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
            }
            Err(err) => return Err(err.into()),
        }
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
