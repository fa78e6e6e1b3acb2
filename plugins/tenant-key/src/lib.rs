//! `tenant-key`: one cache per tenant. The tenant is a claim (config `claim`, default `tenant`) of
//! an `Authorization: Bearer` JWT whose HS256 signature is verified with `config.jwt_secret`. The
//! key is tenant + normalised path + the query parameters named in `params` (all, sorted, when
//! `params` is absent). No token, a bad signature, another algorithm or no secret: `bypass`.
//!
//! Verification is pure computation in the sandbox. `exp` is not checked: a plugin has no clock
//! (the origin still authorises every request that is not a cache hit).
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use weir_plugin_sdk::*;

struct TenantKey {
    secret: Option<Vec<u8>>,
    claim: String,
    params: Option<Vec<String>>,
}

fn b64(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).ok()
}

impl TenantKey {
    /// The verified tenant claim of the request's bearer token.
    fn tenant(&self, req: &Request) -> Result<String, &'static str> {
        let secret = self.secret.as_deref().ok_or("no-secret")?;
        let auth = req.header("authorization").ok_or("no-token")?;
        let token = auth.strip_prefix("Bearer ").or_else(|| auth.strip_prefix("bearer ")).ok_or("no-token")?;
        let mut parts = token.trim().split('.');
        let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err("malformed-token");
        };
        let header: serde_json::Value =
            serde_json::from_slice(&b64(h).ok_or("malformed-token")?).map_err(|_| "malformed-token")?;
        if header.get("alg").and_then(|a| a.as_str()) != Some("HS256") {
            return Err("unsupported-alg");
        }
        let sig = b64(s).ok_or("malformed-token")?;
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).map_err(|_| "no-secret")?;
        mac.update(h.as_bytes());
        mac.update(b".");
        mac.update(p.as_bytes());
        mac.verify_slice(&sig).map_err(|_| "bad-signature")?;
        let payload: serde_json::Value =
            serde_json::from_slice(&b64(p).ok_or("malformed-token")?).map_err(|_| "malformed-token")?;
        match payload.get(&self.claim) {
            Some(serde_json::Value::String(t)) if !t.is_empty() && t.len() <= 128 => Ok(t.clone()),
            _ => Err("no-tenant-claim"),
        }
    }
}

impl Plugin for TenantKey {
    fn new(config: Config) -> Result<Self, String> {
        let params = config.get("params").map(|_| config.strings("params"));
        Ok(TenantKey {
            secret: config.str("jwt_secret").filter(|s| !s.is_empty()).map(String::into_bytes),
            claim: config.str("claim").unwrap_or_else(|| "tenant".into()),
            params,
        })
    }

    fn needs(&self) -> Needs {
        Needs { headers: vec!["authorization".into()], ..Needs::default() }
    }

    fn cache_key(&self, req: &Request) -> KeyDecision {
        let tenant = match self.tenant(req) {
            Ok(t) => t,
            Err(why) => return KeyDecision::Bypass(why.into()),
        };
        let mut q: Vec<(&str, &str)> = req
            .query_pairs()
            .filter(|(k, _)| self.params.as_ref().is_none_or(|ps| ps.iter().any(|p| p == k)))
            .collect();
        q.sort_unstable();
        let mut key = format!("tenant={}|{} {}{}", tenant.len(), tenant, req.method, req.path);
        for (i, (k, v)) in q.iter().enumerate() {
            key.push(if i == 0 { '?' } else { '&' });
            key.push_str(k);
            key.push('=');
            key.push_str(v);
        }
        KeyDecision::Key(key)
    }
}

export_plugin!(TenantKey);
