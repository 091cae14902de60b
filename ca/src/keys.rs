//! Key types the CA can generate for leaves.

use rcgen::{KeyPair, RsaKeySize, SignatureAlgorithm};

use crate::CaError;

/// The key algorithm of an issued leaf.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyType {
    /// ECDSA on P-256 with SHA-256 (the default).
    #[default]
    #[value(name = "ecdsa-p256")]
    #[serde(rename = "ecdsa-p256")]
    EcdsaP256,
    /// ECDSA on P-384 with SHA-384.
    #[value(name = "ecdsa-p384")]
    #[serde(rename = "ecdsa-p384")]
    EcdsaP384,
    /// Ed25519.
    #[value(name = "ed25519")]
    #[serde(rename = "ed25519")]
    Ed25519,
    /// RSA 2048 with SHA-256.
    #[value(name = "rsa-2048")]
    #[serde(rename = "rsa-2048")]
    Rsa2048,
    /// RSA 3072 with SHA-256.
    #[value(name = "rsa-3072")]
    #[serde(rename = "rsa-3072")]
    Rsa3072,
    /// RSA 4096 with SHA-256.
    #[value(name = "rsa-4096")]
    #[serde(rename = "rsa-4096")]
    Rsa4096,
}

impl KeyType {
    /// Generates a fresh key pair of this type.
    pub fn generate(self) -> Result<KeyPair, CaError> {
        let rsa = |size| KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, size);
        Ok(match self {
            Self::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?,
            Self::EcdsaP384 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384)?,
            Self::Ed25519 => KeyPair::generate_for(&rcgen::PKCS_ED25519)?,
            Self::Rsa2048 => rsa(RsaKeySize::_2048)?,
            Self::Rsa3072 => rsa(RsaKeySize::_3072)?,
            Self::Rsa4096 => rsa(RsaKeySize::_4096)?,
        })
    }
}

/// Whether certificates for keys of `alg` need keyEncipherment (RSA key transport).
pub fn is_rsa(alg: &SignatureAlgorithm) -> bool {
    alg == &rcgen::PKCS_RSA_SHA256 || alg == &rcgen::PKCS_RSA_SHA384 || alg == &rcgen::PKCS_RSA_SHA512
}
