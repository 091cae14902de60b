//! Errors that name the file, service and key at fault.

/// Why a compose file could not be read or injected.
#[derive(Debug, thiserror::Error)]
pub enum ComposeError {
    /// The text is not YAML, or not a compose file at all.
    #[error("{origin}: {message}")]
    Syntax {
        /// The file.
        origin: String,
        /// What is wrong.
        message: String,
    },
    /// A service key has a value this tool cannot use.
    #[error("service {service}{}: {message}", if key.is_empty() { String::new() } else { format!(", key {key}") })]
    Service {
        /// The service.
        service: String,
        /// The key, such as `ports[1]` or `x-lanyard.allow`; empty for the service as a whole.
        key: String,
        /// What is wrong and what to do.
        message: String,
    },
    /// A top-level key has a value this tool cannot use.
    #[error("top-level key {key}: {message}")]
    Top {
        /// The key, such as `x-lanyard.ttl`.
        key: String,
        /// What is wrong and what to do.
        message: String,
    },
}

impl ComposeError {
    pub(crate) fn service(service: &str, key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Service { service: service.to_owned(), key: key.into(), message: message.into() }
    }

    pub(crate) fn top(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Top { key: key.into(), message: message.into() }
    }
}
