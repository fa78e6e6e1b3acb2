//! `cache:` (global) and a route's `cache:` block.

use super::*;

impl Validator {
    /// `honor` (true) or `ignore` (false).
    pub(super) fn client_no_cache(&mut self, src: &Source, path: &str, v: Option<&str>, default: bool) -> bool {
        match v {
            None => default,
            Some("honor") => true,
            Some("ignore") => false,
            Some(other) => {
                self.problems.at(src, path, format!("invalid client_no_cache `{other}`: expected `honor` or `ignore`"));
                default
            }
        }
    }

    pub(super) fn targeted_fields(&mut self, src: &Source, list: Option<&Vec<String>>) -> std::sync::Arc<[HeaderName]> {
        let Some(list) = list else { return default_targeted_fields() };
        let mut names = Vec::new();
        for (i, f) in list.iter().enumerate() {
            match HeaderName::from_bytes(f.trim().as_bytes()) {
                Ok(n) if n != http::header::CACHE_CONTROL => names.push(n),
                _ => self.problems.at(
                    src,
                    &format!("cache.targeted_fields[{i}]"),
                    format!("invalid targeted field `{f}`: expected a header name such as `cdn-cache-control` (not `cache-control` itself)"),
                ),
            }
        }
        names.into()
    }

    pub(super) fn route_cache(&mut self, src: &Source, cp: &str, c: &RawRouteCache) -> RouteCache {
        let origin_headers = match c.origin_headers.as_deref() {
            None | Some("respect") => OriginHeaders::Respect,
            Some("override") => OriginHeaders::Override,
            Some(o) => {
                self.problems.at(
                    src,
                    &format!("{cp}.origin_headers"),
                    format!("invalid origin_headers `{o}`: expected `respect` or `override`"),
                );
                OriginHeaders::Respect
            }
        };
        let ttl = self.opt_duration(src, &format!("{cp}.ttl"), c.ttl.as_ref());
        if origin_headers == OriginHeaders::Override && ttl.is_none() {
            self.problems.at(src, &format!("{cp}.origin_headers"), "origin_headers: override needs a `ttl`");
        }
        let mut methods = vec![Method::GET, Method::HEAD];
        if let Some(list) = &c.methods {
            for m in self.methods(src, &format!("{cp}.methods"), list) {
                if m == Method::POST {
                    methods.push(m);
                } else if m != Method::GET && m != Method::HEAD {
                    self.problems.at(
                        src,
                        &format!("{cp}.methods"),
                        format!("method `{m}` cannot be cached: only GET, HEAD and POST"),
                    );
                }
            }
        }
        RouteCache {
            ttl,
            origin_headers,
            stale_while_revalidate: self.opt_duration(
                src,
                &format!("{cp}.stale_while_revalidate"),
                c.stale_while_revalidate.as_ref(),
            ),
            stale_if_error: self.opt_duration(src, &format!("{cp}.stale_if_error"), c.stale_if_error.as_ref()),
            share_private: c.share_private.unwrap_or(false),
            // Set by the route once its consumer is known.
            by_consumer: false,
            client_no_cache: self.client_no_cache(
                src,
                &format!("{cp}.client_no_cache"),
                c.client_no_cache.as_deref(),
                self.client_no_cache,
            ),
            methods,
            max_key_body_bytes: self.size(
                src,
                &format!("{cp}.max_key_body_bytes"),
                c.max_key_body_bytes.as_ref(),
                64 << 10,
            ),
            targeted_fields: self.targeted_fields.clone(),
        }
    }
}
