//! The floor under one loopback hop on this machine: how long a round trip
//! between two processes takes, and what it costs in CPU, with no HTTP/2,
//! gRPC or etcd in it.
//!
//! A write through ste-router costs one hop more than a write to plain etcd
//! (docs/benchmarks.md, "The floor under a hop"). This measures that hop's
//! parts that no router code can remove: the kernel's loopback path and the
//! wake-up of a process sleeping in `read` or `epoll_wait`. The server is a
//! child process (this program again, with `--serve`) echoing fixed-size
//! messages; the client times each round trip.
//!
//! ```sh
//! cargo run --release -p ste-bench --example loopback_floor -- --help
//! hack/experiments/hop-floor.sh     # also a plain etcd and ste-router over one shard
//! ```

use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use ste_bench::stats::Samples;

/// Round trips between two processes over loopback TCP or a Unix socket,
/// with each side blocking in `read`, spinning on non-blocking reads, or
/// (server) on a current-thread tokio runtime; closed loop, and paced at a
/// churn rate. Prints round-trip percentiles and CPU per round trip.
#[derive(Parser, Debug)]
struct Args {
    /// Round trips per closed-loop case (one after another, no pause).
    #[arg(long, env = "FLOOR_ROUNDS", default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(100..))]
    rounds: u32,
    /// Round trips per paced case.
    #[arg(long, env = "FLOOR_PACED_ROUNDS", default_value_t = 2_000, value_parser = clap::value_parser!(u32).range(100..))]
    paced_rounds: u32,
    /// Round trips per second of the paced cases (kube-apiserver sends the
    /// pod store ~180 writes/s at 30 Deployments/s, one at a time).
    #[arg(long, env = "FLOOR_PACED_RATE", default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    paced_rate: u32,
    /// Bytes each way per round trip (a small Txn answer is ~40–100 B).
    #[arg(long, env = "FLOOR_SIZE", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    size: u32,
    /// Also time gRPC calls against these etcd v3 endpoints (`name=url`,
    /// comma-separated; e.g. a plain etcd and a ste-router): a call the
    /// server answers by itself (Maintenance.Alarm) and a create Txn of
    /// `--size` bytes under /registry/pods/loopback-floor/, `--rounds` of
    /// each, from three clients: tonic on the main thread of a two-worker
    /// runtime (how `ste-bench` calls), tonic on a current-thread runtime,
    /// and ste-router's own shard connection (h2, no tonic).
    #[arg(long = "grpc", env = "FLOOR_GRPC", value_delimiter = ',')]
    grpc: Vec<String>,
    /// Which of the three gRPC clients to run, comma-separated.
    #[arg(
        long,
        env = "FLOOR_GRPC_CLIENTS",
        value_enum,
        value_delimiter = ',',
        default_value = "tonic-main,tonic-current,own"
    )]
    grpc_clients: Vec<GrpcClient>,
    /// Skip the raw round trips (only the `--grpc` calls).
    #[arg(long, env = "FLOOR_NO_RAW")]
    no_raw: bool,
    /// Internal: run as the echo server of one case.
    #[arg(long, hide = true, value_enum)]
    serve: Option<Style>,
    /// Internal: the server's transport.
    #[arg(long, hide = true, value_enum, default_value_t = Transport::Tcp)]
    transport: Transport,
    /// Internal: the Unix socket path.
    #[arg(long, hide = true)]
    path: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Transport {
    Tcp,
    Unix,
}

/// A gRPC client of `--grpc`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum GrpcClient {
    /// tonic, the calls on the main thread of a two-worker runtime.
    TonicMain,
    /// tonic on a current-thread runtime.
    TonicCurrent,
    /// ste-router's own shard connection on a current-thread runtime.
    Own,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Style {
    /// Sleep in a blocking `read` until the bytes come.
    Block,
    /// Spin on a non-blocking `read`: no sleep, no wake-up.
    Spin,
    /// A current-thread tokio runtime: `epoll_wait`, then the read.
    Tokio,
}

struct Case {
    transport: Transport,
    server: Style,
    client: Style,
    paced: bool,
}

/// CPU time (ns) and context switches of every thread of this process.
#[derive(Clone, Copy, Default)]
struct Usage {
    cpu_ns: u64,
    switches: u64,
}

impl Usage {
    /// CPU from `schedstat` (nanoseconds: a paced case's few ms of CPU is
    /// below `/proc/<pid>/stat`'s 10 ms ticks); switches as the bench counts them.
    fn now() -> Result<Usage> {
        let mut cpu_ns = 0;
        for task in std::fs::read_dir("/proc/self/task").context("reading /proc/self/task")? {
            let schedstat = std::fs::read_to_string(task?.path().join("schedstat"))?;
            cpu_ns += first_number(&schedstat)?;
        }
        let switches = ste_bench::stats::process_context_switches(std::process::id())
            .context("reading this process's context switches")?;
        Ok(Usage { cpu_ns, switches })
    }

    fn since(self, before: Usage) -> Usage {
        Usage {
            cpu_ns: self.cpu_ns.saturating_sub(before.cpu_ns),
            switches: self.switches.saturating_sub(before.switches),
        }
    }
}

fn first_number(text: &str) -> Result<u64> {
    let word = text.split_whitespace().next().unwrap_or_default();
    word.parse()
        .with_context(|| format!("not a number: {word:?}"))
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(style) = args.serve {
        return serve(
            style,
            args.transport,
            args.path.as_deref(),
            args.size as usize,
        );
    }
    if let Some(bad) = args.grpc.iter().find(|e| !e.contains('=')) {
        bail!("--grpc {bad:?}: expected name=url, e.g. plain-etcd=http://127.0.0.1:2379");
    }
    if !args.no_raw {
        raw_cases(&args)?;
    }
    if !args.grpc.is_empty() {
        grpc::run(
            &args.grpc,
            &args.grpc_clients,
            args.rounds,
            args.size as usize,
        )?;
    }
    Ok(())
}

/// The round trips between two processes, every transport and style.
fn raw_cases(args: &Args) -> Result<()> {
    let cases = [
        (Transport::Tcp, Style::Block, Style::Block, false),
        (Transport::Unix, Style::Block, Style::Block, false),
        (Transport::Tcp, Style::Spin, Style::Spin, false),
        (Transport::Tcp, Style::Tokio, Style::Block, false),
        (Transport::Tcp, Style::Block, Style::Block, true),
        (Transport::Unix, Style::Block, Style::Block, true),
        (Transport::Tcp, Style::Tokio, Style::Block, true),
    ];
    println!("| transport | server | client | pacing | round trip p50 / p90 / p99 µs | client CPU µs / round trip | server CPU µs | server switches |");
    println!("|---|---|---|---|---|---|---|---|");
    for (transport, server, client, paced) in cases {
        let case = Case {
            transport,
            server,
            client,
            paced,
        };
        run_case(args, &case)
            .with_context(|| format!("case {transport:?} {server:?}/{client:?}"))?;
    }
    Ok(())
}

fn run_case(args: &Args, case: &Case) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("echo.sock");
    let (mut server, mut lines) = spawn_server(case, &path)?;
    let address = read_line(&mut lines)?;
    let rounds = if case.paced {
        args.paced_rounds
    } else {
        args.rounds
    };
    let gap = case.paced.then(|| Duration::from_secs(1) / args.paced_rate);
    let measured = match case.transport {
        Transport::Tcp => {
            let stream = TcpStream::connect(address.trim())?;
            stream.set_nodelay(true)?;
            client(stream, case.client, args.size as usize, rounds, gap)?
        }
        Transport::Unix => client(
            UnixStream::connect(&path)?,
            case.client,
            args.size as usize,
            rounds,
            gap,
        )?,
    };
    let usage_line = read_line(&mut lines)?;
    server.finish()?;
    let mut words = usage_line.split_whitespace().map(str::parse::<u64>);
    let (Some(Ok(server_ns)), Some(Ok(server_switches))) = (words.next(), words.next()) else {
        bail!("the server's usage line is malformed: {usage_line:?}");
    };
    let (samples, usage) = measured;
    let per = |value: u64| value as f64 / f64::from(rounds);
    println!(
        "| {:?} | {:?} | {:?} | {} | {:.0} / {:.0} / {:.0} | {:.1} | {:.1} | {:.2} |",
        case.transport,
        case.server,
        case.client,
        gap.map_or("closed loop".to_string(), |_| format!(
            "{}/s",
            args.paced_rate
        )),
        samples.percentile(50.0),
        samples.percentile(90.0),
        samples.percentile(99.0),
        per(usage.cpu_ns) / 1000.0,
        per(server_ns) / 1000.0,
        per(server_switches),
    );
    Ok(())
}

/// The echo server's process: killed if the case ends early (an error),
/// waited for otherwise.
struct Server(Option<Child>);

impl Server {
    fn finish(&mut self) -> Result<()> {
        let Some(mut child) = self.0.take() else {
            return Ok(());
        };
        let status = child.wait()?;
        if !status.success() {
            bail!("the echo server failed: {status}");
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn spawn_server(case: &Case, path: &Path) -> Result<(Server, BufReader<ChildStdout>)> {
    let mut command = Command::new(std::env::current_exe()?);
    command
        .arg("--serve")
        .arg(flag(case.server))
        .arg("--transport")
        .arg(flag(case.transport))
        .arg("--path")
        .arg(path)
        .stdout(Stdio::piped());
    let mut child = command.spawn().context("starting the echo server")?;
    let stdout = child.stdout.take().context("the echo server's stdout")?;
    Ok((Server(Some(child)), BufReader::new(stdout)))
}

/// How clap spells `value` on the command line.
fn flag(value: impl ValueEnum) -> String {
    value
        .to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_default()
}

fn read_line(lines: &mut BufReader<ChildStdout>) -> Result<String> {
    let mut line = String::new();
    if lines.read_line(&mut line)? == 0 {
        bail!("the echo server exited early");
    }
    Ok(line)
}

fn client<S: Read + Write + Nonblocking>(
    mut stream: S,
    style: Style,
    size: usize,
    rounds: u32,
    gap: Option<Duration>,
) -> Result<(Samples, Usage)> {
    if style == Style::Spin {
        stream.nonblocking()?;
    }
    let mut samples = Samples::default();
    let message = vec![7u8; size];
    let mut answer = vec![0u8; size];
    let before = Usage::now()?;
    let mut due = Instant::now();
    for _ in 0..rounds {
        if let Some(gap) = gap {
            due += gap;
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
        let started = Instant::now();
        write_all(&mut stream, &message)?;
        read_exact(&mut stream, &mut answer)?;
        samples.push(started.elapsed());
    }
    let usage = Usage::now()?.since(before);
    Ok((samples, usage))
}

fn read_exact(stream: &mut impl Read, buf: &mut [u8]) -> io::Result<()> {
    whole(buf.len(), ErrorKind::UnexpectedEof, |done| {
        stream.read(&mut buf[done..])
    })
}

fn write_all(stream: &mut impl Write, buf: &[u8]) -> io::Result<()> {
    whole(buf.len(), ErrorKind::WriteZero, |done| {
        stream.write(&buf[done..])
    })
}

/// Repeats `step` (a read or a write from offset `done`) until `len` bytes
/// went through. Blocking or not, the same loop: a non-blocking socket
/// spins on `WouldBlock`; 0 bytes means the peer is gone (`ended`).
fn whole(
    len: usize,
    ended: ErrorKind,
    mut step: impl FnMut(usize) -> io::Result<usize>,
) -> io::Result<()> {
    let mut done = 0;
    while done < len {
        match step(done) {
            Ok(0) => return Err(ended.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::hint::spin_loop(),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

trait Nonblocking {
    fn nonblocking(&self) -> io::Result<()>;
}

impl Nonblocking for TcpStream {
    fn nonblocking(&self) -> io::Result<()> {
        self.set_nonblocking(true)
    }
}

impl Nonblocking for UnixStream {
    fn nonblocking(&self) -> io::Result<()> {
        self.set_nonblocking(true)
    }
}

/// The child: accept one connection, echo until EOF, print "cpu_ns
/// switches" spent from the accept to the EOF.
fn serve(style: Style, transport: Transport, path: Option<&str>, size: usize) -> Result<()> {
    if style == Style::Tokio {
        return tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?
            .block_on(serve_tokio(transport, path, size));
    }
    let usage = match transport {
        Transport::Tcp => {
            let listener = TcpListener::bind("127.0.0.1:0")?;
            announce(&listener.local_addr()?.to_string())?;
            let (stream, _) = listener.accept()?;
            stream.set_nodelay(true)?;
            echo(stream, style, size)?
        }
        Transport::Unix => {
            let listener = UnixListener::bind(path.context("--path for a Unix socket")?)?;
            announce("unix")?;
            let (stream, _) = listener.accept()?;
            echo(stream, style, size)?
        }
    };
    announce(&format!("{} {}", usage.cpu_ns, usage.switches))
}

fn announce(line: &str) -> Result<()> {
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "{line}")?;
    stdout.flush()?;
    Ok(())
}

fn echo<S: Read + Write + Nonblocking>(mut stream: S, style: Style, size: usize) -> Result<Usage> {
    if style == Style::Spin {
        stream.nonblocking()?;
    }
    let before = Usage::now()?;
    let mut buf = vec![0u8; size];
    loop {
        match read_exact(&mut stream, &mut buf) {
            Ok(()) => write_all(&mut stream, &buf)?,
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Usage::now()?.since(before))
}

async fn serve_tokio(transport: Transport, path: Option<&str>, size: usize) -> Result<()> {
    let usage = match transport {
        Transport::Tcp => {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            announce(&listener.local_addr()?.to_string())?;
            let (stream, _) = listener.accept().await?;
            stream.set_nodelay(true)?;
            echo_tokio(stream, size).await?
        }
        Transport::Unix => {
            let listener =
                tokio::net::UnixListener::bind(path.context("--path for a Unix socket")?)?;
            announce("unix")?;
            let (stream, _) = listener.accept().await?;
            echo_tokio(stream, size).await?
        }
    };
    announce(&format!("{} {}", usage.cpu_ns, usage.switches))
}

async fn echo_tokio<S>(mut stream: S, size: usize) -> Result<Usage>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let before = Usage::now()?;
    let mut buf = vec![0u8; size];
    loop {
        match stream.read_exact(&mut buf).await {
            Ok(_) => stream.write_all(&buf).await?,
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Usage::now()?.since(before))
}

/// gRPC round trips against real etcd v3 servers: through tonic, and
/// through ste-router's own client connection.
mod grpc {
    use std::time::{Duration, Instant};

    use anyhow::{Context, Result};
    use bytes::Bytes;
    use ste_bench::stats::Samples;
    use ste_etcd_proto::pb::{
        kv_client::KvClient, maintenance_client::MaintenanceClient, AlarmRequest, AlarmResponse,
        TxnRequest, TxnResponse,
    };
    use ste_router::shard::transport::{OwnedConnection, Target};
    use tonic::transport::Channel;

    use super::GrpcClient;

    pub fn run(
        endpoints: &[String],
        clients: &[GrpcClient],
        rounds: u32,
        size: usize,
    ) -> Result<()> {
        println!();
        println!(
            "| endpoint | client | bare call p50 / p90 / mean µs | create p50 / p90 / mean µs |"
        );
        println!("|---|---|---|---|");
        for endpoint in endpoints {
            let (name, url) = endpoint
                .split_once('=')
                .with_context(|| format!("--grpc {endpoint:?}: expected name=url"))?;
            for &client in clients {
                let line = match client {
                    // The style ste-bench uses: the calls on block_on's
                    // thread, the connection's tasks on the workers.
                    GrpcClient::TonicMain => tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(2)
                        .enable_all()
                        .build()?
                        .block_on(async {
                            calls(Tonic::connect(url).await?, rounds, size).await
                        })?,
                    GrpcClient::TonicCurrent => current_thread()?.block_on(async {
                        calls(Tonic::connect(url).await?, rounds, size).await
                    })?,
                    GrpcClient::Own => current_thread()?.block_on(async {
                        let target = Target::parse(url, None).map_err(anyhow::Error::msg)?;
                        let connection = OwnedConnection::new(target, Duration::from_secs(5));
                        calls(Own(connection), rounds, size).await
                    })?,
                };
                println!("| {name} | {} | {line} |", client.label());
            }
        }
        Ok(())
    }

    fn current_thread() -> std::io::Result<tokio::runtime::Runtime> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    }

    impl GrpcClient {
        fn label(self) -> &'static str {
            match self {
                GrpcClient::TonicMain => "tonic, main thread, 2 workers",
                GrpcClient::TonicCurrent => "tonic, current thread",
                GrpcClient::Own => "ste-router's shard connection, current thread",
            }
        }
    }

    /// The two calls timed, on either client.
    trait Client {
        async fn alarm(&mut self) -> Result<()>;
        async fn txn(&mut self, txn: TxnRequest) -> Result<TxnResponse>;
    }

    struct Tonic {
        maintenance: MaintenanceClient<Channel>,
        kv: KvClient<Channel>,
    }

    impl Tonic {
        async fn connect(url: &str) -> Result<Tonic> {
            let channel = Channel::from_shared(url.to_string())?
                .connect()
                .await
                .with_context(|| format!("connecting to {url}"))?;
            Ok(Tonic {
                maintenance: MaintenanceClient::new(channel.clone()),
                kv: KvClient::new(channel),
            })
        }
    }

    impl Client for Tonic {
        async fn alarm(&mut self) -> Result<()> {
            self.maintenance.alarm(AlarmRequest::default()).await?;
            Ok(())
        }

        async fn txn(&mut self, txn: TxnRequest) -> Result<TxnResponse> {
            Ok(self.kv.txn(txn).await?.into_inner())
        }
    }

    /// h2 polled by the caller, no tonic: what ste-router uses towards
    /// its shards (`router/src/shard/transport.rs`).
    struct Own(OwnedConnection);

    impl Client for Own {
        async fn alarm(&mut self) -> Result<()> {
            let call = self
                .0
                .try_call::<_, AlarmResponse>(
                    "/etcdserverpb.Maintenance/Alarm",
                    &AlarmRequest::default(),
                )
                .context("the connection is busy")?;
            call.await?;
            Ok(())
        }

        async fn txn(&mut self, txn: TxnRequest) -> Result<TxnResponse> {
            let call = self
                .0
                .try_call::<_, TxnResponse>("/etcdserverpb.KV/Txn", &txn)
                .context("the connection is busy")?;
            Ok(call.await?)
        }
    }

    async fn calls(mut client: impl Client, rounds: u32, size: usize) -> Result<String> {
        for _ in 0..100 {
            client.alarm().await?;
        }
        let mut bare = Samples::default();
        for _ in 0..rounds {
            let started = Instant::now();
            client.alarm().await?;
            bare.push(started.elapsed());
        }
        let value = Bytes::from(vec![b'x'; size]);
        let mut create = Samples::default();
        // A prefix no earlier run used, so that every create finds its key new.
        let run = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos();
        for i in 0..rounds {
            let key = Bytes::from(format!("/registry/pods/loopback-floor/{run}-{i}"));
            let txn = ste_testkit::shapes::create(&key, &value);
            let started = Instant::now();
            let answer = client.txn(txn).await?;
            create.push(started.elapsed());
            anyhow::ensure!(answer.succeeded, "create of {key:?} lost its compare");
        }
        Ok(format!("{} | {}", summary(&bare), summary(&create)))
    }

    /// "p50 / p90 / mean" in µs.
    fn summary(samples: &Samples) -> String {
        format!(
            "{:.0} / {:.0} / {:.0}",
            samples.percentile(50.0),
            samples.percentile(90.0),
            samples.mean()
        )
    }
}
