//! PROXY protocol v2 headers carrying the verified peer identity.
//!
//! TLVs sent: `PP2_TYPE_SSL` (0x20) with the client flags, verify = 0, and the
//! sub-TLVs `PP2_SUBTYPE_SSL_VERSION` and `PP2_SUBTYPE_SSL_CN`; and
//! [`TLV_PEER_IDENTITY`] (0xE0, the first custom type) with the peer's SPIFFE
//! ID, or its first DNS name when it has none.

use std::net::{IpAddr, SocketAddr};

/// PROXY v2 signature.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Custom TLV with the verified peer identity (UTF-8).
pub const TLV_PEER_IDENTITY: u8 = 0xE0;
const PP2_TYPE_SSL: u8 = 0x20;
const PP2_SUBTYPE_SSL_VERSION: u8 = 0x21;
const PP2_SUBTYPE_SSL_CN: u8 = 0x22;
const PP2_CLIENT_SSL: u8 = 0x01;
const PP2_CLIENT_CERT_CONN: u8 = 0x02;

/// What the header says about the TLS client.
#[derive(Clone, Debug)]
pub struct PeerInfo<'a> {
    /// Negotiated TLS version, such as `TLSv1.3`.
    pub tls_version: &'a str,
    /// The client's subject common name, if any.
    pub common_name: Option<&'a str>,
    /// The verified identity.
    pub identity: &'a str,
}

fn tlv(out: &mut Vec<u8>, kind: u8, value: &[u8]) {
    out.push(kind);
    out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    out.extend_from_slice(value);
}

/// Encodes a v2 `PROXY` header for a TCP connection from `src` to `dst`.
pub fn encode(src: SocketAddr, dst: SocketAddr, peer: &PeerInfo<'_>) -> Vec<u8> {
    let mut body = Vec::with_capacity(128);
    let family = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            body.extend_from_slice(&s.octets());
            body.extend_from_slice(&d.octets());
            0x11
        }
        (s, d) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
                IpAddr::V6(v6) => v6.octets(),
            };
            body.extend_from_slice(&v6(s));
            body.extend_from_slice(&v6(d));
            0x21
        }
    };
    body.extend_from_slice(&src.port().to_be_bytes());
    body.extend_from_slice(&dst.port().to_be_bytes());

    let mut ssl = vec![PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN, 0, 0, 0, 0];
    tlv(&mut ssl, PP2_SUBTYPE_SSL_VERSION, peer.tls_version.as_bytes());
    if let Some(cn) = peer.common_name {
        tlv(&mut ssl, PP2_SUBTYPE_SSL_CN, cn.as_bytes());
    }
    tlv(&mut body, PP2_TYPE_SSL, &ssl);
    tlv(&mut body, TLV_PEER_IDENTITY, peer.identity.as_bytes());

    let mut out = Vec::with_capacity(16 + body.len());
    out.extend_from_slice(&SIGNATURE);
    out.push(0x21);
    out.push(family);
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Finds the TLV of `kind` in a complete header (for tests and upstreams).
pub fn find_tlv(header: &[u8], kind: u8) -> Option<&[u8]> {
    if header.len() < 16 || header[..12] != SIGNATURE {
        return None;
    }
    let addr_len = match header[13] {
        0x11 => 12,
        0x21 => 36,
        _ => return None,
    };
    let total = 16 + u16::from_be_bytes([header[14], header[15]]) as usize;
    let mut rest = header.get(16 + addr_len..total)?;
    while rest.len() >= 3 {
        let len = u16::from_be_bytes([rest[1], rest[2]]) as usize;
        let value = rest.get(3..3 + len)?;
        if rest[0] == kind {
            return Some(value);
        }
        rest = &rest[3 + len..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_identity() {
        let peer = PeerInfo { tls_version: "TLSv1.3", common_name: Some("web"), identity: "spiffe://td/web" };
        let h = encode("10.0.0.1:4000".parse().unwrap(), "10.0.0.2:80".parse().unwrap(), &peer);
        assert_eq!(&h[..12], &SIGNATURE);
        assert_eq!(h[12], 0x21);
        assert_eq!(h[13], 0x11);
        assert_eq!(u16::from_be_bytes([h[14], h[15]]) as usize, h.len() - 16);
        assert_eq!(find_tlv(&h, TLV_PEER_IDENTITY), Some(&b"spiffe://td/web"[..]));
        let v6 = encode("[::1]:4000".parse().unwrap(), "10.0.0.2:80".parse().unwrap(), &peer);
        assert_eq!(v6[13], 0x21);
        assert_eq!(find_tlv(&v6, TLV_PEER_IDENTITY), Some(&b"spiffe://td/web"[..]));
    }
}
