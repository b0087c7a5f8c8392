//! One module per subcommand.

pub mod admin;
pub mod agent;
pub mod broker;
pub mod client;
pub mod demo;
pub mod pki;
pub mod verify;
