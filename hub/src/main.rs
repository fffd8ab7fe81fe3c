//! `hub`: the server (`hub serve`) and its admin CLI (`print-config`, `token`,
//! `device …`, `twin …`, `c2d …`, `invoke`, `tail`, `cert device`, `connection-string`,
//! `policy …`, `dps …`). Start-up failures print one clear line; a bad configuration exits with
//! code 2.

mod cli;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use hub::config::{Config, ConfigError, Overrides};

/// Without a subcommand, `hub` serves (`hub` = `hub serve`).
#[derive(Parser)]
#[command(
    version,
    about = "Self-hosted IoT device hub",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ConfigArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the hub until Ctrl-C or SIGTERM.
    Serve(ConfigArgs),
    /// Print the effective configuration (defaults < file < env < flags) as TOML.
    PrintConfig(ConfigArgs),
    /// Mint a service bearer token from the data dir's owner key; prints only the token.
    Token(cli::TokenArgs),
    /// Manage device identities through the REST API.
    #[command(subcommand)]
    Device(cli::DeviceCommand),
    /// Device twins: get, patch, query.
    #[command(subcommand)]
    Twin(cli::TwinCommand),
    /// Cloud-to-device messages: send, purge, feedback.
    #[command(subcommand)]
    C2d(cli::C2dCommand),
    /// Invoke a direct method on a device and print its answer.
    Invoke(cli::InvokeArgs),
    /// Routing: get or set the configuration (Azure's routing JSON), test a message.
    #[command(subcommand)]
    Routing(cli::RoutingCommand),
    /// Cluster mode: NATS nodes, stream and bucket leaders and replicas.
    #[command(subcommand)]
    Cluster(cli::ClusterCommand),
    /// Print telemetry as it arrives, one JSON line per message.
    Tail(cli::TailArgs),
    /// Print a shared access policy's connection string (for Azure's service SDKs);
    /// prints only the string.
    ConnectionString(cli::ConnectionStringArgs),
    /// Shared access policies: list, rotate a key.
    #[command(subcommand)]
    Policy(cli::PolicyCommand),
    /// Provisioning (DPS): ID scope, enrollment groups, enrollments, device keys,
    /// registrations.
    #[command(subcommand)]
    Dps(cli::DpsCommand),
    /// Issue certificates from the data dir's development CA.
    #[command(subcommand)]
    Cert(cli::CertCommand),
}

/// Where the configuration comes from; each flag also reads a `HUB_*` variable.
#[derive(Args)]
struct ConfigArgs {
    /// Config file and data dir.
    #[command(flatten)]
    location: cli::HubLocation,
    /// Host name devices use (default localhost).
    #[arg(long, env = "HUB_HOSTNAME")]
    hostname: Option<String>,
    /// MQTT over TCP listen address (default 127.0.0.1:1883).
    #[arg(long, env = "HUB_MQTT")]
    mqtt: Option<std::net::SocketAddr>,
    /// MQTT over TLS listen address (default 127.0.0.1:8883).
    #[arg(long, env = "HUB_MQTTS")]
    mqtts: Option<std::net::SocketAddr>,
    /// REST API listen address (default 127.0.0.1:8080).
    #[arg(long, env = "HUB_HTTP")]
    http: Option<std::net::SocketAddr>,
    /// HTTPS listen address: service API over TLS and MQTT over WebSocket at
    /// /$iothub/websocket (off unless given; 443 in production).
    #[arg(long, env = "HUB_HTTPS")]
    https: Option<std::net::SocketAddr>,
    /// Cluster mode: NATS JetStream servers, comma-separated
    /// (nats://a:4222,nats://b:4222,nats://c:4222).
    #[arg(long, env = "HUB_CLUSTER", value_delimiter = ',')]
    cluster: Option<Vec<String>>,
    /// AMQP over TLS listen address: C2D sends, feedback and Event Hub-compatible
    /// reads (default 127.0.0.1:5671).
    #[arg(long, env = "HUB_AMQPS")]
    amqps: Option<std::net::SocketAddr>,
    /// Plain AMQP listen address (off unless given; for UseDevelopmentEmulator=true).
    #[arg(long, env = "HUB_AMQP")]
    amqp: Option<std::net::SocketAddr>,
}

impl ConfigArgs {
    fn load(&self) -> Result<Config, ConfigError> {
        self.location.load(Overrides {
            data_dir: None,
            hostname: self.hostname.clone(),
            mqtt: self.mqtt,
            mqtts: self.mqtts,
            http: self.http,
            https: self.https,
            cluster: self.cluster.clone(),
            amqps: self.amqps,
            amqp: self.amqp,
        })
    }
}

/// Exit code for a configuration the hub refuses.
const EXIT_BAD_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve(cli.serve));
    let default_log = match command {
        Command::Serve(_) => "info",
        _ => "warn",
    };
    init_logging(default_log);

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match command {
        Command::Serve(args) => {
            let config = match args.load() {
                Ok(config) => config,
                Err(err) => return config_failure(&err),
            };
            let served = runtime.block_on(async {
                let shutdown = shutdown_signal()
                    .map_err(|err| format!("cannot install signal handlers: {err}"))?;
                hub::run(config, shutdown)
                    .await
                    .map_err(|err| err.to_string())
            });
            match served {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("error: {err}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::PrintConfig(args) => match args.load() {
            Ok(config) => {
                print!("{}", config.to_toml());
                ExitCode::SUCCESS
            }
            Err(err) => config_failure(&err),
        },
        Command::Token(args) => report(cli::token(&args)),
        Command::Device(command) => report(runtime.block_on(cli::device(command))),
        Command::Tail(args) => report(runtime.block_on(cli::tail(args))),
        Command::C2d(command) => report(runtime.block_on(cli::c2d(command))),
        Command::Twin(command) => report(runtime.block_on(cli::twin(command))),
        Command::Invoke(args) => report(runtime.block_on(cli::invoke(args))),
        Command::Routing(command) => report(runtime.block_on(cli::routing(command))),
        Command::Cluster(command) => report(runtime.block_on(cli::cluster(command))),
        Command::Cert(command) => report(cli::cert(command)),
        Command::ConnectionString(args) => report(cli::connection_string(&args)),
        Command::Policy(command) => report(cli::policy(command)),
        Command::Dps(command) => report(runtime.block_on(cli::dps(command))),
    }
}

fn config_failure(err: &ConfigError) -> ExitCode {
    eprintln!("error: {err}");
    ExitCode::from(EXIT_BAD_CONFIG)
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Installs the Ctrl-C and SIGTERM handlers now (so a signal that arrives right after
/// the ready line is not lost) and returns a future that completes on either.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        Ok(async move {
            tokio::select! {
                _ = interrupt.recv() => tracing::info!("Ctrl-C: shutting down"),
                _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            if tokio::signal::ctrl_c().await.is_ok() {
                tracing::info!("Ctrl-C: shutting down");
            }
        })
    }
}
