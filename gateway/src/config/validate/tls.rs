//! TLS: listener certificates (`listen[].tls`) and TLS to upstreams (`routes[].upstream_tls`).

use super::*;

impl Validator {
    /// `upstream_tls:` and `upstream_http2:`, built into the route's client configuration now
    /// (a missing or mismatched file is a configuration error). `verify: false` is a warning.
    pub(super) fn upstream_tls(&mut self, src: &Source, p: &str, r: &RawRoute) -> Option<crate::tls::UpstreamTls> {
        let up = format!("{p}.upstream_tls");
        let t = r.upstream_tls.as_ref();
        let file = |v: &mut Self, key: &str, rel: Option<&String>, what: &str| {
            rel.map(|rel| v.file_exists(src, &format!("{up}.{key}"), rel, what))
        };
        let ca = file(self, "ca", t.and_then(|t| t.ca.as_ref()), "upstream CA file");
        let cert = file(self, "client_cert", t.and_then(|t| t.client_cert.as_ref()), "client certificate file");
        let key = file(self, "client_key", t.and_then(|t| t.client_key.as_ref()), "client key file");
        if cert.is_some() != key.is_some() {
            self.problems.at(src, &up, "upstream_tls needs both `client_cert` and `client_key`, or neither");
        }
        let verify = t.and_then(|t| t.verify).unwrap_or(true);
        if !verify {
            self.warnings.push(Problem {
                file: src.path.clone(),
                pos: src.spans.value(&format!("{up}.verify")),
                message: "upstream_tls.verify: false accepts any certificate from the upstream: anyone on the path can impersonate it".into(),
            });
        }
        let missing = [&ca, &cert, &key].iter().any(|f| f.as_ref().is_some_and(|f| !f.is_file()));
        if missing {
            return None;
        }
        let client = cert.as_deref().zip(key.as_deref());
        match crate::tls::upstream_tls(
            ca.as_deref(),
            client,
            t.and_then(|t| t.server_name.as_deref()),
            verify,
            r.upstream_http2.unwrap_or(false),
        ) {
            Ok(u) => Some(u),
            Err(e) => {
                self.problems.at(src, &up, e);
                None
            }
        }
    }

    /// A listener's `tls:`: every certificate and the client CA loaded and checked now, so a
    /// bad file is reported at its entry (and a reload with one keeps the old certificates).
    pub(super) fn tls(&mut self, src: &Source, p: &str, t: &RawTls) -> Option<crate::tls::TlsSettings> {
        use crate::tls::{ClientAuth, MinVersion};
        if t.certs.is_empty() {
            self.problems.at(src, &format!("{p}.certs"), "tls needs at least one certificate");
        }
        let mut certs = Vec::new();
        let mut files = Vec::new();
        let mut ok = true;
        for (j, c) in t.certs.iter().enumerate() {
            let cp = format!("{p}.certs[{j}]");
            let cert = self.file_exists(src, &format!("{cp}.cert"), &c.cert, "certificate file");
            let key = self.file_exists(src, &format!("{cp}.key"), &c.key, "key file");
            if !cert.is_file() || !key.is_file() {
                ok = false;
                continue;
            }
            match crate::tls::load_cert(&cert, &key) {
                Ok(served) => {
                    if let Some((passed, days)) = expiry_soon(served.not_after) {
                        let when = if passed { format!("expired {days} ago") } else { format!("expires in {days}") };
                        self.warnings.push(Problem {
                            file: src.path.clone(),
                            pos: src.spans.value(&format!("{cp}.cert")),
                            message: format!("certificate `{}` ({}) {when}; it is still served", c.cert, served.name),
                        });
                    }
                    certs.push(std::sync::Arc::new(served));
                }
                Err(e) => {
                    ok = false;
                    self.problems.at(src, &cp, e);
                }
            }
            files.push(cert);
            files.push(key);
        }
        let client_ca = t.client_ca.as_ref().and_then(|ca| {
            let path = self.file_exists(src, &format!("{p}.client_ca"), ca, "client CA file");
            files.push(path.clone());
            match crate::tls::load_client_ca(&path) {
                Ok(c) => Some(std::sync::Arc::new(c)),
                Err(e) => {
                    ok = false;
                    if path.is_file() {
                        self.problems.at(src, &format!("{p}.client_ca"), e);
                    }
                    None
                }
            }
        });
        let client_crl = t.client_crl.as_ref().and_then(|crl| self.client_crl(src, p, t, crl, &mut files));
        if client_crl.is_none() && t.client_crl.is_some() {
            ok = false;
        }
        let client_auth = self.keyword(
            src,
            &format!("{p}.client_auth"),
            "client_auth",
            t.client_auth.as_deref(),
            &[("required", ClientAuth::Required), ("optional", ClientAuth::Optional)],
            ClientAuth::Required,
        );
        if t.client_auth.is_some() && t.client_ca.is_none() {
            self.problems.at(
                src,
                &format!("{p}.client_auth"),
                "client_auth needs `client_ca` (the CA that signs client certificates)",
            );
        }
        // Older versions are not offered at all.
        let min_version = self.keyword(
            src,
            &format!("{p}.min_version"),
            "min_version",
            t.min_version.as_deref(),
            &[("1.2", MinVersion::Tls12), ("1.3", MinVersion::Tls13)],
            MinVersion::Tls12,
        );
        let handshake_timeout = self.duration(
            src,
            &format!("{p}.handshake_timeout"),
            t.handshake_timeout.as_ref(),
            std::time::Duration::from_secs(10),
        );
        // HSTS: only on the TLS listener (RFC 6797 §7.2: never over plain HTTP).
        let hsts = t.hsts.as_ref().and_then(|h| {
            let max_age = self.duration(src, &format!("{p}.hsts"), Some(h), std::time::Duration::ZERO).as_secs();
            http::HeaderValue::from_str(&format!("max-age={max_age}")).ok()
        });
        if let (Some(ca), Some(crl)) = (&client_ca, &client_crl) {
            if let Err(e) = crate::tls::client_verifier(ca, Some(crl), client_auth) {
                ok = false;
                self.problems.at(src, &format!("{p}.client_crl"), e);
            }
        }
        (ok && !certs.is_empty()).then(|| crate::tls::TlsSettings {
            certs: std::sync::Arc::new(certs),
            client_ca,
            client_crl,
            client_auth,
            min_version,
            handshake_timeout,
            hsts,
            files,
        })
    }

    /// `client_crl`: loaded and checked now; a list whose `nextUpdate` has passed (or soon will)
    /// is a warning, since every certificate it covers is refused while it is stale.
    fn client_crl(
        &mut self,
        src: &Source,
        p: &str,
        t: &RawTls,
        crl: &str,
        files: &mut Vec<std::path::PathBuf>,
    ) -> Option<std::sync::Arc<crate::tls::ClientCrl>> {
        let key = format!("{p}.client_crl");
        if t.client_ca.is_none() {
            self.problems.at(src, &key, "client_crl needs `client_ca` (it revokes certificates that CA signed)");
        }
        let path = self.file_exists(src, &key, crl, "client CRL file");
        files.push(path.clone());
        if !path.is_file() {
            return None;
        }
        match crate::tls::load_client_crl(&path) {
            Ok(c) => {
                for (issuer, next) in &c.issuers {
                    if let Some((passed, days)) = next.and_then(expiry_soon) {
                        let when = if passed {
                            format!("passed its nextUpdate {days} ago: every certificate it covers is refused until a newer list is loaded")
                        } else {
                            format!("reaches its nextUpdate in {days}: replace it before, or the certificates it covers are refused")
                        };
                        self.warnings.push(Problem {
                            file: src.path.clone(),
                            pos: src.spans.value(&key),
                            message: format!("client CRL `{crl}` ({issuer}) {when}"),
                        });
                    }
                }
                Some(std::sync::Arc::new(c))
            }
            Err(e) => {
                self.problems.at(src, &key, e);
                None
            }
        }
    }
}

/// Whether `until` (Unix seconds) is within [`crate::tls::EXPIRY_WARNING`] or past: whether
/// it has passed, and how long ago or ahead (`1 day`, `3 days`).
fn expiry_soon(until: i64) -> Option<(bool, String)> {
    let left = until - crate::clock::unix_s(std::time::SystemTime::now());
    let window = i64::try_from(crate::tls::EXPIRY_WARNING.as_secs()).unwrap_or(i64::MAX);
    (left < window).then(|| {
        let n = left.abs() / 86_400;
        (left <= 0, if n == 1 { "1 day".to_string() } else { format!("{n} days") })
    })
}
