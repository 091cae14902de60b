//! A typed view of docker-compose files and `ca inject`, the pure transform
//! that puts a Lanyard sidecar in front of every service.
//!
//! The model keeps every key of the input: the typed fields are read from
//! the document, and the transform edits only the keys it owns, so unknown
//! keys and `x-` extensions pass through unchanged.

pub mod error;
pub mod inject;
pub mod model;
pub mod options;

pub use error::ComposeError;
pub use inject::{inject, Injected};
pub use model::Compose;
