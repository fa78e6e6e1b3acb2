//! `tenant-key`: one cache per tenant. The tenant is a claim (config `claim`, default `tenant`) of
//! an `Authorization: Bearer` JWT whose HS256 signature is verified with `config.jwt_secret`. The
//! key is tenant + normalised path + the query parameters named in `params` (all, sorted, when
//! `params` is absent). No token, a bad signature, another algorithm or no secret: `bypass`.
//!
//! `identify` (routes with `consumer: {from: plugin}`) answers the verified token's
//! `consumer_claim` (default `sub`) as the consumer, only while the token is valid at the time
//! Weir gives it: `exp` is required (unless `require_exp: false`) and must be in the future, `nbf`
//! in the past, each within `leeway_s` (default 0). An expired token has no consumer, so a
//! `required` route answers 401 before the cache or any quota.
//!
//! `cache-key` has no clock (its answers are memoised by the request): it checks the signature,
//! not `exp`. Put `consumer: {from: plugin, required: true}` on the route to refuse expired
//! tokens before the cache.
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use weir_plugin_sdk::*;

struct TenantKey {
    secret: Option<Vec<u8>>,
    claim: String,
    consumer_claim: String,
    require_exp: bool,
    leeway_s: u64,
    params: Option<Vec<String>>,
}

fn b64(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).ok()
}

impl TenantKey {
    /// The verified payload of the request's bearer token.
    fn claims(&self, req: &Request) -> Result<serde_json::Value, &'static str> {
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
        serde_json::from_slice(&b64(p).ok_or("malformed-token")?).map_err(|_| "malformed-token")
    }

    /// The verified tenant claim of the request's bearer token.
    fn tenant(&self, req: &Request) -> Result<String, &'static str> {
        match self.claims(req)?.get(&self.claim) {
            Some(serde_json::Value::String(t)) if !t.is_empty() && t.len() <= 128 => Ok(t.clone()),
            _ => Err("no-tenant-claim"),
        }
    }

    /// Whether the token's `exp` / `nbf` admit it at `now` (seconds since the epoch).
    fn valid_at(&self, claims: &serde_json::Value, now: u64) -> bool {
        let time = |name: &str| claims.get(name).map(|v| v.as_u64());
        let exp_ok = match time("exp") {
            Some(Some(exp)) => now < exp.saturating_add(self.leeway_s),
            Some(None) => false,
            None => !self.require_exp,
        };
        let nbf_ok = match time("nbf") {
            Some(Some(nbf)) => now.saturating_add(self.leeway_s) >= nbf,
            Some(None) => false,
            None => true,
        };
        exp_ok && nbf_ok
    }
}

impl Plugin for TenantKey {
    fn new(config: Config) -> Result<Self, String> {
        let params = config.get("params").map(|_| config.strings("params"));
        Ok(TenantKey {
            secret: config.str("jwt_secret").filter(|s| !s.is_empty()).map(String::into_bytes),
            claim: config.str("claim").unwrap_or_else(|| "tenant".into()),
            consumer_claim: config.str("consumer_claim").unwrap_or_else(|| "sub".into()),
            require_exp: config.str("require_exp").is_none_or(|v| v != "false"),
            leeway_s: match config.str("leeway_s") {
                None => 0,
                Some(v) => v.parse().map_err(|_| format!("leeway_s: `{v}` is not a number of seconds"))?,
            },
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

    fn identify(&self, req: &Request, now: Datetime) -> Option<String> {
        let claims = self.claims(req).ok()?;
        if !self.valid_at(&claims, now.unix_seconds()) {
            return None;
        }
        match claims.get(&self.consumer_claim) {
            Some(serde_json::Value::String(c)) if !c.is_empty() && c.len() <= 256 => Some(c.clone()),
            _ => None,
        }
    }
}

export_plugin!(TenantKey);
