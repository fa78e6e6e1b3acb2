//! `budgets:`, a route's `budget:`, and consumers' own budget limits.

use super::*;

impl Validator {
    /// `budgets:`: each a limit (money, at most `budget::MAX_AMOUNT`), a window and a fail mode.
    pub(super) fn budgets(&mut self, src: &Source, raw: &std::collections::BTreeMap<String, RawBudgetDef>) {
        for (name, b) in raw {
            let bp = format!("budgets.{name}");
            if name.is_empty()
                || name.len() > 64
                || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                self.problems.at_key(src, &bp, format!("invalid budget name `{name}`: 1-64 of A-Z a-z 0-9 - _ ."));
            }
            // A bad limit is reported once; the budget is still known, so routes naming it do
            // not add "unknown budget" errors on top.
            let limit = parse_money(&b.limit).unwrap_or_else(|e| {
                self.problems.at(src, &format!("{bp}.limit"), e);
                rust_decimal::Decimal::ZERO
            });
            let limit_units = crate::budget::units_exact(limit).unwrap_or_else(|| {
                self.problems.at(
                    src,
                    &format!("{bp}.limit"),
                    format!("limit {limit} is above {}, the largest amount kept exactly", crate::budget::MAX_AMOUNT),
                );
                0
            });
            let per = match b.per.text.trim() {
                "1h" => BudgetWindow::Hour,
                "1d" => BudgetWindow::Day,
                "30d" => BudgetWindow::Days30,
                "month" => BudgetWindow::Month,
                other => {
                    self.problems.at(
                        src,
                        &format!("{bp}.per"),
                        format!("invalid budget window `{other}`: expected 1h, 1d, 30d or month (calendar, UTC)"),
                    );
                    BudgetWindow::Day
                }
            };
            let fail = self.keyword(
                src,
                &format!("{bp}.fail"),
                "fail mode",
                b.fail.as_deref(),
                &[("closed", FailMode::Closed), ("open", FailMode::Open)],
                FailMode::Closed,
            );
            let lease_ttl =
                self.duration(src, &format!("{bp}.lease_ttl"), b.lease_ttl.as_ref(), crate::budget::LEASE_TTL);
            if !(Duration::from_secs(1)..=Duration::from_secs(86_400)).contains(&lease_ttl) {
                self.problems.at(src, &format!("{bp}.lease_ttl"), "lease_ttl must be between 1s and 1d");
            }
            let history = b.history.as_ref();
            let hourly_ttl = self.duration(
                src,
                &format!("{bp}.history.hourly"),
                history.and_then(|h| h.hourly.as_ref()),
                crate::budget::HOURLY_TTL,
            );
            let daily_ttl = self.duration(
                src,
                &format!("{bp}.history.daily"),
                history.and_then(|h| h.daily.as_ref()),
                crate::budget::DAILY_TTL,
            );
            let system_limit_units = b.system_limit.as_ref().and_then(|t| match parse_money(t) {
                Ok(d) => crate::budget::units_exact(d).or_else(|| {
                    self.problems.at(
                        src,
                        &format!("{bp}.system_limit"),
                        format!("system_limit {d} is above {}", crate::budget::MAX_AMOUNT),
                    );
                    None
                }),
                Err(e) => {
                    self.problems.at(src, &format!("{bp}.system_limit"), e);
                    None
                }
            });
            let def = BudgetDef {
                name: name.clone(),
                limit,
                limit_units,
                system_limit_units,
                per,
                fail,
                lease_ttl,
                hourly_ttl,
                daily_ttl,
            };
            self.budgets.insert(name.clone(), std::sync::Arc::new(def));
        }
    }

    /// A route's `budget:` (after `budgets:` are known).
    pub(super) fn route_budget(
        &mut self,
        src: &Source,
        p: &str,
        b: &RawBudget,
        consumer: Option<&ConsumerFrom>,
        has_plugin: bool,
    ) -> Option<RouteBudget> {
        let bp = format!("{p}.budget");
        let def = self.budgets.get(&b.name).cloned();
        if def.is_none() {
            let known: Vec<&str> = self.budgets.keys().map(String::as_str).collect();
            self.problems.at(
                src,
                &format!("{bp}.name"),
                format!(
                    "unknown budget `{}` (budgets: {})",
                    b.name,
                    if known.is_empty() { "none".into() } else { known.join(", ") }
                ),
            );
        }
        if !consumer.is_some_and(|c| c.required) {
            self.problems.at(
                src,
                &bp,
                "a budget needs the route's `consumer: {..., required: true}` (an unknown caller must never get a budget)",
            );
        }
        let units = |v: &mut Self, field: &str, t: &Text| -> Option<i64> {
            match parse_money(t) {
                Ok(d) => crate::budget::units_exact(d).or_else(|| {
                    v.problems.at(src, &format!("{bp}.{field}"), format!("{d} is above {}", crate::budget::MAX_AMOUNT));
                    None
                }),
                Err(e) => {
                    v.problems.at(src, &format!("{bp}.{field}"), e);
                    None
                }
            }
        };
        let cost = if b.cost.text.trim() == "plugin" {
            if !has_plugin {
                self.problems.at(
                    src,
                    &format!("{bp}.cost"),
                    "`cost: plugin` needs the route's `plugin:` (its cost hook)",
                );
            }
            if b.reserve.is_none() {
                self.problems.at(
                    src,
                    &bp,
                    "`cost: plugin` needs `reserve` (held before forwarding, while the cost is unknown)",
                );
            }
            if b.max_cost.is_none() {
                self.problems.at(
                    src,
                    &bp,
                    "`cost: plugin` needs `max_cost`: what a call costs when its response cannot be priced (no usage, a failed hook, a client that left); add e.g. `max_cost: \"0.50\"`",
                );
            }
            None
        } else {
            Some(units(self, "cost", &b.cost)?)
        };
        let reserve = match &b.reserve {
            Some(t) => units(self, "reserve", t)?,
            None => cost.unwrap_or(0),
        };
        if cost.is_some_and(|c| reserve < c) {
            self.problems.at(
                src,
                &format!("{bp}.reserve"),
                "reserve is below the fixed cost: every call would overshoot",
            );
        }
        let max_cost = match &b.max_cost {
            Some(t) => Some(units(self, "max_cost", t)?),
            None => None,
        };
        if max_cost.is_some_and(|m| m < reserve) {
            self.problems.at(src, &format!("{bp}.max_cost"), "max_cost is below the reservation");
        }
        let mut charge_status = Vec::new();
        let default = ["2xx".to_string()];
        let classes = b.charge_status.as_ref().map_or(&default[..], OneOrMany::as_slice);
        for c in classes {
            let range = match c.trim() {
                "any" => Some((100, 599)),
                x if x.len() == 3 && x.ends_with("xx") => {
                    x[..1].parse::<u16>().ok().filter(|d| (1..=5).contains(d)).map(|d| (d * 100, d * 100 + 99))
                }
                x => x.parse::<u16>().ok().filter(|s| (100..=599).contains(s)).map(|s| (s, s)),
            };
            match range {
                Some(r) => charge_status.push(r),
                None => self.problems.at(
                    src,
                    &format!("{bp}.charge_status"),
                    format!("invalid charge_status `{c}`: expected a class (`2xx`), a code (`201`) or `any`"),
                ),
            }
        }
        if b.charge_hits == Some(true) && cost.is_none() {
            self.problems.at(
                src,
                &format!("{bp}.charge_hits"),
                "charge_hits needs a fixed cost: a hit has no usage of its own for the plugin to price",
            );
        }
        Some(RouteBudget {
            def: def?,
            cost_units: cost,
            reserve_units: reserve,
            max_cost_units: max_cost,
            charge_status,
            headers: b.headers.unwrap_or(false),
            charge_hits: b.charge_hits.unwrap_or(false),
        })
    }

    /// `consumers[].limits`: a consumer's own rate (and burst) for the policies of a name.
    /// `consumers[].budgets`: a consumer's own limit for a named budget (after `budgets:`).
    pub(super) fn consumer_budgets(
        &mut self,
        src: &Source,
        raw: &[RawConsumer],
    ) -> HashMap<String, HashMap<String, i64>> {
        let mut out = HashMap::new();
        for (i, c) in raw.iter().enumerate() {
            let mut own = HashMap::new();
            for (name, limit) in &c.budgets {
                let bp = format!("consumers[{i}].budgets.{name}");
                if !self.budgets.contains_key(name) {
                    self.problems.at_key(src, &bp, format!("no budget named `{name}` in `budgets:`"));
                    continue;
                }
                match parse_money(limit).map(crate::budget::units_exact) {
                    Ok(Some(u)) => {
                        own.insert(name.clone(), u);
                    }
                    Ok(None) => self.problems.at(
                        src,
                        &bp,
                        format!(
                            "limit {} is above {}, the largest amount kept exactly",
                            limit.text,
                            crate::budget::MAX_AMOUNT
                        ),
                    ),
                    Err(e) => self.problems.at(src, &bp, e),
                }
            }
            if !own.is_empty() {
                out.insert(c.id.clone(), own);
            }
        }
        out
    }
}
