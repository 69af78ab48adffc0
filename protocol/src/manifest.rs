//! Plugin manifests: what a publisher signs about a component.

use serde::{Deserialize, Serialize};

use crate::signed::Signable;

/// The WIT world a plugin implements (see `wit/worlds.wit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum World {
    /// `inventory-collector`: returns typed inventory.
    InventoryCollector,
    /// `task`: JSON in, JSON out.
    Task,
    /// `command-runner`: a program or shell script in, its exit code and output out.
    CommandRunner,
}

impl World {
    /// The world's name in `wit/`.
    pub fn as_str(self) -> &'static str {
        match self {
            World::InventoryCollector => "inventory-collector",
            World::Task => "task",
            World::CommandRunner => "command-runner",
        }
    }
}

impl std::str::FromStr for World {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "inventory-collector" => Ok(World::InventoryCollector),
            "task" => Ok(World::Task),
            "command-runner" => Ok(World::CommandRunner),
            other => Err(format!(
                "unknown world {other:?}; expected inventory-collector, command-runner or task"
            )),
        }
    }
}

/// What a plugin asks to be granted. Everything absent is denied.
///
/// Unknown fields are an error, not ignored: a manifest asking for a capability this agent
/// does not know is refused rather than run with less than it expects.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Capabilities {
    /// The `host-facts` import returns facts instead of `none`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub host_facts: bool,
    /// Absolute host directories the plugin may read, mounted read-only at the same path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub read_paths: Vec<String>,
    /// Absolute paths of the programs the `process` import may run, exactly as the plugin
    /// will name them; `"*"` asks for any program given by an absolute path (granted only
    /// by an agent policy that lists `"*"` too).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exec: Vec<String>,
    /// `host:port` addresses the plugin may open TCP connections to; the host is an IP
    /// literal (IPv6 in brackets) or a DNS name. Without any, the plugin has no sockets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network: Vec<String>,
    /// Names of the job parameters the `parameters` import may return.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parameters: Vec<String>,
}

impl Capabilities {
    /// Whether nothing is asked for.
    pub fn is_empty(&self) -> bool {
        !self.host_facts
            && self.read_paths.is_empty()
            && self.exec.is_empty()
            && self.network.is_empty()
            && self.parameters.is_empty()
    }

    /// Human-readable list, for logs and errors.
    pub fn describe(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.host_facts {
            out.push("host-facts".to_string());
        }
        for p in &self.read_paths {
            out.push(format!("read:{p}"));
        }
        for p in &self.exec {
            out.push(format!("exec:{p}"));
        }
        for a in &self.network {
            out.push(format!("net:{a}"));
        }
        for n in &self.parameters {
            out.push(format!("param:{n}"));
        }
        out
    }
}

/// The host of a `host:port` network capability.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NetHost {
    /// An IP literal.
    Ip(std::net::IpAddr),
    /// A DNS name, lowercase, without a trailing dot.
    Name(String),
}

/// A parsed `host:port` network capability. `Display` gives its canonical form: a
/// lowercase name or an IP literal (IPv6 in brackets), then `:port`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NetAddr {
    /// Where.
    pub host: NetHost,
    /// Which port: 1–65535.
    pub port: u16,
}

impl std::str::FromStr for NetAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| format!("network address {s:?} {why}; expected HOST:PORT");
        if let Ok(sa) = s.parse::<std::net::SocketAddr>() {
            if sa.port() == 0 {
                return Err(bad("has a port outside 1-65535"));
            }
            return Ok(NetAddr {
                host: NetHost::Ip(sa.ip()),
                port: sa.port(),
            });
        }
        let (host, port) = s.rsplit_once(':').ok_or_else(|| bad("has no port"))?;
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad("has a port outside 1-65535"))?;
        let name = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        };
        if name.len() > 253 || !name.split('.').all(label_ok) {
            return Err(bad("has an invalid host (IPv6 literals go in brackets)"));
        }
        // All-numeric dotted labels are a malformed IPv4 literal, not a host name.
        if name
            .split('.')
            .all(|l| l.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(bad("has an invalid IP address"));
        }
        Ok(NetAddr {
            host: NetHost::Name(name),
            port,
        })
    }
}

impl std::fmt::Display for NetAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.host {
            NetHost::Ip(ip) => write!(f, "{}", std::net::SocketAddr::new(*ip, self.port)),
            NetHost::Name(n) => write!(f, "{n}:{}", self.port),
        }
    }
}

/// Parameter names are 1–64 characters of `[A-Za-z0-9_.-]`.
pub fn is_valid_parameter_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// A plugin manifest, as signed by a publisher key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Manifest {
    /// The plugin's name: 1–64 characters of `[a-z0-9-]`.
    pub name: String,
    /// Strictly increasing per name.
    pub version: u64,
    /// SHA-256 of the component, lowercase hex.
    pub sha256: String,
    /// The component's length in bytes.
    pub length: u64,
    /// The WIT world it implements.
    pub world: World,
    /// What it asks to be granted.
    #[serde(default)]
    pub capabilities: Capabilities,
    /// When it was signed, Unix seconds.
    pub issued_at: u64,
    /// After this (Unix seconds), agents refuse to install it.
    pub expires_at: u64,
}

impl Signable for Manifest {
    const CONTEXT: &'static str = "plugin-manifest-v1";
}

/// Plugin names are 1–64 characters of `[a-z0-9-]`, not starting with `-`.
pub fn is_valid_plugin_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// SHA-256 of `bytes` as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
}

impl Manifest {
    /// Checks the fields a signature cannot: name syntax, digest syntax, read and exec
    /// paths, network addresses, parameter names.
    pub fn validate(&self) -> Result<(), String> {
        if !is_valid_plugin_name(&self.name) {
            return Err(format!("invalid plugin name {:?}", self.name));
        }
        if self.sha256.len() != 64 || !self.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("sha256 must be 64 hex characters".into());
        }
        for p in &self.capabilities.read_paths {
            if !p.starts_with('/') || p.split('/').any(|c| c == "..") {
                return Err(format!(
                    "read path {p:?} must be absolute and must not contain '..'"
                ));
            }
        }
        for p in &self.capabilities.exec {
            if p != "*" && !is_clean_absolute(p) {
                return Err(format!(
                    "exec path {p:?} must be an absolute file path without '.', '..' or '//', or \"*\" for any program"
                ));
            }
        }
        for a in &self.capabilities.network {
            a.parse::<NetAddr>()?;
        }
        for n in &self.capabilities.parameters {
            if !is_valid_parameter_name(n) {
                return Err(format!(
                    "parameter name {n:?} is invalid: use 1-64 characters of A-Z a-z 0-9 _ . -"
                ));
            }
        }
        Ok(())
    }
}

/// An absolute path naming a file: starts with `/`, and has no empty, `.` or `..`
/// components (so it does not end in `/` either). Such a path names one file exactly.
pub fn is_clean_absolute(p: &str) -> bool {
    p.len() > 1
        && p.starts_with('/')
        && p[1..]
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
        && !p.contains('\0')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_capabilities_are_refused() {
        let err = serde_json::from_str::<Capabilities>(r#"{"raw_sockets":true}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn new_capabilities_round_trip_and_describe() {
        let caps = Capabilities {
            host_facts: false,
            read_paths: vec![],
            exec: vec!["/usr/bin/uptime".into()],
            network: vec!["db.example:5432".into()],
            parameters: vec!["token".into()],
        };
        assert!(!caps.is_empty());
        let json = serde_json::to_string(&caps).unwrap();
        assert_eq!(
            json,
            r#"{"exec":["/usr/bin/uptime"],"network":["db.example:5432"],"parameters":["token"]}"#
        );
        assert_eq!(serde_json::from_str::<Capabilities>(&json).unwrap(), caps);
        assert_eq!(
            caps.describe(),
            vec!["exec:/usr/bin/uptime", "net:db.example:5432", "param:token"]
        );
        // Absent fields stay absent, so older manifests verify unchanged.
        assert_eq!(
            serde_json::to_string(&Capabilities::default()).unwrap(),
            "{}"
        );
        assert!(Capabilities::default().is_empty());
    }

    #[test]
    fn network_addresses_parse() {
        let ok = |s: &str| s.parse::<NetAddr>().unwrap();
        assert_eq!(
            ok("127.0.0.1:8080"),
            NetAddr {
                host: NetHost::Ip([127, 0, 0, 1].into()),
                port: 8080
            }
        );
        assert_eq!(ok("[::1]:443").to_string(), "[::1]:443");
        assert_eq!(
            ok("DB.Example.COM.:5432").to_string(),
            "db.example.com:5432"
        );
        assert_eq!(ok("localhost:65535").port, 65535);
        for bad in [
            "127.0.0.1",
            "127.0.0.1:0",
            "127.0.0.1:65536",
            "host:-1",
            "host:",
            ":80",
            "::1:443",
            "a..b:80",
            "-a.b:80",
            "a b:80",
            "999.1.1.1:80",
            "http://x:80",
        ] {
            assert!(bad.parse::<NetAddr>().is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn validate_checks_exec_network_and_parameters() {
        let mut m = Manifest {
            name: "runner".into(),
            version: 1,
            sha256: "b".repeat(64),
            length: 1,
            world: World::Task,
            capabilities: Capabilities {
                exec: vec!["/usr/bin/uptime".into(), "/bin/echo".into()],
                network: vec!["127.0.0.1:80".into(), "example.org:443".into()],
                parameters: vec!["api-token".into(), "region_1.name".into()],
                ..Capabilities::default()
            },
            issued_at: 0,
            expires_at: 1,
        };
        assert!(m.validate().is_ok(), "{:?}", m.validate());
        for bad in [
            "uptime",
            "/usr/bin/../bin/sh",
            "/usr/./bin/sh",
            "/usr//bin/sh",
            "/usr/bin/",
            "/",
            "",
            "**",
            " *",
        ] {
            m.capabilities.exec = vec![bad.into()];
            let err = m.validate().unwrap_err();
            assert!(err.contains("exec path"), "{bad}: {err}");
        }
        // Any program: the agent's policy decides whether to grant it.
        m.capabilities.exec = vec!["*".into()];
        assert!(m.validate().is_ok(), "{:?}", m.validate());
        m.capabilities.exec.clear();
        for bad in ["127.0.0.1", "127.0.0.1:0", "host:99999"] {
            m.capabilities.network = vec![bad.into()];
            let err = m.validate().unwrap_err();
            assert!(err.contains("network address"), "{bad}: {err}");
        }
        m.capabilities.network.clear();
        for bad in ["", "a/b", "with space", &"x".repeat(65)] {
            m.capabilities.parameters = vec![bad.into()];
            let err = m.validate().unwrap_err();
            assert!(err.contains("parameter name"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn validate_refuses_bad_fields() {
        let mut m = Manifest {
            name: "inventory".into(),
            version: 1,
            sha256: "a".repeat(64),
            length: 1,
            world: World::Task,
            capabilities: Capabilities::default(),
            issued_at: 0,
            expires_at: 1,
        };
        assert!(m.validate().is_ok());
        m.capabilities.read_paths = vec!["/var/../etc".into()];
        assert!(m.validate().is_err());
        m.capabilities.read_paths = vec!["etc".into()];
        assert!(m.validate().is_err());
        m.capabilities.read_paths.clear();
        m.name = "Bad/Name".into();
        assert!(m.validate().is_err());
    }
}
