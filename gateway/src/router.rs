//! Phase 2, route match: host (exact, then `*.suffix`), longest segment-aware path prefix, methods.
//! Compiled once per configuration into a specificity-ordered table.

use http::Method;

use crate::config::{HostMatch, Route};

#[derive(Debug)]
pub struct Router {
    /// Route indexes, most specific first.
    order: Vec<usize>,
    routes: Vec<(Option<HostMatch>, String, Option<Vec<Method>>)>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum RouteMatch {
    Found(usize),
    /// Some route matches host and path, none the method.
    MethodNotAllowed(Vec<Method>),
    NotFound,
}

impl Router {
    pub fn new(routes: &[Route]) -> Router {
        Router::from_table(routes.iter().map(|r| (r.host.clone(), r.path.clone(), r.methods.clone())).collect())
    }

    fn from_table(table: Vec<(Option<HostMatch>, String, Option<Vec<Method>>)>) -> Router {
        let mut order: Vec<usize> = (0..table.len()).collect();
        let host_rank = |h: &Option<HostMatch>| match h {
            Some(HostMatch::Exact(_)) => (2, 0),
            Some(HostMatch::Suffix(s)) => (1, s.len()),
            None => (0, 0),
        };
        // Stable sort: ties keep declaration order.
        order.sort_by(|&a, &b| {
            let (ha, pa) = (&table[a].0, &table[a].1);
            let (hb, pb) = (&table[b].0, &table[b].1);
            host_rank(hb).cmp(&host_rank(ha)).then(pb.len().cmp(&pa.len()))
        });
        Router { order, routes: table }
    }

    /// `host` is the request's host without port (any case, trailing dot allowed).
    pub fn route(&self, host: Option<&str>, path: &str, method: &Method) -> RouteMatch {
        let host = host.map(normalize_host);
        let mut allowed: Vec<Method> = Vec::new();
        let mut path_matched = false;
        for &i in &self.order {
            let (h, prefix, methods) = &self.routes[i];
            if !host_matches(h.as_ref(), host.as_deref()) || !path_matches(prefix, path) {
                continue;
            }
            match methods {
                Some(ms) if !ms.contains(method) => {
                    path_matched = true;
                    for m in ms {
                        if !allowed.contains(m) {
                            allowed.push(m.clone());
                        }
                    }
                }
                _ => return RouteMatch::Found(i),
            }
        }
        if path_matched {
            RouteMatch::MethodNotAllowed(allowed)
        } else {
            RouteMatch::NotFound
        }
    }
}

/// Lower-case, without port and trailing dot: `API.example.com.:8080` → `api.example.com`.
pub fn normalize_host(h: &str) -> String {
    let no_port = if h.starts_with('[') {
        h.split_once(']').map(|(a, _)| &h[..=a.len()]).unwrap_or(h)
    } else {
        h.rsplit_once(':').filter(|(_, p)| p.chars().all(|c| c.is_ascii_digit())).map(|(a, _)| a).unwrap_or(h)
    };
    no_port.trim_end_matches('.').to_ascii_lowercase()
}

fn host_matches(m: Option<&HostMatch>, host: Option<&str>) -> bool {
    match (m, host) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(HostMatch::Exact(e)), Some(h)) => e == h,
        (Some(HostMatch::Suffix(s)), Some(h)) => h.len() > s.len() && h.ends_with(s.as_str()),
    }
}

/// `/products` matches `/products` and `/products/1`, not `/productsfoo`.
fn path_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" || prefix.ends_with('/') {
        return path.starts_with(prefix);
    }
    path.strip_prefix(prefix).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(
        host: Option<HostMatch>,
        path: &str,
        methods: Option<Vec<Method>>,
    ) -> (Option<HostMatch>, String, Option<Vec<Method>>) {
        (host, path.to_string(), methods)
    }

    fn router(table: Vec<(Option<HostMatch>, String, Option<Vec<Method>>)>) -> Router {
        Router::from_table(table)
    }

    #[test]
    fn longest_prefix_and_hosts() {
        let rt = router(vec![
            r(None, "/", None),
            r(None, "/products", None),
            r(Some(HostMatch::Exact("api.example.com".into())), "/", None),
            r(Some(HostMatch::Suffix(".example.com".into())), "/", None),
            r(None, "/admin", Some(vec![Method::GET])),
        ]);
        assert_eq!(rt.route(None, "/products/1", &Method::GET), RouteMatch::Found(1));
        assert_eq!(rt.route(None, "/productsx", &Method::GET), RouteMatch::Found(0));
        assert_eq!(rt.route(Some("API.example.com.:443"), "/products", &Method::GET), RouteMatch::Found(2));
        assert_eq!(rt.route(Some("a.example.com"), "/x", &Method::GET), RouteMatch::Found(3));
        assert_eq!(rt.route(Some("example.com"), "/x", &Method::GET), RouteMatch::Found(0));
        // /admin only allows GET, but "/" catches everything: the fallback route wins.
        assert_eq!(rt.route(None, "/admin", &Method::POST), RouteMatch::Found(0));
    }

    #[test]
    fn method_not_allowed() {
        let rt = router(vec![r(None, "/a", Some(vec![Method::GET, Method::HEAD]))]);
        assert_eq!(
            rt.route(None, "/a/b", &Method::DELETE),
            RouteMatch::MethodNotAllowed(vec![Method::GET, Method::HEAD])
        );
        assert_eq!(rt.route(None, "/b", &Method::GET), RouteMatch::NotFound);
    }

    #[test]
    fn hosts_normalise() {
        assert_eq!(normalize_host("Example.COM.:8080"), "example.com");
        assert_eq!(normalize_host("[::1]:80"), "[::1]");
    }
}
