//! Which agents a job's targets name: `all`, `tag:KEY=VALUE`, or `id,id,...`. Tags are
//! the server's (from activations and operators); an agent's labels, what it says of
//! itself, never decide what it is sent.

use super::types::Agent;

/// Why targets name no agent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// The selector does not parse.
    #[error("target {0:?} must be tag:KEY=VALUE")]
    BadSelector(String),
    /// An id names no agent.
    #[error("agent {0:?} is unknown")]
    Unknown(String),
    /// An id names a deregistered agent.
    #[error("agent {0:?} is deregistered")]
    Deregistered(String),
    /// Nothing matches.
    #[error("no agents match targets {0:?}")]
    NoMatch(String),
}

/// The agent ids `selector` names among `agents`, deregistered ones never included.
pub fn resolve(selector: &str, agents: &[Agent]) -> Result<Vec<String>, TargetError> {
    let selector = selector.trim();
    let all = agents;
    let agents: Vec<&Agent> = all.iter().filter(|a| a.deregistered_ms.is_none()).collect();
    let ids: Vec<String> = if selector == "all" {
        agents.iter().map(|a| a.id.clone()).collect()
    } else if let Some(tag) = selector.strip_prefix("tag:") {
        let (k, v) = tag
            .split_once('=')
            .ok_or_else(|| TargetError::BadSelector(selector.to_string()))?;
        agents
            .iter()
            .filter(|a| a.tags.get(k).map(String::as_str) == Some(v))
            .map(|a| a.id.clone())
            .collect()
    } else {
        let mut ids = Vec::new();
        for id in selector.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if !agents.iter().any(|a| a.id == id) {
                return Err(if all.iter().any(|a| a.id == id) {
                    TargetError::Deregistered(id.to_string())
                } else {
                    TargetError::Unknown(id.to_string())
                });
            }
            if !ids.iter().any(|x| x == id) {
                ids.push(id.to_string());
            }
        }
        ids
    };
    if ids.is_empty() {
        return Err(TargetError::NoMatch(selector.to_string()));
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(id: &str, env: &str, deregistered: bool) -> Agent {
        Agent {
            id: id.into(),
            hostname: String::new(),
            os: String::new(),
            os_version: String::new(),
            arch: String::new(),
            agent_version: String::new(),
            tags: [("env".to_string(), env.to_string())].into(),
            labels: [("env".to_string(), "prod".to_string())].into(),
            online: true,
            first_seen_ms: 0,
            last_seen_ms: 0,
            status_changed_ms: 0,
            deregistered_ms: deregistered.then_some(1),
        }
    }

    #[test]
    fn targets_resolve_by_all_tag_and_id_and_skip_deregistered_agents() {
        let agents = [
            agent("a", "prod", false),
            agent("b", "dev", false),
            agent("gone", "prod", true),
        ];
        assert_eq!(resolve("all", &agents).unwrap(), ["a", "b"]);
        assert_eq!(resolve("tag:env=prod", &agents).unwrap(), ["a"]);
        assert_eq!(resolve("b, a,b", &agents).unwrap(), ["b", "a"]);
        let e = resolve("a,gone", &agents).unwrap_err().to_string();
        assert!(e.contains("deregistered"), "{e}");
        let e = resolve("nobody", &agents).unwrap_err().to_string();
        assert!(e.contains("unknown"), "{e}");
        assert!(resolve("tag:env=qa", &agents).is_err());
        assert!(resolve("tag:env", &agents).is_err());
    }
}
