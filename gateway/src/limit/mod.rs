//! Rate limiting (issue 11, in progress): the limiter arithmetic lands first, with its tests;
//! the policy wiring (phase 3 and the upstream function), the bounded local store and the Redis
//! script follow. `weir run` still refuses `rate_limit` blocks until then.

pub mod gcra;
