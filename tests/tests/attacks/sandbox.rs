//! Attacks by hostile plugins and manifests on the agent's sandbox.

#[allow(unused_imports)]
use super::super::support::*;
