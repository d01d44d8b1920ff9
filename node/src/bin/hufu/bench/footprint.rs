//! Where a node's bytes on disk go (`hufu bench scale`): per sled tree and
//! kind of key, how many keys there are and the bytes of the keys and of
//! the values themselves, beside the bytes the files take. What is left
//! is sled's own: page headers, per-item framing, and the stale fragments
//! its log-structured segments keep until they are cleaned.

use crate::output::outln;
use std::collections::BTreeMap;
use std::path::Path;

/// Keys of one kind in one tree.
#[derive(Debug, Default, Clone)]
pub struct Part {
    pub count: u64,
    pub key_bytes: u64,
    pub value_bytes: u64,
}

/// A database's parts by tree and kind of key, and its files' size.
#[derive(Debug, Default, Clone)]
pub struct Footprint {
    pub parts: BTreeMap<(String, String), Part>,
    pub disk_bytes: u64,
    /// Allocated bytes by kind of file: sled's log (`db`), the values and
    /// pages it keeps in files of their own (`blobs`), its snapshots of the
    /// page table (`snap.*`), and the rest.
    pub files: BTreeMap<&'static str, u64>,
}

impl Footprint {
    /// Reads the sled database at `dir`, which no process may hold open.
    pub fn of(dir: &Path) -> anyhow::Result<Footprint> {
        let disk_bytes = super::scale::disk_bytes(dir);
        let mut files = BTreeMap::new();
        for entry in std::fs::read_dir(dir)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let file = match name.as_str() {
                "db" => "log",
                "blobs" => "blobs",
                n if n.starts_with("snap.") => "snapshot",
                _ => "other",
            };
            *files.entry(file).or_default() += super::scale::disk_bytes_of(&entry.path());
        }
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(64 << 20)
            .open()?;
        let mut parts = BTreeMap::new();
        for name in db.tree_names() {
            let tree_name = String::from_utf8_lossy(&name).into_owned();
            for item in db.open_tree(&name)?.iter() {
                let (k, v) = item?;
                let part: &mut Part = parts
                    .entry((tree_name.clone(), kind(&tree_name, &k)))
                    .or_default();
                part.count += 1;
                part.key_bytes += k.len() as u64;
                part.value_bytes += v.len() as u64;
            }
        }
        Ok(Footprint {
            parts,
            disk_bytes,
            files,
        })
    }

    /// Prints the parts per holder of `holders`, then what sled adds.
    pub fn print(&self, what: &str, holders: u64) {
        let per = |b: u64| b as f64 / holders as f64;
        outln!(
            "{what}: {:.1} bytes/holder on disk\n  {:<12} {:<10} {:>10} {:>12} {:>14} {:>12}",
            per(self.disk_bytes),
            "tree",
            "keys",
            "count",
            "bytes/key",
            "bytes/value",
            "per holder"
        );
        let mut logical = 0;
        for ((tree, kind), p) in &self.parts {
            let bytes = p.key_bytes + p.value_bytes;
            logical += bytes;
            outln!(
                "  {tree:<12} {kind:<10} {:>10} {:>12.1} {:>14.1} {:>12.1}",
                p.count,
                p.key_bytes as f64 / p.count.max(1) as f64,
                p.value_bytes as f64 / p.count.max(1) as f64,
                per(bytes)
            );
        }
        outln!(
            "  keys and values {:.1} bytes/holder; sled's own {:.1} bytes/holder",
            per(logical),
            per(self.disk_bytes.saturating_sub(logical))
        );
        let files: Vec<String> = self
            .files
            .iter()
            .map(|(file, bytes)| format!("{file} {:.1}", per(*bytes)))
            .collect();
        outln!("  files, bytes/holder: {}", files.join(", "));
    }
}

/// The kind of a key: its prefix up to `/` in the audit log's trees
/// (`bundle/`, `hash/`, …), its first byte in the status store's (`S`,
/// `C`, …), whose keys go on in binary.
fn kind(tree: &str, key: &[u8]) -> String {
    let text_keys = tree == hufu_node::audit::LOG_TREE || tree == hufu_node::audit::WITNESS_TREE;
    match key.iter().position(|&b| b == b'/') {
        Some(end) if text_keys => String::from_utf8_lossy(&key[..=end]).into_owned(),
        _ => match key.first() {
            Some(b) if b.is_ascii_alphabetic() => char::from(*b).to_string(),
            _ => "other".into(),
        },
    }
}
