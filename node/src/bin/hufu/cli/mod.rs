//! The `hufu` command line: the argument tree and the dispatch to each
//! command group. Each group (`status`, `code`, `keys`, `federation`,
//! `audit`, `certs`) is a module with its own clap types and bodies; the
//! tools (`demo`, `bench`) live beside this tree in the binary. Everything
//! a command does to a node goes through the `hufu_node` library.

pub mod audit;
pub mod certs;
pub mod code;
pub mod codes;
pub mod conn;
pub mod explain;
pub mod federation;
pub mod keys;
pub mod qr;
pub mod signal;
pub mod status;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use hufu_certs::Province;
use hufu_proto::v1::LookupRequest;
use hufu_proto::v1::status_lookup_service_client::StatusLookupServiceClient;

use crate::output::outln;
use conn::ConnArgs;
use hufu_node::config::NodeConfig;
use hufu_node::init::{self, InitOptions};
use signal::shutdown_signal;

#[derive(Debug, clap::Parser)]
#[command(
    name = "hufu",
    version,
    about = "Federated health-code node: verify at the edge, replicate between provinces"
)]
pub struct Cli {
    /// Log as JSON lines instead of text (log level from RUST_LOG, default info).
    #[arg(long, global = true)]
    pub log_json: bool,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Worker threads the process's runtime should have (`None`: tokio's
    /// default, one per core).
    pub fn runtime_threads(&self) -> Option<usize> {
        match &self.command {
            Command::Bench(crate::bench::BenchArgs {
                what: crate::bench::BenchWhat::Surge(surge),
                ..
            }) => surge.runtime_threads(),
            _ => None,
        }
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Create a province directory: CA, node and admin certificates, secrets, config.
    Init(InitArgs),
    /// Run a node until SIGINT or SIGTERM.
    Serve {
        /// The node's configuration file.
        #[arg(long, default_value = "hufu.toml")]
        config: PathBuf,
    },
    /// Certificates from a province CA.
    #[command(subcommand)]
    Certs(certs::CertsCommand),
    /// Statuses at this province's node (admin certificate).
    #[command(subcommand)]
    Status(status::StatusCommand),
    /// Look a holder up (terminal or node certificate).
    Lookup {
        /// Holder pseudonym.
        holder: String,
        /// Issuing province; default: the node's own.
        #[arg(long)]
        issuer: Option<Province>,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Health codes: issue one, print the published keys.
    #[command(subcommand)]
    Code(code::CodeCommand),
    /// Verify a code at a node (terminal certificate).
    Verify(code::VerifyArgs),
    /// Legacy codes: bind this province's existing codes to holders (admin certificate).
    #[command(subcommand)]
    Codes(codes::CodesCommand),
    /// Code-signing keys: rotate, revoke (admin certificate).
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// The trust list: member files, genesis, signing, proposals, installing.
    #[command(subcommand)]
    Federation(federation::FederationCommand),
    /// A local federation demonstration on loopback.
    Demo(crate::demo::DemoArgs),
    /// Benchmarks that print figures.
    Bench(crate::bench::BenchArgs),
    /// The audit log: fetch a node's log (auditor certificate), verify, query and export it offline.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// The node's configuration: check it without serving.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print a shell completion script: `hufu completions bash > /etc/bash_completion.d/hufu`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum ConfigCommand {
    /// Check a configuration as `hufu serve` would use it, without serving:
    /// files, keys, certificates against the province, limits, free ports.
    /// Exits 2 if anything would fail.
    Check {
        #[arg(long, default_value = "hufu.toml")]
        config: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// GB/T 2260 province code, e.g. 440000.
    #[arg(long, required_unless_present = "replica_of")]
    pub province: Option<Province>,
    /// Directory to create.
    #[arg(long)]
    pub dir: PathBuf,
    /// This node's name.
    #[arg(long, default_value = "node-1")]
    pub node_name: String,
    #[arg(long, default_value = "127.0.0.1:7443")]
    pub listen: std::net::SocketAddr,
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub metrics_listen: std::net::SocketAddr,
    /// DNS name or IP the node is reached at (repeatable); default localhost, 127.0.0.1, ::1.
    #[arg(long = "host")]
    pub hosts: Vec<String>,
    /// Make a further replica of the province whose node directory this is
    /// (same province, secrets and keys; its own node name, certificate and
    /// store), sharing the province's write log on NATS JetStream.
    #[arg(long, value_name = "DIR", conflicts_with = "province")]
    pub replica_of: Option<PathBuf>,
    /// The NATS servers of the province's JetStream cluster (repeatable),
    /// for --replica-of; default: the [replication] servers of that node.
    #[arg(long = "nats", value_name = "URL")]
    pub nats: Vec<String>,
}

fn init(args: InitArgs) -> anyhow::Result<()> {
    if let Some(from) = &args.replica_of {
        return init_replica(from, &args);
    }
    let province = args
        .province
        .ok_or_else(|| anyhow::anyhow!("--province is required"))?;
    let opts = InitOptions {
        province,
        node_name: args.node_name,
        listen: args.listen,
        metrics_listen: Some(args.metrics_listen),
        hosts: args.hosts,
    };
    let config = init::init_province(&args.dir, &opts)?;
    outln!(
        "province {} ({}) initialised in {}",
        opts.province,
        opts.province.name(),
        args.dir.display()
    );
    outln!("  config:      {}", config.display());
    outln!("  next:        hufu serve --config {}", config.display());
    Ok(())
}

/// `hufu init --replica-of DIR`: a further replica of a province.
fn init_replica(from: &Path, args: &InitArgs) -> anyhow::Result<()> {
    use hufu_node::config::ReplicationConfig;
    use hufu_node::replication::setup::{ReplicaOptions, init_replica};
    let source = NodeConfig::load(&from.join(init::CONFIG_FILE))?;
    let mut replication = match (&source.replication, args.nats.is_empty()) {
        (Some(r), _) => r.clone(),
        (None, false) => ReplicationConfig::new(args.nats.clone()),
        (None, true) => anyhow::bail!(
            "{} has no [replication] section: name the province's NATS servers with --nats nats://host:4222 (repeatable)",
            from.display()
        ),
    };
    if !args.nats.is_empty() {
        replication.servers = args.nats.clone();
    }
    let opts = ReplicaOptions {
        node_name: args.node_name.clone(),
        listen: args.listen,
        metrics_listen: Some(args.metrics_listen),
        hosts: args.hosts.clone(),
    };
    let config = init_replica(&source, &args.dir, &opts, replication)?;
    outln!(
        "replica {} of province {} ({}) initialised in {}",
        opts.node_name,
        source.province,
        source.province.name(),
        args.dir.display()
    );
    outln!("  config:      {}", config.display());
    if source.replication.is_none() {
        outln!(
            "  also:        add the same [replication] section to {} before starting either",
            from.join(init::CONFIG_FILE).display()
        );
    }
    outln!("  next:        hufu serve --config {}", config.display());
    Ok(())
}

pub fn init_tracing(cli: &Cli) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        // Client commands stay quiet unless asked; servers log at info.
        let default = match cli.command {
            Command::Serve { .. } => "info",
            _ => "warn",
        };
        tracing_subscriber::EnvFilter::new(default)
    });
    // Colour codes only for a person at a terminal, never into a journal,
    // a file or a pipe.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if cli.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Init(args) => init(args)?,
        Command::Serve { config } => serve(&config).await?,
        Command::Certs(cmd) => certs::run(cmd)?,
        Command::Status(cmd) => return status::status(cmd).await,
        Command::Lookup {
            holder,
            issuer,
            conn,
        } => {
            let mut client = StatusLookupServiceClient::new(conn.channel().await?);
            let issuer = match issuer {
                Some(p) => p,
                None => conn.province()?,
            };
            let reply = client
                .lookup(LookupRequest {
                    issuer: issuer.to_string(),
                    holder,
                })
                .await?
                .into_inner();
            if let Some(record) = reply.record {
                status::print_record(&record);
            }
        }
        Command::Code(cmd) => code::code(cmd).await?,
        Command::Verify(args) => return code::verify(args).await,
        Command::Codes(cmd) => codes::codes(cmd).await?,
        Command::Keys(cmd) => keys::keys(cmd).await?,
        Command::Federation(cmd) => federation::federation(cmd).await?,
        Command::Demo(args) => crate::demo::run(args).await?,
        Command::Bench(args) => crate::bench::run(args).await?,
        Command::Audit(cmd) => return audit::run(cmd).await,
        Command::Config(ConfigCommand::Check { config }) => {
            let report = hufu_node::config_check::check(&config).await;
            for f in &report.findings {
                outln!("{} {}", if f.ok { "ok  " } else { "FAIL" }, f.text);
            }
            if !report.passed() {
                eprintln!(
                    "hufu: {} cannot serve: fix what FAIL names",
                    config.display()
                );
                return Ok(ExitCode::from(2));
            }
            outln!("{} is ready to serve", config.display());
        }
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "hufu", &mut crate::output::Stdout);
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn serve(config_path: &Path) -> anyhow::Result<()> {
    let config = NodeConfig::load(config_path)?;
    let node = hufu_node::server::start(&config).await?;
    outln!(
        "hufu node for province {} ({}) serving on {}",
        config.province,
        config.province.name(),
        node.addr
    );
    if let Some(m) = node.metrics_addr {
        outln!("metrics on http://{m}/metrics");
    }
    shutdown_signal().await;
    tracing::info!("shutting down: finishing calls in flight");
    node.shutdown().await?;
    tracing::info!("stopped");
    Ok(())
}
