//! `parameters`: the job parameters a plugin was granted by name. Values are never
//! logged.

use std::collections::BTreeMap;

use super::{Host, v0_1, v0_2};

/// The values of the parameters named in `granted`, and no others.
pub fn granted(all: &BTreeMap<String, String>, granted: &[String]) -> BTreeMap<String, String> {
    granted
        .iter()
        .filter_map(|name| Some((name.clone(), all.get(name)?.clone())))
        .collect()
}

impl v0_2::parameters::Host for Host {
    fn get(&mut self, name: String) -> Option<String> {
        self.parameters.get(&name).cloned()
    }
}

impl v0_1::parameters::Host for Host {
    fn get(&mut self, name: String) -> Option<String> {
        v0_2::parameters::Host::get(self, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use v0_2::parameters::Host as _;

    #[test]
    fn get_returns_only_granted_names_that_are_set() {
        let mut h = Host::for_test(
            &[],
            &[("region", "eu"), ("token", "s3cret"), ("other", "x")],
            &["region", "token", "unset"],
        );
        assert_eq!(h.get("region".into()).as_deref(), Some("eu"));
        assert_eq!(h.get("token".into()).as_deref(), Some("s3cret"));
        assert_eq!(h.get("other".into()), None, "set but not granted");
        assert_eq!(h.get("unset".into()), None, "granted but not set");
        assert_eq!(h.parameters.len(), 2, "only granted values are kept");
        assert_eq!(
            v0_1::parameters::Host::get(&mut h, "region".into()).as_deref(),
            Some("eu")
        );
        let mut none = Host::for_test(&[], &[("region", "eu")], &[]);
        assert_eq!(none.get("region".into()), None);
    }
}
