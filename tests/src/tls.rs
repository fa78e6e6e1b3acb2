//! TLS for the end-to-end tests: a private CA and certificates generated per test (rcgen; no
//! file checked in that could expire), and a client that reports what the handshake did.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Version};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};

use crate::{full, Got};

/// A certificate authority that signs what a test needs.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    pub pem: String,
}

/// A signed leaf: PEM texts and the DER chain.
#[derive(Debug, Clone)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
    pub key_der: Vec<u8>,
    /// The serial number's bytes (what a CRL entry names).
    pub serial: Vec<u8>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().expect("CA key");
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        let cert = p.self_signed(&key).expect("CA cert");
        let pem = cert.pem();
        Ca { cert, key, pem }
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    pub fn server(&self, names: &[&str]) -> Leaf {
        self.leaf(names, None, false)
    }

    /// A client certificate with subject CN `cn`.
    pub fn client(&self, cn: &str) -> Leaf {
        self.leaf(&[], Some(cn), false)
    }

    /// A server certificate that is already expired.
    pub fn expired(&self, names: &[&str]) -> Leaf {
        self.leaf(names, None, true)
    }

    fn leaf(&self, names: &[&str], cn: Option<&str>, expired: bool) -> Leaf {
        let key = KeyPair::generate().expect("leaf key");
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        for n in names {
            p.subject_alt_names.push(match n.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*n).try_into().expect("dns name")),
            });
        }
        p.distinguished_name.push(DnType::CommonName, cn.unwrap_or(names.first().copied().unwrap_or("leaf")));
        // Serials unique in the process (a CRL names certificates by issuer and serial).
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let mut serial = vec![0x01];
        serial.extend_from_slice(&NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed).to_be_bytes());
        p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        if expired {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = p.signed_by(&key, &self.cert, &self.key).expect("sign");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
            key_der: key.serialize_der(),
            serial,
        }
    }

    /// A CRL (PEM) of this CA revoking `revoked`; `stale`: its nextUpdate has passed.
    pub fn crl(&self, revoked: &[&Leaf], stale: bool) -> String {
        use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevokedCertParams, SerialNumber};
        let p = CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2020, 1, 1),
            next_update: if stale { rcgen::date_time_ymd(2021, 1, 1) } else { rcgen::date_time_ymd(2099, 1, 1) },
            crl_number: SerialNumber::from(u64::try_from(revoked.len()).expect("count") + 1),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|l| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&l.serial),
                    revocation_time: rcgen::date_time_ymd(2020, 6, 1),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        p.signed_by(&self.cert, &self.key).expect("CRL").pem().expect("CRL PEM")
    }

    /// Writes this CA's certificate (a client-CA or upstream-CA bundle) to `dir/file`.
    pub fn write(&self, dir: &Path, file: &str) -> PathBuf {
        let path = dir.join(file);
        std::fs::write(&path, &self.pem).expect("write CA");
        path
    }

    pub fn roots(&self) -> RootCertStore {
        let mut r = RootCertStore::empty();
        r.add(self.cert.der().clone()).expect("root");
        r
    }
}

impl Leaf {
    /// Writes `NAME.pem` and `NAME.key` into `dir`.
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let (c, k) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
        std::fs::write(&c, &self.cert_pem).expect("write cert");
        std::fs::write(&k, &self.key_pem).expect("write key");
        (c, k)
    }
}

/// A client configuration: trusts `roots`, offers `alpn`, optionally presents `client`, and
/// keeps sessions for resumption (share the `Arc` between connections to resume).
pub fn client_config(roots: RootCertStore, alpn: &[&str], client: Option<&Leaf>) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let b = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let mut cfg = match client {
        None => b.with_no_client_auth(),
        Some(l) => b
            .with_client_auth_cert(
                vec![l.der.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(l.key_der.clone())),
            )
            .expect("client cert"),
    };
    cfg.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    cfg.resumption = rustls::client::Resumption::in_memory_sessions(64);
    Arc::new(cfg)
}

/// What a TLS connection negotiated.
#[derive(Debug)]
pub struct Handshake {
    pub kind: Option<rustls::HandshakeKind>,
    pub alpn: Option<Vec<u8>>,
    pub version: Option<rustls::ProtocolVersion>,
    /// The server's end-entity certificate.
    pub server_cert: Option<CertificateDer<'static>>,
}

/// A TLS connection carrying HTTP/1.1 or HTTP/2 (by ALPN).
pub struct Conn {
    pub handshake: Handshake,
    h1: Option<hyper::client::conn::http1::SendRequest<crate::Body>>,
    h2: Option<hyper::client::conn::http2::SendRequest<crate::Body>>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("handshake", &self.handshake).finish()
    }
}

/// Connects and handshakes with server name `sni`. `Err`: the handshake (or the connection)
/// failed, with the reason.
pub async fn connect(addr: SocketAddr, sni: &str, cfg: &Arc<ClientConfig>) -> Result<Conn, String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from(sni.to_string()).map_err(|e| e.to_string())?;
    let tls =
        tokio::time::timeout(Duration::from_secs(10), tokio_rustls::TlsConnector::from(cfg.clone()).connect(name, tcp))
            .await
            .map_err(|_| "handshake timed out".to_string())?
            .map_err(|e| e.to_string())?;
    let (_, c) = tls.get_ref();
    let handshake = Handshake {
        kind: c.handshake_kind(),
        alpn: c.alpn_protocol().map(<[u8]>::to_vec),
        version: c.protocol_version(),
        server_cert: c.peer_certificates().and_then(|p| p.first()).map(|d| d.clone().into_owned()),
    };
    let io = TokioIo::new(tls);
    if handshake.alpn.as_deref() == Some(b"h2") {
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        Ok(Conn { handshake, h1: None, h2: Some(send) })
    } else {
        let (send, conn) = hyper::client::conn::http1::handshake(io).await.map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        Ok(Conn { handshake, h1: Some(send), h2: None })
    }
}

impl Conn {
    /// GET `path` with `Host` (or `:authority`) `authority`. `Err`: the connection failed
    /// (a TLS 1.3 client-certificate refusal surfaces here, on the first read).
    pub async fn get(&mut self, authority: &str, path: &str, headers: &[(&str, &str)]) -> Result<Got, String> {
        self.send(http::Method::GET, authority, path, headers, "").await
    }

    /// POST `body` to `path`, like `get`.
    pub async fn post(&mut self, authority: &str, path: &str, body: &str) -> Result<Got, String> {
        self.send(http::Method::POST, authority, path, &[], body).await
    }

    async fn send(
        &mut self,
        method: http::Method,
        authority: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Result<Got, String> {
        let version = if self.h2.is_some() { Version::HTTP_2 } else { Version::HTTP_11 };
        let uri = if self.h2.is_some() { format!("https://{authority}{path}") } else { path.to_string() };
        let mut b = Request::builder().method(method).uri(uri).version(version);
        if self.h1.is_some() {
            b = b.header("host", authority);
        }
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(full(body.to_string())).map_err(|e| e.to_string())?;
        let fut = async {
            let resp = match (&mut self.h1, &mut self.h2) {
                (Some(s), _) => {
                    s.ready().await.map_err(|e| format!("connection not usable: {e}"))?;
                    s.send_request(req).await
                }
                (_, Some(s)) => {
                    s.ready().await.map_err(|e| format!("connection not usable: {e}"))?;
                    s.send_request(req).await
                }
                _ => unreachable!(),
            }
            .map_err(|e| e.to_string())?;
            let (parts, body) = resp.into_parts();
            let body: Bytes = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
            Ok::<_, String>(Got { status: parts.status, version: parts.version, headers: parts.headers, body })
        };
        tokio::time::timeout(Duration::from_secs(30), fut).await.map_err(|_| "request timed out".to_string())?
    }
}

/// An HTTPS origin: serves `leaf` (HTTP/1.1 or HTTP/2 by ALPN) and answers with what it saw as
/// JSON: `host`, `version`, `sni`, and whether the client presented a certificate (`client_ca`:
/// verified against it and required).
pub async fn https_origin(leaf: &Leaf, client_ca: Option<&Ca>) -> SocketAddr {
    use hyper::service::service_fn;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let b = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("versions");
    let b = match client_ca {
        None => b.with_no_client_auth(),
        Some(ca) => b.with_client_cert_verifier(
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(ca.roots()), provider)
                .build()
                .expect("verifier"),
        ),
    };
    let mut cfg = b
        .with_single_cert(vec![leaf.der.clone()], PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf.key_der.clone())))
        .expect("origin cert");
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let (_, c) = tls.get_ref();
                let sni = c.server_name().map(str::to_string);
                let client_cert = c.peer_certificates().is_some_and(|p| !p.is_empty());
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let body = serde_json::json!({
                        "host": req.headers().get("host").and_then(|v| v.to_str().ok()),
                        "authority": req.uri().authority().map(|a| a.to_string()),
                        "version": format!("{:?}", req.version()),
                        "sni": sni,
                        "client_cert": client_cert,
                    });
                    async move { Ok::<_, std::convert::Infallible>(crate::text(200, &body.to_string())) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

/// A certificate in Kubernetes' secret layout: `NAME -> ..data/NAME`, `..data -> <version dir>`;
/// a rotation points `..data` at a new directory with one atomic rename.
#[derive(Debug)]
pub struct SecretDir {
    root: PathBuf,
    version: usize,
}

impl SecretDir {
    pub fn new(root: &Path, leaf: &Leaf) -> SecretDir {
        let mut s = SecretDir { root: root.to_path_buf(), version: 0 };
        s.rotate(&leaf.cert_pem, &leaf.key_pem);
        std::os::unix::fs::symlink("..data/tls.crt", root.join("tls.crt")).expect("symlink");
        std::os::unix::fs::symlink("..data/tls.key", root.join("tls.key")).expect("symlink");
        s
    }

    /// Writes `cert` and `key` into a new version directory and swaps `..data` to it.
    pub fn rotate(&mut self, cert: &str, key: &str) {
        self.version += 1;
        let v = format!("..v{}", self.version);
        std::fs::create_dir(self.root.join(&v)).expect("version dir");
        std::fs::write(self.root.join(&v).join("tls.crt"), cert).expect("cert");
        std::fs::write(self.root.join(&v).join("tls.key"), key).expect("key");
        let tmp = self.root.join("..data_tmp");
        std::os::unix::fs::symlink(&v, &tmp).expect("symlink");
        std::fs::rename(&tmp, self.root.join("..data")).expect("rename");
    }

    pub fn cert(&self) -> PathBuf {
        self.root.join("tls.crt")
    }

    pub fn key(&self) -> PathBuf {
        self.root.join("tls.key")
    }
}
