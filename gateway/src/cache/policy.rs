//! Phase 7 for cached routes: may this response be stored, and for how long (RFC 9111 §3, §4.2)?
//! One function, `decide`, with the route's policy and the origin's headers as inputs.

use std::time::{Duration, SystemTime};

use http::header::{
    HeaderMap, HeaderName, HeaderValue, AGE, CACHE_CONTROL, DATE, ETAG, EXPIRES, LAST_MODIFIED, SET_COOKIE, VARY,
};
use http::{Method, StatusCode};

use super::control::{RequestDirectives, ResponseDirectives, ResponseLines};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginHeaders {
    Respect,
    Override,
}

#[derive(Debug, Clone)]
pub struct RouteCache {
    pub ttl: Option<Duration>,
    pub origin_headers: OriginHeaders,
    pub stale_while_revalidate: Option<Duration>,
    pub stale_if_error: Option<Duration>,
    pub share_private: bool,
    /// The route has a consumer and not `shared_across_consumers: true`: every stored answer
    /// is one consumer's (the verified `Weir-Consumer` is part of its key, as a variant), so
    /// consumer B is never served what the origin told consumer A.
    pub by_consumer: bool,
    /// `client_no_cache: honor` (the default): a request whose own `Cache-Control` / `Pragma`
    /// forces the origin (no-cache, max-age=0, min-fresh past the entry) goes there, paid and
    /// counted as the client's miss. `ignore`: such a request is served from the cache.
    pub client_no_cache: bool,
    /// Methods whose responses may be stored (GET and HEAD; POST only when listed).
    pub methods: Vec<Method>,
    pub max_key_body_bytes: u64,
    /// `cache.targeted_fields` (RFC 9213), most specific first: the first present and valid
    /// one replaces `Cache-Control` and `Expires` for Weir's storing and freshness decisions.
    pub targeted_fields: std::sync::Arc<[http::HeaderName]>,
}

/// `cache.targeted_fields` when unset: Weir's own field, then the one every CDN reads.
pub fn default_targeted_fields() -> std::sync::Arc<[http::HeaderName]> {
    std::sync::Arc::new([
        http::HeaderName::from_static("weir-cache-control"),
        http::HeaderName::from_static("cdn-cache-control"),
    ])
}

/// Why a response was not stored (rendered as `Cache-Status: ...; detail=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotStored {
    Method,
    Status,
    NoStore,
    Private,
    Authorization,
    Cookie,
    SetCookie,
    VaryStar,
    NoFreshness,
    TooLarge,
    Purged,
    Partial,
    /// The route's plugin said `store: false`.
    Plugin,
    /// Too many bytes are being buffered for cache fills right now (`cache.max_fill_bytes`).
    Busy,
}

impl NotStored {
    pub fn as_str(self) -> &'static str {
        match self {
            NotStored::Method => "method",
            NotStored::Status => "status",
            NotStored::NoStore => "no-store",
            NotStored::Private => "private",
            NotStored::Authorization => "authorization",
            NotStored::Cookie => "cookie",
            NotStored::SetCookie => "set-cookie",
            NotStored::VaryStar => "vary-star",
            NotStored::NoFreshness => "no-freshness",
            NotStored::TooLarge => "too-large",
            NotStored::Purged => "purged",
            NotStored::Partial => "partial",
            NotStored::Plugin => "plugin",
            NotStored::Busy => "fill-budget",
        }
    }
}

/// The facts about the request that storage rules depend on.
#[derive(Debug, Clone)]
pub struct RequestFacts {
    pub method: Method,
    pub authorization: bool,
    pub cookie: bool,
    pub directives: RequestDirectives,
}

impl RequestFacts {
    pub fn of(method: &Method, headers: &HeaderMap) -> Self {
        if headers.is_empty() {
            // Nothing to look up (a lookup hashes the name even in an empty map).
            return RequestFacts {
                method: method.clone(),
                authorization: false,
                cookie: false,
                directives: RequestDirectives::default(),
            };
        }
        RequestFacts {
            method: method.clone(),
            authorization: headers.contains_key(http::header::AUTHORIZATION),
            cookie: headers.contains_key(http::header::COOKIE),
            directives: RequestDirectives::parse(headers),
        }
    }
}

/// Lifetimes for a storable response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lifetime {
    pub fresh_for: Duration,
    pub initial_age: Duration,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    pub revalidate_always: bool,
    pub stale_forbidden: bool,
}

/// Status codes cacheable by default (RFC 9110 §15.1): the policy TTL and heuristics apply to these.
pub fn heuristically_cacheable(s: StatusCode) -> bool {
    matches!(s.as_u16(), 200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501)
}

/// Status codes whose semantics (RFC 9110 §15, RFC 6585, RFC 7725) Weir's cache implements:
/// what `must-understand` asks about. 206 is known but never stored (no partial storage).
fn understood(s: StatusCode) -> bool {
    matches!(
        s.as_u16(),
        200..=205 | 300..=305 | 307 | 308 | 400..=417 | 421 | 422 | 426 | 428 | 429 | 431 | 451 | 500..=505 | 511
    )
}

/// Heuristic freshness: 10 % of the time since Last-Modified, at most a day (RFC 9111 §4.2.2).
const HEURISTIC_CAP: Duration = Duration::from_secs(86_400);

/// An HTTP-date in any of its three forms (IMF-fixdate, RFC 850, asctime; RFC 9110 §5.6.7),
/// day and month names in any case.
fn http_date(value: Option<&HeaderValue>) -> Option<SystemTime> {
    let text = value?.to_str().ok()?.trim();
    // An origin's `Date` changes once a second and every fill reads one: the last IMF-fixdate
    // parsed on this thread is kept (comparing 29 bytes instead of ~1,000 instructions of
    // parsing on every miss).
    let Ok(key) = <[u8; IMF_FIXDATE]>::try_from(text.as_bytes()) else { return parse_http_date(text) };
    if let Some(t) = LAST_DATE.with(|c| {
        let (k, t) = c.get();
        (k == key).then_some(t)
    }) {
        return t;
    }
    let t = parse_http_date(text);
    LAST_DATE.with(|c| c.set((key, t)));
    t
}

/// `Sun, 06 Nov 1994 08:49:37 GMT`: the one date format an origin should send.
const IMF_FIXDATE: usize = 29;

thread_local! {
    /// The last 29-byte date parsed on this thread, and what it parsed to.
    static LAST_DATE: std::cell::Cell<([u8; IMF_FIXDATE], Option<SystemTime>)> =
        const { std::cell::Cell::new(([0; IMF_FIXDATE], None)) };
}

fn parse_http_date(text: &str) -> Option<SystemTime> {
    httpdate::parse_http_date(text).ok().or_else(|| httpdate::parse_http_date(&canonical_case(text)).ok())
}

/// `mon, 06 NOV 1994 08:49:37 gmt` as `Mon, 06 Nov 1994 08:49:37 GMT`: each word capitalised,
/// `GMT` upper-case (the parser knows the names only in their canonical case).
fn canonical_case(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut word_start = true;
    for c in text.chars() {
        if c.is_ascii_alphabetic() {
            out.push(if word_start { c.to_ascii_uppercase() } else { c.to_ascii_lowercase() });
            word_start = false;
        } else {
            out.push(c);
            word_start = true;
        }
    }
    out.replace("Gmt", "GMT")
}

/// What the storage decision reads of an answer's fields, found in one pass over them: an
/// answer carries a handful of fields, and a hashed lookup of each of the nine names read here
/// cost more than walking them once (RFC 9111 §5.1: of several lines, the first counts).
struct Head<'h> {
    cache_control: ResponseLines,
    /// One of the route's targeted fields (RFC 9213) is there.
    targeted: bool,
    set_cookie: bool,
    /// `Vary: *`, or a `Vary` line that is not visible ASCII (which no key could honour).
    vary_star: bool,
    date: Option<&'h HeaderValue>,
    age: Option<&'h HeaderValue>,
    expires: Option<&'h HeaderValue>,
    last_modified: Option<&'h HeaderValue>,
    etag: bool,
}

impl<'h> Head<'h> {
    fn scan(headers: &'h HeaderMap, targeted_fields: &[HeaderName]) -> Self {
        let mut h = Head {
            cache_control: ResponseLines::default(),
            targeted: false,
            set_cookie: false,
            vary_star: false,
            date: None,
            age: None,
            expires: None,
            last_modified: None,
            etag: false,
        };
        for (k, v) in headers {
            // (Any name but `cache-control` may be configured as one, even a field read below.)
            h.targeted |= targeted_fields.contains(k);
            if *k == CACHE_CONTROL {
                h.cache_control.add(v);
            } else if *k == DATE {
                h.date = h.date.or(Some(v));
            } else if *k == AGE {
                h.age = h.age.or(Some(v));
            } else if *k == EXPIRES {
                h.expires = h.expires.or(Some(v));
            } else if *k == LAST_MODIFIED {
                h.last_modified = h.last_modified.or(Some(v));
            } else if *k == ETAG {
                h.etag = true;
            } else if *k == SET_COOKIE {
                h.set_cookie = true;
            } else if *k == VARY {
                h.vary_star |= v.to_str().map_or(true, |s| s.split(',').any(|t| t.trim() == "*"));
            }
        }
        h
    }
}

/// Decides whether (and for how long) a response to `req` may be stored by this shared cache.
pub fn decide(
    cfg: &RouteCache,
    req: &RequestFacts,
    status: StatusCode,
    headers: &HeaderMap,
    now: SystemTime,
) -> Result<Lifetime, NotStored> {
    if !cfg.methods.contains(&req.method) || req.method == Method::HEAD {
        return Err(NotStored::Method);
    }
    if status == StatusCode::PARTIAL_CONTENT {
        return Err(NotStored::Partial);
    }
    let head = Head::scan(headers, &cfg.targeted_fields);
    // A targeted field (RFC 9213) replaces Cache-Control and Expires for Weir's own decisions.
    let targeted = if head.targeted { ResponseDirectives::targeted(headers, &cfg.targeted_fields) } else { None };
    let is_targeted = targeted.is_some();
    let cc = targeted.unwrap_or_else(|| head.cache_control.finish());
    // §5.2.2.3: `must-understand` stores only a status whose caching rules Weir implements,
    // and for those it overrides `no-store`.
    if cc.must_understand && !understood(status) {
        return Err(NotStored::Status);
    }
    let share = cfg.share_private;
    if ((cc.no_store && !cc.must_understand) || req.directives.no_store) && !share {
        return Err(NotStored::NoStore);
    }
    if cc.private && !share {
        return Err(NotStored::Private);
    }
    // §3.5: a response to an authenticated request is shared only when it says it may be.
    if req.authorization && !share && !(cc.public || cc.s_maxage.is_some() || cc.must_revalidate) {
        return Err(NotStored::Authorization);
    }
    if req.cookie && !share {
        return Err(NotStored::Cookie);
    }
    if head.set_cookie && !share {
        return Err(NotStored::SetCookie);
    }
    if head.vary_star {
        return Err(NotStored::VaryStar);
    }

    let date = http_date(head.date).unwrap_or(now);
    // RFC 9111 §5.1: a list counts by its first member, and of several lines the first counts.
    let age_header = head
        .age
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let v = v.split(',').next().unwrap_or("").trim();
            // Delta-seconds (RFC 9111 §1.2.2): digits only, and at most 2^31 before any arithmetic.
            (!v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .then(|| v.parse::<u64>().unwrap_or(u64::MAX).min(1 << 31))
        })
        .map(Duration::from_secs);
    let apparent = now.duration_since(date).unwrap_or_default();
    let initial_age = age_header.unwrap_or_default().max(apparent);
    let respect = cfg.origin_headers == OriginHeaders::Respect;

    let explicit = if respect {
        cc.s_maxage.or(cc.max_age).or_else(|| {
            if is_targeted {
                return None;
            }
            http_date(head.expires)
                .map(|e| e.duration_since(date).unwrap_or_default())
                // An unparseable Expires (e.g. "0") means "already expired" (§5.3).
                .or_else(|| head.expires.is_some().then_some(Duration::ZERO))
        })
    } else {
        None
    };
    let fresh_for = match explicit {
        // RFC 9111 §3: any final status may be stored when its freshness is explicit.
        Some(d) => {
            if !(200..=599).contains(&status.as_u16()) {
                return Err(NotStored::Status);
            }
            d
        }
        None => {
            if !heuristically_cacheable(status) {
                return Err(NotStored::Status);
            }
            match cfg.ttl {
                Some(ttl) => ttl,
                None => match http_date(head.last_modified) {
                    Some(lm) if respect => (date.duration_since(lm).unwrap_or_default() / 10).min(HEURISTIC_CAP),
                    // No freshness at all: worth storing only to revalidate it (ETag).
                    _ if respect && head.etag => Duration::ZERO,
                    _ => return Err(NotStored::NoFreshness),
                },
            }
        }
    };

    let stale_ok = !respect || !cc.forbids_stale();
    let window = |directive: Option<Duration>, policy: Option<Duration>| {
        if !stale_ok {
            return Duration::ZERO;
        }
        let d = if respect { directive.or(policy) } else { policy };
        d.unwrap_or_default()
    };
    let lifetime = Lifetime {
        fresh_for,
        initial_age,
        stale_while_revalidate: window(cc.stale_while_revalidate, cfg.stale_while_revalidate),
        stale_if_error: window(cc.stale_if_error, cfg.stale_if_error),
        revalidate_always: respect && cc.no_cache,
        stale_forbidden: !stale_ok,
    };
    let has_validators = head.etag || head.last_modified.is_some();
    if lifetime.fresh_for.saturating_sub(initial_age).is_zero()
        && lifetime.stale_while_revalidate.is_zero()
        && lifetime.stale_if_error.is_zero()
        && !has_validators
    {
        return Err(NotStored::NoFreshness);
    }
    Ok(lifetime)
}

/// What a cached route forwards of an untrusted peer's request: the default set below, plus
/// the route's `forward_headers`. A header the origin reflects into its answer but that is not
/// part of the key (`X-Forwarded-Prefix: //evil.example` in a `<script src>`) would poison the
/// entry every client then gets; keying every header instead would let any client bust the
/// cache with a random one. So an allow list, not a deny list.
#[derive(Debug, Clone, Default)]
pub struct ForwardHeaders {
    /// Exact names (lower case).
    pub names: Vec<http::HeaderName>,
    /// `PREFIX*` entries (lower case, without the `*`).
    pub prefixes: Vec<String>,
}

/// Forwarded on every cached route: content negotiation, conditionals and ranges, the body's
/// framing, the client's identity as the route passes it (`Authorization`, `Cookie` — the cache
/// rules decide what is stored of such requests), the request's own cache directives, Weir's
/// consumer, client certificate, request id and trace context, and Weir's forwarding headers
/// (`Host`, `Via`, `Forwarded`, `X-Forwarded-For/-Host/-Proto`, set by Weir itself). A `match`
/// on the lower-case name: a length switch and one comparison, on every miss.
fn forwarded_by_default(name: &str) -> bool {
    matches!(
        name,
        "host"
            | "accept"
            | "accept-charset"
            | "accept-encoding"
            | "accept-language"
            | "if-match"
            | "if-none-match"
            | "if-modified-since"
            | "if-unmodified-since"
            | "if-range"
            | "range"
            | "content-type"
            | "content-length"
            | "content-encoding"
            | "transfer-encoding"
            | "expect"
            | "user-agent"
            | "authorization"
            | "cookie"
            | "cache-control"
            | "pragma"
            | "via"
            | "forwarded"
            | "x-forwarded-for"
            | "x-forwarded-host"
            | "x-forwarded-proto"
            | "weir-consumer"
            | "weir-client-cert"
            | "x-request-id"
            | "traceparent"
            | "tracestate"
    )
}

impl ForwardHeaders {
    /// Whether a cached route forwards `name` from an untrusted peer.
    pub fn allows(&self, name: &http::HeaderName) -> bool {
        forwarded_by_default(name.as_str())
            || self.names.contains(name)
            || self.prefixes.iter().any(|p| name.as_str().starts_with(p.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn cfg(ttl: Option<u64>, mode: OriginHeaders) -> RouteCache {
        RouteCache {
            ttl: ttl.map(Duration::from_secs),
            origin_headers: mode,
            stale_while_revalidate: Some(Duration::from_secs(30)),
            stale_if_error: Some(Duration::from_secs(600)),
            share_private: false,
            by_consumer: false,
            client_no_cache: true,
            methods: vec![Method::GET, Method::HEAD],
            max_key_body_bytes: 1024,
            targeted_fields: default_targeted_fields(),
        }
    }

    fn get() -> RequestFacts {
        RequestFacts::of(&Method::GET, &HeaderMap::new())
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn s_maxage_beats_max_age_and_forbids_stale() {
        let l = decide(
            &cfg(None, OriginHeaders::Respect),
            &get(),
            StatusCode::OK,
            &headers(&[("cache-control", "max-age=10, s-maxage=99")]),
            SystemTime::now(),
        )
        .unwrap();
        assert_eq!(l.fresh_for, Duration::from_secs(99));
        assert_eq!(l.stale_while_revalidate, Duration::ZERO);
        assert_eq!(l.stale_if_error, Duration::ZERO);
    }

    #[test]
    fn policy_ttl_only_when_origin_is_silent() {
        let c = cfg(Some(60), OriginHeaders::Respect);
        assert_eq!(
            decide(&c, &get(), StatusCode::OK, &HeaderMap::new(), SystemTime::now()).unwrap().fresh_for,
            Duration::from_secs(60)
        );
        assert_eq!(
            decide(&c, &get(), StatusCode::OK, &headers(&[("cache-control", "max-age=5")]), SystemTime::now())
                .unwrap()
                .fresh_for,
            Duration::from_secs(5)
        );
        assert_eq!(
            decide(&c, &get(), StatusCode::INTERNAL_SERVER_ERROR, &HeaderMap::new(), SystemTime::now()),
            Err(NotStored::Status)
        );
        let none = cfg(None, OriginHeaders::Respect);
        assert_eq!(
            decide(&none, &get(), StatusCode::OK, &HeaderMap::new(), SystemTime::now()),
            Err(NotStored::NoFreshness)
        );
    }

    #[test]
    fn override_ignores_max_age_but_not_private() {
        let c = cfg(Some(60), OriginHeaders::Override);
        let l = decide(
            &c,
            &get(),
            StatusCode::OK,
            &headers(&[("cache-control", "max-age=0, no-cache, must-revalidate")]),
            SystemTime::now(),
        )
        .unwrap();
        assert_eq!(l.fresh_for, Duration::from_secs(60));
        assert!(!l.revalidate_always);
        assert_eq!(l.stale_while_revalidate, Duration::from_secs(30));
        assert_eq!(
            decide(&c, &get(), StatusCode::OK, &headers(&[("cache-control", "private")]), SystemTime::now()),
            Err(NotStored::Private)
        );
        assert_eq!(
            decide(&c, &get(), StatusCode::OK, &headers(&[("set-cookie", "a=b")]), SystemTime::now()),
            Err(NotStored::SetCookie)
        );
    }

    /// The decision reads an answer's fields in one pass: every `Cache-Control` line counts, of
    /// several `Date`/`Age`/`Expires` lines the first does, `Vary: *` on any line refuses, and a
    /// targeted field is found wherever it stands, even one named like a field read for itself.
    #[test]
    fn one_pass_reads_every_line_as_the_rfc_says() {
        let c = cfg(None, OriginHeaders::Respect);
        let now = SystemTime::now();
        let date = httpdate::fmt_http_date(now - Duration::from_secs(10));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(100));
        let answer = headers(&[
            ("cache-control", "max-age=60"),
            ("date", &date),
            ("age", "3"),
            ("cache-control", "stale-if-error=9, max-age=5"),
            ("age", "50"),
            ("date", &later),
            ("cache-control", "must-revalidate"),
        ]);
        let l = decide(&c, &get(), StatusCode::OK, &answer, now).unwrap();
        assert_eq!(l.fresh_for, Duration::from_secs(60));
        assert_eq!(l.stale_if_error, Duration::ZERO, "must-revalidate on the third line forbids stale");
        assert!(l.initial_age >= Duration::from_secs(10) && l.initial_age < Duration::from_secs(50), "{l:?}");
        // Of two `Expires` lines the first counts (an unparseable first one is "expired").
        let exp = headers(&[("expires", "0"), ("expires", &later), ("etag", "\"v\"")]);
        assert_eq!(decide(&c, &get(), StatusCode::OK, &exp, now).unwrap().fresh_for, Duration::ZERO);
        assert_eq!(
            decide(&c, &get(), StatusCode::OK, &headers(&[("vary", " * "), ("vary", "accept")]), now),
            Err(NotStored::VaryStar)
        );
        // A targeted field replaces Cache-Control and Expires, after them or before them.
        let t = headers(&[("cache-control", "no-store"), ("cdn-cache-control", "max-age=7")]);
        assert_eq!(decide(&c, &get(), StatusCode::OK, &t, now).unwrap().fresh_for, Duration::from_secs(7));
        let mut odd = c.clone();
        odd.targeted_fields = std::sync::Arc::new([EXPIRES]);
        let t = headers(&[("cache-control", "max-age=1"), ("expires", "max-age=8")]);
        assert_eq!(decide(&odd, &get(), StatusCode::OK, &t, now).unwrap().fresh_for, Duration::from_secs(8));
    }

    #[test]
    fn credentials_and_vary_star() {
        let c = cfg(Some(60), OriginHeaders::Respect);
        let auth = RequestFacts::of(&Method::GET, &headers(&[("authorization", "Bearer x")]));
        assert_eq!(
            decide(&c, &auth, StatusCode::OK, &HeaderMap::new(), SystemTime::now()),
            Err(NotStored::Authorization)
        );
        assert!(decide(
            &c,
            &auth,
            StatusCode::OK,
            &headers(&[("cache-control", "public, max-age=5")]),
            SystemTime::now()
        )
        .is_ok());
        let cookie = RequestFacts::of(&Method::GET, &headers(&[("cookie", "s=1")]));
        assert_eq!(decide(&c, &cookie, StatusCode::OK, &HeaderMap::new(), SystemTime::now()), Err(NotStored::Cookie));
        assert_eq!(
            decide(&c, &get(), StatusCode::OK, &headers(&[("vary", "accept, *")]), SystemTime::now()),
            Err(NotStored::VaryStar)
        );
        let mut shared = c.clone();
        shared.share_private = true;
        assert!(decide(&shared, &cookie, StatusCode::OK, &HeaderMap::new(), SystemTime::now()).is_ok());
    }

    #[test]
    fn expires_and_heuristic() {
        let c = cfg(None, OriginHeaders::Respect);
        let now = SystemTime::now();
        let date = httpdate::fmt_http_date(now);
        let exp = httpdate::fmt_http_date(now + Duration::from_secs(120));
        let l = decide(&c, &get(), StatusCode::OK, &headers(&[("date", &date), ("expires", &exp)]), now).unwrap();
        assert!(l.fresh_for >= Duration::from_secs(119));
        let lm = httpdate::fmt_http_date(now - Duration::from_secs(1000));
        let l = decide(&c, &get(), StatusCode::OK, &headers(&[("date", &date), ("last-modified", &lm)]), now).unwrap();
        assert!(l.fresh_for >= Duration::from_secs(99) && l.fresh_for <= Duration::from_secs(101));
        // Invalid Expires = already expired; with no validators nothing worth storing... except stale windows.
        let l = decide(&c, &get(), StatusCode::OK, &headers(&[("expires", "0")]), now).unwrap();
        assert_eq!(l.fresh_for, Duration::ZERO);
    }

    /// The one-date memo answers what parsing would: the same text twice, then another, a
    /// non-canonical case, and garbage of the same length.
    #[test]
    fn remembered_dates_parse_as_parsing_would() {
        let at = |text: &str| http_date(headers(&[("date", text)]).get(DATE));
        let a = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").ok();
        assert!(a.is_some());
        assert_eq!(at("Sun, 06 Nov 1994 08:49:37 GMT"), a);
        assert_eq!(at("Sun, 06 Nov 1994 08:49:37 GMT"), a);
        let b = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:38 GMT").ok();
        assert_eq!(at("Sun, 06 Nov 1994 08:49:38 GMT"), b);
        assert_ne!(a, b);
        assert_eq!(at("sun, 06 nov 1994 08:49:37 gmt"), a);
        assert_eq!(at("this is not a date, 29 bytes!"), None);
        assert_eq!(at("Sun, 06 Nov 1994 08:49:37 GMT"), a);
    }
}
