//! `hufu audit`: the auditor's commands. `fetch` copies a node's audit log
//! over the read-only audit API (auditor certificate) into a directory;
//! `verify`, `query` and `export` then work on that directory offline, with
//! nothing from the node but what it signed.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use hufu_certs::Province;
use hufu_federation::audit::{
    DirWriter, EntryKind, ExportFormat, Filter, LogSigner, Record, SignedCheckpoint, TreeHash,
    Witness, export, query, verify_dir_history,
};
use hufu_federation::holder::HolderId;
use hufu_federation::trust::{SignedTrustList, TrustList, TrustStore};
use hufu_proto::v1::audit_service_client::AuditServiceClient;
use hufu_proto::v1::{GetCheckpointsRequest, GetConsistencyProofRequest, GetEntriesRequest};

use crate::cli::conn::ConnArgs;
use crate::output::outln;
use hufu_node::config::NodeConfig;
use hufu_node::status::{format_time, parse_time};

/// Largest audit API reply accepted: a page of 10,000 entries is a few MiB.
const MAX_REPLY_BYTES: usize = 64 * 1024 * 1024;

/// Exit code of `verify` when the directory fails verification.
pub const VERIFY_FAILED: u8 = 2;

#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Copy a node's audit log (entries, published checkpoints with their
    /// cosignatures, consistency proofs) into a new directory. Needs an
    /// auditor certificate (--cert, --key) of any member province.
    Fetch {
        /// Directory to create; it must not exist or be empty.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Check a fetched directory offline: every checkpoint signed by the
    /// log's key and cosigned by the witness quorum, consistent with the one
    /// before, and every entry in it. Exits 2 naming the first failure.
    Verify {
        /// The directory `hufu audit fetch` wrote.
        dir: PathBuf,
        /// The trust list to check against, obtained independently of the
        /// node audited: a signed note (vNNNNNN.note), or a trust directory,
        /// whose chain is checked from the genesis.
        #[arg(long)]
        trust: PathBuf,
    },
    /// Print the entries of a fetched directory that match every filter
    /// given, one per line (verify the directory first).
    Query {
        /// The directory `hufu audit fetch` wrote.
        dir: PathBuf,
        #[command(flatten)]
        filter: FilterArgs,
    },
    /// Print the evidence of conflicting checkpoints this node's witness has
    /// kept, one JSON object per line: both signed checkpoints and the proof
    /// offered. Run it on the node's host while the node is stopped (its
    /// database admits one process at a time).
    Evidence {
        /// The node's hufu.toml.
        #[arg(long, default_value = "hufu.toml")]
        config: PathBuf,
    },
    /// Write the entries that match every filter given as JSON Lines or CSV
    /// (verify the directory first).
    Export {
        /// The directory `hufu audit fetch` wrote.
        dir: PathBuf,
        #[arg(long, value_enum)]
        format: Format,
        #[command(flatten)]
        filter: FilterArgs,
        /// Output file; default standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Format {
    /// One JSON object per line.
    Jsonl,
    /// A header line, then one row per entry.
    Csv,
}

/// Which entries `query` and `export` keep.
#[derive(Debug, Clone, clap::Args)]
pub struct FilterArgs {
    /// Entries at or after this time (RFC 3339, e.g. 2022-01-10T08:00:00Z, or Unix seconds).
    #[arg(long)]
    pub since: Option<String>,
    /// Entries before this time (RFC 3339 or Unix seconds).
    #[arg(long)]
    pub until: Option<String>,
    /// Entries whose caller identity contains this text, e.g. terminal/gate-7 or province/610000.
    #[arg(long)]
    pub caller: Option<String>,
    /// Entries about this province (the issuer of the code or holder).
    #[arg(long)]
    pub province: Option<Province>,
    /// Entries about this holder pseudonym.
    #[arg(long)]
    pub holder: Option<String>,
    /// lookup_served, lookup_made, verify_served, status_changed, key_rotated, key_revoked or trust_list_changed.
    #[arg(long)]
    pub kind: Option<String>,
}

impl FilterArgs {
    pub fn filter(&self) -> anyhow::Result<Filter> {
        let millis = |t: &Option<String>| -> anyhow::Result<Option<u64>> {
            Ok(match t {
                Some(t) => parse_time(t)
                    .map_err(anyhow::Error::msg)?
                    .map(|secs| secs.max(0) as u64 * 1000),
                None => None,
            })
        };
        Ok(Filter {
            since: millis(&self.since)?,
            until: millis(&self.until)?,
            caller: self.caller.clone(),
            province: self.province,
            holder: self
                .holder
                .as_deref()
                .map(|h| h.parse::<HolderId>())
                .transpose()
                .context("--holder")?,
            kind: self
                .kind
                .as_deref()
                .map(|k| k.parse::<EntryKind>())
                .transpose()?,
        })
    }
}

pub async fn run(cmd: AuditCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCommand::Fetch { out, conn } => fetch(&out, &conn).await?,
        AuditCommand::Verify { dir, trust } => {
            let history = load_trust(&trust)?;
            let list = history.last().expect("at least one version");
            return Ok(match verify_dir_history(&dir, &history) {
                Ok(report) => {
                    outln!("verified: {report}");
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!(
                        "hufu: audit verification of {} FAILED against trust list v{}: {err}",
                        dir.display(),
                        list.version
                    );
                    ExitCode::from(VERIFY_FAILED)
                }
            });
        }
        AuditCommand::Query { dir, filter } => {
            let records = query(&dir, &filter.filter()?)?;
            for record in &records {
                outln!("{}", line(record));
            }
            eprintln!(
                "{} entr{} match",
                records.len(),
                if records.len() == 1 { "y" } else { "ies" }
            );
        }
        AuditCommand::Evidence { config } => evidence(&config)?,
        AuditCommand::Export {
            dir,
            format,
            filter,
            out,
        } => {
            let records = query(&dir, &filter.filter()?)?;
            let format = match format {
                Format::Jsonl => ExportFormat::JsonLines,
                Format::Csv => ExportFormat::Csv,
            };
            match &out {
                Some(path) => {
                    let file = std::fs::File::create(path)
                        .with_context(|| format!("cannot create {}", path.display()))?;
                    export(&records, format, file)?;
                    eprintln!("{} entries written to {}", records.len(), path.display());
                }
                None => export(&records, format, crate::output::Stdout)?,
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Copies the node's published checkpoints, the consistency proofs between
/// them and the entries they cover into `out`.
async fn fetch(out: &Path, conn: &ConnArgs) -> anyhow::Result<()> {
    let mut client = AuditServiceClient::new(conn.channel().await?)
        .max_decoding_message_size(MAX_REPLY_BYTES)
        .max_encoding_message_size(MAX_REPLY_BYTES);

    let mut checkpoints: Vec<SignedCheckpoint> = Vec::new();
    let mut origin: String;
    let mut log_size: u64;
    loop {
        let after_size = checkpoints.last().map_or(0, |cp| cp.checkpoint().size);
        let reply = client
            .get_checkpoints(GetCheckpointsRequest { after_size })
            .await
            .context("cannot read the node's checkpoints")?
            .into_inner();
        (origin, log_size) = (reply.origin, reply.log_size);
        let mut last = after_size;
        for note in &reply.checkpoints {
            let cp =
                SignedCheckpoint::parse(note).context("the node sent a malformed checkpoint")?;
            anyhow::ensure!(
                cp.checkpoint().size > last,
                "the node sent checkpoints out of order (size {} after {last})",
                cp.checkpoint().size
            );
            last = cp.checkpoint().size;
            checkpoints.push(cp);
        }
        if !reply.more || reply.checkpoints.is_empty() {
            break;
        }
    }
    let Some(last) = checkpoints.last() else {
        anyhow::bail!(
            "{origin} has published no checkpoint yet ({log_size} entries written): a checkpoint is published once the trust list's witness quorum has cosigned it; try again later"
        );
    };
    let covered = last.checkpoint().size;

    let mut dir = DirWriter::create(out)?;
    let mut previous = 0;
    for cp in &checkpoints {
        let size = cp.checkpoint().size;
        let proof = if previous == 0 {
            Vec::new()
        } else {
            client
                .get_consistency_proof(GetConsistencyProofRequest {
                    old_size: previous,
                    new_size: size,
                })
                .await
                .with_context(|| format!("cannot read the consistency proof {previous} to {size}"))?
                .into_inner()
                .hashes
                .iter()
                .map(|h| {
                    TreeHash::from_slice(h).ok_or_else(|| {
                        anyhow::anyhow!("the node sent a proof hash of {} bytes", h.len())
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?
        };
        dir.checkpoint(cp, &proof)?;
        previous = size;
    }
    let mut next = 0;
    while next < covered {
        let page = client
            .get_entries(GetEntriesRequest {
                start: next,
                end: covered,
            })
            .await
            .with_context(|| format!("cannot read entries from {next}"))?
            .into_inner()
            .entries;
        anyhow::ensure!(
            !page.is_empty(),
            "the node returned no entries from {next}, though its checkpoint covers {covered}"
        );
        for e in page {
            dir.entry(e.index, &e.entry)?;
            next = e.index + 1;
        }
    }
    dir.finish()?;
    outln!(
        "fetched {origin}: {covered} entries and {} checkpoints into {}",
        checkpoints.len(),
        out.display()
    );
    outln!(
        "next: hufu audit verify {} --trust <a trust list obtained independently>",
        out.display()
    );
    Ok(())
}

/// Prints the evidence kept by the witness of the node configured in
/// `config_path`.
fn evidence(config_path: &Path) -> anyhow::Result<()> {
    let config = NodeConfig::load(config_path)?;
    let data = config.audit_dir();
    let db = sled::Config::new().path(&data).open().with_context(|| {
        format!(
            "cannot open the node's database {} (stop the node first: it is in use while the node runs)",
            data.display()
        )
    })?;
    let signer = LogSigner::load(&config.path(&config.log_key))?;
    let witness = Witness::open(
        db.open_tree(hufu_node::audit::WITNESS_TREE)?,
        Arc::new(signer),
    );
    let evidence = witness.evidence()?;
    for e in &evidence {
        outln!("{}", serde_json::to_string(e)?);
    }
    eprintln!(
        "{} piece{} of evidence of conflicting audit checkpoints kept by {}",
        evidence.len(),
        if evidence.len() == 1 { "" } else { "s" },
        witness.name()
    );
    Ok(())
}

/// The trust lists at `path`, in version order: every version of a trust
/// directory, its chain checked from the genesis (each checkpoint is judged
/// against the version in force when it was cosigned); or one signed note,
/// checked if it is a genesis.
fn load_trust(path: &Path) -> anyhow::Result<Vec<TrustList>> {
    if path.is_dir() {
        let store = TrustStore::open(path)
            .with_context(|| format!("trust directory {}", path.display()))?;
        return Ok((1..=store.version())
            .filter_map(|v| store.get(v))
            .map(|signed| signed.list.clone())
            .collect());
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let signed =
        SignedTrustList::parse(&text).with_context(|| format!("trust list {}", path.display()))?;
    if signed.list.version == 1 {
        signed
            .verify_genesis()
            .with_context(|| format!("trust list {}", path.display()))?;
    } else {
        eprintln!(
            "note: trust list v{} given alone, so its signatures cannot be checked against the versions before it, and every checkpoint is judged against it alone; pass a trust directory to check the whole chain",
            signed.list.version
        );
    }
    Ok(vec![signed.list])
}

/// One entry for people: tab-separated, absent fields as `-`.
fn line(record: &Record) -> String {
    let e = &record.entry;
    let source = e
        .source
        .and_then(|s| serde_json::to_value(s).ok())
        .and_then(|v| v.as_str().map(str::to_owned));
    let time = format_time((e.time / 1000) as i64);
    [
        record.index.to_string(),
        time,
        e.kind.as_str().to_owned(),
        e.caller.uri(),
        e.province.to_string(),
        e.holder.as_ref().map(|h| h.to_string()).unwrap_or_default(),
        e.answer.clone().unwrap_or_default(),
        source.unwrap_or_default(),
        e.detail.clone().unwrap_or_default(),
    ]
    .map(|field| if field.is_empty() { "-".into() } else { field })
    .join("\t")
}
