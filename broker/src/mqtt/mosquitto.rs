//! Configuration for Mosquitto as the external broker: password-file hashes, the ACL file
//! and the settings that make them hold (`drover broker acl --format mosquitto`).
//!
//! - **Password file**: Mosquitto 2.0's default hash, `$7$<iterations>$<salt>$<hash>`:
//!   PBKDF2-HMAC-SHA512 over the password, `iterations` = 101, a 12-byte random salt, a
//!   64-byte derived key, salt and key in standard base64 with padding. This is what
//!   `mosquitto_passwd` writes; the tests check both directions against the real tools.
//!   The store keeps only salted SHA-256 of agent passwords, so the Mosquitto hash of an
//!   agent's password is computed when its credential is minted and stored beside it.
//! - **ACL file**: the control plane reads and writes all of `drover/`; every agent may
//!   write only under its own `up/` and read only under its own `down/`, through
//!   `pattern` lines on `%u`, the authenticated username. Mosquitto's ACL file does not
//!   check SUBSCRIBE at all: a subscription to `#` is accepted, and the `read` rule is
//!   applied to every message before it is delivered, so nothing else arrives.
//! - **Settings**: `use_username_as_clientid true` replaces the client id with the
//!   username, so one agent cannot take over (and disconnect) another's session.
//!   Mosquitto cannot refuse retained publishes per topic, so an agent may retain
//!   messages under its own `up/` (see [`conf_snippet`]).

use std::num::NonZeroU32;

use anyhow::{Context as _, bail};
use base64::Engine as _;
use ring::pbkdf2;
use ring::rand::{SecureRandom as _, SystemRandom};

use super::auth::CONTROL_USER;
use drover_protocol::topics;

/// Mosquitto 2.0's hash type tag for PBKDF2-HMAC-SHA512.
const PBKDF2_SHA512_TAG: &str = "7";
/// `mosquitto_passwd`'s default iteration count.
pub const ITERATIONS: u32 = 101;
/// `mosquitto_passwd`'s salt length, bytes.
const SALT_LEN: usize = 12;
/// SHA-512's output length: the derived key's length, bytes.
const HASH_LEN: usize = 64;

/// The file names `drover broker acl` writes.
pub const PASSWD_FILE: &str = "passwd";
/// See [`PASSWD_FILE`].
pub const ACL_FILE: &str = "acl";
/// See [`PASSWD_FILE`].
pub const CONF_SNIPPET_FILE: &str = "mosquitto.conf.snippet";

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

fn derive(password: &[u8], salt: &[u8], iterations: NonZeroU32) -> [u8; HASH_LEN] {
    let mut out = [0u8; HASH_LEN];
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA512,
        iterations,
        salt,
        password,
        &mut out,
    );
    out
}

/// The Mosquitto password-file hash of `password` with a fresh random salt:
/// `$7$101$<base64 salt>$<base64 hash>`.
pub fn password_hash(password: &str) -> anyhow::Result<String> {
    let mut salt = [0u8; SALT_LEN];
    SystemRandom::new()
        .fill(&mut salt)
        .map_err(|_| anyhow::anyhow!("system random source failed"))?;
    Ok(password_hash_with_salt(password, &salt))
}

fn password_hash_with_salt(password: &str, salt: &[u8]) -> String {
    let iterations = NonZeroU32::new(ITERATIONS).expect("non-zero");
    let hash = derive(password.as_bytes(), salt, iterations);
    format!(
        "${PBKDF2_SHA512_TAG}${ITERATIONS}${}${}",
        b64().encode(salt),
        b64().encode(hash)
    )
}

/// Checks `password` against a `$7$...` hash as Mosquitto does (any iteration count).
pub fn verify(hash: &str, password: &str) -> anyhow::Result<bool> {
    let parts: Vec<&str> = hash.split('$').collect();
    let ["", tag, iterations, salt, expected] = parts[..] else {
        bail!("not a $7$<iterations>$<salt>$<hash> password hash");
    };
    if tag != PBKDF2_SHA512_TAG {
        bail!("hash type ${tag}$ is not PBKDF2-SHA512 ($7$)");
    }
    let iterations: NonZeroU32 = iterations
        .parse()
        .context("the iteration count is not a positive number")?;
    let salt = b64().decode(salt).context("the salt is not base64")?;
    let expected = b64().decode(expected).context("the hash is not base64")?;
    if expected.len() != HASH_LEN {
        bail!("the hash is {} bytes, not {HASH_LEN}", expected.len());
    }
    Ok(pbkdf2::verify(
        pbkdf2::PBKDF2_HMAC_SHA512,
        iterations,
        &salt,
        password.as_bytes(),
        &expected,
    )
    .is_ok())
}

/// One password-file line.
pub fn passwd_line(username: &str, hash: &str) -> String {
    format!("{username}:{hash}\n")
}

/// The ACL file: the control plane's rights, then every agent's, by pattern.
pub fn acl_file(control: bool) -> String {
    let root = topics::ROOT.split('/').next().unwrap_or(topics::ROOT);
    let agent = topics::agent_prefix("%u");
    let mut s = String::from(
        "# Drover's topic ACL for Mosquitto, written by `drover broker acl`.\n\
         # Mosquitto does not check SUBSCRIBE against this file; it checks `read` before\n\
         # delivering each message, so an agent receives only what is under its own down/.\n\n",
    );
    if control {
        s.push_str("# The control plane: everything under drover/.\n");
        s.push_str(&format!(
            "user {CONTROL_USER}\ntopic readwrite {root}/#\n\n"
        ));
    }
    s.push_str(
        "# Every agent (%u = its authenticated username = its id): publish only under\n\
         # its own up/, receive only under its own down/.\n",
    );
    s.push_str(&format!("pattern write {agent}up/#\n"));
    s.push_str(&format!("pattern read {agent}down/#\n"));
    s
}

/// The settings an operator adds to `mosquitto.conf`, with the written files' paths.
pub fn conf_snippet(passwd: &std::path::Path, acl: &std::path::Path) -> String {
    format!(
        "# Drover: add to mosquitto.conf (Mosquitto 2.0 or later), next to your listener.\n\
         # Written by `drover broker acl`; run it again (and send Mosquitto SIGHUP) after\n\
         # agents are added or deregistered.\n\
         #\n\
         # Every client must log in; the password file holds PBKDF2-SHA512 hashes.\n\
         allow_anonymous false\n\
         password_file {passwd}\n\
         acl_file {acl}\n\
         # The client id becomes the username: an agent cannot take over another's session.\n\
         use_username_as_clientid true\n\
         set_tcp_nodelay true\n\
         #\n\
         # Limitation: Mosquitto cannot refuse retained publishes per topic, so an agent may\n\
         # retain messages under its own up/ topics (the embedded broker lets it retain\n\
         # only its status). It still cannot publish (retained or not) under any down/\n\
         # topic, and agents never act on a retained job: envelopes are signed,\n\
         # addressed, time-limited and single-use.\n",
        passwd = passwd.display(),
        acl = acl.display(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Written by Mosquitto 2.0.11's `mosquitto_passwd -b FILE alice secret-pw`.
    const FROM_MOSQUITTO_PASSWD: &str = "alice:$7$101$LdSq4Zbs8f13DEU7$46cIPjQIE0xIAoLdmlaUmrcPIrVUPlIxkHAnpQCyeowX1DXDDPBwh6fflDiDh113du/OWprSQFs+MhXk7lfcRQ==";

    #[test]
    fn recomputes_a_hash_written_by_mosquitto_passwd() {
        let (user, hash) = FROM_MOSQUITTO_PASSWD.split_once(':').unwrap();
        assert_eq!(user, "alice");
        assert!(verify(hash, "secret-pw").unwrap());
        assert!(!verify(hash, "secret-pw2").unwrap());
        // Same salt, same password: byte for byte what mosquitto_passwd wrote.
        let salt = b64().decode(hash.split('$').nth(3).unwrap()).unwrap();
        assert_eq!(salt.len(), SALT_LEN);
        assert_eq!(password_hash_with_salt("secret-pw", &salt), hash);
    }

    #[test]
    fn fresh_hashes_have_mosquittos_shape() {
        let h = password_hash("pw").unwrap();
        let parts: Vec<&str> = h.split('$').collect();
        assert_eq!(parts[..3], ["", "7", "101"]);
        assert_eq!(b64().decode(parts[3]).unwrap().len(), 12);
        assert_eq!(b64().decode(parts[4]).unwrap().len(), 64);
        assert!(verify(&h, "pw").unwrap());
        assert_ne!(h, password_hash("pw").unwrap(), "salt is not random");
        assert!(verify("$6$abc$def", "pw").is_err());
        assert!(verify("nonsense", "pw").is_err());
    }

    #[test]
    fn acl_confines_agents_to_their_subtree() {
        let acl = acl_file(true);
        assert!(acl.contains("user drover-control\ntopic readwrite drover/#\n"));
        assert!(acl.contains("pattern write drover/v1/agents/%u/up/#\n"));
        assert!(acl.contains("pattern read drover/v1/agents/%u/down/#\n"));
        assert!(!acl_file(false).contains("user "));
    }
}
