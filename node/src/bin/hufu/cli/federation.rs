//! `hufu federation`: the trust list from member files to a running node:
//! genesis, signatures, proposals, installing, applying, and the node's view.

use std::path::PathBuf;

use anyhow::Context;
use hufu_certs::Province;

use super::conn::ConnArgs;
use crate::output::{out, outln};
use hufu_node::config::NodeConfig;

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
        /// The province's legacy code formats: a JSON list of
        /// {"name", "prefix", "pattern", "max_len", "example"}.
        #[arg(long)]
        formats: Option<PathBuf>,
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
        /// New legacy code formats for a member: PROVINCE=formats.json (a
        /// JSON list, as for `member --formats`; `[]` removes them).
        #[arg(long = "formats")]
        formats: Vec<String>,
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

pub async fn federation(cmd: FederationCommand) -> anyhow::Result<()> {
    use hufu_node::federation::ops;
    match cmd {
        FederationCommand::Member {
            config,
            endpoints,
            formats,
            out,
        } => {
            let config = NodeConfig::load(&config)?;
            let mut member = ops::member_of(&config, endpoints)?;
            if let Some(path) = formats {
                member.legacy_formats = ops::read_formats(&path)?;
                member.validate()?;
            }
            let json = member.to_json();
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
                None => out!("{json}"),
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
            outln!(
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
            outln!(
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
            outln!("merged; signatures: {}", merged.signer_names().join(", "));
        }
        FederationCommand::Propose {
            current,
            add,
            update,
            remove,
            endpoints,
            formats,
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
            for f in formats {
                let (p, path) = f
                    .split_once('=')
                    .with_context(|| format!("--formats {f:?}: expected PROVINCE=formats.json"))?;
                change
                    .formats
                    .push((p.parse()?, ops::read_formats(std::path::Path::new(path))?));
            }
            let next = ops::propose(&current.list, change)?;
            ops::write_note(&out, &next)?;
            outln!(
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
            outln!(
                "trust list v{} (threshold {}, witness quorum {})",
                list.version,
                list.threshold,
                list.witness_quorum
            );
            for m in &list.members {
                outln!(
                    "  {} {:<14} keys {:>2}  revoked {:>2}  endpoints {}",
                    m.province,
                    m.name,
                    m.jwks.keys.len(),
                    m.revoked_kids.len(),
                    m.endpoints.join(",")
                );
                for f in &m.legacy_formats {
                    outln!(
                        "    legacy format {}: prefix {:?}, pattern {:?}, up to {} bytes, e.g. {}",
                        f.name,
                        f.prefix,
                        f.pattern,
                        f.max_len,
                        f.example
                    );
                }
            }
            outln!("signatures: {}", note.signer_names().join(", "));
        }
        FederationCommand::Install { file, config } => {
            let config = NodeConfig::load(&config)?;
            let note = ops::read_note(&file)?;
            let version = ops::install(&config, &note)?;
            outln!(
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
                outln!(
                    "trust list v{} applied; peers are being told",
                    reply.version
                );
            } else {
                outln!("the node already holds v{}", reply.version);
            }
        }
        FederationCommand::Status { config } => {
            let config = NodeConfig::load(&config)?;
            let addr = hufu_node::console::status::console_addr(&config)?;
            let view = hufu_node::console::status::fetch(addr).await?;
            out!("{}", hufu_node::console::status::render(&view));
        }
    }
    Ok(())
}
