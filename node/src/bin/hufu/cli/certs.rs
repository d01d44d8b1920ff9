//! `hufu certs`: certificates from a province CA: issue, renew, revoke,
//! show. Terminal certificates live 30 days by default, so a lost or stolen
//! terminal stops working soon even if nobody revokes it; renewing is one
//! command. A revoked certificate is refused by the province's node within
//! a second and by every other member's node within a few seconds.

use std::path::{Path, PathBuf};

use anyhow::Context;
use hufu_certs::{LeafOptions, Role};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::output::outln;
use hufu_node::config::NodeConfig;
use hufu_node::init;
use hufu_node::revocation::{RevocationList, Revoked};

#[derive(Debug, clap::Subcommand)]
pub enum CertsCommand {
    /// Issue a certificate from the province CA in DIR: writes DIR/<role>/<name>.pem and .key.
    Issue {
        #[arg(long)]
        dir: PathBuf,
        /// node, terminal, admin or auditor.
        #[arg(long)]
        role: Role,
        #[arg(long)]
        name: String,
        /// For node certificates: DNS names / IPs (repeatable).
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Validity in days (default: 30 for terminals, 365 for the rest).
        #[arg(long)]
        days: Option<i64>,
    },
    /// Issue a new certificate and key for the identity (and, for a node,
    /// the names) of an existing certificate, in place of its files.
    Renew {
        #[arg(long)]
        dir: PathBuf,
        /// The certificate to renew; its key is the .key file beside it.
        #[arg(long)]
        cert: PathBuf,
        /// Validity in days (default: 30 for terminals, 365 for the rest).
        #[arg(long)]
        days: Option<i64>,
        /// Also revoke the certificate being replaced.
        #[arg(long)]
        revoke_old: bool,
    },
    /// Revoke a certificate of this province, by serial or by its file:
    /// every member's node refuses it within seconds, open connections too.
    Revoke {
        #[arg(long)]
        dir: PathBuf,
        /// Serial in hex, as `hufu certs show` prints it.
        #[arg(long, conflicts_with = "cert", required_unless_present = "cert")]
        serial: Option<String>,
        /// The certificate file.
        #[arg(long)]
        cert: Option<PathBuf>,
        /// Why (kept in the list, for operators).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Print the identity, serial and validity of a certificate file.
    Show { file: PathBuf },
}

pub fn run(cmd: CertsCommand) -> anyhow::Result<()> {
    match cmd {
        CertsCommand::Issue {
            dir,
            role,
            name,
            hosts,
            days,
        } => {
            let mut opts = if role == Role::Node {
                LeafOptions::for_node(&hosts)
            } else {
                LeafOptions::for_role(role)
            };
            if let Some(days) = days {
                opts.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(days);
            }
            let (cert, key) = init::issue_cert(&dir, role, &name, &opts)?;
            outln!(
                "certificate: {}\nkey:         {} (mode 0600)\nexpires:     {}",
                cert.display(),
                key.display(),
                opts.not_after.date()
            );
        }
        CertsCommand::Renew {
            dir,
            cert,
            days,
            revoke_old,
        } => {
            let old = read_cert(&cert)?;
            let (identity, mut opts) = hufu_certs::renewal_of(&old)?;
            if let Some(days) = days {
                opts.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(days);
            }
            let ca = init::load_ca(&dir)?;
            let key = cert.with_extension("key");
            ca.issue(&identity, &opts)?.write(&cert, &key)?;
            outln!(
                "renewed {identity}\ncertificate: {}\nkey:         {} (mode 0600)\nexpires:     {}",
                cert.display(),
                key.display(),
                opts.not_after.date()
            );
            if revoke_old {
                let serial = hufu_certs::certificate_serial(&old)?;
                revoke(&dir, &serial, &identity.uri(), "renewed")?;
            }
        }
        CertsCommand::Revoke {
            dir,
            serial,
            cert,
            reason,
        } => {
            let (serial, identity) = match (serial, cert) {
                (Some(serial), _) => (hufu_certs::parse_serial(&serial)?, String::new()),
                (None, Some(file)) => {
                    let der = read_cert(&file)?;
                    let identity = hufu_certs::Identity::from_cert_der(&der)?;
                    let province = NodeConfig::load(&dir.join(init::CONFIG_FILE))?.province;
                    anyhow::ensure!(
                        identity.province == province,
                        "{} is a certificate of province {}: only that province can revoke it (this is {province})",
                        file.display(),
                        identity.province
                    );
                    (hufu_certs::certificate_serial(&der)?, identity.uri())
                }
                (None, None) => anyhow::bail!("name the certificate: --serial or --cert"),
            };
            revoke(&dir, &serial, &identity, &reason)?;
        }
        CertsCommand::Show { file } => {
            let der = read_cert(&file)?;
            let identity = hufu_certs::Identity::from_cert_der(&der)?;
            outln!("identity: {identity}");
            outln!(
                "province: {} ({})",
                identity.province,
                identity.province.name()
            );
            outln!("role:     {}", identity.role);
            outln!("serial:   {}", hufu_certs::certificate_serial(&der)?);
        }
    }
    Ok(())
}

/// Adds `serial` to the revocation list of the province in `dir`.
fn revoke(dir: &Path, serial: &str, identity: &str, reason: &str) -> anyhow::Result<()> {
    let config = NodeConfig::load(&dir.join(init::CONFIG_FILE))?;
    let path = config.path(&config.revoked_certs);
    let mut list = RevocationList::load(&path)?;
    let added = list.add(Revoked {
        serial: serial.to_owned(),
        identity: identity.to_owned(),
        revoked_at: hufu_node::status::now_unix(),
        reason: reason.to_owned(),
    });
    if !added {
        outln!("serial {serial} was already revoked");
        return Ok(());
    }
    list.save(&path)?;
    outln!(
        "revoked serial {serial}{}: this province's node refuses it within a second, other members' nodes within seconds (list: {})",
        if identity.is_empty() {
            String::new()
        } else {
            format!(" ({identity})")
        },
        path.display()
    );
    Ok(())
}

fn read_cert(file: &Path) -> anyhow::Result<CertificateDer<'static>> {
    let pem =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))
}
