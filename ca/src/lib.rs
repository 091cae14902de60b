//! Lanyard's control plane: a private CA (root + intermediate) that issues
//! short-lived service certificates into cert dirs.

pub mod acme;
pub mod acme_server;
pub mod allow;
pub mod authority;
pub mod compose;
pub mod doctor;
pub mod enrol;
pub mod error;
pub mod inspect;
pub mod issue;
pub mod keys;
pub mod mirror;
pub mod ops;
pub mod rotation;
pub mod serve;
pub mod state;
pub mod store;
pub mod token;

pub use error::CaError;
