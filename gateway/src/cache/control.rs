//! `Cache-Control` parsing (RFC 9111 §5.2) for requests and responses. Unknown directives are
//! ignored, malformed delta-seconds make the directive absent, duplicates keep the first.

use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue, CACHE_CONTROL, PRAGMA};

/// Response directives that matter to a shared cache.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ResponseDirectives {
    pub max_age: Option<Duration>,
    pub s_maxage: Option<Duration>,
    pub no_store: bool,
    /// `no-cache` (unqualified: stored, but revalidated before every use).
    pub no_cache: bool,
    pub private: bool,
    pub public: bool,
    pub must_revalidate: bool,
    pub proxy_revalidate: bool,
    pub stale_while_revalidate: Option<Duration>,
    pub stale_if_error: Option<Duration>,
    /// `must-understand` (§5.2.2.3): store only a status whose caching rules the cache knows,
    /// and then even over `no-store`.
    pub must_understand: bool,
}

/// Request directives (RFC 9111 §5.2.1).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RequestDirectives {
    pub max_age: Option<Duration>,
    /// `Some(None)`: any staleness accepted; `Some(Some(d))`: up to `d`.
    pub max_stale: Option<Option<Duration>>,
    pub min_fresh: Option<Duration>,
    pub no_cache: bool,
    pub no_store: bool,
    pub only_if_cached: bool,
}

impl RequestDirectives {
    /// These directives less the ones that would send a request to the origin past a stored
    /// answer (`no-cache`, `max-age`, `min-fresh`): for `cache.client_no_cache: ignore`.
    pub fn without_forcing(&self) -> RequestDirectives {
        RequestDirectives { max_age: None, min_fresh: None, no_cache: false, ..self.clone() }
    }
}

/// Delta-seconds (§1.2.2): digits only; values too large saturate (2^31 per the RFC's advice).
fn delta(v: Option<&str>) -> Option<Duration> {
    let mut v = v?.as_bytes();
    // Quotes around the number are tolerated (`max-age="60"`), as many as there are.
    while let [b'"', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b'"'] = v {
        v = rest;
    }
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let secs = v.iter().fold(0u64, |n, d| n.saturating_mul(10).saturating_add(u64::from(d - b'0')));
    Some(Duration::from_secs(secs.min(1 << 31)))
}

/// Calls `f` with every directive of every `Cache-Control` line as (name, optional value),
/// borrowed from the header (no allocation: this runs on every stored response), honouring
/// quoted commas. A line that is not visible ASCII is skipped whole.
fn each_directive<'h>(headers: &'h HeaderMap, mut f: impl FnMut(&'h str, Option<&'h str>)) {
    for v in headers.get_all(CACHE_CONTROL) {
        if let Ok(s) = v.to_str() {
            split_list(s, &mut f);
        }
    }
}

/// The items of one comma-separated line, trimmed, empty ones skipped. `s` is ASCII (a
/// `HeaderValue::to_str`), so it is scanned as bytes: every cut is at an ASCII `,` or `=`.
fn split_list<'s>(s: &'s str, f: &mut impl FnMut(&'s str, Option<&'s str>)) {
    let b = s.as_bytes();
    let mut start = 0;
    while start < b.len() {
        let mut end = start;
        let mut quoted = false;
        while end < b.len() {
            match b[end] {
                b'"' => quoted = !quoted,
                b',' if !quoted => break,
                _ => {}
            }
            end += 1;
        }
        let item = s[start..end].trim_ascii();
        start = end + 1;
        if item.is_empty() {
            continue;
        }
        match item.split_once('=') {
            Some((k, v)) => f(k.trim_ascii(), Some(v.trim_ascii())),
            None => f(item, None),
        }
    }
}

/// True the first time `bit` is seen: of duplicated directives the first one counts (§4.2.1).
fn first(seen: &mut u8, bit: u8) -> bool {
    let new = *seen & bit == 0;
    *seen |= bit;
    new
}

impl ResponseDirectives {
    pub fn parse(headers: &HeaderMap) -> Self {
        let mut lines = ResponseLines::default();
        for v in headers.get_all(CACHE_CONTROL) {
            lines.add(v);
        }
        lines.finish()
    }

    /// The directives of the first of `fields` (most specific first) present and valid as a
    /// structured dictionary (RFC 9213). A lookup per field: `policy::decide` calls it only when
    /// its pass over the answer's fields met one of them.
    pub fn targeted(headers: &HeaderMap, fields: &[HeaderName]) -> Option<Self> {
        fields.iter().find_map(|name| {
            let mut lines = headers.get_all(name).iter().peekable();
            lines.peek()?;
            let mut text = String::new();
            for v in lines {
                if !text.is_empty() {
                    text.push(',');
                }
                text.push_str(v.to_str().ok()?);
            }
            let dict: sfv::Dictionary = sfv::Parser::new(&text).parse().ok()?;
            Some(Self::from_dictionary(&dict))
        })
    }

    fn from_dictionary(dict: &sfv::Dictionary) -> Self {
        use sfv::{BareItem, ListEntry};
        let item = |name: &str| match dict.get(name) {
            Some(ListEntry::Item(i)) => Some(&i.bare_item),
            // An inner list (`no-cache=(a b)`): the qualified form, read as the directive.
            Some(ListEntry::InnerList(_)) => Some(&BareItem::Boolean(true)),
            None => None,
        };
        let seconds = |name: &str| match item(name) {
            Some(BareItem::Integer(n)) => {
                u64::try_from(i64::from(*n)).ok().map(|s| Duration::from_secs(s.min(1 << 31)))
            }
            _ => None,
        };
        // Flags: `true`, or a qualified value (a string or token of field names) — read as the
        // unqualified directive, as for `Cache-Control`. `?0` is absent.
        let flag = |name: &str| !matches!(item(name), None | Some(BareItem::Boolean(false)));
        ResponseDirectives {
            max_age: seconds("max-age"),
            s_maxage: seconds("s-maxage"),
            no_store: flag("no-store"),
            no_cache: flag("no-cache"),
            private: flag("private"),
            public: flag("public"),
            must_revalidate: flag("must-revalidate"),
            proxy_revalidate: flag("proxy-revalidate"),
            stale_while_revalidate: seconds("stale-while-revalidate"),
            stale_if_error: seconds("stale-if-error"),
            must_understand: flag("must-understand"),
        }
    }

    /// The response forbids serving it stale (§4.2.4, §5.2.2.2/8/10, and `no-cache`).
    pub fn forbids_stale(&self) -> bool {
        self.must_revalidate || self.proxy_revalidate || self.s_maxage.is_some() || self.no_cache
    }
}

/// `Cache-Control` lines read one at a time, in order (a pass over an answer's fields meets
/// them among the others): what `ResponseDirectives::parse` does with one lookup.
#[derive(Debug, Default)]
pub struct ResponseLines {
    d: ResponseDirectives,
    /// Delta directives already seen (of duplicates the first counts, §4.2.1).
    seen: u8,
}

impl ResponseLines {
    /// The next `Cache-Control` line; one that is not visible ASCII is skipped whole.
    pub fn add(&mut self, line: &HeaderValue) {
        let Ok(s) = line.to_str() else { return };
        let (d, seen) = (&mut self.d, &mut self.seen);
        split_list(s, &mut |name: &str, value: Option<&str>| {
            let is = |n: &str| name.eq_ignore_ascii_case(n);
            if is("max-age") && first(seen, 1) {
                d.max_age = delta(value);
            } else if is("s-maxage") && first(seen, 2) {
                d.s_maxage = delta(value);
            } else if is("stale-while-revalidate") && first(seen, 4) {
                d.stale_while_revalidate = delta(value);
            } else if is("stale-if-error") && first(seen, 8) {
                d.stale_if_error = delta(value);
            } else if is("no-store") {
                d.no_store = true;
            } else if is("no-cache") {
                // Qualified forms (`no-cache="set-cookie"`) are treated as unqualified: safer.
                d.no_cache = true;
            } else if is("private") {
                d.private = true;
            } else if is("public") {
                d.public = true;
            } else if is("must-revalidate") {
                d.must_revalidate = true;
            } else if is("proxy-revalidate") {
                d.proxy_revalidate = true;
            } else if is("must-understand") {
                d.must_understand = true;
            }
        });
    }

    pub fn finish(self) -> ResponseDirectives {
        self.d
    }
}

impl RequestDirectives {
    pub fn parse(headers: &HeaderMap) -> Self {
        let mut d = RequestDirectives::default();
        let mut any = false;
        each_directive(headers, |name, value| {
            any = true;
            let is = |n: &str| name.eq_ignore_ascii_case(n);
            if is("max-age") {
                d.max_age = d.max_age.or(delta(value));
            } else if is("max-stale") {
                d.max_stale = Some(value.and_then(|v| delta(Some(v))));
            } else if is("min-fresh") {
                d.min_fresh = d.min_fresh.or(delta(value));
            } else if is("no-cache") {
                d.no_cache = true;
            } else if is("no-store") {
                d.no_store = true;
            } else if is("only-if-cached") {
                d.only_if_cached = true;
            }
        });
        // `Pragma: no-cache` counts only without any Cache-Control (RFC 9111 §5.4).
        if !any
            && headers
                .get_all(PRAGMA)
                .iter()
                .any(|v| v.to_str().is_ok_and(|s| s.to_ascii_lowercase().contains("no-cache")))
        {
            d.no_cache = true;
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(v: &str) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert(CACHE_CONTROL, HeaderValue::from_str(v).unwrap());
        m
    }

    #[test]
    fn response_directives() {
        let d = ResponseDirectives::parse(&h(
            "public, max-age=60, s-maxage=\"30\", stale-while-revalidate=5, X-Ext=\"a,b\"",
        ));
        assert!(d.public);
        assert_eq!(d.max_age, Some(Duration::from_secs(60)));
        assert_eq!(d.s_maxage, Some(Duration::from_secs(30)));
        assert_eq!(d.stale_while_revalidate, Some(Duration::from_secs(5)));
        assert!(d.forbids_stale());
        let d = ResponseDirectives::parse(&h("max-age=abc, no-store, private=\"x\""));
        assert_eq!(d.max_age, None);
        assert!(d.no_store && d.private);
        // The first of duplicated directives wins.
        assert_eq!(ResponseDirectives::parse(&h("max-age=5, max-age=500")).max_age, Some(Duration::from_secs(5)));
        assert_eq!(
            ResponseDirectives::parse(&h("max-age=99999999999999999999")).max_age,
            Some(Duration::from_secs(1 << 31))
        );
    }

    /// Quoted commas do not split; names are case-insensitive; items are trimmed of spaces and
    /// tabs, empty ones skipped; every line counts, a line that is not visible ASCII is skipped.
    #[test]
    fn lists_are_split_as_the_rfc_says() {
        // Unquoted, the comma would make `max-age=5"` a directive, and the first `max-age` wins.
        let d = ResponseDirectives::parse(&h("private=\"set-cookie, max-age=5\", max-age=60"));
        assert_eq!((d.private, d.max_age), (true, Some(Duration::from_secs(60))));
        let mut m = h(" ,\tPublic ,, MAX-AGE = 7\t,");
        m.append(CACHE_CONTROL, HeaderValue::from_bytes(b"no-store, max-age=1\xff").unwrap());
        m.append(CACHE_CONTROL, HeaderValue::from_static("must-revalidate"));
        let d = ResponseDirectives::parse(&m);
        assert_eq!(
            (d.public, d.max_age, d.no_store, d.must_revalidate),
            (true, Some(Duration::from_secs(7)), false, true)
        );
        // Quotes around a number are tolerated; inside it, or a sign, they are not.
        assert_eq!(ResponseDirectives::parse(&h("max-age=\"\"9\"\"")).max_age, Some(Duration::from_secs(9)));
        assert_eq!(ResponseDirectives::parse(&h("max-age=\"1\"2")).max_age, None);
        assert_eq!(ResponseDirectives::parse(&h("max-age=+3")).max_age, None);
        assert_eq!(ResponseDirectives::parse(&h("max-age=")).max_age, None);
    }

    #[test]
    fn targeted_fields() {
        let fields = [HeaderName::from_static("weir-cache-control"), HeaderName::from_static("cdn-cache-control")];
        let mut m = h("max-age=5");
        assert_eq!(ResponseDirectives::targeted(&m, &fields), None);
        m.append("cdn-cache-control", HeaderValue::from_static("max-age=60"));
        m.append("cdn-cache-control", HeaderValue::from_static("stale-if-error=9, private"));
        let d = ResponseDirectives::targeted(&m, &fields).unwrap();
        assert_eq!(
            (d.max_age, d.stale_if_error, d.private),
            (Some(Duration::from_secs(60)), Some(Duration::from_secs(9)), true)
        );
        // The most specific field present wins; an invalid one is skipped as if absent.
        m.insert("weir-cache-control", HeaderValue::from_static("max-age=1"));
        assert_eq!(ResponseDirectives::targeted(&m, &fields).unwrap().max_age, Some(Duration::from_secs(1)));
        m.insert("weir-cache-control", HeaderValue::from_static("max-age=1,,"));
        assert_eq!(ResponseDirectives::targeted(&m, &fields).unwrap().max_age, Some(Duration::from_secs(60)));
        // Values of the wrong type are ignored; `?0` is false.
        let mut m = HeaderMap::new();
        m.insert("cdn-cache-control", HeaderValue::from_static("max-age=\"60\", s-maxage=1.5, no-store=?0, no-cache"));
        let d = ResponseDirectives::targeted(&m, &fields).unwrap();
        assert_eq!((d.max_age, d.s_maxage, d.no_store, d.no_cache), (None, None, false, true));
    }

    #[test]
    fn request_directives() {
        let d = RequestDirectives::parse(&h("max-stale, min-fresh=10, only-if-cached"));
        assert_eq!(d.max_stale, Some(None));
        assert_eq!(d.min_fresh, Some(Duration::from_secs(10)));
        assert!(d.only_if_cached);
        assert_eq!(RequestDirectives::parse(&h("max-stale=5")).max_stale, Some(Some(Duration::from_secs(5))));
        let mut p = HeaderMap::new();
        p.insert(PRAGMA, HeaderValue::from_static("no-cache"));
        assert!(RequestDirectives::parse(&p).no_cache);
    }
}
