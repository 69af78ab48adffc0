//! The agent's configuration: read once from a TOML file and flags into checked types.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use drover_protocol::job::Limits;
use drover_protocol::keys::PublicKey;
use drover_protocol::link::BrokerUrl;
use drover_protocol::manifest::{Capabilities, NetAddr, is_clean_absolute};
use serde::Deserialize;

use crate::sandbox::exec::ANY_PROGRAM;

/// The configuration file, as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// The agent's id.
    pub id: Option<String>,
    /// `mqtt://host:port` or `mqtts://host:port`.
    pub broker: Option<String>,
    /// CA certificates (PEM) for `mqtts://`.
    pub ca_file: Option<PathBuf>,
    /// MQTT username; defaults to the id.
    pub username: Option<String>,
    /// MQTT password.
    pub password: Option<String>,
    /// A file holding the MQTT password.
    pub password_file: Option<PathBuf>,
    /// Where the agent keeps its caches and state.
    pub data_dir: Option<PathBuf>,
    /// MQTT keep-alive, seconds.
    pub keep_alive_secs: Option<u64>,
    /// Plugin fetch chunk size, bytes.
    pub chunk_size: Option<u32>,
    /// Largest plugin the agent downloads, bytes.
    pub max_plugin_bytes: Option<u64>,
    /// Jobs run at once.
    pub max_concurrent_jobs: Option<usize>,
    /// Jobs waiting to run; past this, new jobs are refused as busy.
    pub job_queue: Option<usize>,
    /// Tags announced to the server.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Keys the agent trusts. Filled in by enrollment when absent.
    #[serde(default)]
    pub trust: TrustFile,
    /// How to enroll on first start, when the agent has not enrolled yet.
    pub enroll: Option<crate::identity::EnrollSettings>,
    /// What plugins may be granted.
    #[serde(default)]
    pub policy: PolicyFile,
    /// Upper bounds on job limits.
    #[serde(default)]
    pub limits: LimitsFile,
}

/// `[trust]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustFile {
    /// Root public keys (hex): they sign the key set, which names the publisher and
    /// control-plane keys.
    #[serde(default)]
    pub roots: Vec<String>,
    /// How many distinct roots must sign the first key set (default 1).
    pub root_threshold: Option<u32>,
    /// The first key set, as the server issued it; later ones arrive over MQTT and are
    /// kept in the data directory.
    pub keyset_file: Option<PathBuf>,
}

/// `[policy]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// Whether plugins may be granted `host-facts`.
    #[serde(default)]
    pub host_facts: bool,
    /// Directories plugins may be granted read-only access to (and anything below them).
    #[serde(default)]
    pub read_paths: Vec<PathBuf>,
    /// Programs plugins may be granted to run: exact absolute paths, or `"*"` for any
    /// program (which also lets a plugin ask for `"*"` itself).
    #[serde(default)]
    pub exec: Vec<String>,
    /// `host:port` addresses plugins may be granted TCP connections to.
    #[serde(default)]
    pub network: Vec<String>,
    /// Whether plugins may be granted job parameters; `true` when absent, since the
    /// values come from the signed job.
    pub parameters: Option<bool>,
    /// Users that granted programs may be run as, by name (such as `"nobody"`). Empty
    /// when absent: programs run as the agent's own user.
    #[serde(default)]
    pub run_as: Vec<String>,
}

impl PolicyFile {
    /// Checks the exec, network and run-as entries and builds the policy. (`read_paths`
    /// are checked by [`Config::from_file`].)
    fn check(self) -> anyhow::Result<Policy> {
        for p in &self.exec {
            if p != ANY_PROGRAM && !is_clean_absolute(p) {
                bail!(
                    "policy.exec entry {p:?} must be an absolute program path, without '.', '..' or '//', or \"*\" for any program"
                );
            }
        }
        for u in &self.run_as {
            if u.is_empty() || u.contains(['/', ':', '\0']) {
                bail!("policy.run_as entry {u:?} must be a user name, without '/', ':' or NUL");
            }
        }
        let network = self
            .network
            .iter()
            .map(|a| {
                a.parse::<NetAddr>()
                    .map_err(|e| anyhow::anyhow!("policy.network: {e}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Policy {
            host_facts: self.host_facts,
            read_paths: self.read_paths,
            exec: self.exec,
            network,
            parameters: self.parameters.unwrap_or(true),
            run_as: self.run_as,
        })
    }
}

/// `[limits]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    /// Longest deadline, seconds.
    pub timeout_secs: Option<u64>,
    /// Largest plugin memory, MiB.
    pub memory_mib: Option<u64>,
    /// Largest output per stream, KiB.
    pub output_kib: Option<u64>,
}

/// What the agent's local policy allows a plugin.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// `host-facts` may be granted.
    pub host_facts: bool,
    /// Read-only paths that may be granted, normalised and absolute.
    pub read_paths: Vec<PathBuf>,
    /// Programs that may be granted, as exact absolute paths; [`ANY_PROGRAM`] allows
    /// any program, and asking for [`ANY_PROGRAM`] itself.
    pub exec: Vec<String>,
    /// `host:port` addresses that may be granted.
    pub network: Vec<NetAddr>,
    /// Whether job parameters may be granted.
    pub parameters: bool,
    /// Users a granted program may be run as, by name.
    pub run_as: Vec<String>,
}

impl Policy {
    /// Grants what `asked` asks for if all of it is allowed; otherwise lists what is not,
    /// in the form [`Capabilities::describe`] uses.
    pub fn grant(&self, asked: &Capabilities) -> Result<Capabilities, Vec<String>> {
        let mut missing = Vec::new();
        if asked.host_facts && !self.host_facts {
            missing.push("host-facts".to_string());
        }
        for p in &asked.read_paths {
            let path = Path::new(p);
            let allowed = is_normal_absolute(path)
                && self.read_paths.iter().any(|root| path.starts_with(root));
            if !allowed {
                missing.push(format!("read:{p}"));
            }
        }
        let any_program = self.exec.iter().any(|e| e == ANY_PROGRAM);
        for p in &asked.exec {
            // Exact paths only, or `*` on both sides: a directory entry would let a plugin
            // pick any program in it, which only `*` may grant, knowingly.
            let allowed = if p == ANY_PROGRAM {
                any_program
            } else {
                is_clean_absolute(p) && (any_program || self.exec.iter().any(|e| e == p))
            };
            if !allowed {
                missing.push(format!("exec:{p}"));
            }
        }
        for a in &asked.network {
            let allowed = a
                .parse::<NetAddr>()
                .is_ok_and(|addr| self.network.contains(&addr));
            if !allowed {
                missing.push(format!("net:{a}"));
            }
        }
        if !self.parameters {
            for n in &asked.parameters {
                missing.push(format!("param:{n}"));
            }
        }
        if missing.is_empty() {
            Ok(asked.clone())
        } else {
            Err(missing)
        }
    }

    /// The `read_paths` entry a granted read path lies at or below: the longest, so a
    /// link the operator wrote in a longer entry is followed (they named it). The rest
    /// of the path is opened without following links (`sandbox::host_dir`).
    pub fn read_root(&self, path: &str) -> Option<&Path> {
        let path = Path::new(path);
        self.read_paths
            .iter()
            .filter(|root| path.starts_with(root))
            .max_by_key(|root| root.components().count())
            .map(PathBuf::as_path)
    }
}

fn is_normal_absolute(p: &Path) -> bool {
    p.is_absolute()
        && p.components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}

/// The checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The agent's id.
    pub id: String,
    /// The broker; from enrollment when not configured.
    pub broker: Option<BrokerUrl>,
    /// CA file for TLS.
    pub ca_file: Option<PathBuf>,
    /// MQTT username.
    pub username: String,
    /// MQTT password.
    pub password: Option<String>,
    /// State and caches.
    pub data_dir: PathBuf,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
    /// Fetch chunk size.
    pub chunk_size: u32,
    /// Largest plugin.
    pub max_plugin_bytes: u64,
    /// Jobs at once.
    pub max_concurrent_jobs: usize,
    /// Jobs waiting.
    pub job_queue: usize,
    /// Tags.
    pub tags: BTreeMap<String, String>,
    /// Enrollment settings for a first start.
    pub enroll: Option<crate::identity::EnrollSettings>,
    /// Root keys anchoring the key set; from enrollment when empty.
    pub roots: Vec<PublicKey>,
    /// Distinct roots needed on the first key set.
    pub root_threshold: u32,
    /// The first key set.
    pub keyset_file: Option<PathBuf>,
    /// Local policy.
    pub policy: Policy,
    /// Upper bounds on job limits.
    pub max_limits: Limits,
}

/// Flags that override the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--id`.
    pub id: Option<String>,
    /// `--broker`.
    pub broker: Option<String>,
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--password-file`.
    pub password_file: Option<PathBuf>,
    /// `--tag k=v`.
    pub tags: Vec<(String, String)>,
}

impl Config {
    /// Reads the file (if any), applies the overrides, and checks everything.
    pub fn load(path: Option<&Path>, o: Overrides) -> anyhow::Result<Config> {
        let file: ConfigFile = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading config {}", p.display()))?;
                toml::from_str(&text).with_context(|| format!("parsing config {}", p.display()))?
            }
            None => ConfigFile::default(),
        };
        Config::from_file(file, o)
    }

    /// Checks a parsed file with overrides applied.
    pub fn from_file(file: ConfigFile, o: Overrides) -> anyhow::Result<Config> {
        let id =
            o.id.or(file.id)
                .context("no agent id: set `id` in the config file or pass --id")?;
        if !drover_protocol::topics::is_valid_agent_id(&id) {
            bail!("agent id {id:?} is invalid: use 1-64 characters of A-Z a-z 0-9 . _ -");
        }
        let broker: Option<BrokerUrl> = o
            .broker
            .or(file.broker)
            .map(|b| b.parse())
            .transpose()
            .map_err(anyhow::Error::msg)?;
        let password = match o.password_file.or(file.password_file) {
            Some(p) => Some(
                std::fs::read_to_string(&p)
                    .with_context(|| format!("reading password file {}", p.display()))?
                    .trim()
                    .to_string(),
            ),
            None => file.password,
        };
        let parse_keys = |keys: &[String], what: &str| -> anyhow::Result<Vec<PublicKey>> {
            keys.iter()
                .map(|k| PublicKey::from_hex(k).with_context(|| format!("bad {what} key {k:?}")))
                .collect()
        };
        let roots = parse_keys(&file.trust.roots, "trust.roots")?;
        for p in &file.policy.read_paths {
            if !is_normal_absolute(p) {
                bail!(
                    "policy.read_paths entry {} must be absolute, without '.' or '..'",
                    p.display()
                );
            }
        }
        let policy = file.policy.check()?;
        let mut tags = file.tags;
        tags.extend(o.tags);
        let chunk_size = file
            .chunk_size
            .unwrap_or(drover_protocol::chunk::DEFAULT_CHUNK_SIZE);
        if !(drover_protocol::chunk::MIN_CHUNK_SIZE..=drover_protocol::chunk::MAX_CHUNK_SIZE)
            .contains(&chunk_size)
        {
            bail!("chunk_size {chunk_size} is outside 1 KiB..1 MiB");
        }
        if let Some(k) = file.limits.output_kib
            && !(1..=1024).contains(&k)
        {
            // Two streams of this, escaped in JSON, must fit in one 16 MiB message.
            bail!("limits.output_kib {k} is outside 1..1024: a result must fit in one message");
        }
        let default = Limits::default();
        Ok(Config {
            username: file.username.unwrap_or_else(|| id.clone()),
            id,
            broker,
            ca_file: file.ca_file,
            password,
            data_dir: o
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("/var/lib/drover-agent")),
            keep_alive: Duration::from_secs(file.keep_alive_secs.unwrap_or(15).max(5)),
            chunk_size,
            max_plugin_bytes: file.max_plugin_bytes.unwrap_or(64 << 20),
            max_concurrent_jobs: file.max_concurrent_jobs.unwrap_or(4).max(1),
            job_queue: file.job_queue.unwrap_or(64).max(1),
            tags,
            enroll: file.enroll,
            roots,
            root_threshold: file.trust.root_threshold.unwrap_or(1).max(1),
            keyset_file: file.trust.keyset_file,
            policy,
            max_limits: Limits {
                timeout_ms: file
                    .limits
                    .timeout_secs
                    .map(|s| s * 1000)
                    .unwrap_or(10 * default.timeout_ms),
                memory_bytes: file
                    .limits
                    .memory_mib
                    .map(|m| m << 20)
                    .unwrap_or(2 * default.memory_bytes),
                output_bytes: file
                    .limits
                    .output_kib
                    .map(|k| k << 10)
                    .unwrap_or(default.output_bytes),
            },
        })
    }

    /// The job's limits, clamped to this agent's maxima.
    pub fn clamp(&self, asked: Limits) -> Limits {
        Limits {
            timeout_ms: asked.timeout_ms.min(self.max_limits.timeout_ms).max(1),
            memory_bytes: asked.memory_bytes.min(self.max_limits.memory_bytes),
            output_bytes: asked.output_bytes.min(self.max_limits.output_bytes),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_grants_only_what_is_allowed_and_names_the_rest() {
        let policy = Policy {
            host_facts: false,
            read_paths: vec![PathBuf::from("/var/lib/dpkg")],
            ..Policy::default()
        };
        let ok = Capabilities {
            host_facts: false,
            read_paths: vec!["/var/lib/dpkg".into(), "/var/lib/dpkg/info".into()],
            ..Capabilities::default()
        };
        assert_eq!(policy.grant(&ok).unwrap(), ok);
        let bad = Capabilities {
            host_facts: true,
            read_paths: vec![
                "/etc".into(),
                "/var/lib/dpkg/../../../etc".into(),
                "/var/lib/dpkgx".into(),
            ],
            ..Capabilities::default()
        };
        assert_eq!(
            policy.grant(&bad).unwrap_err(),
            vec![
                "host-facts",
                "read:/etc",
                "read:/var/lib/dpkg/../../../etc",
                "read:/var/lib/dpkgx"
            ]
        );
    }

    /// The policy a `[policy]` section (without its header) gives.
    fn policy_of(section: &str) -> anyhow::Result<Policy> {
        toml::from_str::<PolicyFile>(section)?.check()
    }

    #[test]
    fn exec_network_and_parameters_are_intersected_with_policy() {
        let policy = policy_of(
            r#"exec = ["/usr/bin/uptime", "/bin/echo"]
network = ["127.0.0.1:8080", "DB.example:5432", "[::1]:443"]"#,
        )
        .unwrap();
        assert!(policy.parameters, "parameters are allowed when not set");
        let ok = Capabilities {
            exec: vec!["/bin/echo".into()],
            network: vec![
                "db.example:5432".into(),
                "127.0.0.1:8080".into(),
                "[0:0:0:0:0:0:0:1]:443".into(),
            ],
            parameters: vec!["token".into()],
            ..Capabilities::default()
        };
        assert_eq!(policy.grant(&ok).unwrap(), ok);

        let bad = Capabilities {
            exec: vec![
                "/bin/sh".into(),
                // Exact paths: neither another spelling nor a directory prefix counts.
                "/usr/bin/../bin/uptime".into(),
                "/usr/bin".into(),
                "/usr/bin/uptime/x".into(),
                "/usr/bin/uptime".into(),
            ],
            network: vec![
                "127.0.0.1:8081".into(),
                "127.0.0.2:8080".into(),
                "localhost:8080".into(),
                "db.example:5433".into(),
                "not an address".into(),
                "127.0.0.1:8080".into(),
            ],
            ..Capabilities::default()
        };
        assert_eq!(
            policy.grant(&bad).unwrap_err(),
            vec![
                "exec:/bin/sh",
                "exec:/usr/bin/../bin/uptime",
                "exec:/usr/bin",
                "exec:/usr/bin/uptime/x",
                "net:127.0.0.1:8081",
                "net:127.0.0.2:8080",
                "net:localhost:8080",
                "net:db.example:5433",
                "net:not an address",
            ]
        );

        // An empty policy allows none of it, and parameters can be turned off.
        let closed = policy_of("parameters = false").unwrap();
        let asks = Capabilities {
            exec: vec!["/bin/echo".into()],
            network: vec!["127.0.0.1:8080".into()],
            parameters: vec!["a".into(), "b".into()],
            ..Capabilities::default()
        };
        assert_eq!(
            closed.grant(&asks).unwrap_err(),
            vec!["exec:/bin/echo", "net:127.0.0.1:8080", "param:a", "param:b"]
        );
        assert!(closed.grant(&Capabilities::default()).is_ok());
    }

    #[test]
    fn any_program_is_granted_only_by_a_policy_that_lists_it() {
        let any = policy_of(r#"exec = ["*"]"#).unwrap();
        let star = Capabilities {
            exec: vec!["*".into()],
            ..Capabilities::default()
        };
        assert_eq!(any.grant(&star).unwrap(), star);
        // A policy with `*` also grants any specific program, but only a clean path.
        let specific = Capabilities {
            exec: vec!["/bin/sh".into(), "/opt/tool/bin/run".into()],
            ..Capabilities::default()
        };
        assert_eq!(any.grant(&specific).unwrap(), specific);
        let odd = Capabilities {
            exec: vec!["sh".into(), "/bin/../bin/sh".into(), "**".into()],
            ..Capabilities::default()
        };
        assert_eq!(
            any.grant(&odd).unwrap_err(),
            vec!["exec:sh", "exec:/bin/../bin/sh", "exec:**"]
        );

        // Listing every program a plugin might run is not the same as `*`.
        let exact = policy_of(r#"exec = ["/bin/sh", "/usr/bin/env"]"#).unwrap();
        assert_eq!(exact.grant(&star).unwrap_err(), vec!["exec:*"]);
        let both = Capabilities {
            exec: vec!["/bin/sh".into(), "*".into()],
            ..Capabilities::default()
        };
        assert_eq!(exact.grant(&both).unwrap_err(), vec!["exec:*"]);
        assert_eq!(Policy::default().grant(&star).unwrap_err(), vec!["exec:*"]);
    }

    #[test]
    fn run_as_users_are_read_and_checked() {
        assert!(policy_of("").unwrap().run_as.is_empty());
        let p = policy_of(r#"run_as = ["nobody", "deploy-bot", "svc.web"]"#).unwrap();
        assert_eq!(p.run_as, vec!["nobody", "deploy-bot", "svc.web"]);
        for bad in [r#""""#, r#""a/b""#, r#""a:b""#, r#""a\u0000""#] {
            let err = policy_of(&format!("run_as = [{bad}]")).unwrap_err();
            assert!(
                format!("{err:#}").contains("policy.run_as entry"),
                "{bad}: {err:#}"
            );
        }
        let err = policy_of(r#"run_as = "nobody""#).unwrap_err();
        assert!(format!("{err:#}").contains("run_as"), "{err:#}");
        let err = policy_of(r#"runas = ["nobody"]"#).unwrap_err();
        assert!(format!("{err:#}").contains("unknown field"), "{err:#}");
    }

    #[test]
    fn bad_policy_entries_are_config_errors() {
        for policy in [
            r#"exec = ["uptime"]"#,
            r#"exec = ["/usr/bin/../bin/sh"]"#,
            r#"exec = ["**"]"#,
            r#"network = ["127.0.0.1"]"#,
            r#"network = ["host:0"]"#,
            r#"run_as = ["x:y"]"#,
        ] {
            let err = policy_of(policy).unwrap_err();
            assert!(format!("{err:#}").contains("policy."), "{policy}: {err:#}");
        }
    }
}
