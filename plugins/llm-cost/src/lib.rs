//! `llm-cost`: the cost of an LLM API call from the token counts in its response, times
//! per-1k-token prices from the config (`input_per_1k`, `output_per_1k`, and optionally
//! `cache_write_per_1k` / `cache_read_per_1k`, which default to the input price), as an exact
//! decimal string.
//!
//! Where the counts are:
//! - a JSON body: its `usage` (`prompt_tokens`/`completion_tokens`, or
//!   `input_tokens`/`output_tokens`);
//! - an OpenAI chat completions stream (server-sent events) with
//!   `stream_options.include_usage`: the `usage` of the last chunk before `[DONE]`;
//! - an OpenAI Responses API stream: the `response.completed` event's `response.usage`;
//! - an Anthropic messages stream: input and cache tokens in `message_start`, the cumulative
//!   output tokens in the last `message_delta`.
//!
//! No usage found (a stream without `include_usage`, a body Weir could only show in part): no
//! price, and Weir settles the call at the route's `max_cost`.
use rust_decimal::Decimal;
use serde_json::Value;
use weir_plugin_sdk::*;

struct LlmCost {
    input_per_1k: Decimal,
    output_per_1k: Decimal,
    cache_write_per_1k: Decimal,
    cache_read_per_1k: Decimal,
}

fn price(config: &Config, key: &str) -> Result<Option<Decimal>, String> {
    let Some(s) = config.str(key) else { return Ok(None) };
    let d: Decimal = s.parse().map_err(|_| format!("{key}: `{s}` is not a decimal"))?;
    if d.is_sign_negative() {
        return Err(format!("{key} must not be negative"));
    }
    Ok(Some(d))
}

fn required(config: &Config, key: &str) -> Result<Decimal, String> {
    price(config, key)?.ok_or_else(|| format!("{key} is required (a decimal string, e.g. \"0.003\")"))
}

/// Token counts found so far.
#[derive(Default)]
struct Usage {
    input: u64,
    output: u64,
    cache_write: u64,
    cache_read: u64,
    found: bool,
}

fn count(v: &Value, names: &[&str]) -> Option<u64> {
    names.iter().find_map(|n| v.get(*n).and_then(Value::as_u64))
}

impl Usage {
    /// A `usage` object (OpenAI chat and Responses, Anthropic `message_start` / non-streamed).
    fn read(&mut self, u: &Value) {
        if !u.is_object() {
            return;
        }
        self.found = true;
        if let Some(n) = count(u, &["prompt_tokens", "input_tokens"]) {
            self.input = n;
        }
        if let Some(n) = count(u, &["completion_tokens", "output_tokens"]) {
            self.output = n;
        }
        if let Some(n) = count(u, &["cache_creation_input_tokens"]) {
            self.cache_write = n;
        }
        if let Some(n) = count(u, &["cache_read_input_tokens"]) {
            self.cache_read = n;
        }
    }

    /// One JSON value: a whole body, or one event's data.
    fn event(&mut self, v: &Value) {
        match v.get("type").and_then(Value::as_str) {
            Some("message_start") => {
                if let Some(u) = v.get("message").and_then(|m| m.get("usage")) {
                    self.read(u);
                }
            }
            Some("response.completed") => {
                if let Some(u) = v.get("response").and_then(|r| r.get("usage")) {
                    self.read(u);
                }
            }
            // `message_delta` (cumulative output), a chat chunk's `usage` (null but in the
            // last chunk), a whole JSON body.
            _ => {
                if let Some(u) = v.get("usage") {
                    self.read(u);
                }
            }
        }
    }
}

fn usage_of(body: &[u8]) -> Option<Usage> {
    let mut usage = Usage::default();
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        usage.event(&v);
    } else {
        let text = std::str::from_utf8(body).ok()?;
        for line in text.lines() {
            let Some(data) = line.strip_prefix("data:") else { continue };
            let data = data.trim();
            if data == "[DONE]" {
                continue;
            }
            if let Ok(v) = serde_json::from_str::<Value>(data) {
                usage.event(&v);
            }
        }
    }
    usage.found.then_some(usage)
}

impl Plugin for LlmCost {
    fn new(config: Config) -> Result<Self, String> {
        let input_per_1k = required(&config, "input_per_1k")?;
        Ok(LlmCost {
            input_per_1k,
            output_per_1k: required(&config, "output_per_1k")?,
            cache_write_per_1k: price(&config, "cache_write_per_1k")?.unwrap_or(input_per_1k),
            cache_read_per_1k: price(&config, "cache_read_per_1k")?.unwrap_or(input_per_1k),
        })
    }

    fn needs(&self) -> Needs {
        Needs { response_body: true, ..Needs::default() }
    }

    fn cost(&self, _req: &Request, resp: &Response) -> Option<String> {
        let u = usage_of(resp.body.as_deref()?)?;
        let k = Decimal::from(1000);
        let cost = Decimal::from(u.input) * self.input_per_1k / k
            + Decimal::from(u.output) * self.output_per_1k / k
            + Decimal::from(u.cache_write) * self.cache_write_per_1k / k
            + Decimal::from(u.cache_read) * self.cache_read_per_1k / k;
        Some(cost.normalize().to_string())
    }
}

export_plugin!(LlmCost);
