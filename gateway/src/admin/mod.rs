//! The admin API on its own listener: `/health` for anyone, everything else behind a bearer token
//! compared in constant time. Paths are contract (DESIGN.md); more arrive with their features.

use std::sync::Arc;

use http::{header, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use subtle::ConstantTimeEq;

use crate::error::{json_response, GatewayError};
use crate::runtime::Gateway;
use crate::Body;

/// Admin state: the gateway and the token (`None` only on loopback, as validated at start-up).
#[derive(Debug)]
pub struct Admin {
    pub gateway: Arc<Gateway>,
    pub token: Option<String>,
}

impl Admin {
    fn authorized(&self, req: &Request<Incoming>) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        presented.as_bytes().ct_eq(token.as_bytes()).into()
    }

    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        match self.route(req).await {
            Ok(r) => r,
            Err(e) => e.into_response(),
        }
    }

    async fn route(&self, req: Request<Incoming>) -> Result<Response<Body>, GatewayError> {
        let path = req.uri().path().to_string();
        if path == "/health" && req.method() == Method::GET {
            return Ok(self.health());
        }
        if !self.authorized(&req) {
            return Err(GatewayError::Unauthorized);
        }
        match (req.method(), path.as_str()) {
            (&Method::POST, "/reload") => match self.gateway.reload() {
                Ok(()) => Ok(json_response(StatusCode::OK, &serde_json::json!({"status": "reloaded"}))),
                Err(e) => {
                    tracing::error!("reload rejected, the previous configuration keeps serving:\n{e}");
                    Err(GatewayError::InvalidConfig { message: e.to_string() })
                }
            },
            (m, p) => Err(GatewayError::NotFound(format!("no admin endpoint {m} {p}"))),
        }
    }

    fn health(&self) -> Response<Body> {
        let rt = self.gateway.runtime();
        json_response(
            StatusCode::OK,
            &serde_json::json!({
                "status": "ok",
                "uptime_seconds": self.gateway.started.elapsed().as_secs(),
                "routes": rt.routes.len(),
                "redis": {"configured": rt.config.redis.is_some(), "connected": false},
            }),
        )
    }
}
