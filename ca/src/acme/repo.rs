//! The documents ACME keeps in the store: public certificates (through
//! [`PublicCerts`]), accounts, rate-limit events and challenge answers.

use super::*;

/// A public certificate's document.
const KIND_CERT: &str = "public_cert";
/// An ACME account, per directory and email.
pub(super) const KIND_ACCOUNT: &str = "acme_account";
/// An order or a failed validation, for the rate limits.
pub(super) const KIND_EVENT: &str = "acme_event";
/// An HTTP-01 answer, in the store so that any replica answers it.
pub(super) const KIND_CHALLENGE: &str = "challenge";
/// A TLS-ALPN-01 validation certificate and key (PEM), likewise.
pub(super) const KIND_CHALLENGE_ALPN: &str = "challenge_alpn";
/// How long a challenge answer is kept at most.
pub(super) const CHALLENGE_TTL: Duration = Duration::from_secs(3600);

/// The public certificates in the store. A document that does not parse
/// is reported by name, never skipped as if it were not there.
#[derive(Clone)]
pub struct PublicCerts {
    store: Arc<dyn Store>,
}

impl PublicCerts {
    /// The certificates in `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    /// Every document: the certificate, or why it cannot be read.
    pub fn scan(&self) -> Result<Vec<Result<PublicCert, PublicError>>, PublicError> {
        Ok(self.store.docs(KIND_CERT)?.iter().map(|(name, json)| parse(name, json)).collect())
    }

    /// Every certificate; a corrupt document is an error that names it.
    pub fn list(&self) -> Result<Vec<PublicCert>, PublicError> {
        self.scan()?.into_iter().collect()
    }

    /// One certificate.
    pub fn get(&self, name: &str) -> Result<Option<PublicCert>, PublicError> {
        self.store.doc(KIND_CERT, name)?.map(|json| parse(name, &json)).transpose()
    }

    /// Stores `cert` under its name.
    pub fn put(&self, cert: &PublicCert) -> Result<(), PublicError> {
        let json = serde_json::to_string(cert).map_err(|e| PublicError::Invalid(e.to_string()))?;
        Ok(self.store.put_doc(KIND_CERT, &cert.cert_name, &json)?)
    }

    /// Deletes the document of `name`; whether there was one.
    pub fn delete(&self, name: &str) -> Result<bool, PublicError> {
        Ok(self.store.delete_doc(KIND_CERT, name)?)
    }

    /// `PUT /certificates/{name}` and `ca upload`: a certificate from another
    /// provider, validated, written as a cert dir (default
    /// `STATE/public/NAME`), then served and watched like the others.
    pub fn upload(
        &self,
        state_dir: &Path,
        name: &str,
        chain_pem: &str,
        key_pem: &str,
    ) -> Result<PublicCert, PublicError> {
        name.parse::<CertName>()?;
        let mut cert = self.get(name)?.unwrap_or_else(|| PublicCert::new(name, CertSource::Upload));
        cert.source = CertSource::Upload;
        if cert.out_dir.as_os_str().is_empty() {
            cert.out_dir = state_dir.join("public").join(name);
        }
        let info = write_public(&cert.out_dir, chain_pem, key_pem).map_err(PublicError::Invalid)?;
        cert.domains = info.dns.clone();
        cert.status = CertStatus::Uploaded;
        cert.record_served(&info, chain_pem);
        cert.next_attempt = i64::MAX;
        self.put(&cert)?;
        Ok(cert)
    }
}

fn parse(name: &str, json: &str) -> Result<PublicCert, PublicError> {
    serde_json::from_str(json).map_err(|e| PublicError::Corrupt { name: name.to_owned(), what: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_corrupt_document_is_reported_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(crate::store::SqliteStore::open(dir.path()).unwrap());
        let certs = PublicCerts::new(store.clone());
        let mut good = PublicCert::new("shop", CertSource::Api);
        good.domains = vec!["shop.example.com".into()];
        certs.put(&good).unwrap();
        store.put_doc(KIND_CERT, "broken", "{\"cert_name\": 7").unwrap();
        let e = certs.list().unwrap_err().to_string();
        assert!(e.contains("\"broken\"") && e.contains("corrupt"), "{e}");
        assert!(certs.get("broken").is_err());
        assert_eq!(certs.get("shop").unwrap(), Some(good));
        let scanned = certs.scan().unwrap();
        assert_eq!(scanned.iter().filter(|c| c.is_ok()).count(), 1);
    }
}
