//! A node's chain of trust lists on disk: `v000001.note`, `v000002.note`, …
//! in one directory, every version kept for auditors.
//!
//! The chain is re-verified from the genesis whenever the store is opened, so
//! a file altered on disk is caught before the node trusts anything. Each new
//! version is written to a temporary file, synced, and renamed into place
//! without replacing an existing file, then the directory is synced: a crash
//! leaves the chain as it was or one version longer, never a torn file.

use std::fs::{self, File, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::{SignedTrustList, TrustError};
use crate::note::MAX_NOTE_BYTES;

/// The chain of accepted trust lists of one node.
#[derive(Debug)]
pub struct TrustStore {
    dir: PathBuf,
    /// Version `i + 1` at index `i`; never empty.
    chain: Vec<SignedTrustList>,
}

impl TrustStore {
    /// Opens the store in `dir`, verifying the whole chain: the genesis
    /// signed by all founders, then each version by the threshold of the one
    /// before. A missing, altered or out-of-chain file is an error.
    pub fn open(dir: &Path) -> Result<TrustStore, TrustError> {
        let versions = note_files(dir)?;
        if versions.is_empty() {
            return Err(TrustError::StoreEmpty {
                dir: dir.to_owned(),
            });
        }
        let mut chain: Vec<SignedTrustList> = Vec::with_capacity(versions.len());
        for (index, &version) in versions.iter().enumerate() {
            let expected = index as u64 + 1;
            if version != expected {
                return Err(TrustError::MissingVersion {
                    dir: dir.to_owned(),
                    version: expected,
                });
            }
            let path = dir.join(file_name(version));
            let broken = |source: TrustError| TrustError::BrokenChain {
                path: path.clone(),
                source: Box::new(source),
            };
            let signed = SignedTrustList::parse(&read_note(&path)?).map_err(broken)?;
            if signed.list.version != version {
                return Err(broken(TrustError::MalformedList(format!(
                    "the file holds v{}",
                    signed.list.version
                ))));
            }
            match chain.last() {
                None => signed.verify_genesis(),
                Some(previous) => signed.verify_successor(&previous.list),
            }
            .map_err(broken)?;
            chain.push(signed);
        }
        Ok(TrustStore {
            dir: dir.to_owned(),
            chain,
        })
    }

    /// Creates the store in `dir` from a verified genesis. If `dir` already
    /// holds a chain starting with this very genesis, opens it instead, so a
    /// repeated `init` is harmless; any other chain is an error.
    pub fn init_genesis(dir: &Path, genesis: &SignedTrustList) -> Result<TrustStore, TrustError> {
        genesis.verify_genesis()?;
        fs::create_dir_all(dir).map_err(io_err("create trust store directory", dir))?;
        if !note_files(dir)?.is_empty() {
            let store = TrustStore::open(dir)?;
            if store.chain[0].list != genesis.list {
                return Err(TrustError::StoreExists {
                    dir: dir.to_owned(),
                    version: store.version(),
                });
            }
            return Ok(store);
        }
        write_note(dir, 1, genesis.note())?;
        tracing::info!(dir = %dir.display(), members = ?genesis.list.provinces(), "trust store created from genesis");
        Ok(TrustStore {
            dir: dir.to_owned(),
            chain: vec![genesis.clone()],
        })
    }

    /// The newest accepted version.
    pub fn current(&self) -> &SignedTrustList {
        // The chain always holds at least the genesis.
        &self.chain[self.chain.len() - 1]
    }

    /// The newest accepted version number.
    pub fn version(&self) -> u64 {
        self.current().list.version
    }

    /// Version `version`, if accepted.
    pub fn get(&self, version: u64) -> Option<&SignedTrustList> {
        let index = usize::try_from(version.checked_sub(1)?).ok()?;
        self.chain.get(index)
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Accepts `next` as the new current version if it is the valid successor
    /// of the current one, writing it to disk first. `Ok(false)` when `next`
    /// is the current version already (gossip repeats itself). Refusals are
    /// logged here, so callers need not.
    pub fn apply(&mut self, next: SignedTrustList) -> Result<bool, TrustError> {
        let offered = next.list.version;
        let result = self.try_apply(next);
        match &result {
            Ok(true) => {
                tracing::info!(
                    version = offered,
                    members = ?self.current().list.provinces(),
                    "trust list updated"
                );
            }
            Ok(false) => {}
            Err(error) => {
                tracing::warn!(offered, current = self.version(), %error, "trust list refused");
            }
        }
        result
    }

    fn try_apply(&mut self, next: SignedTrustList) -> Result<bool, TrustError> {
        let current = self.current();
        if next.list.version == current.list.version {
            // Same text, perhaps other signatures: nothing new to trust.
            if next.text() == current.text() {
                return Ok(false);
            }
            // Only a rival that is validly signed is evidence that members
            // signed two lists with one number; anything else is just invalid.
            match self.chain.len() {
                1 => next.verify_genesis()?,
                n => next.verify_successor(&self.chain[n - 2].list)?,
            }
            return Err(TrustError::Conflict {
                version: next.list.version,
            });
        }
        next.verify_successor(&current.list)?;
        write_note(&self.dir, next.list.version, next.note())?;
        self.chain.push(next);
        Ok(true)
    }
}

/// `v000001.note`: six digits keep a directory listing in version order.
fn file_name(version: u64) -> String {
    format!("v{version:06}.note")
}

/// Versions of the note files in `dir`, sorted. Other files (temporary
/// files of an interrupted write, an operator's notes) are ignored.
fn note_files(dir: &Path) -> Result<Vec<u64>, TrustError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("list trust store directory", dir)(e)),
    };
    let mut versions = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err("list trust store directory", dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let version = name
            .strip_prefix('v')
            .and_then(|n| n.strip_suffix(".note"))
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse::<u64>().ok());
        // Only the canonical spelling: "v1.note" next to "v000001.note"
        // would be two candidates for one version.
        if let Some(version) = version.filter(|&v| file_name(v) == name) {
            versions.push(version);
        }
    }
    versions.sort_unstable();
    Ok(versions)
}

/// Reads a note file, refusing one larger than any note before reading it.
fn read_note(path: &Path) -> Result<String, TrustError> {
    let file = File::open(path).map_err(io_err("open trust list", path))?;
    let mut text = String::new();
    // One byte over the limit is enough for parsing to refuse it.
    file.take(MAX_NOTE_BYTES as u64 + 1)
        .read_to_string(&mut text)
        .map_err(io_err("read trust list", path))?;
    Ok(text)
}

/// Writes version `version` durably; never replaces an existing file.
fn write_note(dir: &Path, version: u64, note: &str) -> Result<(), TrustError> {
    let path = dir.join(file_name(version));
    // Trust lists are public: readable by auditors and operators.
    let mut file = tempfile::Builder::new()
        .prefix(".tmp-")
        .suffix(".note")
        .permissions(Permissions::from_mode(0o644))
        .tempfile_in(dir)
        .map_err(io_err("create a temporary file in", dir))?;
    file.write_all(note.as_bytes())
        .and_then(|()| file.as_file().sync_all())
        .map_err(io_err("write", file.path()))?;
    file.persist_noclobber(&path).map_err(|e| {
        if e.error.kind() == io::ErrorKind::AlreadyExists {
            TrustError::StoreRace { path: path.clone() }
        } else {
            io_err("write", &path)(e.error)
        }
    })?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync trust store directory", dir))
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> TrustError + 'a {
    move |source| TrustError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}
