//! A typed view of docker-compose files and `ca inject`, the pure transform
//! that puts a Lanyard sidecar in front of every service.
//!
//! The model keeps every key of the input: the typed fields are read from
//! the document (interpolated), and the transform edits only the keys it
//! owns, so unknown keys and `x-` extensions pass through unchanged. The
//! output is written by [`yaml`], which quotes whatever YAML 1.1 and 1.2
//! readers would read differently.

pub mod error;
pub mod images;
pub mod inject;
pub mod interpolate;
pub mod model;
pub mod options;
pub mod stack;
pub mod yaml;

pub use error::ComposeError;
pub use inject::{inject, inject_with, Injected};
pub use model::{Compose, Project};
