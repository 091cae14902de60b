//! Pebble and pebble-challtestsrv: the ACME server the tests order from.

use super::*;

/// Whether a DNS server answers an A query on UDP 127.0.0.1:`port` within 3 s.
fn answers_dns(port: u16) -> bool {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind UDP port 0");
    socket.connect(("127.0.0.1", port)).expect("connect UDP");
    socket.set_read_timeout(Some(Duration::from_millis(300))).expect("UDP read timeout");
    // ID 0x4c59, recursion desired, one question: probe.test. A IN.
    let query = b"\x4c\x59\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x05probe\x04test\x00\x00\x01\x00\x01";
    let mut answer = [0u8; 512];
    (0..10).any(|_| {
        let _ = socket.send(query);
        matches!(socket.recv(&mut answer), Ok(n) if n >= 12 && answer[..2] == query[..2])
    })
}

/// Starts pebble-challtestsrv in `work`; returns (DNS port, management port,
/// guard). A DNS port taken meanwhile by someone else is not fatal to
/// challtestsrv (it logs and serves on without DNS, so Pebble would ask the
/// port's holder), so that case is detected and retried on other ports.
fn start_challtestsrv(work: &Path) -> (u16, u16, ChildGuard) {
    for attempt in 1..=5 {
        let (dns, dns_mgmt) = (free_port(), free_port());
        let dns_log = work.join(format!("challtestsrv-{attempt}.log"));
        let mut cts = Command::new(peer("pebble-challtestsrv"));
        cts.args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", "", "-http01", "", "-https01", "", "-tlsalpn01", ""])
            .arg("-dns01")
            .arg(format!("127.0.0.1:{dns}"))
            .arg("-management")
            .arg(format!("127.0.0.1:{dns_mgmt}"));
        let mut guard = ChildGuard::spawn(cts, &dns_log);
        guard.wait_for_port(SocketAddr::from(([127, 0, 0, 1], dns_mgmt)), &dns_log);
        let answers = answers_dns(dns);
        let log = std::fs::read_to_string(&dns_log).unwrap_or_default();
        if answers && !log.contains("address already in use") {
            return (dns, dns_mgmt, guard);
        }
        eprintln!("challtestsrv could not bind DNS port {dns} (attempt {attempt}), trying another");
    }
    panic!("pebble-challtestsrv could not bind a DNS port in 5 attempts; see {}", work.display());
}

/// Pebble plus pebble-challtestsrv as its DNS (every name -> 127.0.0.1),
/// on free ports, killed on drop.
pub struct Pebble {
    server: Option<ChildGuard>,
    _dns: ChildGuard,
    /// One Pebble at a time in this process: concurrent ones shared ports
    /// (the TCP probe of `free_port` says nothing of the mock DNS's UDP
    /// port) and so each other's DNS answers.
    _alone: std::sync::MutexGuard<'static, ()>,
    work: PathBuf,
    listen: String,
    acme: u16,
    mgmt: u16,
    dns_mgmt: u16,
    http_port: u16,
    tls_port: u16,
    validity: u64,
    env: Vec<(String, String)>,
    resolver: u16,
    /// External account binding: (key ID, base64url HMAC key), when required.
    eab: Option<(String, String)>,
}

impl Pebble {
    /// Starts Pebble validating HTTP-01 on `http_port` and TLS-ALPN-01 on
    /// `tls_port`, issuing certificates valid for `validity` seconds.
    pub fn start(work: &Path, http_port: u16, tls_port: u16, validity: u64, env: &[(&str, &str)]) -> Self {
        Self::start_at(work, "127.0.0.1", http_port, tls_port, validity, env)
    }

    /// The same, with the ACME endpoint on `listen` (an address containers
    /// reach, such as the Docker bridge gateway) under the name
    /// `host.docker.internal` as well as `localhost`.
    pub fn start_at(
        work: &Path,
        listen: &str,
        http_port: u16,
        tls_port: u16,
        validity: u64,
        env: &[(&str, &str)],
    ) -> Self {
        static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let work = work.join(format!("pebble-{}", free_port()));
        std::fs::create_dir_all(&work).expect("pebble dir");
        // Debian's package ships no test certificates: make a CA and a localhost cert.
        let openssl = |args: &str| run_ok(Command::new(peer("openssl")).current_dir(&work).args(args.split(' ')));
        let new_key = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";
        openssl(&format!(
            "req -x509 {new_key} -keyout ca.key -out ca.pem -days 30 -subj /CN=pebble-test-ca \
             -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign"
        ));
        openssl(&format!("req {new_key} -keyout key.pem -out srv.csr -subj /CN=localhost"));
        std::fs::write(
            work.join("ext.cnf"),
            format!("subjectAltName=DNS:localhost,DNS:host.docker.internal,IP:127.0.0.1,IP:{listen}\nextendedKeyUsage=serverAuth\n"),
        )
        .expect("write ext.cnf");
        openssl(
            "x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 30 -out cert.pem -extfile ext.cnf",
        );
        let (dns, dns_mgmt, dns_guard) = start_challtestsrv(&work);
        let mut p = Self {
            server: None,
            _dns: dns_guard,
            _alone: alone,
            work,
            listen: listen.to_owned(),
            acme: free_port(),
            mgmt: free_port(),
            dns_mgmt,
            http_port,
            tls_port,
            validity,
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            resolver: dns,
            eab: None,
        };
        p.restart();
        p
    }

    /// (Re)starts the ACME server on the same ports; it forgets accounts and
    /// makes a new root, as a real outage would.
    pub fn restart(&mut self) {
        self.server = None;
        let config = format!(
            r#"{{"pebble": {{"listenAddress": "{}:{}", "managementListenAddress": "127.0.0.1:{}", "certificate": {:?}, "privateKey": {:?}, "httpPort": {}, "tlsPort": {}, "ocspResponderURL": "http://127.0.0.1:4002", "certificateValidityPeriod": {}, {}}}}}"#,
            self.listen,
            self.acme,
            self.mgmt,
            self.work.join("cert.pem"),
            self.work.join("key.pem"),
            self.http_port,
            self.tls_port,
            self.validity,
            match &self.eab {
                Some((kid, key)) =>
                    format!(r#""externalAccountBindingRequired": true, "externalAccountMACKeys": {{"{kid}": "{key}"}}"#),
                None => r#""externalAccountBindingRequired": false"#.to_owned(),
            }
        );
        let path = self.work.join("pebble.json");
        std::fs::write(&path, config).expect("write pebble.json");
        let log = self.work.join(format!("pebble-{}.log", free_port()));
        let mut cmd = Command::new(peer("pebble"));
        cmd.arg("-config")
            .arg(&path)
            .arg("-dnsserver")
            .arg(format!("127.0.0.1:{}", self.resolver))
            .arg("-strict=false");
        cmd.env("PEBBLE_VA_NOSLEEP", "1").envs(self.env.iter().map(|(k, v)| (k, v)));
        let mut guard = ChildGuard::spawn(cmd, &log);
        let addr = format!("{}:{}", self.listen, self.acme).parse().expect("listen address");
        guard.wait_for_port(addr, &log);
        self.server = Some(guard);
    }

    /// Requires external account binding with this key from now on.
    pub fn require_eab(&mut self, kid: &str, hmac_key_b64url: &str) {
        self.eab = Some((kid.to_owned(), hmac_key_b64url.to_owned()));
        self.restart();
    }

    /// Validates names through another DNS server from now on.
    pub fn use_resolver(&mut self, port: u16) {
        self.resolver = port;
        self.restart();
    }

    /// Stops the ACME server (an outage); `restart` brings it back.
    pub fn stop(&mut self) {
        self.server = None;
    }

    /// The directory URL on loopback.
    pub fn directory(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.acme)
    }

    /// The directory as containers see it, through `host.docker.internal`.
    pub fn directory_for_containers(&self) -> String {
        format!("https://host.docker.internal:{}/dir", self.acme)
    }

    /// The CA that signs Pebble's own HTTPS (for `[acme] directory_roots`).
    pub fn tls_ca(&self) -> PathBuf {
        self.work.join("ca.pem")
    }

    /// Pebble's current issuing root, written to a file.
    pub fn root(&self) -> PathBuf {
        let path = self.work.join(format!("root-{}.pem", free_port()));
        let out = run_ok(
            Command::new(peer("curl"))
                .args(["-sS", "--fail", "--cacert"])
                .arg(self.tls_ca())
                .arg(format!("https://127.0.0.1:{}/roots/0", self.mgmt)),
        );
        std::fs::write(&path, out.stdout).expect("write root");
        path
    }

    /// Points `host` at `ip` in the DNS Pebble validates with.
    pub fn set_a(&self, host: &str, ip: &str) {
        let post = |path: &str, body: String| {
            run_ok(
                Command::new(peer("curl"))
                    .args(["-sS", "--fail", "-d", &body])
                    .arg(format!("http://127.0.0.1:{}/{path}", self.dns_mgmt)),
            );
        };
        post("clear-a", format!(r#"{{"host": "{host}"}}"#));
        post("add-a", format!(r#"{{"host": "{host}", "addresses": ["{ip}"]}}"#));
    }
}
