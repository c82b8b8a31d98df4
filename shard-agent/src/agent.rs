//! `ste-shard-agent run`: etcd supervision, registration, drain on signal.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{watch, Mutex};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::etcd::{
    EtcdCommand, EtcdError, HealthChecker, StopMode, Supervisor, SupervisorSettings,
};
use crate::registration::{self, Registrar, RegistrationError};
use crate::state::AgentState;
use ste_shard_api::ShardPhase;

/// Deletion of the drained Shard is retried for this long.
const DELETE_TIMEOUT: Duration = Duration::from_secs(30);
/// Backoff of failed API writes: 1s doubling to 30s.
const API_BACKOFF_INITIAL: Duration = Duration::from_secs(1);
const API_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Interval of reading the Shard's phase while draining.
const DRAIN_POLL: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error(transparent)]
    Registration(#[from] RegistrationError),
    #[error("binding the admin server on {addr}: {source}")]
    Admin {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("the etcd supervisor stopped unexpectedly: {0}")]
    Supervisor(String),
    #[error("the drain of shard {shard} did not finish within {seconds}s (last phase: {phase}); etcd was stopped anyway and the Shard kept: the router will declare it Lost")]
    DrainTimedOut {
        shard: String,
        seconds: u64,
        phase: String,
    },
    #[error("stopped at once by a second {signal}: etcd killed, shard {shard} not drained")]
    Interrupted { signal: &'static str, shard: String },
    #[error("shard {shard} drained and etcd stopped, but deleting the Shard failed for {}s: {source}", DELETE_TIMEOUT.as_secs())]
    Delete {
        shard: String,
        source: RegistrationError,
    },
}

pub async fn run(config: Config) -> Result<(), AgentError> {
    let command = EtcdCommand::from_config(&config);
    let health = HealthChecker::new(&config)?;
    let registrar = match &config.registration {
        Some(reg) => {
            let client = registration::client(reg.kubeconfig.as_deref()).await?;
            Some(Registrar::new(
                client,
                config.shard_name.clone(),
                config.advertise_client.clone(),
                config.node_name.clone(),
                config.quota_bytes,
            ))
        }
        None => {
            info!("registration disabled (--no-register / --kubeconfig none): no Shard object is written");
            None
        }
    };
    let state = Arc::new(AgentState::new(
        config.shard_name.clone(),
        registrar.is_some(),
        config.health_interval,
    ));

    let mut term = signal(SignalKind::terminate()).map_err(AgentError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(AgentError::Signals)?;

    let admin = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .map_err(|source| AgentError::Admin {
            addr: config.admin_listen,
            source,
        })?;
    let admin_addr = admin.local_addr().unwrap_or(config.admin_listen);
    command.prepare()?;
    info!(shard = %config.shard_name, "admin server on http://{admin_addr} (/livez /readyz /metrics)");
    let admin_router = crate::admin::router(state.clone());
    tokio::spawn(async move {
        if let Err(err) = axum::serve(admin, admin_router).await {
            error!("the admin server stopped: {err}");
        }
    });

    let (healthy_tx, healthy_rx) = watch::channel(false);
    let (stop_etcd, stop_rx) = watch::channel(None::<StopMode>);
    let (etcd_done, etcd_stopped) = watch::channel(false);
    let supervisor = Supervisor {
        command,
        health,
        settings: SupervisorSettings {
            health_interval: config.health_interval,
            unhealthy_after: config.unhealthy_after,
            stop_grace: config.stop_grace,
        },
        state: state.clone(),
        healthy: healthy_tx,
    };
    let mut supervisor: JoinHandle<()> = tokio::spawn(async move {
        supervisor.run(stop_rx).await;
        etcd_done.send_replace(true);
    });
    let wait_etcd_stopped = || {
        let mut stopped = etcd_stopped.clone();
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        }
    };

    // Registration and the drain never run at the same time.
    let gate = Arc::new(Mutex::new(()));
    let (stop_heartbeat, heartbeat_stopped) = watch::channel(false);
    let heartbeat = match (&registrar, &config.registration) {
        (Some(registrar), Some(reg)) => Some(tokio::spawn(registration_loop(
            registrar.clone(),
            state.clone(),
            healthy_rx,
            reg.heartbeat_interval,
            gate.clone(),
            heartbeat_stopped,
        ))),
        _ => None,
    };

    let first = tokio::select! {
        signal = next_signal(&mut term, &mut int) => signal,
        result = &mut supervisor => {
            return Err(AgentError::Supervisor(match result {
                Ok(()) => "it returned".into(),
                Err(err) => err.to_string(),
            }));
        }
    };
    state.set_draining();
    info!(shard = %config.shard_name, "received {first}: shutting down (a second signal stops etcd at once)");

    let shutdown = async {
        let Some(registrar) = &registrar else {
            stop_etcd.send_replace(Some(StopMode::Graceful));
            wait_etcd_stopped().await;
            info!(shard = %config.shard_name, "etcd stopped; bye");
            return Ok(());
        };
        let drain_timeout = config
            .registration
            .as_ref()
            .map(|r| r.drain_timeout)
            .unwrap_or_default();
        let outcome = drain(registrar, &state, drain_timeout, &gate).await;
        stop_heartbeat.send_replace(true);
        if let Some(heartbeat) = heartbeat {
            let _ = heartbeat.await;
        }
        stop_etcd.send_replace(Some(StopMode::Graceful));
        wait_etcd_stopped().await;
        match outcome {
            DrainOutcome::Drained => {
                delete(registrar).await?;
                info!(shard = %config.shard_name, "shard drained, etcd stopped, Shard deleted; bye");
                Ok(())
            }
            DrainOutcome::Gone => {
                info!(shard = %config.shard_name, "etcd stopped; there is no Shard to delete; bye");
                Ok(())
            }
            DrainOutcome::TimedOut { phase } => {
                // Tell the router at once that the shard's etcd is gone.
                if let Err(err) = registrar.heartbeat(false).await {
                    warn!(shard = %config.shard_name, "{err}");
                }
                let err = AgentError::DrainTimedOut {
                    shard: config.shard_name.clone(),
                    seconds: drain_timeout.as_secs(),
                    phase,
                };
                error!("{err}");
                Err(err)
            }
        }
    };
    tokio::select! {
        result = shutdown => result,
        signal = next_signal(&mut term, &mut int) => {
            error!(shard = %config.shard_name, "received a second {signal}: killing etcd now, without drain");
            stop_etcd.send_replace(Some(StopMode::Kill));
            wait_etcd_stopped().await;
            Err(AgentError::Interrupted { signal, shard: config.shard_name.clone() })
        }
    }
}

async fn next_signal(term: &mut Signal, int: &mut Signal) -> &'static str {
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

/// Once etcd is healthy: create or update the Shard, then heartbeat until
/// stopped. Re-registers if the Shard disappears (unless draining).
async fn registration_loop(
    registrar: Registrar,
    state: Arc<AgentState>,
    mut healthy: watch::Receiver<bool>,
    interval: Duration,
    gate: Arc<Mutex<()>>,
    mut stop: watch::Receiver<bool>,
) {
    let shard = registrar.name().to_string();
    'register: loop {
        tokio::select! {
            result = healthy.wait_for(|h| *h) => if result.is_err() { return },
            _ = stop.wait_for(|s| *s) => return,
        }
        let mut backoff = API_BACKOFF_INITIAL;
        loop {
            {
                let _registering = gate.lock().await;
                if state.draining() {
                    return;
                }
                let result = tokio::select! {
                    result = registrar.register() => result,
                    _ = stop.wait_for(|s| *s) => return,
                };
                match result {
                    Ok(()) => {
                        state.set_registered(true);
                        info!(shard = %shard, "registered Shard {shard} (spec.drain=false)");
                        break;
                    }
                    Err(err) => warn!(
                        shard = %shard,
                        "registration failed: {err}; retrying in {}",
                        humantime::format_duration(backoff)
                    ),
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            backoff = (backoff * 2).min(API_BACKOFF_MAX);
        }

        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let result = tokio::select! {
                result = registrar.heartbeat(state.etcd_healthy()) => result,
                _ = stop.wait_for(|s| *s) => return,
            };
            match result {
                Ok(()) => {
                    state.metrics.heartbeat(true);
                    if failing {
                        info!(shard = %shard, "heartbeats succeed again");
                        failing = false;
                    }
                }
                Err(err) if err.is_not_found() => {
                    state.metrics.heartbeat(false);
                    state.set_registered(false);
                    warn!(shard = %shard, "Shard {shard} no longer exists (deleted by someone else?): registering it again");
                    continue 'register;
                }
                Err(err) => {
                    state.metrics.heartbeat(false);
                    failing = true;
                    warn!(shard = %shard, "{err}; retrying at the next heartbeat");
                }
            }
        }
    }
}

enum DrainOutcome {
    Drained,
    /// The Shard does not exist (never registered, or deleted by someone else).
    Gone,
    TimedOut {
        phase: String,
    },
}

/// Sets `spec.drain: true` and waits (bounded) for the router's `Drained`.
async fn drain(
    registrar: &Registrar,
    state: &AgentState,
    timeout: Duration,
    gate: &Mutex<()>,
) -> DrainOutcome {
    let shard = registrar.name();
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    let _no_registration = gate.lock().await;
    let outcome = async {
        let mut backoff = API_BACKOFF_INITIAL / 2;
        loop {
            match tokio::time::timeout_at(deadline, registrar.start_drain()).await {
                Err(_) => return DrainOutcome::TimedOut { phase: "unknown: setting spec.drain did not succeed".into() },
                Ok(Ok(())) => break,
                Ok(Err(err)) if err.is_not_found() => {
                    warn!(shard, "there is no Shard {shard} to drain");
                    return DrainOutcome::Gone;
                }
                Ok(Err(err)) => {
                    warn!(shard, "{err}; retrying in {}", humantime::format_duration(backoff));
                    if tokio::time::timeout_at(deadline, tokio::time::sleep(backoff)).await.is_err() {
                        return DrainOutcome::TimedOut { phase: format!("unknown: setting spec.drain failed: {err}") };
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        info!(
            shard,
            "set spec.drain=true on Shard {shard}; waiting up to {} for the router to report phase Drained",
            humantime::format_duration(timeout)
        );
        let mut last_phase = String::from("not read yet");
        loop {
            match tokio::time::timeout_at(deadline, registrar.phase()).await {
                Err(_) => return DrainOutcome::TimedOut { phase: last_phase },
                Ok(Ok(Some(Some(ShardPhase::Drained)))) => return DrainOutcome::Drained,
                Ok(Ok(None)) => {
                    warn!(shard, "Shard {shard} was deleted while draining");
                    return DrainOutcome::Gone;
                }
                Ok(Ok(Some(phase))) => {
                    let phase = phase.map(|p| p.as_str()).unwrap_or("(none)").to_string();
                    if phase != last_phase {
                        info!(shard, "Shard {shard} is in phase {phase}; waiting for Drained");
                        last_phase = phase;
                    }
                }
                Ok(Err(err)) => warn!(shard, "{err}; retrying"),
            }
            if tokio::time::timeout_at(deadline, tokio::time::sleep(DRAIN_POLL)).await.is_err() {
                return DrainOutcome::TimedOut { phase: last_phase };
            }
        }
    }
    .await;
    state
        .metrics
        .drain_seconds
        .set(start.elapsed().as_secs_f64());
    if let DrainOutcome::Drained = outcome {
        info!(
            shard,
            "the router drained shard {shard} in {:.1}s",
            start.elapsed().as_secs_f64()
        );
    }
    outcome
}

async fn delete(registrar: &Registrar) -> Result<(), AgentError> {
    let shard = registrar.name();
    let deadline = Instant::now() + DELETE_TIMEOUT;
    let mut backoff = API_BACKOFF_INITIAL;
    loop {
        match registrar.delete().await {
            Ok(true) => return Ok(()),
            Ok(false) => {
                info!(shard, "Shard {shard} was already deleted");
                return Ok(());
            }
            Err(err) if Instant::now() + backoff >= deadline => {
                return Err(AgentError::Delete {
                    shard: shard.to_string(),
                    source: err,
                });
            }
            Err(err) => {
                warn!(
                    shard,
                    "{err}; retrying in {}",
                    humantime::format_duration(backoff)
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}
