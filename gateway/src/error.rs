//! The one place where gateway errors become HTTP responses (`{"error","message"}` JSON).
//! Handlers return `GatewayError`; only `into_response` knows status codes and wire format.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use crate::Body;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("no route matches {method} {host}{path}")]
    NoRoute { method: Method, host: String, path: String },
    #[error("method {method} is not allowed on this route")]
    MethodNotAllowed { method: Method, allow: Vec<Method> },
    #[error("request headers are {size} bytes, more than the {limit}-byte limit")]
    HeadersTooLarge { size: usize, limit: usize },
    #[error("request body is larger than the {limit}-byte limit of this route")]
    PayloadTooLarge { limit: u64 },
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("upstream {upstream} is unavailable: {reason}")]
    UpstreamUnavailable { upstream: String, reason: String },
    #[error("route {route} has {limit} upstream requests in flight, its `max_upstream_connections`")]
    UpstreamBusy { route: String, limit: usize },
    #[error("upstream {upstream} sent no response head within {after:?}")]
    UpstreamTimeout { upstream: String, after: Duration },
    #[error("missing or invalid bearer token")]
    Unauthorized,
    /// An admin request a browser could have sent for a page (`Origin`, `Sec-Fetch-Site`), or
    /// under a name that is not the admin API's (DNS rebinding).
    #[error("{0}")]
    Forbidden(String),
    /// A mutating admin call whose body is not declared `application/json`.
    #[error("admin calls that change state must be sent as `Content-Type: application/json`")]
    UnsupportedMediaType,
    #[error("{0}")]
    NotFound(String),
    #[error("{message}")]
    InvalidConfig { message: String },
    #[error("only-if-cached: no stored response can satisfy this request")]
    NotCached,
    /// A `fail: closed` budgeted route while the shared tier (Redis) is unusable: the spend cannot
    /// be checked, so the call is refused rather than let through unmetered. The budget phase
    /// raises it when `redis::Shared::is_up()` is false (the breaker is open or Redis is gone).
    #[error("the budget store is unavailable and this route fails closed; retry shortly")]
    BudgetUnavailable,
    /// A `count: all` rate-limit policy refused the request (nothing was consumed from any).
    #[error("rate limit `{policy}` exceeded; retry in {retry_after_s} s")]
    RateLimited { policy: String, retry_after_s: u64, headers: Vec<(header::HeaderName, HeaderValue)> },
    /// Too many failed credentials from this client address (`server.auth_failures`).
    #[error("too many failed credentials from this address; retry in {retry_after_s} s")]
    AuthFailures { retry_after_s: u64 },
    /// A route with `consumer.required` and no consumer found by its source.
    #[error("{}", match missing {
        ConsumerMissing::Header(h) => format!("this route needs a known API key in `{h}`"),
        ConsumerMissing::Plugin => "this route needs a credential its plugin accepts (missing, invalid or expired)".to_string(),
        ConsumerMissing::ClientCert => "this route needs a client certificate (mTLS) that names a consumer".to_string(),
    })]
    UnknownConsumer { missing: ConsumerMissing },
    /// A route with `consumer: {from: plugin, required: true}` whose `identify` hook failed
    /// (trap, timeout, no free instance): the caller is not refused as unknown, nor let in.
    #[error("the consumer could not be identified right now (plugin {outcome}); retry shortly")]
    IdentifyUnavailable { outcome: &'static str },
    /// The TLS handshake with an `https://` upstream failed (its certificate did not verify,
    /// say); the reason is logged, not sent to the client.
    #[error("the TLS connection to upstream {upstream} failed (the gateway log has the reason)")]
    UpstreamTls { upstream: String },
    /// HTTP/2 connection reuse (or an SNI / Host mismatch) sent a request for a host the
    /// connection's certificate does not cover (RFC 9110 §15.5.20).
    #[error("this connection's certificate does not cover `{host}`: open a new connection for it")]
    Misdirected { host: String },
    /// A `match.scheme: https` route asked on a plain listener. Not redirected: an API client
    /// has already sent its credentials in clear, and a redirect would teach it that works.
    #[error("this route is served over HTTPS only")]
    HttpsRequired,
    /// The connection's client certificate was revoked (`client_crl`) after its handshake: the
    /// request is refused and the connection closed.
    #[error("the client certificate of this connection has been revoked")]
    ClientCertRevoked,
    /// A budgeted call that would take the consumer's spend over the limit (nothing reserved).
    #[error("budget `{budget}` is spent for this window; retry in {retry_after_s} s")]
    BudgetExhausted { budget: String, retry_after_s: u64 },
    /// A `fail: closed` rate limit while Redis is away.
    #[error("the rate-limit store is unavailable and this route fails closed; retry shortly")]
    RateLimitUnavailable,
    /// `server.max_tunnels` tunnels are open on this instance.
    #[error("this gateway holds as many tunnels as it may (`server.max_tunnels`); retry shortly")]
    TunnelsBusy,
    /// This client address holds `server.max_tunnels_per_address` tunnels already.
    #[error("this address holds as many tunnels as it may (`server.max_tunnels_per_address`)")]
    TooManyTunnels,
    /// An `Expect` other than `100-continue` (RFC 9110 §10.1.1).
    #[error("unsupported expectation `{0}`: only `100-continue` is supported")]
    ExpectationFailed(String),
}

/// The error code of a response Weir produced (a response extension, for the access log).
#[derive(Debug, Clone, Copy)]
pub struct Code(pub &'static str);

/// Which consumer source found nothing (it decides the 401's challenge).
#[derive(Debug, Clone)]
pub enum ConsumerMissing {
    Header(String),
    Plugin,
    ClientCert,
}

impl GatewayError {
    /// The message a client reads. Upstream failures name neither the upstream's address nor
    /// the cause (an internal address, a connect error's detail): those go to the log and the
    /// access log (`Display`, `upstream`).
    pub fn client_message(&self) -> String {
        match self {
            GatewayError::UpstreamUnavailable { .. } => "the upstream is unavailable".to_string(),
            GatewayError::UpstreamTimeout { after, .. } => {
                format!("the upstream sent no response head within {after:?}")
            }
            GatewayError::UpstreamTls { .. } => "the TLS connection to the upstream failed".to_string(),
            e => e.to_string(),
        }
    }

    /// The upstream a failure is about (for the log and the access log, never the client).
    pub fn upstream(&self) -> Option<&str> {
        match self {
            GatewayError::UpstreamUnavailable { upstream, .. }
            | GatewayError::UpstreamTimeout { upstream, .. }
            | GatewayError::UpstreamTls { upstream } => Some(upstream),
            _ => None,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::NoRoute { .. } | GatewayError::NotFound(_) => StatusCode::NOT_FOUND,
            GatewayError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            GatewayError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::BadRequest(_) | GatewayError::InvalidConfig { .. } => StatusCode::BAD_REQUEST,
            GatewayError::UpstreamUnavailable { .. } | GatewayError::UpstreamTls { .. } => StatusCode::BAD_GATEWAY,
            GatewayError::UpstreamTimeout { .. } | GatewayError::NotCached => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::Unauthorized | GatewayError::UnknownConsumer { .. } => StatusCode::UNAUTHORIZED,
            GatewayError::Forbidden(_) => StatusCode::FORBIDDEN,
            GatewayError::TunnelsBusy => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::TooManyTunnels => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            GatewayError::Misdirected { .. } => StatusCode::MISDIRECTED_REQUEST,
            GatewayError::HttpsRequired | GatewayError::ClientCertRevoked => StatusCode::FORBIDDEN,
            GatewayError::ExpectationFailed(_) => StatusCode::EXPECTATION_FAILED,
            GatewayError::BudgetUnavailable
            | GatewayError::UpstreamBusy { .. }
            | GatewayError::RateLimitUnavailable
            | GatewayError::IdentifyUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::RateLimited { .. }
            | GatewayError::BudgetExhausted { .. }
            | GatewayError::AuthFailures { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// Stable machine-readable code (contract: clients match on it).
    pub fn code(&self) -> &'static str {
        match self {
            GatewayError::NoRoute { .. } => "no_route",
            GatewayError::MethodNotAllowed { .. } => "method_not_allowed",
            GatewayError::HeadersTooLarge { .. } => "headers_too_large",
            GatewayError::PayloadTooLarge { .. } => "payload_too_large",
            GatewayError::BadRequest(_) => "bad_request",
            GatewayError::UpstreamUnavailable { .. } => "upstream_unavailable",
            GatewayError::UpstreamTls { .. } => "upstream_tls",
            GatewayError::UpstreamTimeout { .. } => "upstream_timeout",
            GatewayError::UpstreamBusy { .. } => "upstream_busy",
            GatewayError::Unauthorized => "unauthorized",
            GatewayError::Forbidden(_) => "forbidden",
            GatewayError::TunnelsBusy => "tunnels_busy",
            GatewayError::TooManyTunnels => "too_many_tunnels",
            GatewayError::UnsupportedMediaType => "unsupported_media_type",
            GatewayError::NotFound(_) => "not_found",
            GatewayError::InvalidConfig { .. } => "invalid_config",
            GatewayError::NotCached => "not_cached",
            GatewayError::BudgetUnavailable => "budget_unavailable",
            GatewayError::RateLimited { .. } => "rate_limited",
            GatewayError::AuthFailures { .. } => "too_many_auth_failures",
            GatewayError::BudgetExhausted { .. } => "budget_exhausted",
            GatewayError::UnknownConsumer { .. } => "unknown_consumer",
            GatewayError::RateLimitUnavailable => "ratelimit_unavailable",
            GatewayError::IdentifyUnavailable { .. } => "consumer_unavailable",
            GatewayError::Misdirected { .. } => "misdirected_request",
            GatewayError::HttpsRequired => "https_required",
            GatewayError::ClientCertRevoked => "client_cert_revoked",
            GatewayError::ExpectationFailed(_) => "expectation_failed",
        }
    }

    pub fn into_response(self) -> Response<Body> {
        let mut resp =
            json_response(self.status(), &serde_json::json!({"error": self.code(), "message": self.client_message()}));
        resp.extensions_mut().insert(Code(self.code()));
        match &self {
            GatewayError::MethodNotAllowed { allow, .. } => {
                let list = allow.iter().map(Method::as_str).collect::<Vec<_>>().join(", ");
                if let Ok(v) = HeaderValue::from_str(&list) {
                    resp.headers_mut().insert(header::ALLOW, v);
                }
            }
            GatewayError::Unauthorized => {
                resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            GatewayError::UpstreamBusy { .. } | GatewayError::TunnelsBusy | GatewayError::TooManyTunnels => {
                resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            GatewayError::AuthFailures { retry_after_s } => {
                resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_s));
            }
            GatewayError::RateLimited { retry_after_s, headers, .. } => {
                resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_s));
                for (k, v) in headers {
                    resp.headers_mut().insert(k.clone(), v.clone());
                }
            }
            GatewayError::UnknownConsumer { missing } => {
                // RFC 9110 §11.6.1: a 401 carries a challenge. API keys and client certificates
                // have no registered scheme; a plugin's credential is a bearer token (RFC 6750
                // §3's `invalid_token`).
                let challenge = match missing {
                    ConsumerMissing::Header(h) => {
                        HeaderValue::from_str(&format!("ApiKey realm=\"weir\", header=\"{h}\"")).ok()
                    }
                    ConsumerMissing::Plugin => {
                        Some(HeaderValue::from_static("Bearer realm=\"weir\", error=\"invalid_token\""))
                    }
                    ConsumerMissing::ClientCert => Some(HeaderValue::from_static("ClientCertificate realm=\"weir\"")),
                };
                if let Some(v) = challenge {
                    resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
                }
            }
            GatewayError::BudgetExhausted { retry_after_s, .. } => {
                resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_s));
            }
            GatewayError::IdentifyUnavailable { .. } => {
                resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            GatewayError::RateLimitUnavailable => {
                resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
            GatewayError::BudgetUnavailable => {
                // The breaker probes again within seconds (`redis.breaker.open_for`).
                resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
            GatewayError::HeadersTooLarge { .. }
            | GatewayError::PayloadTooLarge { .. }
            | GatewayError::BadRequest(_)
            | GatewayError::ClientCertRevoked => {
                // The rest of the request was not read, or the connection's certificate is
                // revoked: the connection is not reused.
                resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        resp
    }
}

/// A JSON response with `Cache-Control: no-store` (gateway answers are never cacheable downstream).
pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let body = Bytes::from(value.to_string());
    let mut resp = Response::new(Full::new(body).map_err(|never| match never {}).boxed());
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn upstream_failures_do_not_name_the_upstream_to_the_client() {
        for e in [
            GatewayError::UpstreamUnavailable {
                upstream: "http://10.0.0.5:3000".into(),
                reason: "client error (Connect): tcp connect error: Connection refused".into(),
            },
            GatewayError::UpstreamTimeout { upstream: "http://10.0.0.5:3000".into(), after: Duration::from_secs(10) },
            GatewayError::UpstreamTls { upstream: "https://10.0.0.5:3443".into() },
        ] {
            assert!(e.to_string().contains("10.0.0.5"), "the log keeps it: {e}");
            let body = e.into_response().into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let text = String::from_utf8_lossy(&body);
            assert!(!text.contains("10.0.0.5") && !text.contains("Connect"), "{text}");
        }
    }

    #[tokio::test]
    async fn budget_unavailable_is_a_503_json_with_retry_after() {
        let resp = GatewayError::BudgetUnavailable.into_response();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers().get(header::RETRY_AFTER).map(|v| v.as_bytes()), Some(&b"5"[..]));
        let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        assert_eq!(v["error"], "budget_unavailable");
    }
}
