//! The key set on disk: its first version, reading and checking it, storing it durably,
//! and making the next one.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use drover_protocol::keys::{PublicKey, SigningKey, load_public, public_path};
use drover_protocol::keyset::KeySet;
use drover_protocol::signed::Signed;

use crate::paths::DataDir;

/// `<path>.<suffix>` beside a file.
pub fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".");
    s.push(suffix);
    s.into()
}

/// Writes the first key set (version 1, signed by the root key) unless one exists.
/// Returns whether it was created.
pub fn ensure_initial(data: &DataDir) -> anyhow::Result<bool> {
    if data.keyset().exists() {
        return Ok(false);
    }
    let root = SigningKey::load(&data.root_key())?;
    let publisher = load_public(&public_path(&data.publisher_key()))?;
    let control = load_public(&public_path(&data.control_plane_key()))?;
    let ks = KeySet {
        version: 1,
        roots: vec![root.public()],
        root_threshold: 1,
        publishers: vec![publisher],
        publisher_threshold: 1,
        control_plane: vec![control],
        issued_at: drover_protocol::now_secs(),
    };
    ks.validate()?;
    store(data, &Signed::sign(&ks, &root))?;
    Ok(true)
}

/// Reads and checks the current key set (signed by its own roots).
pub fn load(data: &DataDir) -> anyhow::Result<(Signed<KeySet>, KeySet)> {
    let path = data.keyset();
    let signed: Signed<KeySet> = serde_json::from_slice(
        &std::fs::read(&path)
            .with_context(|| format!("reading {} (run `drover keygen`)", path.display()))?,
    )
    .with_context(|| format!("parsing {}", path.display()))?;
    let claimed = signed.unverified()?;
    let ks = signed
        .verify_threshold(&claimed.roots, claimed.root_threshold as usize)
        .with_context(|| format!("{} is not signed by its own roots", path.display()))?;
    Ok((signed, ks))
}

/// Replaces the stored key set, durably: agents may already hold it.
pub fn store(data: &DataDir, signed: &Signed<KeySet>) -> anyhow::Result<()> {
    let path = data.keyset();
    drover_protocol::durable::replace(&path, &serde_json::to_vec_pretty(signed)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// Changes to make in a rotation.
#[derive(Debug, Default, Clone)]
pub struct Rotation {
    /// Publisher keys to add.
    pub add_publishers: Vec<PublicKey>,
    /// Publisher keys to remove.
    pub remove_publishers: Vec<PublicKey>,
    /// The new publisher threshold.
    pub publisher_threshold: Option<u32>,
    /// Root keys to add.
    pub add_roots: Vec<PublicKey>,
    /// Root keys to remove.
    pub remove_roots: Vec<PublicKey>,
    /// The new root threshold.
    pub root_threshold: Option<u32>,
    /// Control-plane keys to add.
    pub add_control_plane: Vec<PublicKey>,
    /// Control-plane keys to remove.
    pub remove_control_plane: Vec<PublicKey>,
}

fn apply(list: &mut Vec<PublicKey>, add: &[PublicKey], remove: &[PublicKey]) {
    list.retain(|k| !remove.contains(k));
    for k in add {
        if !list.contains(k) {
            list.push(*k);
        }
    }
}

/// Makes the next key set from `current`, signed by `signers` (which must be enough of
/// the *current* roots), and checks it as an agent would.
pub fn rotate(
    current: &KeySet,
    change: &Rotation,
    signers: &[SigningKey],
) -> anyhow::Result<Signed<KeySet>> {
    let mut next = current.clone();
    next.version += 1;
    next.issued_at = drover_protocol::now_secs();
    apply(
        &mut next.publishers,
        &change.add_publishers,
        &change.remove_publishers,
    );
    apply(&mut next.roots, &change.add_roots, &change.remove_roots);
    apply(
        &mut next.control_plane,
        &change.add_control_plane,
        &change.remove_control_plane,
    );
    if let Some(t) = change.publisher_threshold {
        next.publisher_threshold = t;
    }
    if let Some(t) = change.root_threshold {
        next.root_threshold = t;
    }
    next.validate()?;
    let Some((first, rest)) = signers.split_first() else {
        bail!("a rotation must be signed by the current root keys (--sign-with)");
    };
    let mut signed = Signed::sign(&next, first);
    for k in rest {
        signed.add_signature(k);
    }
    current
        .verify_successor(&signed)
        .context("the new key set would be refused by agents")?;
    Ok(signed)
}

/// Parses a public key given as hex or as a `.pub` file.
pub fn parse_key(s: &str) -> Result<PublicKey, String> {
    if let Ok(k) = PublicKey::from_hex(s) {
        return Ok(k);
    }
    load_public(Path::new(s)).map_err(|e| format!("{s:?} is neither a hex key nor a key file: {e}"))
}
