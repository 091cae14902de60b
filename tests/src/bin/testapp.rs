//! `testapp`: the tiny application the compose end-to-end test puts behind
//! sidecars, and the rogue that tries to get around them. Plain std I/O
//! (TLS only for the rogue's probe), so it runs in a `FROM scratch` image.
//!
//! - `testapp http PORT`: HTTP/1.1 server. `/health`; `/whoami` answers with
//!   the `X-Forwarded-Client-Cert` the sidecar set; `/call/VAR` calls the
//!   URL in environment variable VAR (`http://` GET, or `tcp://` one line
//!   to an echo server) and answers with what came back.
//!   `/redis` sends PING to `$REDIS_HOST` (port `$REDIS_PORT`, default
//!   6379), `/postgres` runs `select 41 + 1` on `$DB_HOST` (`$DB_PORT`,
//!   default 5432; user and database `app`, trust auth), `/status` does both.
//! - `testapp echo PORT`: line echo that reads a PROXY v2 header first and
//!   prefixes each reply with the caller identity it carried.
//! - `testapp get URL`: plain HTTP GET; prints the body, exit 0 on 200.
//! - `testapp tcp HOST:PORT`: sends a line; exit 0 only if something other
//!   than a TLS alert answers.
//! - `testapp tls HOST:PORT`: TLS without a client certificate; exit 0 only
//!   if the server lets a request through.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["http", port] => serve(port, handle_http),
        ["echo", port] => serve(port, handle_echo),
        ["get", url] => http_get(url).and_then(|(status, body)| {
            print!("{body}");
            if status == 200 {
                Ok(())
            } else {
                Err(format!("HTTP {status}"))
            }
        }),
        ["tcp", addr] => tcp_probe(addr).map(|reply| println!("answered: {reply:?}")),
        ["tls", addr] => tls_probe(addr).map(|reply| println!("answered: {reply:?}")),
        _ => Err("usage: testapp http PORT | echo PORT | get URL | tcp HOST:PORT | tls HOST:PORT".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("testapp: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(port: &str, handler: fn(TcpStream) -> std::io::Result<()>) -> Result<(), String> {
    let listener = TcpListener::bind(format!("0.0.0.0:{port}")).map_err(|e| format!("bind {port}: {e}"))?;
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
            let _ = handler(stream);
        });
    }
    Ok(())
}

fn handle_http(stream: TcpStream) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let path = request_line.split_whitespace().nth(1).unwrap_or("/").to_owned();
        let mut xfcc = String::new();
        let mut close = request_line.ends_with("HTTP/1.0\r\n");
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
                break;
            }
            let (name, value) = line.split_once(':').unwrap_or((&line, ""));
            match name.to_ascii_lowercase().as_str() {
                "x-forwarded-client-cert" => xfcc = value.trim().to_owned(),
                "connection" => close |= value.trim().eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
        let (status, body) = match path.as_str() {
            "/health" => (200, "ok\n".to_owned()),
            "/whoami" => (200, format!("xfcc={xfcc}\n")),
            "/redis" | "/postgres" | "/status" => {
                let mut parts = Vec::new();
                if path != "/postgres" {
                    parts.push(redis_ping().map(|r| format!("redis says {r}")));
                }
                if path != "/redis" {
                    parts.push(postgres_query().map(|r| format!("postgres says {r}")));
                }
                match parts.into_iter().collect::<Result<Vec<_>, _>>() {
                    Ok(lines) => (200, lines.join("\n") + "\n"),
                    Err(e) => (502, format!("{e}\n")),
                }
            }
            p if p.starts_with("/call/") => match call(&p["/call/".len()..]) {
                Ok(body) => (200, body),
                Err(e) => (502, format!("call failed: {e}\n")),
            },
            _ => (200, format!("hello from {}\n", std::env::var("HOSTNAME").unwrap_or_default())),
        };
        let reason = if status == 200 { "OK" } else { "Bad Gateway" };
        write!(
            out,
            "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n{body}",
            body.len(),
            if close { "Connection: close\r\n" } else { "" }
        )?;
        out.flush()?;
        if close {
            return Ok(());
        }
    }
}

/// Calls the URL in environment variable `var`.
fn call(var: &str) -> Result<String, String> {
    let url = std::env::var(var).map_err(|_| format!("no environment variable {var}"))?;
    if let Some(addr) = url.strip_prefix("tcp://") {
        return tcp_probe(addr.trim_end_matches('/'));
    }
    let (status, body) = http_get(&url)?;
    if status != 200 {
        return Err(format!("{url}: HTTP {status}: {body}"));
    }
    Ok(body)
}

/// `host:port` from `$HOST_VAR` and `$PORT_VAR` (or the default port).
fn service_addr(host_var: &str, port_var: &str, default_port: u16) -> Result<String, String> {
    let host = std::env::var(host_var).map_err(|_| format!("no environment variable {host_var}"))?;
    let port = std::env::var(port_var).unwrap_or_else(|_| default_port.to_string());
    Ok(format!("{host}:{port}"))
}

/// PING in RESP, as redis-cli sends it; the server's answer.
fn redis_ping() -> Result<String, String> {
    let addr = service_addr("REDIS_HOST", "REDIS_PORT", 6379)?;
    let mut stream = connect(&addr)?;
    stream.write_all(b"*1\r\n$4\r\nPING\r\n").map_err(|e| format!("write {addr}: {e}"))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).map_err(|e| format!("read {addr}: {e}"))?;
    match line.trim_end() {
        "+PONG" => Ok("PONG".into()),
        other => Err(format!("redis at {addr} answered {other:?}")),
    }
}

/// One PostgreSQL v3 message: type byte and payload.
fn pg_message(reader: &mut impl Read) -> Result<(u8, Vec<u8>), String> {
    let mut head = [0u8; 5];
    reader.read_exact(&mut head).map_err(|e| format!("postgres: {e}"))?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut body = vec![0u8; len.saturating_sub(4)];
    reader.read_exact(&mut body).map_err(|e| format!("postgres: {e}"))?;
    Ok((head[0], body))
}

/// `select 41 + 1` over the PostgreSQL wire protocol (v3, trust auth): the value.
fn postgres_query() -> Result<String, String> {
    let addr = service_addr("DB_HOST", "DB_PORT", 5432)?;
    let mut stream = connect(&addr)?;
    let params = b"user\0app\0database\0app\0\0";
    let mut startup = ((8 + params.len()) as u32).to_be_bytes().to_vec();
    startup.extend(196_608u32.to_be_bytes());
    startup.extend(params);
    stream.write_all(&startup).map_err(|e| format!("write {addr}: {e}"))?;
    let query = b"select 41 + 1\0";
    let mut sent_query = false;
    let mut value = None;
    loop {
        let (kind, body) = pg_message(&mut stream)?;
        match kind {
            b'R' if body.get(..4) != Some(&[0, 0, 0, 0]) => return Err("postgres asks for a password".into()),
            b'E' => return Err(format!("postgres error: {}", String::from_utf8_lossy(&body))),
            b'D' if body.len() >= 6 => {
                let len = u32::from_be_bytes([body[2], body[3], body[4], body[5]]) as usize;
                value = body.get(6..6 + len).map(|v| String::from_utf8_lossy(v).into_owned());
            }
            b'Z' if !sent_query => {
                let mut q = vec![b'Q'];
                q.extend(((4 + query.len()) as u32).to_be_bytes());
                q.extend(query);
                stream.write_all(&q).map_err(|e| format!("write {addr}: {e}"))?;
                sent_query = true;
            }
            b'Z' => return value.ok_or_else(|| "postgres returned no row".into()),
            _ => {}
        }
    }
}

fn connect(addr: &str) -> Result<TcpStream, String> {
    let target = addr.to_socket_addrs().map_err(|e| format!("resolve {addr}: {e}"))?.next();
    let target = target.ok_or_else(|| format!("{addr} has no address"))?;
    let stream = TcpStream::connect_timeout(&target, TIMEOUT).map_err(|e| format!("connect {addr}: {e}"))?;
    stream.set_read_timeout(Some(TIMEOUT)).map_err(|e| e.to_string())?;
    Ok(stream)
}

fn http_get(url: &str) -> Result<(u16, String), String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| format!("{url}: only http:// URLs"))?;
    let (authority, path) = rest.split_once('/').map_or((rest, "/".to_owned()), |(a, p)| (a, format!("/{p}")));
    let addr = if authority.contains(':') { authority.to_owned() } else { format!("{authority}:80") };
    let mut stream = connect(&addr)?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).map_err(|e| format!("read from {addr}: {e}"))?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| format!("{addr}: not an HTTP answer: {text:?}"))?;
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or("no status")?;
    Ok((status, body.to_owned()))
}

fn tcp_probe(addr: &str) -> Result<String, String> {
    let mut stream = connect(addr)?;
    stream.write_all(b"ping\n").map_err(|e| format!("write {addr}: {e}"))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).map_err(|e| format!("read {addr}: {e}"))?;
    if line.is_empty() {
        return Err(format!("{addr} closed without answering"));
    }
    if line.as_bytes().starts_with(&[0x15, 0x03]) {
        return Err(format!("{addr} answered with a TLS alert: it wants TLS"));
    }
    Ok(line)
}

fn handle_echo(stream: TcpStream) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    let identity = read_proxy_v2(&mut reader)?.unwrap_or_else(|| "anonymous".into());
    let mut line = String::new();
    while reader.read_line(&mut line)? > 0 {
        write!(out, "{identity}: {line}")?;
        line.clear();
    }
    Ok(())
}

/// Reads a PROXY v2 header, if the stream starts with one, and returns
/// the identity in TLV 0xE0.
fn read_proxy_v2(reader: &mut BufReader<TcpStream>) -> std::io::Result<Option<String>> {
    const SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
    if !reader.fill_buf()?.starts_with(&SIGNATURE[..1]) {
        return Ok(None);
    }
    let mut head = [0u8; 16];
    reader.read_exact(&mut head)?;
    if &head[..12] != SIGNATURE {
        return Err(std::io::Error::other("bad PROXY v2 signature"));
    }
    let mut rest = vec![0u8; u16::from_be_bytes([head[14], head[15]]) as usize];
    reader.read_exact(&mut rest)?;
    let addresses = match head[13] >> 4 {
        1 => 12,
        2 => 36,
        _ => 0,
    };
    let mut tlvs = rest.get(addresses..).unwrap_or_default();
    while tlvs.len() >= 3 {
        let len = u16::from_be_bytes([tlvs[1], tlvs[2]]) as usize;
        let value = tlvs.get(3..3 + len).unwrap_or_default();
        if tlvs[0] == 0xE0 {
            return Ok(Some(String::from_utf8_lossy(value).into_owned()));
        }
        tlvs = tlvs.get(3 + len..).unwrap_or_default();
    }
    Ok(None)
}

/// Accepts any server certificate: the rogue only wants to know whether
/// the server lets it in without a client certificate.
#[derive(Debug)]
struct AcceptAnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn tls_probe(addr: &str) -> Result<String, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider)))
        .with_no_client_auth();
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h).to_owned();
    let name = rustls::pki_types::ServerName::try_from(host).map_err(|e| e.to_string())?;
    let conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, connect(addr)?);
    tls.write_all(b"ping\n").map_err(|e| format!("TLS to {addr} refused: {e}"))?;
    let mut reply = [0u8; 256];
    match tls.read(&mut reply) {
        Ok(0) => Err(format!("TLS to {addr}: closed without answering")),
        Ok(n) => Ok(String::from_utf8_lossy(&reply[..n]).into_owned()),
        Err(e) => Err(format!("TLS to {addr} refused: {e}")),
    }
}
