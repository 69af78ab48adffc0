//! Attacks on the server: by dishonest agents, anonymous network clients and a hostile
//! broker.

#[allow(unused_imports)]
use super::super::support::*;
