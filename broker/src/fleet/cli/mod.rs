//! The fleet's CLI groups: `drover agents`, `drover activation`, and `drover broker
//! acl`, which gives an external broker the agents' logins.

pub mod activation;
pub mod agents;
pub mod broker_acl;
