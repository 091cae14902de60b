//! Compose model (see issue 6).
