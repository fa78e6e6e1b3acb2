//! `llm-cost`: the cost of an LLM API call from the response's JSON `usage` token counts
//! (`prompt_tokens`/`completion_tokens`, or `input_tokens`/`output_tokens`) times per-1k-token
//! prices from the config (`input_per_1k`, `output_per_1k`, exact decimal strings), as an exact
//! decimal string. No usage in the response: no opinion (the policy's cost applies).
use rust_decimal::Decimal;
use weir_plugin_sdk::*;

struct LlmCost {
    input_per_1k: Decimal,
    output_per_1k: Decimal,
}

fn price(config: &Config, key: &str) -> Result<Decimal, String> {
    let s = config.str(key).ok_or_else(|| format!("{key} is required (a decimal string, e.g. \"0.003\")"))?;
    let d: Decimal = s.parse().map_err(|_| format!("{key}: `{s}` is not a decimal"))?;
    if d.is_sign_negative() {
        return Err(format!("{key} must not be negative"));
    }
    Ok(d)
}

fn tokens(usage: &serde_json::Value, names: &[&str]) -> u64 {
    names.iter().find_map(|n| usage.get(*n).and_then(|v| v.as_u64())).unwrap_or(0)
}

impl Plugin for LlmCost {
    fn new(config: Config) -> Result<Self, String> {
        Ok(LlmCost { input_per_1k: price(&config, "input_per_1k")?, output_per_1k: price(&config, "output_per_1k")? })
    }

    fn needs(&self) -> Needs {
        Needs { response_body: true, ..Needs::default() }
    }

    fn cost(&self, _req: &Request, resp: &Response) -> Option<String> {
        let body: serde_json::Value = serde_json::from_slice(resp.body.as_deref()?).ok()?;
        let usage = body.get("usage")?;
        let input = Decimal::from(tokens(usage, &["prompt_tokens", "input_tokens"]));
        let output = Decimal::from(tokens(usage, &["completion_tokens", "output_tokens"]));
        let k = Decimal::from(1000);
        let cost = input * self.input_per_1k / k + output * self.output_per_1k / k;
        Some(cost.normalize().to_string())
    }
}

export_plugin!(LlmCost);
