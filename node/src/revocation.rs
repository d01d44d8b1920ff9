//! A province's revoked certificates: the list `hufu certs revoke` writes
//! beside the CA (`ca/revoked.json` by default, `revoked_certs` in the
//! config), and how it reaches every member's node.
//!
//! The province's own node reads the list when it changes (it looks once a
//! second) and refuses the revoked certificates at once, on open
//! connections too. It publishes the serials with its code-signing keys:
//! the digest its signed feed heads carry covers keys, revoked kids and
//! revoked serials, so peers notice a change with the next head, fetch the
//! list with `GetJwks` and accept it only if it matches the signed digest.
//! The list is public: serials identify certificates, not people.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::codes::Codes;
use crate::standing::Standing;

/// How often the node looks at its revocation list file.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// One revoked certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revoked {
    /// Lowercase hex, as `hufu certs show` prints it.
    pub serial: String,
    /// The identity the certificate carried, when known.
    #[serde(default)]
    pub identity: String,
    /// Unix seconds.
    pub revoked_at: i64,
    #[serde(default)]
    pub reason: String,
}

/// The file's content.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationList {
    pub revoked: Vec<Revoked>,
}

impl RevocationList {
    /// Reads the list at `path`; a missing file is an empty list.
    pub fn load(path: &Path) -> anyhow::Result<RevocationList> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(err) => return Err(err).with_context(|| format!("cannot read {}", path.display())),
        };
        let list: RevocationList = serde_json::from_str(&text).with_context(|| {
            format!(
                "revocation list {} is not valid: fix it or restore it from a backup",
                path.display()
            )
        })?;
        for r in &list.revoked {
            anyhow::ensure!(
                hufu_certs::parse_serial(&r.serial).ok().as_deref() == Some(r.serial.as_str()),
                "revocation list {}: serial {:?} is not lowercase hex as `hufu certs revoke` writes it",
                path.display(),
                r.serial
            );
        }
        Ok(list)
    }

    /// Writes the list to `path` atomically (it is public: mode 0644).
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut json = serde_json::to_string_pretty(self)?;
        json.push('\n');
        let mut file = tempfile::Builder::new()
            .prefix(".hufu-")
            .suffix(".tmp")
            .tempfile_in(dir)
            .with_context(|| format!("cannot write in {}", dir.display()))?;
        std::io::Write::write_all(&mut file, json.as_bytes())?;
        file.as_file().sync_all()?;
        std::fs::set_permissions(
            file.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )?;
        file.persist(path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    }

    /// Adds `entry` unless its serial is already revoked; returns whether
    /// it was added.
    pub fn add(&mut self, entry: Revoked) -> bool {
        if self.revoked.iter().any(|r| r.serial == entry.serial) {
            return false;
        }
        self.revoked.push(entry);
        true
    }

    /// The revoked serials, sorted.
    pub fn serials(&self) -> Vec<String> {
        let mut serials: Vec<String> = self.revoked.iter().map(|r| r.serial.clone()).collect();
        serials.sort();
        serials.dedup();
        serials
    }
}

/// Puts the list at `path` in force at this node, if it changed: refuses
/// the certificates at once and publishes the serials to peers.
pub fn reload(standing: &Standing, codes: &Codes, path: &Path) -> anyhow::Result<()> {
    let list = RevocationList::load(path)?;
    if standing.set_revoked(standing.own(), list.serials()) {
        tracing::warn!(
            revoked = list.revoked.len(),
            file = %path.display(),
            "certificate revocation list put in force"
        );
        codes.publish_own_keys();
    }
    Ok(())
}

/// Watches the list at `path` until `stop`, reloading it when its size or
/// modification time changes. A broken file keeps the list in force.
pub async fn watch(
    standing: Arc<Standing>,
    codes: Arc<Codes>,
    path: std::path::PathBuf,
    stop: CancellationToken,
) {
    let stamp = |path: &Path| -> Option<(SystemTime, u64)> {
        let meta = std::fs::metadata(path).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    };
    let mut seen = stamp(&path);
    let mut tick = tokio::time::interval(WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = stamp(&path);
        if now == seen {
            continue;
        }
        seen = now;
        if let Err(err) = reload(&standing, &codes, &path) {
            tracing::error!(error = %format!("{err:#}"), "revocation list not reloaded; the previous one stays in force");
        }
    }
}
