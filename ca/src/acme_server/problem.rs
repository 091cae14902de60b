//! ACME problem documents (RFC 8555 §6.7, RFC 7807).

use hyper::StatusCode;
use serde_json::{json, Value};

/// An error answered as `application/problem+json`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {detail}")]
pub struct Problem {
    /// The ACME error type after `urn:ietf:params:acme:error:`.
    pub kind: &'static str,
    /// What went wrong and what to do.
    pub detail: String,
    /// The HTTP status.
    pub status: StatusCode,
}

macro_rules! problems {
    ($($fn:ident => $kind:literal, $status:ident;)*) => {
        impl Problem {
            $(
                #[doc = concat!("`", $kind, "`.")]
                pub fn $fn(detail: impl Into<String>) -> Self {
                    Self { kind: $kind, detail: detail.into(), status: StatusCode::$status }
                }
            )*
        }
    };
}

problems! {
    malformed => "malformed", BAD_REQUEST;
    bad_nonce => "badNonce", BAD_REQUEST;
    bad_signature_algorithm => "badSignatureAlgorithm", BAD_REQUEST;
    unauthorized => "unauthorized", FORBIDDEN;
    account_does_not_exist => "accountDoesNotExist", BAD_REQUEST;
    rejected_identifier => "rejectedIdentifier", BAD_REQUEST;
    unsupported_identifier => "unsupportedIdentifier", BAD_REQUEST;
    bad_csr => "badCSR", BAD_REQUEST;
    order_not_ready => "orderNotReady", FORBIDDEN;
    already_revoked => "alreadyRevoked", BAD_REQUEST;
    bad_revocation_reason => "badRevocationReason", BAD_REQUEST;
    external_account_required => "externalAccountRequired", UNAUTHORIZED;
    invalid_profile => "invalidProfile", BAD_REQUEST;
    invalid_contact => "invalidContact", BAD_REQUEST;
    incorrect_response => "incorrectResponse", FORBIDDEN;
    connection => "connection", BAD_REQUEST;
    tls => "tls", BAD_REQUEST;
    not_found => "malformed", NOT_FOUND;
    conflict => "malformed", CONFLICT;
    server_internal => "serverInternal", INTERNAL_SERVER_ERROR;
}

impl Problem {
    /// The problem document.
    pub fn to_json(&self) -> Value {
        json!({
            "type": format!("urn:ietf:params:acme:error:{}", self.kind),
            "detail": self.detail,
            "status": self.status.as_u16(),
        })
    }
}

impl From<crate::store::StoreError> for Problem {
    fn from(e: crate::store::StoreError) -> Self {
        Self {
            kind: "serverInternal",
            detail: format!("the store failed: {e}"),
            status: StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}
