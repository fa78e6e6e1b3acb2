//! Phase 2, route match: host (exact, then `*.suffix`), longest segment-aware path prefix, methods.
//! Compiled once per configuration into a specificity-ordered table.

use http::Method;

/// A route's `match.host`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    /// Lower-case host without port or trailing dot.
    Exact(String),
    /// `*.example.com` stored as `.example.com`: matches any subdomain, not the apex.
    Suffix(String),
}

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
    /// Routes as `(match.host, match.path, match.methods)`, in declaration order.
    pub fn from_table(table: Vec<(Option<HostMatch>, String, Option<Vec<Method>>)>) -> Router {
        let mut order: Vec<usize> = (0..table.len()).collect();
        // Stable sort: ties keep declaration order.
        order.sort_by(|&a, &b| {
            let (ha, pa) = (&table[a].0, &table[a].1);
            let (hb, pb) = (&table[b].0, &table[b].1);
            host_rank(hb).cmp(&host_rank(ha)).then(pb.len().cmp(&pa.len()))
        });
        Router { order, routes: table }
    }

    /// `host` is the request's host without port (any case, trailing dot allowed).
    ///
    /// Routes are tried most specific first (host, then path prefix length). The first tier of
    /// equally specific routes whose host and path match decides: one of them allows the method,
    /// or the answer is 405 with the union of their methods — a less specific route (a
    /// catch-all `/`) never answers for a path a more specific route claims, so a method a route
    /// leaves out cannot walk around its consumer, limits, budget or invalidation.
    pub fn route(&self, host: Option<&str>, path: &str, method: &Method) -> RouteMatch {
        // The data plane passes hosts already normal (`Canonical::host`): no copy for those.
        let owned;
        let host = match host {
            Some(h) if h.bytes().all(|b| !b.is_ascii_uppercase() && b != b':') && !h.ends_with('.') => Some(h),
            Some(h) => {
                owned = normalize_host(h);
                Some(owned.as_str())
            }
            None => None,
        };
        let mut allowed: Vec<Method> = Vec::new();
        let mut tier = None;
        for &i in &self.order {
            let (h, prefix, methods) = &self.routes[i];
            let rank = (host_rank(h), prefix.len());
            if tier.is_some_and(|t| t != rank) {
                break;
            }
            if !host_matches(h.as_ref(), host) || !path_matches(prefix, path) {
                continue;
            }
            match methods {
                Some(ms) if !ms.contains(method) => {
                    tier = Some(rank);
                    for m in ms {
                        if !allowed.contains(m) {
                            allowed.push(m.clone());
                        }
                    }
                }
                _ => return RouteMatch::Found(i),
            }
        }
        if tier.is_some() {
            RouteMatch::MethodNotAllowed(allowed)
        } else {
            RouteMatch::NotFound
        }
    }

    /// Pairs `(a, b)`: route `a` lists methods and a less specific route `b` would match every
    /// path of `a`; requests to `a`'s paths with other methods get 405 from `a` (routers before
    /// this rule let `b` answer them). For `weir validate`'s warning.
    pub fn shadowed_catch_alls(&self) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for (a, (ha, pa, ma)) in self.routes.iter().enumerate() {
            if ma.is_none() {
                continue;
            }
            let rank_a = (host_rank(ha), pa.len());
            let wider = self.order.iter().copied().find(|&b| {
                let (hb, pb, _) = &self.routes[b];
                b != a && (host_rank(hb), pb.len()) < rank_a && (hb.is_none() || hb == ha) && path_matches(pb, pa)
            });
            if let Some(b) = wider {
                out.push((a, b));
            }
        }
        out
    }
}

fn host_rank(h: &Option<HostMatch>) -> (u8, usize) {
    match h {
        Some(HostMatch::Exact(_)) => (2, 0),
        Some(HostMatch::Suffix(s)) => (1, s.len()),
        None => (0, 0),
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
        // /admin only allows GET: "/" never answers for it, a POST gets 405.
        assert_eq!(rt.route(None, "/admin", &Method::POST), RouteMatch::MethodNotAllowed(vec![Method::GET]));
        assert_eq!(rt.route(None, "/admin/x", &Method::GET), RouteMatch::Found(4));
        assert_eq!(rt.route(None, "/administer", &Method::POST), RouteMatch::Found(0));
        assert_eq!(rt.shadowed_catch_alls(), vec![(4, 0)]);
    }

    #[test]
    fn equally_specific_routes_share_the_answer() {
        let rt = router(vec![
            r(None, "/", None),
            r(None, "/a", Some(vec![Method::GET])),
            r(None, "/a", Some(vec![Method::PUT, Method::GET])),
        ]);
        assert_eq!(rt.route(None, "/a", &Method::PUT), RouteMatch::Found(2));
        assert_eq!(rt.route(None, "/a", &Method::DELETE), RouteMatch::MethodNotAllowed(vec![Method::GET, Method::PUT]));
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
