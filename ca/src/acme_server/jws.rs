//! RFC 7515 flattened JWS as ACME uses it (RFC 8555 §6.2): the protected
//! header, the public key (JWK, RFC 7517) with its thumbprint (RFC 7638),
//! and signature checks for ES256, ES384, RS256 and EdDSA through aws-lc-rs.

use aws_lc_rs::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use serde::Deserialize;
use serde_json::Value;

use super::problem::Problem;

/// A public key as a JWK, normalised to what the thumbprint covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Jwk {
    /// `kty: EC`, `crv: P-256` or `P-384`, with coordinates.
    Ec {
        /// `P-256` or `P-384`.
        crv: String,
        /// x coordinate, base64url.
        x: String,
        /// y coordinate, base64url.
        y: String,
    },
    /// `kty: RSA` with modulus and exponent.
    Rsa {
        /// Modulus, base64url.
        n: String,
        /// Exponent, base64url.
        e: String,
    },
    /// `kty: OKP`, `crv: Ed25519`.
    Ed25519 {
        /// The public key, base64url.
        x: String,
    },
}

fn field<'a>(v: &'a Value, name: &str) -> Result<&'a str, Problem> {
    v.get(name).and_then(Value::as_str).ok_or_else(|| Problem::malformed(format!("the JWK has no string {name:?}")))
}

impl Jwk {
    /// Reads a JWK object.
    pub fn from_json(v: &Value) -> Result<Self, Problem> {
        let key = match field(v, "kty")? {
            "EC" => {
                let crv = field(v, "crv")?;
                if crv != "P-256" && crv != "P-384" {
                    return Err(Problem::bad_signature_algorithm(format!("EC curve {crv:?}: use P-256 or P-384")));
                }
                Self::Ec { crv: crv.into(), x: field(v, "x")?.into(), y: field(v, "y")?.into() }
            }
            "RSA" => Self::Rsa { n: field(v, "n")?.into(), e: field(v, "e")?.into() },
            "OKP" if field(v, "crv")? == "Ed25519" => Self::Ed25519 { x: field(v, "x")?.into() },
            other => {
                return Err(Problem::bad_signature_algorithm(format!("key type {other:?}: use EC, RSA or Ed25519")))
            }
        };
        Ok(key)
    }

    /// The JWK as JSON, with only the members the thumbprint covers.
    pub fn to_json(&self) -> Value {
        match self {
            Self::Ec { crv, x, y } => serde_json::json!({ "crv": crv, "kty": "EC", "x": x, "y": y }),
            Self::Rsa { n, e } => serde_json::json!({ "e": e, "kty": "RSA", "n": n }),
            Self::Ed25519 { x } => serde_json::json!({ "crv": "Ed25519", "kty": "OKP", "x": x }),
        }
    }

    /// RFC 7638 thumbprint: SHA-256 over the required members in
    /// lexicographic order without whitespace, base64url.
    pub fn thumbprint(&self) -> String {
        // serde_json's map is ordered by key, and `to_string` writes no whitespace.
        let canonical = self.to_json().to_string();
        B64.encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, canonical.as_bytes()))
    }

    /// Checks `sig` over `message` for algorithm `alg`.
    pub fn verify(&self, alg: &str, message: &[u8], sig: &[u8]) -> Result<(), Problem> {
        let decode = |s: &str| B64.decode(s).map_err(|_| Problem::malformed("a JWK member is not base64url"));
        let mismatch = || Problem::bad_signature_algorithm(format!("algorithm {alg:?} does not fit the account key"));
        let checked = match (self, alg) {
            (Self::Ec { crv, x, y }, "ES256" | "ES384") => {
                let algorithm = match (crv.as_str(), alg) {
                    ("P-256", "ES256") => &signature::ECDSA_P256_SHA256_FIXED,
                    ("P-384", "ES384") => &signature::ECDSA_P384_SHA384_FIXED,
                    _ => return Err(mismatch()),
                };
                let mut point = vec![4u8];
                point.extend(decode(x)?);
                point.extend(decode(y)?);
                UnparsedPublicKey::new(algorithm, point).verify(message, sig)
            }
            (Self::Rsa { n, e }, "RS256") => {
                let (n, e) = (decode(n)?, decode(e)?);
                RsaPublicKeyComponents { n: n.as_slice(), e: e.as_slice() }.verify(
                    &signature::RSA_PKCS1_2048_8192_SHA256,
                    message,
                    sig,
                )
            }
            (Self::Ed25519 { x }, "EdDSA") => {
                UnparsedPublicKey::new(&signature::ED25519, decode(x)?).verify(message, sig)
            }
            (_, "ES256" | "ES384" | "RS256" | "EdDSA") => return Err(mismatch()),
            _ => {
                return Err(Problem::bad_signature_algorithm(format!(
                    "algorithm {alg:?} is not supported: use ES256, ES384, RS256 or EdDSA"
                )))
            }
        };
        checked.map_err(|_| Problem::malformed("the JWS signature does not verify"))
    }

    /// Whether this key is the subject public key of `spki_der`.
    pub fn matches_spki(&self, spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> bool {
        use x509_parser::public_key::PublicKey;
        let decode = |s: &str| B64.decode(s).unwrap_or_default();
        match (self, spki.parsed()) {
            (Self::Ec { x, y, .. }, Ok(PublicKey::EC(point))) => {
                let mut raw = vec![4u8];
                raw.extend(decode(x));
                raw.extend(decode(y));
                point.data() == raw.as_slice()
            }
            (Self::Rsa { n, e }, Ok(PublicKey::RSA(rsa))) => {
                let strip = |b: &[u8]| b.iter().skip_while(|&&x| x == 0).copied().collect::<Vec<_>>();
                strip(rsa.modulus) == strip(&decode(n)) && strip(rsa.exponent) == strip(&decode(e))
            }
            (Self::Ed25519 { x }, _) => spki.subject_public_key.data.as_ref() == decode(x).as_slice(),
            _ => false,
        }
    }
}

/// Who signed a request: a new key (`jwk`), or an account (`kid`).
#[derive(Clone, Debug)]
pub enum Signer {
    /// The key itself (newAccount, revokeCert by certificate key).
    Jwk(Jwk),
    /// An account URL.
    Kid(String),
}

/// A flattened JWS whose protected header has been read but whose
/// signature is checked only once the signer's key is known.
#[derive(Debug)]
pub struct Jws {
    /// `alg`.
    pub alg: String,
    /// `nonce` (absent only in inner key-change and EAB objects).
    pub nonce: Option<String>,
    /// `url`.
    pub url: String,
    /// `jwk` or `kid`.
    pub signer: Signer,
    /// The decoded payload; empty for POST-as-GET.
    pub payload: Vec<u8>,
    signing_input: Vec<u8>,
    signature: Vec<u8>,
}

#[derive(Deserialize)]
struct Flattened {
    protected: String,
    payload: String,
    signature: String,
}

impl Jws {
    /// Parses a flattened JWS (`application/jose+json`).
    pub fn parse(body: &[u8]) -> Result<Self, Problem> {
        let flat: Flattened = serde_json::from_slice(body).map_err(|e| {
            Problem::malformed(format!("the body is not a flattened JWS (protected, payload, signature): {e}"))
        })?;
        Self::from_flattened(&flat)
    }

    /// Parses a flattened JWS given as a JSON value (the inner JWS of keyChange).
    pub fn from_value(v: &Value) -> Result<Self, Problem> {
        let flat: Flattened = serde_json::from_value(v.clone())
            .map_err(|e| Problem::malformed(format!("the inner object is not a flattened JWS: {e}")))?;
        Self::from_flattened(&flat)
    }

    fn from_flattened(flat: &Flattened) -> Result<Self, Problem> {
        let decode = |what: &str, s: &str| {
            B64.decode(s.trim_end_matches('='))
                .map_err(|_| Problem::malformed(format!("the JWS {what} is not base64url")))
        };
        let header: Value = serde_json::from_slice(&decode("protected header", &flat.protected)?)
            .map_err(|e| Problem::malformed(format!("the JWS protected header is not JSON: {e}")))?;
        let alg = header.get("alg").and_then(Value::as_str).ok_or_else(|| Problem::malformed("the JWS has no alg"))?;
        if alg == "none" || alg.starts_with("HS") {
            return Err(Problem::bad_signature_algorithm(format!("algorithm {alg:?} is not allowed for requests")));
        }
        let url = header.get("url").and_then(Value::as_str).ok_or_else(|| Problem::malformed("the JWS has no url"))?;
        let signer = match (header.get("jwk"), header.get("kid").and_then(Value::as_str)) {
            (Some(jwk), None) => Signer::Jwk(Jwk::from_json(jwk)?),
            (None, Some(kid)) => Signer::Kid(kid.to_owned()),
            _ => return Err(Problem::malformed("the JWS header needs exactly one of jwk and kid")),
        };
        Ok(Self {
            alg: alg.to_owned(),
            nonce: header.get("nonce").and_then(Value::as_str).map(str::to_owned),
            url: url.to_owned(),
            signer,
            payload: decode("payload", &flat.payload)?,
            signing_input: format!("{}.{}", flat.protected, flat.payload).into_bytes(),
            signature: decode("signature", &flat.signature)?,
        })
    }

    /// Checks the signature with `key`.
    pub fn verify(&self, key: &Jwk) -> Result<(), Problem> {
        key.verify(&self.alg, &self.signing_input, &self.signature)
    }

    /// The payload as JSON; POST-as-GET (empty) is refused here.
    pub fn json(&self) -> Result<Value, Problem> {
        serde_json::from_slice(&self.payload)
            .map_err(|e| Problem::malformed(format!("the JWS payload is not JSON: {e}")))
    }
}

/// Checks an external account binding (RFC 8555 §7.3.4): an HS256 JWS by
/// `kid` over the account key, for `url`. Returns the kid.
pub fn verify_eab(
    eab: &Value,
    account_key: &Jwk,
    url: &str,
    keys: &std::collections::BTreeMap<String, String>,
) -> Result<String, Problem> {
    let flat: Flattened = serde_json::from_value(eab.clone())
        .map_err(|e| Problem::malformed(format!("externalAccountBinding is not a flattened JWS: {e}")))?;
    let header: Value = B64
        .decode(&flat.protected)
        .ok()
        .and_then(|h| serde_json::from_slice(&h).ok())
        .ok_or_else(|| Problem::malformed("externalAccountBinding's protected header is not base64url JSON"))?;
    let kid = header.get("kid").and_then(Value::as_str).unwrap_or_default();
    if header.get("alg").and_then(Value::as_str) != Some("HS256") || header.get("nonce").is_some() {
        return Err(Problem::malformed("externalAccountBinding must be HS256 with a kid and no nonce"));
    }
    if header.get("url").and_then(Value::as_str) != Some(url) {
        return Err(Problem::malformed(format!("externalAccountBinding's url must be {url}")));
    }
    let secret =
        keys.get(kid).ok_or_else(|| Problem::unauthorized(format!("external account key {kid:?} is unknown")))?;
    let secret = B64
        .decode(secret.trim_end_matches('='))
        .map_err(|_| Problem::server_internal("an [acme_server.eab] key is not base64url"))?;
    let payload: Value = B64
        .decode(&flat.payload)
        .ok()
        .and_then(|p| serde_json::from_slice(&p).ok())
        .ok_or_else(|| Problem::malformed("externalAccountBinding's payload is not base64url JSON"))?;
    if Jwk::from_json(&payload)? != *account_key {
        return Err(Problem::malformed("externalAccountBinding binds another key than the account's"));
    }
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &secret);
    let sig = B64
        .decode(&flat.signature)
        .map_err(|_| Problem::malformed("externalAccountBinding's signature is not base64url"))?;
    aws_lc_rs::hmac::verify(&key, format!("{}.{}", flat.protected, flat.payload).as_bytes(), &sig)
        .map_err(|_| Problem::unauthorized(format!("externalAccountBinding does not verify with key {kid:?}")))?;
    Ok(kid.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7638 §3.1's example key and thumbprint.
    #[test]
    fn thumbprint_matches_rfc_7638() {
        let jwk = Jwk::from_json(&serde_json::json!({
            "kty": "RSA",
            "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
            "e": "AQAB",
            "alg": "RS256",
            "kid": "2011-04-29"
        }))
        .unwrap();
        assert_eq!(jwk.thumbprint(), "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs");
    }

    #[test]
    fn signatures_verify_only_with_their_key_and_algorithm() {
        use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
        let point = pair.public_key().as_ref();
        let jwk = Jwk::Ec { crv: "P-256".into(), x: B64.encode(&point[1..33]), y: B64.encode(&point[33..]) };
        let protected = B64.encode(
            serde_json::json!({ "alg": "ES256", "nonce": "n1", "url": "https://ca/acme/new-account", "jwk": jwk.to_json() })
                .to_string(),
        );
        let payload = B64.encode(br#"{"termsOfServiceAgreed":true}"#);
        let sig = pair.sign(&rng, format!("{protected}.{payload}").as_bytes()).unwrap();
        let body =
            serde_json::json!({ "protected": protected, "payload": payload, "signature": B64.encode(sig.as_ref()) });
        let jws = Jws::parse(body.to_string().as_bytes()).unwrap();
        assert_eq!((jws.nonce.as_deref(), jws.url.as_str()), (Some("n1"), "https://ca/acme/new-account"));
        let Signer::Jwk(key) = &jws.signer else { panic!("a jwk signer") };
        jws.verify(key).unwrap();

        let mut tampered = body.clone();
        tampered["payload"] = B64.encode(br#"{"termsOfServiceAgreed":false}"#).into();
        assert!(Jws::parse(tampered.to_string().as_bytes()).unwrap().verify(key).is_err());
        let other = Jwk::Ec { crv: "P-256".into(), x: B64.encode([1u8; 32]), y: B64.encode([2u8; 32]) };
        assert!(jws.verify(&other).is_err());
        let rsa = Jwk::Rsa { n: "AQAB".into(), e: "AQAB".into() };
        assert!(jws.verify(&rsa).unwrap_err().to_string().contains("does not fit"));
        let none = B64.encode(serde_json::json!({ "alg": "none", "url": "u", "kid": "k" }).to_string());
        let body = serde_json::json!({ "protected": none, "payload": "", "signature": "" });
        assert!(Jws::parse(body.to_string().as_bytes()).unwrap_err().to_string().contains("not allowed"));
    }
}
