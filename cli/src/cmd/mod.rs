//! One module per subcommand.

pub mod admin;
pub mod agent;
pub mod bench;
pub mod broker;
pub mod business;
pub mod client;
pub mod demo;
pub mod edxml;
pub mod pki;
pub mod verify;
