//! The `hufu` subcommands: argument definitions and what each one does.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use hufu_certs::Province;
use hufu_proto::v1::admin_service_client::AdminServiceClient;
use hufu_proto::v1::status_lookup_service_client::StatusLookupServiceClient;
use hufu_proto::v1::{
    Colour, GetJwksRequest, GetStatusRequest, HolderMatch, IssueCodeRequest, LookupRequest, Policy,
    PutStatusRequest, RevokeKeyRequest, RotateKeyRequest, StatusInput, StatusRecord, Verdict,
    VerifyRequest, get_status_request, issue_code_request, status_input,
};

use crate::config::NodeConfig;
pub use crate::conn::ConnArgs;
use crate::import;
use crate::init::{self, InitOptions};
use crate::signal::shutdown_signal;
use crate::status::{
    colour_name, format_time, parse_colour, parse_reason, parse_time, reason_name, seconds,
    timestamp,
};

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
    Certs(crate::certs_cli::CertsCommand),
    /// Statuses at this province's node (admin certificate).
    #[command(subcommand)]
    Status(StatusCommand),
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
    Code(CodeCommand),
    /// Verify a code at a node (terminal certificate).
    Verify(VerifyArgs),
    /// Code-signing keys: rotate, revoke (admin certificate).
    #[command(subcommand)]
    Keys(KeysCommand),
    /// The trust list: member files, genesis, signing, proposals, installing.
    #[command(subcommand)]
    Federation(FederationCommand),
    /// A local federation demonstration on loopback.
    Demo(crate::demo::DemoArgs),
    /// Benchmarks that print figures.
    Bench(crate::bench::BenchArgs),
    /// The audit log: fetch a node's log (auditor certificate), verify, query and export it offline.
    #[command(subcommand)]
    Audit(crate::audit_cli::AuditCommand),
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
    #[arg(long)]
    pub province: Province,
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
}

#[derive(Debug, clap::Args)]
pub struct HolderArgs {
    /// National id (GB 11643); pseudonymised at the node, never stored.
    #[arg(
        long = "id",
        conflicts_with = "holder",
        required_unless_present = "holder"
    )]
    pub national_id: Option<String>,
    /// Holder pseudonym.
    #[arg(long)]
    pub holder: Option<String>,
}

#[derive(Debug, clap::Subcommand)]
pub enum StatusCommand {
    /// Import statuses from CSV (header: national_id,colour,as_of,last_negative_test,reason) or JSON Lines.
    Import {
        file: PathBuf,
        #[arg(long, value_enum)]
        format: Option<import::Format>,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Set one holder's status.
    Set {
        #[command(flatten)]
        who: HolderArgs,
        /// green, yellow or red.
        #[arg(long)]
        colour: String,
        /// none, close_contact, positive_test, high_risk_travel, missing_test.
        #[arg(long, default_value = "none")]
        reason: String,
        /// When the colour was decided (RFC 3339 or Unix seconds); default now.
        #[arg(long)]
        as_of: Option<String>,
        /// Last negative test (RFC 3339 or Unix seconds).
        #[arg(long)]
        negative_test: Option<String>,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Read one holder's status.
    Get {
        #[command(flatten)]
        who: HolderArgs,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum CodeCommand {
    /// Issue a signed code for a holder with their current status.
    Issue {
        #[command(flatten)]
        who: HolderArgs,
        /// The holder's name as on the identity card; the code carries it
        /// masked (张*三), for checkpoints to compare with the person.
        #[arg(long)]
        name: Option<String>,
        /// Also write the code as a QR image (.png or .svg).
        #[arg(long)]
        qr: Option<PathBuf>,
        /// Also print the code as a QR code in the terminal.
        #[arg(long)]
        qr_terminal: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Print the node's published code-signing keys (JWKS).
    Jwks {
        #[command(flatten)]
        conn: ConnArgs,
    },
}

#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// The code (compact JWT, or the QR text "HUFU:/…"); "-" reads it from stdin.
    pub token: String,
    /// National id read from the identity card of the person showing the
    /// code: the node answers whether it is the holder's.
    #[arg(long = "id")]
    pub national_id: Option<String>,
    /// Require a negative test within this many hours.
    #[arg(long)]
    pub negative_test_within_hours: Option<i64>,
    /// Require at most this colour (green or yellow).
    #[arg(long)]
    pub max_colour: Option<String>,
    /// Refuse answers from a stale replica.
    #[arg(long)]
    pub require_fresh: bool,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum FederationCommand {
    /// Describe this province as a trust list member (JSON, to hand to the founders).
    Member {
        /// The province's hufu.toml.
        #[arg(long, default_value = "hufu.toml")]
        config: PathBuf,
        /// host:port where other provinces reach this node (repeatable;
        /// default: the config's client endpoint).
        #[arg(long = "endpoint")]
        endpoints: Vec<String>,
        /// Write here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Make an unsigned genesis trust list from member files.
    Genesis {
        #[arg(long = "member", required = true)]
        members: Vec<PathBuf>,
        /// Signatures of current members that the next version needs.
        #[arg(long)]
        threshold: usize,
        /// Cosignatures an audit checkpoint needs (default 1).
        #[arg(long)]
        witness_quorum: Option<usize>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Add this province's governance signature to a trust list file (in place).
    Sign {
        file: PathBuf,
        #[arg(long, default_value = "hufu.toml")]
        config: PathBuf,
    },
    /// Combine the signatures of several copies of one trust list.
    Merge {
        #[arg(long)]
        out: PathBuf,
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Propose the next version of a trust list (unsigned).
    Propose {
        /// The version in force.
        #[arg(long)]
        current: PathBuf,
        /// Add a member (its member file).
        #[arg(long = "add")]
        add: Vec<PathBuf>,
        /// Replace a member's keys, CA and endpoints (its new member file).
        #[arg(long = "update")]
        update: Vec<PathBuf>,
        /// Remove a member.
        #[arg(long = "remove")]
        remove: Vec<Province>,
        /// New endpoints for a member: PROVINCE=host:port[,host:port...]
        #[arg(long = "endpoints")]
        endpoints: Vec<String>,
        #[arg(long)]
        threshold: Option<usize>,
        #[arg(long)]
        witness_quorum: Option<usize>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Print a trust list: version, members, signatures.
    Show { file: PathBuf },
    /// Install a genesis (or the next version) into a stopped node's trust directory.
    Install {
        file: PathBuf,
        #[arg(long, default_value = "hufu.toml")]
        config: PathBuf,
    },
    /// Hand the next version to a running node (admin certificate); it gossips it on.
    Apply {
        file: PathBuf,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Show a running node's view of the federation: trust list, members,
    /// feed positions, replica ages, breakers, last errors (from its console).
    Status {
        #[arg(long, default_value = "hufu.toml")]
        config: PathBuf,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Start signing with a new key; the old one stays published until its codes expire.
    Rotate {
        /// es256 or eddsa.
        #[arg(long, default_value = "es256")]
        alg: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Revoke a key: every code it signed is refused from now on.
    Revoke {
        kid: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
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
        Command::Init(args) => {
            let opts = InitOptions {
                province: args.province,
                node_name: args.node_name,
                listen: args.listen,
                metrics_listen: Some(args.metrics_listen),
                hosts: args.hosts,
            };
            let config = init::init_province(&args.dir, &opts)?;
            println!(
                "province {} ({}) initialised in {}",
                opts.province,
                opts.province.name(),
                args.dir.display()
            );
            println!("  config:      {}", config.display());
            println!("  next:        hufu serve --config {}", config.display());
        }
        Command::Serve { config } => serve(&config).await?,
        Command::Certs(cmd) => crate::certs_cli::run(cmd)?,
        Command::Status(cmd) => return status(cmd).await,
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
                print_record(&record);
            }
        }
        Command::Code(cmd) => code(cmd).await?,
        Command::Verify(args) => return verify(args).await,
        Command::Keys(cmd) => keys(cmd).await?,
        Command::Federation(cmd) => federation(cmd).await?,
        Command::Demo(args) => crate::demo::run(args).await?,
        Command::Bench(args) => crate::bench::run(args).await?,
        Command::Audit(cmd) => return crate::audit_cli::run(cmd).await,
        Command::Config(ConfigCommand::Check { config }) => {
            let report = crate::config_check::check(&config).await;
            for f in &report.findings {
                println!("{} {}", if f.ok { "ok  " } else { "FAIL" }, f.text);
            }
            if !report.passed() {
                eprintln!(
                    "hufu: {} cannot serve: fix what FAIL names",
                    config.display()
                );
                return Ok(ExitCode::from(2));
            }
            println!("{} is ready to serve", config.display());
        }
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "hufu", &mut std::io::stdout());
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn serve(config_path: &Path) -> anyhow::Result<()> {
    let config = NodeConfig::load(config_path)?;
    let node = crate::server::start(&config).await?;
    println!(
        "hufu node for province {} ({}) serving on {}",
        config.province,
        config.province.name(),
        node.addr
    );
    if let Some(m) = node.metrics_addr {
        println!("metrics on http://{m}/metrics");
    }
    shutdown_signal().await;
    tracing::info!("shutting down: finishing calls in flight");
    node.shutdown().await?;
    tracing::info!("stopped");
    Ok(())
}

fn input(who: &HolderArgs) -> status_input::Subject {
    match (&who.national_id, &who.holder) {
        (Some(id), _) => status_input::Subject::NationalId(id.clone()),
        (None, Some(h)) => status_input::Subject::Holder(h.clone()),
        (None, None) => unreachable!("clap requires --id or --holder"),
    }
}

async fn status(cmd: StatusCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        StatusCommand::Import { file, format, conn } => {
            // The header and emptiness are checked before dialling; the rows
            // are read while they stream.
            let reader = import::Reader::open(&file, format)?;
            let size = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
            let channel = conn.channel().await?;
            let name = file.display().to_string();
            let outcome = import::send(reader, size, channel, &name).await?;
            for r in &outcome.rejected {
                eprintln!("{name}:{}: {}", r.line, r.reason);
            }
            let unlisted = outcome
                .rejected_count
                .saturating_sub(outcome.rejected.len() as u64);
            if unlisted > 0 {
                eprintln!(
                    "{name}: {unlisted} more rejected lines not listed (the first {} are); fix those and run the import again to see the rest",
                    outcome.rejected.len()
                );
            }
            println!(
                "imported {} of {} rows from {name}; {} rejected",
                outcome.accepted, outcome.lines, outcome.rejected_count
            );
            return Ok(if outcome.rejected_count == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            });
        }
        StatusCommand::Set {
            who,
            colour,
            reason,
            as_of,
            negative_test,
            conn,
        } => {
            let status = StatusInput {
                subject: Some(input(&who)),
                colour: parse_colour(&colour).map_err(anyhow::Error::msg)? as i32,
                as_of: match as_of {
                    Some(t) => parse_time(&t).map_err(anyhow::Error::msg)?.map(timestamp),
                    None => None,
                },
                last_negative_test: match negative_test {
                    Some(t) => parse_time(&t).map_err(anyhow::Error::msg)?.map(timestamp),
                    None => None,
                },
                reason: parse_reason(&reason).map_err(anyhow::Error::msg)? as i32,
            };
            let mut admin = AdminServiceClient::new(conn.channel().await?);
            let reply = admin
                .put_status(PutStatusRequest {
                    status: Some(status),
                })
                .await?
                .into_inner();
            if let Some(record) = reply.record {
                print_record(&record);
            }
            println!("sequence:           {}", reply.sequence);
        }
        StatusCommand::Get { who, conn } => {
            let subject = match input(&who) {
                status_input::Subject::NationalId(id) => {
                    get_status_request::Subject::NationalId(id)
                }
                status_input::Subject::Holder(h) => get_status_request::Subject::Holder(h),
            };
            let mut admin = AdminServiceClient::new(conn.channel().await?);
            let reply = admin
                .get_status(GetStatusRequest {
                    subject: Some(subject),
                })
                .await?
                .into_inner();
            if let Some(record) = reply.record {
                print_record(&record);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn print_record(record: &StatusRecord) {
    let colour = Colour::try_from(record.colour).unwrap_or(Colour::Unspecified);
    let reason = hufu_proto::v1::Reason::try_from(record.reason).unwrap_or_default();
    println!("issuer:             {}", record.issuer);
    println!("holder:             {}", record.holder);
    println!("colour:             {}", colour_name(colour));
    println!("reason:             {}", reason_name(reason));
    if let Some(t) = seconds(record.as_of.as_ref()) {
        println!("as of:              {}", format_time(t));
    }
    if let Some(t) = seconds(record.last_negative_test.as_ref()) {
        println!("last negative test: {}", format_time(t));
    }
}

async fn code(cmd: CodeCommand) -> anyhow::Result<()> {
    match cmd {
        CodeCommand::Issue {
            who,
            name,
            qr,
            qr_terminal,
            conn,
        } => {
            let subject = match input(&who) {
                status_input::Subject::NationalId(id) => {
                    issue_code_request::Subject::NationalId(id)
                }
                status_input::Subject::Holder(h) => issue_code_request::Subject::Holder(h),
            };
            let mut admin = AdminServiceClient::new(conn.channel().await?);
            let reply = admin
                .issue_code(IssueCodeRequest {
                    subject: Some(subject),
                    name: name.unwrap_or_default(),
                })
                .await?
                .into_inner();
            println!("{}", reply.token);
            let symbol = crate::qr::symbol(&reply.token)?;
            eprintln!(
                "kid {}; expires {}; {} bytes, QR version {} (level {})",
                reply.kid,
                reply
                    .expires
                    .map(|t| format_time(t.seconds))
                    .unwrap_or_default(),
                reply.token.len(),
                crate::qr::version(&symbol),
                crate::qr::level(&symbol)
            );
            if let Some(path) = qr {
                crate::qr::write(&symbol, &path)?;
                eprintln!("QR code written to {}", path.display());
            }
            if qr_terminal {
                eprintln!("{}", crate::qr::to_terminal(&symbol));
            }
        }
        CodeCommand::Jwks { conn } => {
            let mut client = StatusLookupServiceClient::new(conn.channel().await?);
            let reply = client
                .get_jwks(GetJwksRequest::default())
                .await?
                .into_inner();
            let jwks: serde_json::Value = serde_json::from_str(&reply.jwks_json)?;
            println!("{}", serde_json::to_string_pretty(&jwks)?);
            for kid in reply.revoked_kids {
                eprintln!("revoked: {kid}");
            }
        }
    }
    Ok(())
}

async fn verify(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let token = if args.token == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
        s.trim().to_owned()
    } else {
        args.token.clone()
    };
    let policy = if args.negative_test_within_hours.is_some()
        || args.max_colour.is_some()
        || args.require_fresh
    {
        Some(Policy {
            max_negative_test_age: args
                .negative_test_within_hours
                .map(|h| hufu_proto::Duration {
                    seconds: h * 3600,
                    nanos: 0,
                }),
            max_colour: match &args.max_colour {
                Some(c) => parse_colour(c).map_err(anyhow::Error::msg)? as i32,
                None => 0,
            },
            require_fresh: args.require_fresh,
        })
    } else {
        None
    };
    let mut client = StatusLookupServiceClient::new(args.conn.channel().await?);
    let reply = client
        .verify(VerifyRequest {
            token,
            policy,
            national_id: args.national_id.clone().unwrap_or_default(),
        })
        .await?
        .into_inner();
    let verdict = Verdict::try_from(reply.verdict).unwrap_or_default();
    println!(
        "verdict:            {}",
        verdict
            .as_str_name()
            .trim_start_matches("VERDICT_")
            .to_lowercase()
    );
    println!("reason:             {}", reply.reason);
    if verdict != Verdict::Valid {
        return Ok(ExitCode::from(3));
    }
    if let Some(status) = &reply.status {
        print_record(status);
    }
    if !reply.masked_name.is_empty() {
        println!("name:               {}", reply.masked_name);
    }
    if !reply.masked_national_id.is_empty() {
        println!("national id:        {}", reply.masked_national_id);
    }
    let holder_match = HolderMatch::try_from(reply.holder_match).unwrap_or_default();
    if holder_match != HolderMatch::Unspecified {
        println!(
            "holder match:       {}",
            holder_match
                .as_str_name()
                .trim_start_matches("HOLDER_MATCH_")
                .to_lowercase()
        );
    }
    if let Some(p) = &reply.provenance {
        let source = hufu_proto::v1::Source::try_from(p.source).unwrap_or_default();
        println!(
            "source:             {}",
            source
                .as_str_name()
                .trim_start_matches("SOURCE_")
                .to_lowercase()
        );
        if let Some(age) = &p.age {
            println!("age:                {}s", age.seconds);
        }
    }
    println!("policy met:         {}", reply.policy_met);
    Ok(if holder_match == HolderMatch::False {
        // Someone else's code: whatever its colour, it does not admit.
        ExitCode::from(5)
    } else if reply.policy_met {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(4)
    })
}

async fn keys(cmd: KeysCommand) -> anyhow::Result<()> {
    match cmd {
        KeysCommand::Rotate { alg, conn } => {
            let mut admin = AdminServiceClient::new(conn.channel().await?);
            let reply = admin
                .rotate_key(RotateKeyRequest { algorithm: alg })
                .await?
                .into_inner();
            println!("new signing key:  {}", reply.kid);
            println!(
                "previous key:     {} (published until its codes expire)",
                reply.previous_kid
            );
        }
        KeysCommand::Revoke { kid, conn } => {
            let mut admin = AdminServiceClient::new(conn.channel().await?);
            admin
                .revoke_key(RevokeKeyRequest { kid: kid.clone() })
                .await?;
            println!("revoked {kid}: codes it signed are refused from now on");
        }
    }
    Ok(())
}

async fn federation(cmd: FederationCommand) -> anyhow::Result<()> {
    use crate::federation::ops;
    match cmd {
        FederationCommand::Member {
            config,
            endpoints,
            out,
        } => {
            let config = NodeConfig::load(&config)?;
            let json = ops::member_of(&config, endpoints)?.to_json();
            match out {
                Some(path) => {
                    std::fs::write(&path, json)
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    eprintln!(
                        "member file for {} written to {}",
                        config.province,
                        path.display()
                    );
                }
                None => print!("{json}"),
            }
        }
        FederationCommand::Genesis {
            members,
            threshold,
            witness_quorum,
            out,
        } => {
            let members = members
                .iter()
                .map(|m| ops::read_member(m))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let note = ops::genesis(members, threshold, witness_quorum)?;
            ops::write_note(&out, &note)?;
            println!(
                "genesis trust list v1 with {} members written to {}; every founder signs it with `hufu federation sign`",
                note.list.members.len(),
                out.display()
            );
        }
        FederationCommand::Sign { file, config } => {
            let config = NodeConfig::load(&config)?;
            let mut note = ops::read_note(&file)?;
            ops::sign(&config, &mut note)?;
            ops::write_note(&file, &note)?;
            println!(
                "signed v{} for {}; signatures: {}",
                note.list.version,
                config.province,
                note.signer_names().join(", ")
            );
        }
        FederationCommand::Merge { out, files } => {
            let mut merged = ops::read_note(&files[0])?;
            for f in &files[1..] {
                merged.merge_signatures(&ops::read_note(f)?)?;
            }
            ops::write_note(&out, &merged)?;
            println!("merged; signatures: {}", merged.signer_names().join(", "));
        }
        FederationCommand::Propose {
            current,
            add,
            update,
            remove,
            endpoints,
            threshold,
            witness_quorum,
            out,
        } => {
            let current = ops::read_note(&current)?;
            let mut change = ops::Proposal {
                add: add
                    .iter()
                    .map(|m| ops::read_member(m))
                    .collect::<anyhow::Result<_>>()?,
                update: update
                    .iter()
                    .map(|m| ops::read_member(m))
                    .collect::<anyhow::Result<_>>()?,
                remove,
                threshold,
                witness_quorum,
                ..Default::default()
            };
            for e in endpoints {
                let (p, list) = e.split_once('=').with_context(|| {
                    format!("--endpoints {e:?}: expected PROVINCE=host:port[,host:port]")
                })?;
                change
                    .endpoints
                    .push((p.parse()?, list.split(',').map(str::to_owned).collect()));
            }
            let next = ops::propose(&current.list, change)?;
            ops::write_note(&out, &next)?;
            println!(
                "proposed v{} written to {}; it needs {} signatures of v{}'s members",
                next.list.version,
                out.display(),
                current.list.threshold,
                current.list.version
            );
        }
        FederationCommand::Show { file } => {
            let note = ops::read_note(&file)?;
            let list = &note.list;
            println!(
                "trust list v{} (threshold {}, witness quorum {})",
                list.version, list.threshold, list.witness_quorum
            );
            for m in &list.members {
                println!(
                    "  {} {:<14} keys {:>2}  revoked {:>2}  endpoints {}",
                    m.province,
                    m.name,
                    m.jwks.keys.len(),
                    m.revoked_kids.len(),
                    m.endpoints.join(",")
                );
            }
            println!("signatures: {}", note.signer_names().join(", "));
        }
        FederationCommand::Install { file, config } => {
            let config = NodeConfig::load(&config)?;
            let note = ops::read_note(&file)?;
            let version = ops::install(&config, &note)?;
            println!(
                "trust list v{version} installed in {}",
                config.path(&config.trust_dir).display()
            );
        }
        FederationCommand::Apply { file, conn } => {
            let note = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let mut client =
                hufu_proto::v1::federation_service_client::FederationServiceClient::new(
                    conn.channel().await?,
                );
            let reply = client
                .offer_trust_list(hufu_proto::v1::OfferTrustListRequest { note })
                .await?
                .into_inner();
            if reply.applied {
                println!(
                    "trust list v{} applied; peers are being told",
                    reply.version
                );
            } else {
                println!("the node already holds v{}", reply.version);
            }
        }
        FederationCommand::Status { config } => {
            let config = NodeConfig::load(&config)?;
            let addr = crate::console::status::console_addr(&config)?;
            let view = crate::console::status::fetch(addr).await?;
            print!("{}", crate::console::status::render(&view));
        }
    }
    Ok(())
}
