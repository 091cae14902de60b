//! Stand-in apps (echo, HTTP) and a TCP proxy the test can cut.

use super::*;

/// A line-echo TCP server on background threads (a stand-in app); returns its address.
pub fn echo_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let local = listener.local_addr().expect("local addr");
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                use std::io::{BufRead, Write};
                let Ok(read_half) = conn.try_clone() else { return };
                let mut reader = std::io::BufReader::new(read_half);
                let mut writer = conn;
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                    if writer.write_all(line.as_bytes()).is_err() {
                        break;
                    }
                    line.clear();
                }
            });
        }
    });
    local
}

/// A tiny HTTP server answering 200 "hello" to every request (the app).
pub fn http_upstream() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("loopback");
    let local = listener.local_addr().expect("loopback");
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                use std::io::{BufRead, Write};
                let mut reader = std::io::BufReader::new(conn.try_clone().expect("loopback"));
                let mut writer = conn;
                loop {
                    let mut line = String::new();
                    let (mut saw_request, mut close) = (false, false);
                    while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                        saw_request = true;
                        close |= line.eq_ignore_ascii_case("connection: close\r\n");
                        if line == "\r\n" {
                            break;
                        }
                        line.clear();
                    }
                    if !saw_request {
                        return;
                    }
                    let ok = writer.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nhello\n").is_ok();
                    if !ok || close {
                        return;
                    }
                }
            });
        }
    });
    local
}

/// A TCP proxy on loopback that the test can cut (every open connection
/// closed, new ones refused) and heal: a network partition it controls.
/// `on_connect` runs before each connection is forwarded.
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    open: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Proxy {
    /// Forwards connections to `target`.
    pub fn start(target: SocketAddr, on_connect: impl Fn() + Send + 'static) -> Self {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let open = std::sync::Arc::new(std::sync::Mutex::new(Vec::<std::net::TcpStream>::new()));
        let (c, o) = (cut.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if c.load(Ordering::SeqCst) {
                    continue;
                }
                on_connect();
                let Ok(server) = std::net::TcpStream::connect(target) else { continue };
                let mut tracked = o.lock().unwrap_or_else(|e| e.into_inner());
                for s in [&client, &server] {
                    if let Ok(s) = s.try_clone() {
                        tracked.push(s);
                    }
                }
                for (mut from, mut to) in [(client.try_clone(), server.try_clone()), (Ok(server), Ok(client))]
                    .into_iter()
                    .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
                {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        Self { addr, cut, open }
    }

    /// Closes every open connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for s in self.open.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Forwards again.
    pub fn heal(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}
