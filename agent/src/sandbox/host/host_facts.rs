//! `host-facts`: what the agent knows about its host, for a plugin granted `host-facts`.

use super::{Host, v0_1, v0_2};
use crate::facts::HostFacts;

impl v0_2::host_facts::Host for Host {
    fn get(&mut self) -> Option<v0_2::host_facts::Facts> {
        let HostFacts {
            hostname,
            os_family,
            os_name,
            os_version,
            kernel_version,
            architecture,
            cpu_count,
            memory_total_bytes,
            uptime_seconds,
        } = self.facts.clone()?;
        Some(v0_2::host_facts::Facts {
            hostname,
            os_family,
            os_name,
            os_version,
            kernel_version,
            architecture,
            cpu_count,
            memory_total_bytes,
            uptime_seconds,
            agent_id: self.agent_id.clone(),
        })
    }
}

impl v0_1::host_facts::Host for Host {
    fn get(&mut self) -> Option<v0_1::host_facts::Facts> {
        let v0_2::host_facts::Facts {
            hostname,
            os_family,
            os_name,
            os_version,
            kernel_version,
            architecture,
            cpu_count,
            memory_total_bytes,
            uptime_seconds,
            agent_id,
        } = v0_2::host_facts::Host::get(self)?;
        Some(v0_1::host_facts::Facts {
            hostname,
            os_family,
            os_name,
            os_version,
            kernel_version,
            architecture,
            cpu_count,
            memory_total_bytes,
            uptime_seconds,
            agent_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_only_when_granted_at_both_versions() {
        let mut h = Host::for_test(&[], &[], &[]);
        assert!(v0_2::host_facts::Host::get(&mut h).is_none());
        assert!(v0_1::host_facts::Host::get(&mut h).is_none());
        h.facts = Some(HostFacts::gather());
        let now = v0_2::host_facts::Host::get(&mut h).unwrap();
        let old = v0_1::host_facts::Host::get(&mut h).unwrap();
        assert_eq!((now.hostname, now.agent_id), (old.hostname, old.agent_id));
    }
}
