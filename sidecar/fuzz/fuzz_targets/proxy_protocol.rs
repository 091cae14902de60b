//! PROXY v2 headers: `find_tlv` never panics on any bytes, and a header
//! `encode` wrote gives back the identity it carries.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use lanyard_sidecar::proxy_protocol::{encode, find_tlv, PeerInfo, TLV_PEER_IDENTITY};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for kind in [0x20, TLV_PEER_IDENTITY, data.first().copied().unwrap_or(0)] {
        let _ = find_tlv(data, kind);
    }
    // The first 40 bytes choose the addresses and ports; the rest, split at
    // the first two NULs, are the TLS version, the CN and the identity.
    if data.len() < 40 {
        return;
    }
    let (head, text) = data.split_at(40);
    let addr = |b: &[u8], port: [u8; 2]| {
        let ip = if b[0] % 2 == 0 {
            IpAddr::V4(Ipv4Addr::new(b[1], b[2], b[3], b[4]))
        } else {
            IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&b[..16]).expect("16 bytes")))
        };
        SocketAddr::new(ip, u16::from_be_bytes(port))
    };
    let (src, dst) = (addr(&head[..16], [head[32], head[33]]), addr(&head[16..32], [head[34], head[35]]));
    let Ok(text) = std::str::from_utf8(text) else { return };
    let mut parts = text.splitn(3, '\0');
    let (version, cn, identity) = (parts.next().unwrap_or(""), parts.next(), parts.next().unwrap_or(""));
    let header = encode(src, dst, &PeerInfo { tls_version: version, common_name: cn, identity });
    assert_eq!(find_tlv(&header, TLV_PEER_IDENTITY), Some(identity.as_bytes()), "{src} {dst} {text:?}");
});
