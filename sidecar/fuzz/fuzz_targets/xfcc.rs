//! The XFCC header: every certificate gets one, whatever its subject and
//! SANs hold, and no field smuggles in a separator: the value splits into
//! exactly the fields written.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lanyard_sidecar::certinfo::CertInfo;
use time::OffsetDateTime;

fuzz_target!(|fields: (Option<&str>, &str, Vec<&str>, Vec<&str>)| {
    let (by, subject, uris, dns) = fields;
    let peer = CertInfo {
        subject: subject.to_owned(),
        issuer: String::new(),
        serial: "01".into(),
        dns: dns.iter().map(|d| d.to_string()).collect(),
        ips: Vec::new(),
        uris: uris.iter().map(|u| u.to_string()).collect(),
        not_before: OffsetDateTime::UNIX_EPOCH,
        not_after: OffsetDateTime::UNIX_EPOCH,
        key_type: String::new(),
        sha256: "ab".repeat(32),
        is_ca: false,
        spki: Vec::new(),
    };
    let value = lanyard_sidecar::http::xfcc_value(by, &peer).expect("a header for every certificate");
    let text = value.to_str().expect("visible ASCII");
    assert!(!text.contains(','), "a comma would start another element: {text}");
    let fields = text.split(';').count();
    assert_eq!(fields, usize::from(by.is_some()) + 2 + uris.len() + dns.len(), "{text}");
    assert_eq!(text.matches('"').count(), 2, "only the subject is quoted: {text}");
});
