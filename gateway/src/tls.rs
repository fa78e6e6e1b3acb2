//! TLS termination: rustls 0.23 with the `ring` provider, through tokio-rustls.
//!
//! - **Certificates** are PEM chains and keys (PKCS#8, PKCS#1 RSA, SEC1 EC) read with
//!   rustls-pki-types' PEM parser, checked at load (the key matches the chain's first
//!   certificate, it names at least one host, its expiry is read for the gauge and a warning).
//!   Loading is part of configuration validation, so `weir validate` and a reload report a bad
//!   file at its config entry and the old certificates keep serving.
//! - **SNI**: [`Certs`] is Weir's own resolver type (rustls 0.24 renames the trait it
//!   implements): the first certificate whose names cover the client's server name, else the
//!   first one (the default). A reload swaps the set atomically; open connections keep theirs.
//! - **Resumption**: rotating ticket keys (`Ticketer`) and a bounded session cache live in the
//!   [`Acceptor`] and survive reloads, so a certificate rotation does not force full
//!   handshakes. When the client CA or `client_auth` changes they are replaced: a resumed session
//!   would otherwise keep a client certificate that is no longer trusted.
//! - **Provider**: `ring`, measured against aws-lc-rs on this machine (in-memory handshakes,
//!   ECDSA P-256, client and server on one core): aws-lc-rs is 10 % faster on full TLS 1.3
//!   handshakes (4,080 vs 3,700/s), 12 % on resumed ones, 23 % on full TLS 1.2, equal on resumed
//!   TLS 1.2. ring is already the provider of the upstream client and the Redis client, so one
//!   provider serves every connection and the build carries no second C crypto library; the
//!   choice is this one function ([`provider`]).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};

/// Sessions remembered for resumption by session id (TLS 1.2 without tickets), per listener.
const SESSION_CACHE: usize = 20_480;
/// A certificate that expires within this is warned about at every load.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(7 * 86_400);

/// The crypto provider of every TLS connection Weir terminates.
pub fn provider() -> Arc<CryptoProvider> {
    static P: std::sync::OnceLock<Arc<CryptoProvider>> = std::sync::OnceLock::new();
    P.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())).clone()
}

/// One certificate as served: its chain and key, and the names it covers.
#[derive(Debug)]
pub struct Served {
    /// For metrics and logs: the first name in the certificate.
    pub name: String,
    /// DNS names (lower-case; `*.example.com` wildcards) and IP addresses, from subjectAltName.
    pub names: Vec<String>,
    pub key: Arc<CertifiedKey>,
    /// Expiry, Unix seconds.
    pub not_after: i64,
    pub path: PathBuf,
}

impl Served {
    /// Whether `host` (no port, any case) is one of this certificate's names (RFC 6125: a
    /// wildcard stands for exactly one left-most label).
    pub fn covers(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.');
        self.names.iter().any(|n| match n.strip_prefix("*.") {
            Some(parent) => {
                host.split_once('.').is_some_and(|(label, rest)| !label.is_empty() && rest.eq_ignore_ascii_case(parent))
            }
            None => n.eq_ignore_ascii_case(host),
        })
    }
}

/// A PEM chain and its key, the key checked against the chain's first certificate (served
/// certificates and upstream client certificates alike); the error is for the configuration
/// report.
type Chain = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>, CertifiedKey);

fn load_chain(cert: &Path, key: &Path) -> Result<Chain, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("cannot read certificate `{}`: {}", cert.display(), pem_error(&e)))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("certificate `{}` is not valid PEM: {}", cert.display(), pem_error(&e)))?;
    if chain.is_empty() {
        return Err(format!("`{}` holds no CERTIFICATE block", cert.display()));
    }
    let der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("cannot read private key `{}`: {}", key.display(), pem_error(&e)))?;
    let certified = CertifiedKey::from_der(chain.clone(), der.clone_key(), &provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
            format!("private key `{}` does not match certificate `{}`", key.display(), cert.display())
        }
        other => format!("cannot use key `{}` with `{}`: {other}", key.display(), cert.display()),
    })?;
    Ok((chain, der, certified))
}

/// Loads and checks one served certificate chain and its key.
pub fn load_cert(cert: &Path, key: &Path) -> Result<Served, String> {
    let (chain, _, certified) = load_chain(cert, key)?;
    let (names, not_after) = cert_facts(&chain[0]).map_err(|e| format!("certificate `{}`: {e}", cert.display()))?;
    let Some(first) = names.first().cloned() else {
        return Err(format!(
            "certificate `{}` names no host (no DNS or IP subjectAltName): clients would refuse it",
            cert.display()
        ));
    };
    Ok(Served { name: first, names, key: Arc::new(certified), not_after, path: cert.to_path_buf() })
}

fn pem_error(e: &rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::NoItemsFound => "no PEM block of the expected kind".into(),
        other => format!("{other:?}"),
    }
}

/// subjectAltName DNS names and IP addresses, and the expiry.
fn cert_facts(der: &CertificateDer<'_>) -> Result<(Vec<String>, i64), String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => names.push(d.to_ascii_lowercase()),
                GeneralName::IPAddress(b) => {
                    if let Some(ip) = ip_of(b) {
                        names.push(ip.to_string());
                    }
                }
                _ => {}
            }
        }
    }
    Ok((names, cert.validity().not_after.timestamp()))
}

fn ip_of(b: &[u8]) -> Option<std::net::IpAddr> {
    match b.len() {
        4 => <[u8; 4]>::try_from(b).ok().map(std::net::IpAddr::from),
        16 => <[u8; 16]>::try_from(b).ok().map(std::net::IpAddr::from),
        _ => None,
    }
}

/// A client CA bundle: the roots and a digest of the file (a change replaces ticket keys).
#[derive(Debug)]
pub struct ClientCa {
    pub roots: Arc<RootCertStore>,
    pub digest: [u8; 32],
}

pub fn load_client_ca(path: &Path) -> Result<ClientCa, String> {
    use sha2::Digest as _;
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read client CA `{}`: {e}", path.display()))?;
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&bytes) {
        let c = c.map_err(|e| format!("client CA `{}` is not valid PEM: {}", path.display(), pem_error(&e)))?;
        roots.add(c).map_err(|e| format!("client CA `{}`: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("client CA `{}` holds no CERTIFICATE block", path.display()));
    }
    Ok(ClientCa { roots: Arc::new(roots), digest: sha2::Sha256::digest(&bytes).into() })
}

/// A certificate named by its issuer (the issuer name's DER) and serial number: what a CRL
/// entry revokes.
pub type CertId = (Vec<u8>, Vec<u8>);

/// `client_crl`: the revocation lists of the client CA (and of any intermediate that signs
/// client certificates), checked in every handshake and again on every request of a connection
/// that presented a certificate.
#[derive(Debug)]
pub struct ClientCrl {
    pub lists: Vec<CertificateRevocationListDer<'static>>,
    /// Every revoked certificate of every list, for the per-request check.
    pub revoked: Arc<HashSet<CertId>>,
    /// Each list's issuer (RFC 4514) and `nextUpdate` (Unix seconds; `None`: the list gives none).
    pub issuers: Vec<(String, Option<i64>)>,
    pub digest: [u8; 32],
}

/// Reads a CRL file: PEM (`X509 CRL` blocks, one per issuer) or a single DER list.
pub fn load_client_crl(path: &Path) -> Result<ClientCrl, String> {
    use sha2::Digest as _;
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read client CRL `{}`: {e}", path.display()))?;
    let lists: Vec<CertificateRevocationListDer<'static>> = if bytes.first() == Some(&0x30) {
        vec![CertificateRevocationListDer::from(bytes.clone())]
    } else {
        CertificateRevocationListDer::pem_slice_iter(&bytes)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("client CRL `{}` is not valid PEM: {}", path.display(), pem_error(&e)))?
    };
    if lists.is_empty() {
        return Err(format!("client CRL `{}` holds no X509 CRL block", path.display()));
    }
    let mut revoked = HashSet::new();
    let mut issuers = Vec::new();
    for (i, der) in lists.iter().enumerate() {
        let (_, crl) = x509_parser::parse_x509_crl(der.as_ref())
            .map_err(|e| format!("client CRL `{}`: list {} is not an X.509 CRL: {e}", path.display(), i + 1))?;
        let issuer = crl.issuer().as_raw().to_vec();
        for r in crl.iter_revoked_certificates() {
            revoked.insert((issuer.clone(), r.raw_serial().to_vec()));
        }
        issuers.push((crl.issuer().to_string(), crl.next_update().map(|t| t.timestamp())));
    }
    Ok(ClientCrl { lists, revoked: Arc::new(revoked), issuers, digest: sha2::Sha256::digest(&bytes).into() })
}

/// The verifier of client certificates: signed by `ca`; with `crl`, not revoked anywhere in
/// the chain (every CA below the trust anchor needs its list: a certificate whose status no list
/// gives is refused, as nginx and Envoy do), by lists whose `nextUpdate` has not passed.
pub fn client_verifier(
    ca: &ClientCa,
    crl: Option<&ClientCrl>,
    auth: ClientAuth,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, String> {
    let mut v = WebPkiClientVerifier::builder_with_provider(ca.roots.clone(), provider());
    if let Some(crl) = crl {
        v = v.with_crls(crl.lists.iter().cloned()).enforce_revocation_expiration();
    }
    if auth == ClientAuth::Optional {
        v = v.allow_unauthenticated();
    }
    v.build().map_err(|e| match e {
        rustls::server::VerifierBuilderError::InvalidCrl(e) => format!("client CRL: not usable ({e:?})"),
        e => format!("client CA: {e}"),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// A client certificate signed by `client_ca` is needed to connect.
    Required,
    /// Asked for and verified when sent; connections without one are served too.
    Optional,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MinVersion {
    Tls12,
    Tls13,
}

/// A listener's TLS settings, loaded and checked (by configuration validation).
#[derive(Debug, Clone)]
pub struct TlsSettings {
    pub certs: Arc<Vec<Arc<Served>>>,
    pub client_ca: Option<Arc<ClientCa>>,
    pub client_crl: Option<Arc<ClientCrl>>,
    pub client_auth: ClientAuth,
    pub min_version: MinVersion,
    pub handshake_timeout: Duration,
    /// `Strict-Transport-Security` for this listener's responses.
    pub hsts: Option<http::HeaderValue>,
    /// Every file the settings were read from (watched for changes).
    pub files: Vec<PathBuf>,
}

impl TlsSettings {
    /// Certificates that expire within [`EXPIRY_WARNING`] (or have), as warnings.
    pub fn expiry_warnings(&self, now: SystemTime) -> Vec<String> {
        let now = crate::clock::unix_s(now);
        self.certs
            .iter()
            .filter(|c| c.not_after - now < EXPIRY_WARNING.as_secs() as i64)
            .map(|c| {
                let left = c.not_after - now;
                if left <= 0 {
                    format!("certificate `{}` ({}) expired {} s ago", c.path.display(), c.name, -left)
                } else {
                    format!("certificate `{}` ({}) expires in {} s", c.path.display(), c.name, left)
                }
            })
            .collect()
    }
}

/// Weir's certificate resolver: SNI picks by the names in each certificate; the first is the
/// default. Swapped whole on reload.
#[derive(Debug)]
pub struct Certs {
    set: ArcSwap<Vec<Arc<Served>>>,
}

impl Certs {
    fn new(set: Arc<Vec<Arc<Served>>>) -> Certs {
        Certs { set: ArcSwap::new(set) }
    }

    /// The certificate served for `sni` (none: the default).
    pub fn pick(&self, sni: Option<&str>) -> Option<Arc<Served>> {
        let set = self.set.load();
        sni.and_then(|n| set.iter().find(|c| c.covers(n))).or_else(|| set.first()).cloned()
    }

    pub fn all(&self) -> Arc<Vec<Arc<Served>>> {
        self.set.load_full()
    }
}

/// The rustls side of [`Certs`].
#[derive(Debug)]
struct Resolver(Arc<Certs>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.pick(hello.server_name()).map(|c| c.key.clone())
    }
}

/// What the connection was accepted with, for the request path.
#[derive(Debug)]
pub struct TlsConn {
    pub version: &'static str,
    /// The client's server name (SNI), lower-case.
    pub sni: Option<String>,
    /// The certificate this connection was served.
    pub cert: Arc<Served>,
    /// The verified client certificate (mTLS), if one was presented.
    pub client: Option<ClientIdentity>,
    /// The presented chain and the listener's current revocations (with a client certificate).
    pub revocation: Option<Revocation>,
    pub resumed: bool,
    /// `Strict-Transport-Security` to add to responses on this connection.
    pub hsts: Option<http::HeaderValue>,
}

impl TlsConn {
    /// Whether a certificate of the chain this connection presented is revoked by the listener's
    /// current `client_crl` (a list loaded after the handshake counts: the connection's next
    /// request is refused).
    pub fn revoked(&self) -> bool {
        self.revocation.as_ref().is_some_and(Revocation::revoked)
    }
}

/// A connection's client chain, held against the listener's revocations.
#[derive(Debug)]
pub struct Revocation {
    chain: Vec<CertId>,
    current: Arc<ArcSwap<HashSet<CertId>>>,
}

impl Revocation {
    fn of(chain: &[CertificateDer<'_>], current: &Arc<ArcSwap<HashSet<CertId>>>) -> Revocation {
        let chain = chain
            .iter()
            .filter_map(|der| x509_parser::parse_x509_certificate(der).ok())
            .map(|(_, c)| (c.issuer().as_raw().to_vec(), c.raw_serial().to_vec()))
            .collect();
        Revocation { chain, current: current.clone() }
    }

    /// Whether a certificate of the chain is in the listener's current list.
    fn revoked(&self) -> bool {
        let set = self.current.load();
        !set.is_empty() && self.chain.iter().any(|id| set.contains(id))
    }
}

/// A verified client certificate: who it names.
#[derive(Debug)]
pub struct ClientIdentity {
    /// RFC 4514 subject, e.g. `CN=alice,O=Acme`.
    pub subject: String,
    /// subjectAltNames as `DNS:...`, `URI:...`, `email:...`, `IP:...`.
    pub sans: Vec<String>,
    /// The consumer id (`consumer: {from: client_cert}`): the subject's common name, else the
    /// first subjectAltName's value.
    pub id: Option<String>,
    /// `Weir-Client-Cert`, forwarded upstream (a Structured Field dictionary).
    pub header: Option<http::HeaderValue>,
}

impl ClientIdentity {
    fn of(der: &CertificateDer<'_>) -> Option<ClientIdentity> {
        use base64::Engine as _;
        use sha2::Digest as _;
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let subject = cert.subject().to_string();
        let cn = cert.subject().iter_common_name().next().and_then(|a| a.as_str().ok()).map(str::to_string);
        let mut sans = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for n in &san.value.general_names {
                match n {
                    GeneralName::DNSName(d) => sans.push(format!("DNS:{d}")),
                    GeneralName::URI(u) => sans.push(format!("URI:{u}")),
                    GeneralName::RFC822Name(e) => sans.push(format!("email:{e}")),
                    GeneralName::IPAddress(b) => {
                        if let Some(ip) = ip_of(b) {
                            sans.push(format!("IP:{ip}"));
                        }
                    }
                    _ => {}
                }
            }
        }
        let id = cn
            .or_else(|| sans.first().and_then(|s| s.split_once(':')).map(|(_, v)| v.to_string()))
            .filter(|id| !id.is_empty() && id.len() <= 256 && !id.chars().any(char::is_control));
        let hash = sha2::Sha256::digest(der.as_ref());
        let sf = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
        let mut header =
            format!("hash=:{}:, subject=\"{}\"", base64::engine::general_purpose::STANDARD.encode(hash), sf(&subject));
        if !sans.is_empty() {
            header.push_str(", san=(");
            header.push_str(&sans.iter().map(|s| format!("\"{}\"", sf(s))).collect::<Vec<_>>().join(" "));
            header.push(')');
        }
        // Non-ASCII subjects cannot be a header value: the identity still reaches the consumer.
        let header = http::HeaderValue::from_str(&header).ok();
        Some(ClientIdentity { subject, sans, id, header })
    }
}

/// Why a handshake failed, as the `reason` label of `weir_tls_handshake_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    Timeout,
    /// Plain HTTP on a TLS port (answered 400).
    PlainHttp,
    /// Something that is not TLS at all.
    NotTls,
    /// No version, cipher suite or group in common (a TLS 1.1 client, say).
    ProtocolVersion,
    /// mTLS: no client certificate.
    NoClientCert,
    /// mTLS: a certificate that does not verify.
    BadClientCert,
    /// The client sent an alert (it refused our certificate, say).
    AlertReceived,
    /// A malformed message, or the peer went away.
    Other,
}

impl HandshakeFailure {
    pub const ALL: [HandshakeFailure; 8] = [
        HandshakeFailure::Timeout,
        HandshakeFailure::PlainHttp,
        HandshakeFailure::NotTls,
        HandshakeFailure::ProtocolVersion,
        HandshakeFailure::NoClientCert,
        HandshakeFailure::BadClientCert,
        HandshakeFailure::AlertReceived,
        HandshakeFailure::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::PlainHttp => "plain_http",
            HandshakeFailure::NotTls => "not_tls",
            HandshakeFailure::ProtocolVersion => "protocol_version",
            HandshakeFailure::NoClientCert => "no_client_cert",
            HandshakeFailure::BadClientCert => "bad_client_cert",
            HandshakeFailure::AlertReceived => "alert_received",
            HandshakeFailure::Other => "other",
        }
    }

    fn of(e: &std::io::Error) -> HandshakeFailure {
        match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            Some(rustls::Error::PeerIncompatible(_)) => HandshakeFailure::ProtocolVersion,
            Some(rustls::Error::NoCertificatesPresented) => HandshakeFailure::NoClientCert,
            Some(rustls::Error::InvalidCertificate(_)) => HandshakeFailure::BadClientCert,
            Some(rustls::Error::AlertReceived(_)) => HandshakeFailure::AlertReceived,
            _ => HandshakeFailure::Other,
        }
    }
}

/// What decides whether resumption state may be kept across a reload.
#[derive(Debug, Clone, PartialEq, Eq)]
struct AuthKey {
    ca: Option<[u8; 32]>,
    crl: Option<[u8; 32]>,
    auth: ClientAuth,
}

impl AuthKey {
    fn of(s: &TlsSettings) -> AuthKey {
        AuthKey {
            ca: s.client_ca.as_ref().map(|c| c.digest),
            crl: s.client_crl.as_ref().map(|c| c.digest),
            auth: s.client_auth,
        }
    }
}

/// Resumption state that outlives `ServerConfig` rebuilds.
#[derive(Debug, Clone)]
struct Resumption {
    ticketer: Arc<dyn rustls::server::ProducesTickets>,
    cache: Arc<dyn rustls::server::StoresServerSessions>,
}

impl Resumption {
    fn new() -> Result<Resumption, String> {
        Ok(Resumption {
            ticketer: rustls::crypto::ring::Ticketer::new().map_err(|e| format!("cannot make TLS ticket keys: {e}"))?,
            cache: ServerSessionMemoryCache::new(SESSION_CACHE),
        })
    }
}

/// One TLS listener's acceptor: the current `ServerConfig` (rebuilt on reload), its certificate
/// set and resumption state.
#[derive(Debug)]
pub struct Acceptor {
    certs: Arc<Certs>,
    metrics: Arc<crate::metrics::Metrics>,
    config: ArcSwap<ServerConfig>,
    state: Mutex<(AuthKey, Resumption)>,
    timeout: ArcSwap<Duration>,
    hsts: ArcSwap<Option<http::HeaderValue>>,
    /// The current `client_crl`'s revoked certificates, shared with open connections.
    revoked: Arc<ArcSwap<HashSet<CertId>>>,
}

fn revoked_of(s: &TlsSettings) -> Arc<HashSet<CertId>> {
    s.client_crl.as_ref().map_or_else(Default::default, |c| c.revoked.clone())
}

fn server_config(s: &TlsSettings, certs: &Arc<Certs>, resumption: &Resumption) -> Result<ServerConfig, String> {
    let versions: &[&rustls::SupportedProtocolVersion] = match s.min_version {
        MinVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        MinVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|e| format!("TLS versions: {e}"))?;
    let builder = match &s.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => builder.with_client_cert_verifier(client_verifier(ca, s.client_crl.as_deref(), s.client_auth)?),
    };
    let mut cfg = builder.with_cert_resolver(Arc::new(Resolver(certs.clone())));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    cfg.ticketer = resumption.ticketer.clone();
    cfg.session_storage = resumption.cache.clone();
    Ok(cfg)
}

impl Acceptor {
    pub fn new(s: &TlsSettings, metrics: Arc<crate::metrics::Metrics>) -> Result<Acceptor, String> {
        let certs = Arc::new(Certs::new(s.certs.clone()));
        let resumption = Resumption::new()?;
        let cfg = server_config(s, &certs, &resumption)?;
        let key = AuthKey::of(s);
        Ok(Acceptor {
            certs,
            metrics,
            config: ArcSwap::from_pointee(cfg),
            state: Mutex::new((key, resumption)),
            timeout: ArcSwap::from_pointee(s.handshake_timeout),
            hsts: ArcSwap::from_pointee(s.hsts.clone()),
            revoked: Arc::new(ArcSwap::new(revoked_of(s))),
        })
    }

    /// Applies reloaded settings: new certificates for new handshakes; the same ticket keys and
    /// session cache unless the client CA, its CRL or `client_auth` changed (a revoked
    /// certificate must not resume). Returns whether resumption state was replaced.
    pub fn update(&self, s: &TlsSettings) -> Result<bool, String> {
        let key = AuthKey::of(s);
        let mut state = self.state.lock().map_err(|_| "TLS state poisoned".to_string())?;
        let replace = state.0 != key;
        let resumption = if replace { Resumption::new()? } else { state.1.clone() };
        // Built before anything is swapped: a failure leaves the listener as it was.
        let certs_before = self.certs.all();
        self.certs.set.store(s.certs.clone());
        match server_config(s, &self.certs, &resumption) {
            Ok(cfg) => {
                self.config.store(Arc::new(cfg));
                *state = (key, resumption);
                self.timeout.store(Arc::new(s.handshake_timeout));
                self.hsts.store(Arc::new(s.hsts.clone()));
                self.revoked.store(revoked_of(s));
                Ok(replace)
            }
            Err(e) => {
                self.certs.set.store(certs_before);
                Err(e)
            }
        }
    }

    /// Counts a failed handshake (`weir_tls_handshake_errors_total{reason}`).
    pub fn failed(&self, why: HandshakeFailure) {
        self.metrics.tls_handshake_error(why.as_str());
    }

    pub fn certs(&self) -> &Arc<Certs> {
        &self.certs
    }

    /// The handshake, bounded by `handshake_timeout`. Plain HTTP gets a 400 and the connection
    /// is closed.
    pub async fn accept(
        &self,
        tcp: tokio::net::TcpStream,
    ) -> Result<(tokio_rustls::server::TlsStream<tokio::net::TcpStream>, TlsConn), (HandshakeFailure, String)> {
        use tokio::io::AsyncWriteExt as _;
        let timeout = **self.timeout.load();
        let deadline = tokio::time::Instant::now() + timeout;
        let mut first = [0u8; 1];
        let mut tcp = tcp;
        match tokio::time::timeout_at(deadline, tcp.peek(&mut first)).await {
            Err(_) => return Err((HandshakeFailure::Timeout, "no ClientHello in time".into())),
            Ok(Err(e)) => return Err((HandshakeFailure::Other, e.to_string())),
            Ok(Ok(0)) => return Err((HandshakeFailure::Other, "closed before the handshake".into())),
            Ok(Ok(_)) if first[0] == 0x16 => {}
            Ok(Ok(_)) if first[0].is_ascii_uppercase() => {
                let body = r#"{"error":"plain_http","message":"this port speaks HTTPS: plain HTTP was sent to it"}"#;
                let resp = format!(
                    "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tokio::time::timeout_at(deadline, tcp.write_all(resp.as_bytes())).await;
                let _ = tcp.shutdown().await;
                return Err((HandshakeFailure::PlainHttp, "plain HTTP on a TLS port".into()));
            }
            Ok(Ok(_)) => return Err((HandshakeFailure::NotTls, format!("first byte {:#04x} is not TLS", first[0]))),
        }
        let acceptor = tokio_rustls::TlsAcceptor::from(self.config.load_full());
        let stream = match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
            Err(_) => return Err((HandshakeFailure::Timeout, "handshake did not finish in time".into())),
            Ok(Err(e)) => return Err((HandshakeFailure::of(&e), e.to_string())),
            Ok(Ok(s)) => s,
        };
        let (_, conn) = stream.get_ref();
        let sni = conn.server_name().map(str::to_ascii_lowercase);
        let version = match conn.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
            _ => "TLS",
        };
        let peer = conn.peer_certificates().filter(|c| !c.is_empty());
        let client = peer.and_then(|c| c.first()).and_then(ClientIdentity::of);
        let revocation = peer.map(|c| Revocation::of(c, &self.revoked));
        if revocation.as_ref().is_some_and(Revocation::revoked) {
            // Resumption state is replaced when the list changes; this catches the rest.
            return Err((HandshakeFailure::BadClientCert, "client certificate revoked".into()));
        }
        let resumed = conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        self.metrics.tls_handshake(if resumed { "resumed" } else { "full" });
        let Some(cert) = self.certs.pick(sni.as_deref()) else {
            return Err((HandshakeFailure::Other, "no certificate".into()));
        };
        let hsts = (**self.hsts.load()).clone();
        Ok((stream, TlsConn { version, sni, cert, client, revocation, resumed, hsts }))
    }
}

/// A route's TLS to its `https://` upstreams, built at validation: whom to trust, what to
/// present, which name to verify (and send as SNI).
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    pub config: Arc<rustls::ClientConfig>,
    /// Overrides the upstream's host for SNI and verification.
    pub server_name: Option<rustls::pki_types::ServerName<'static>>,
    pub verify: bool,
    /// Offer `h2` by ALPN (`upstream_http2`).
    pub http2: bool,
}

/// Builds an upstream client configuration. `ca`: trust only this bundle (else the web PKI
/// roots); `client`: a certificate and key to present (mTLS to the upstream); `verify: false`
/// accepts any certificate (handshake signatures are still checked).
pub fn upstream_tls(
    ca: Option<&Path>,
    client: Option<(&Path, &Path)>,
    server_name: Option<&str>,
    verify: bool,
    http2: bool,
) -> Result<UpstreamTls, String> {
    let roots = match ca {
        Some(path) => load_client_ca(path).map_err(|e| e.replace("client CA", "upstream CA"))?.roots,
        None => Arc::new(RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() }),
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS versions: {e}"))?;
    let builder = if verify {
        builder.with_root_certificates(roots)
    } else {
        builder.dangerous().with_custom_certificate_verifier(Arc::new(NoVerify(provider())))
    };
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let (chain, der, _) = load_chain(cert, key)?;
            builder
                .with_client_auth_cert(chain, der)
                .map_err(|e| format!("client certificate `{}`: {e}", cert.display()))?
        }
    };
    // ALPN is set by the connector (`h2, http/1.1` with `http2`, none without).
    config.alpn_protocols = Vec::new();
    let server_name = match server_name {
        None => None,
        Some(n) => Some(
            rustls::pki_types::ServerName::try_from(n.to_string())
                .map_err(|_| format!("server_name `{n}` is not a DNS name or IP address"))?,
        ),
    };
    Ok(UpstreamTls { config: Arc::new(config), server_name, verify, http2 })
}

/// `upstream_tls.verify: false`: any certificate is accepted; the handshake's signatures are
/// still verified (the peer holds the key of the certificate it sent).
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
