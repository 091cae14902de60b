//! The control plane's typed errors.

use std::io;
use std::path::PathBuf;

use lanyard_sidecar::certdir::CertDirError;
use lanyard_sidecar::identity::NameError;

/// Everything the CA can refuse or fail at. Messages name the file, field or
/// value and say what to do.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// No CA exists at the state directory.
    #[error("no CA in {0}: run `ca init --state {0}` first")]
    NoCa(PathBuf),
    /// A CA already exists where `init` would write.
    #[error("a CA already exists in {0}; pass --force to replace it (its certificates will stop verifying)")]
    AlreadyExists(PathBuf),
    /// The state directory is not given.
    #[error("no state directory: pass --state DIR or set LANYARD_STATE")]
    NoStateDir,
    /// A state file is unreadable.
    #[error("cannot read {path}: {source}; check its permissions (it must be readable by the CA's user)")]
    ReadState {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// A state file could not be written.
    #[error("cannot write {path}: {source}")]
    WriteState {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// A state file is corrupt.
    #[error("{path} is corrupt: {what}; restore it from a backup or re-run `ca init --force`")]
    CorruptState {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// The root key is kept offline and an operation needs it.
    #[error("the root key is offline (created with --offline-root); this needs the root key")]
    RootOffline,
    /// A name given on the command line or in a CSR is invalid.
    #[error(transparent)]
    Name(#[from] NameError),
    /// The same name was requested twice.
    #[error("duplicate name {0:?}: give each name once")]
    DuplicateName(String),
    /// A DNS name lies outside the intermediate's name constraints.
    #[error("DNS name {name:?} is outside the CA's permitted names ({permitted}); choose a name under one of them")]
    NotPermitted {
        /// The name.
        name: String,
        /// The permitted suffixes.
        permitted: String,
    },
    /// The requested TTL outlives the intermediate.
    #[error("TTL {ttl} would end after the intermediate CA expires ({intermediate_not_after}); choose a TTL of at most {max}")]
    TtlTooLong {
        /// The requested TTL.
        ttl: String,
        /// When the intermediate expires.
        intermediate_not_after: String,
        /// The longest TTL that fits.
        max: String,
    },
    /// The intermediate CA has expired.
    #[error("the intermediate CA expired at {0}; re-run `ca init --force`")]
    IntermediateExpired(String),
    /// A CSR could not be read.
    #[error("CSR {path}: {what}")]
    Csr {
        /// The CSR file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// A CSR asks for a name this identity may not have.
    #[error("CSR {path} asks for {name:?}, which identity {identity:?} may not use; allowed: {allowed}")]
    CsrNameNotAllowed {
        /// The CSR file.
        path: PathBuf,
        /// The refused name.
        name: String,
        /// The identity being issued.
        identity: String,
        /// The names it may use.
        allowed: String,
    },
    /// Writing or reading a cert dir failed.
    #[error(transparent)]
    CertDir(#[from] CertDirError),
    /// The service configuration is invalid.
    #[error("config {origin}: {what}")]
    Config {
        /// The file or source.
        origin: String,
        /// What is wrong.
        what: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// A root-rotation step is not possible now; the message says why and what to do.
    #[error("root rotation: {0}")]
    Rotation(String),
    /// rcgen failed to build or sign a certificate.
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
}
