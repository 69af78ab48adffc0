//! The agent's identity: keys made on the device, and what enrollment gave it.
//!
//! `identity/agent.key` (Ed25519) signs results, announcements and heartbeats;
//! `identity/sealing.key` (X25519) opens secrets sealed to this agent. Both are created
//! here, mode 0600, and never sent anywhere: enrollment sends only their public halves.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use drover_protocol::durable;
use drover_protocol::enroll::{EnrollRequest, EnrollResponse};
use drover_protocol::keys::{PublicKey, SigningKey, write_private};
use drover_protocol::secret::AgentSecretKey;
use serde::{Deserialize, Serialize};

/// The agent's private keys.
#[derive(Debug)]
pub struct Identity {
    /// Signs what the agent sends.
    pub signing: SigningKey,
    /// Opens sealed secrets.
    pub sealing: AgentSecretKey,
}

/// What enrollment gave the agent, kept in `identity/enrollment.json` (mode 0600).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Enrollment {
    /// The agent's id.
    pub agent_id: String,
    /// The broker to dial.
    pub broker: String,
    /// MQTT username.
    pub username: String,
    /// MQTT password, when enrollment issued one.
    pub password: Option<String>,
    /// Root keys.
    pub roots: Vec<PublicKey>,
    /// Distinct roots that sign a key set.
    pub root_threshold: u32,
    /// The first key set, stored beside this file.
    pub keyset_file: PathBuf,
    /// Tags from the activation.
    pub tags: BTreeMap<String, String>,
}

/// `data_dir/identity`.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("identity")
}

impl Identity {
    /// Loads the keys, creating them on first use.
    pub fn load_or_create(data_dir: &Path) -> anyhow::Result<Identity> {
        let dir = dir(data_dir);
        std::fs::create_dir_all(&dir)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        }
        let signing_path = dir.join("agent.key");
        if !signing_path.exists() {
            SigningKey::generate().save(&signing_path)?;
        }
        let signing = SigningKey::load(&signing_path)?;
        let sealing_path = dir.join("sealing.key");
        if !sealing_path.exists() {
            let k = AgentSecretKey::generate();
            write_private(&sealing_path, hex::encode(k.to_bytes()).as_bytes())
                .with_context(|| format!("writing {}", sealing_path.display()))?;
        }
        let text = std::fs::read_to_string(&sealing_path)
            .with_context(|| format!("reading {}", sealing_path.display()))?;
        let bytes: [u8; 32] = hex::decode(text.trim())
            .ok()
            .and_then(|v| v.try_into().ok())
            .with_context(|| format!("{} is not a 32-byte hex key", sealing_path.display()))?;
        Ok(Identity {
            signing,
            sealing: AgentSecretKey::from_bytes(bytes),
        })
    }
}

impl Enrollment {
    /// The stored enrollment, if the agent has enrolled.
    pub fn load(data_dir: &Path) -> anyhow::Result<Option<Enrollment>> {
        let path = dir(data_dir).join("enrollment.json");
        match std::fs::read(&path) {
            Ok(b) => Ok(Some(
                serde_json::from_slice(&b)
                    .with_context(|| format!("parsing {}", path.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }
}

/// Where and how to enroll.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollSettings {
    /// The server's API, `http://HOST:PORT`.
    pub server: String,
    /// The activation id.
    pub activation_id: String,
    /// The activation code.
    pub code: String,
}

/// Enrolls this host as agent `agent_id` with the keys in `data_dir` (made there if
/// need be), as `drover-agent enroll` does. Blocking.
pub fn enroll_here(
    data_dir: &Path,
    agent_id: &str,
    settings: &EnrollSettings,
) -> anyhow::Result<Enrollment> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating data dir {}", data_dir.display()))?;
    let identity = Identity::load_or_create(data_dir)?;
    let hostname = crate::facts::HostFacts::gather().hostname;
    enroll(data_dir, settings, Some(agent_id), &identity, &hostname)
}

/// Enrolls with the server and stores the result. Blocking: call from a blocking
/// context.
pub fn enroll(
    data_dir: &Path,
    settings: &EnrollSettings,
    agent_id: Option<&str>,
    identity: &Identity,
    hostname: &str,
) -> anyhow::Result<Enrollment> {
    let req = EnrollRequest {
        activation_id: settings.activation_id.clone(),
        code: settings.code.clone(),
        agent_id: agent_id.map(str::to_string),
        signing_key: identity.signing.public(),
        sealing_key: hex::encode(identity.sealing.public()),
        hostname: hostname.to_string(),
    };
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .new_agent();
    let url = format!("{}/api/v1/enroll", settings.server.trim_end_matches('/'));
    let mut resp = agent
        .post(&url)
        .send_json(&req)
        .with_context(|| format!("enrolling: cannot reach {url}"))?;
    let status = resp.status();
    let text = resp
        .body_mut()
        .with_config()
        .limit(1 << 20)
        .read_to_string()
        .context("enrolling: reading the answer")?;
    if !status.is_success() {
        let msg = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or(text);
        bail!("enrollment refused: {msg} (HTTP {})", status.as_u16());
    }
    let r: EnrollResponse = serde_json::from_str(&text).context("enrolling: unexpected answer")?;
    if let Some(asked) = agent_id
        && asked != r.agent_id
    {
        bail!(
            "enrollment answered for agent {:?}, not {asked:?}",
            r.agent_id
        );
    }
    let dir = dir(data_dir);
    let keyset_file = dir.join("keyset-initial.json");
    durable::replace(&keyset_file, &serde_json::to_vec_pretty(&r.keyset)?)
        .with_context(|| format!("writing {}", keyset_file.display()))?;
    let e = Enrollment {
        agent_id: r.agent_id,
        broker: r.broker,
        username: r.username,
        password: r.password,
        roots: r.roots,
        root_threshold: r.root_threshold,
        keyset_file,
        tags: r.tags,
    };
    // It holds the broker password: the owner's alone.
    let path = dir.join("enrollment.json");
    durable::replace_private(&path, &serde_json::to_vec_pretty(&e)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_made_once_and_kept_private() {
        let d = std::env::temp_dir().join(format!("drover-identity-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let a = Identity::load_or_create(&d).unwrap();
        let b = Identity::load_or_create(&d).unwrap();
        assert_eq!(a.signing.public(), b.signing.public());
        assert_eq!(a.sealing.public(), b.sealing.public());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            for f in ["agent.key", "sealing.key"] {
                let mode = std::fs::metadata(dir(&d).join(f))
                    .unwrap()
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o777, 0o600, "{f}");
            }
        }
        std::fs::remove_dir_all(&d).unwrap();
    }
}
