//! The REST API's JSON request bodies, parsed and checked for shape before
//! any store access or signing. Each is a fuzz target's input
//! (`ca/fuzz/fuzz_targets/api_bodies.rs`).

use serde::Deserialize;

/// Why a body was refused: always a 400, with what to send instead.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// Not JSON, a wrong type, a missing or an unknown field.
    #[error("malformed JSON body: {0}")]
    Malformed(#[from] serde_json::Error),
    /// Well-formed, but the fields contradict each other.
    #[error("{0}")]
    Invalid(&'static str),
}

/// Parses one of the bodies that are plain structs.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, BodyError> {
    Ok(serde_json::from_slice(body)?)
}

/// `POST /v1/sign`: a one-time token and a CSR.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignBody {
    /// The token from `ca token`.
    pub token: String,
    /// The CSR, PEM.
    pub csr: String,
}

/// `POST /v1/enrol`: an enrolment credential and a CSR.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrolBody {
    /// The secret from `ca enrol NAME`.
    pub secret: String,
    /// The CSR, PEM.
    pub csr: String,
}

/// `POST /v1/renew`: a CSR, authorized by the client certificate.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewBody {
    /// The CSR, PEM.
    pub csr: String,
}

/// `POST /v1/revoke`: one certificate, or every unexpired one of an identity.
#[derive(Debug, PartialEq, Eq)]
pub enum RevokeTarget {
    /// A serial, lowercase hex without leading zeros.
    Serial(String),
    /// An identity name.
    Identity(String),
}

impl RevokeTarget {
    /// Parses `{"serial": ...}` or `{"identity": ...}`; the serial is
    /// normalized the way the store records serials.
    pub fn parse(body: &[u8]) -> Result<Self, BodyError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Raw {
            serial: Option<String>,
            identity: Option<String>,
        }
        match parse::<Raw>(body)? {
            Raw { serial: Some(serial), identity: None } => {
                Ok(Self::Serial(serial.to_ascii_lowercase().trim_start_matches('0').to_owned()))
            }
            Raw { serial: None, identity: Some(identity) } => Ok(Self::Identity(identity)),
            _ => Err(BodyError::Invalid("give exactly one of \"serial\" or \"identity\"")),
        }
    }
}

/// `POST /certificates`: a public certificate to order.
#[derive(Debug)]
pub struct NewPublic {
    /// Its name (checked by `Acme::create`).
    pub cert_name: String,
    /// `domain`, or the `domains` list.
    pub domains: Vec<String>,
    /// The ACME account's contact.
    pub email: String,
    /// The ACME directory; Let's Encrypt when absent.
    pub acme_directory_url: Option<String>,
    /// The ACME profile (`meta.profiles`), kept on every renewal.
    pub profile: Option<String>,
}

impl NewPublic {
    /// Parses the body; exactly one of `domain` and `domains` is given.
    pub fn parse(body: &[u8]) -> Result<Self, BodyError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Raw {
            domain: Option<String>,
            domains: Option<Vec<String>>,
            email: String,
            cert_name: String,
            acme_directory_url: Option<String>,
            profile: Option<String>,
        }
        let raw: Raw = parse(body)?;
        let domains = match (raw.domain, raw.domains) {
            (Some(d), None) => vec![d],
            (None, Some(list)) => list,
            _ => return Err(BodyError::Invalid("give either `domain` or `domains`")),
        };
        Ok(Self {
            cert_name: raw.cert_name,
            domains,
            email: raw.email,
            acme_directory_url: raw.acme_directory_url,
            profile: raw.profile,
        })
    }
}

/// `PUT /certificates/{name}`: a chain and its key, PEM.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadPublic {
    /// The leaf first, then intermediates.
    pub certificate: String,
    /// The leaf's private key.
    pub key: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revoke_takes_exactly_one_target_and_normalizes_serials() {
        assert_eq!(RevokeTarget::parse(br#"{"serial":"00AB"}"#).unwrap(), RevokeTarget::Serial("ab".into()));
        assert_eq!(RevokeTarget::parse(br#"{"identity":"web"}"#).unwrap(), RevokeTarget::Identity("web".into()));
        for both_or_none in [&br#"{"serial":"1","identity":"web"}"#[..], b"{}"] {
            let e = RevokeTarget::parse(both_or_none).unwrap_err();
            assert!(e.to_string().contains("exactly one"), "{e}");
        }
    }

    #[test]
    fn a_new_public_certificate_names_its_domains_once_and_unknown_fields_are_named() {
        let one = NewPublic::parse(br#"{"domain":"a.test","email":"x@y","cert_name":"a"}"#).unwrap();
        assert_eq!(one.domains, ["a.test"]);
        let e = NewPublic::parse(br#"{"domain":"a","domains":["b"],"email":"x@y","cert_name":"a"}"#).unwrap_err();
        assert!(e.to_string().contains("either `domain` or `domains`"), "{e}");
        let e = parse::<UploadPublic>(br#"{"certificate":"","key":"","chain":""}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `chain`"), "{e}");
    }
}
