//! Lanyard's control plane: a private CA (root + intermediate) that issues
//! short-lived service certificates into cert dirs.

pub mod error;
pub mod inspect;
pub mod issue;
pub mod keys;
pub mod state;

pub use error::CaError;
