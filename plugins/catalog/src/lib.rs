//! `catalog`: TTLs and tags by path for a product catalogue, and what a write invalidates.
//!
//! - `GET /products/{id}`: `item_ttl` (default 300 s), tags `product:{id}` and `products`
//! - `GET /products?search=...`: `search_ttl` (default 30 s), tag `products`
//! - `PUT|POST|DELETE /products/{id}`: invalidates tag `product:{id}` and the prefix
//!   `/products?` (every search result)
use weir_plugin_sdk::*;

struct Catalog {
    item_ttl: u32,
    search_ttl: u32,
}

fn seconds(config: &Config, key: &str, default: u32) -> Result<u32, String> {
    match config.str(key) {
        None => Ok(default),
        Some(s) => {
            let t = s.trim();
            let (n, mul) = match t.strip_suffix('m') {
                Some(n) => (n, 60),
                None => (t.strip_suffix('s').unwrap_or(t), 1),
            };
            n.parse::<u32>().map(|n| n * mul).map_err(|_| format!("{key}: expected seconds like 30s or 5m, got {s}"))
        }
    }
}

fn product_id(path: &str) -> Option<&str> {
    let id = path.strip_prefix("/products/")?;
    (!id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')).then_some(id)
}

impl Plugin for Catalog {
    fn new(config: Config) -> Result<Self, String> {
        Ok(Catalog { item_ttl: seconds(&config, "item_ttl", 300)?, search_ttl: seconds(&config, "search_ttl", 30)? })
    }

    fn ttl(&self, req: &Request, _resp: &Response) -> Option<TtlDecision> {
        if let Some(id) = product_id(&req.path) {
            return Some(TtlDecision {
                ttl: Some(self.item_ttl),
                tags: vec![format!("product:{id}"), "products".into()],
                ..TtlDecision::default()
            });
        }
        (req.path == "/products").then(|| TtlDecision {
            ttl: Some(self.search_ttl),
            tags: vec!["products".into()],
            ..TtlDecision::default()
        })
    }

    fn invalidate(&self, req: &Request, resp: &Response) -> Invalidation {
        match product_id(&req.path) {
            Some(id) if resp.status < 400 => Invalidation {
                tags: vec![format!("product:{id}")],
                prefixes: vec!["/products?".into()],
                ..Invalidation::default()
            },
            _ => Invalidation::default(),
        }
    }
}

export_plugin!(Catalog);
