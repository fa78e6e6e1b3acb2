//! Who pays, and when: the one file where a call's payer is chosen and its budget lease is
//! reserved, settled and guarded (phases 6 and 9).
//!
//! - **Payer.** A request pays for what it asked for: its miss, its pass-through, its write, its
//!   tunnel, and a refetch its own `Cache-Control` / `Pragma` forced. `_system` pays only for
//!   Weir's own work — background refreshes, revalidations of stale entries and warm-ups — under
//!   the budget's `system_limit` when one is set; its balance is never shown to a client.
//! - **Exactly once.** Every reservation is held by a [`LeaseGuard`]. Settled explicitly at the
//!   response head (a fixed cost), or at the end of the body (a price the plugin computes);
//!   dropped unsettled — the client left before the head or mid-body, a task was cancelled — it
//!   settles from a task of its own at what the call may cost (the fixed cost, or `max_cost`):
//!   the origin was asked, so the call is charged. Lease expiry only covers an instance that
//!   died holding one.
//! - **Unpriceable is never cheaper than priceable.** With `cost: plugin`, a response the hook
//!   cannot price (no usage, a trapping hook, a body that failed) settles at `max_cost`.

use std::sync::Arc;

use http::Response;
use http_body_util::BodyExt as _;

use super::body;
use super::{Purpose, RequestCtx};
use crate::budget::{Budgets, Lease, Refusal, SYSTEM};
use crate::config::{FailMode, RouteBudget};
use crate::error::GatewayError;
use crate::metrics::Metrics;
use crate::Body;

/// A call's reservations, settled exactly once: by [`LeaseGuard::settle`], or when dropped.
/// One lease per budget level the call is charged to — today the route's budget; team and
/// organisation budgets will add levels, each reserved before the call and settled with it.
#[derive(Debug)]
pub(crate) struct LeaseGuard {
    levels: Vec<Held>,
    /// Set once the upstream connection started writing the request (`upstream::Asked`): a
    /// guard dropped before that — the client left while Weir was still connecting, say — asked
    /// the origin nothing, and releases instead of charging.
    asked: Option<Arc<std::sync::atomic::AtomicBool>>,
}

#[derive(Debug)]
struct Held {
    budgets: Arc<Budgets>,
    metrics: Arc<Metrics>,
    lease: Lease,
    /// What the call is charged if the guard is dropped unsettled.
    if_dropped: i64,
}

impl LeaseGuard {
    /// The flag the upstream request sets when it is handed to the connection.
    pub(crate) fn asked_flag(&mut self) -> Arc<std::sync::atomic::AtomicBool> {
        self.asked.get_or_insert_with(Arc::default).clone()
    }

    /// The lease of the route's own budget (the first level).
    pub(crate) fn lease(&self) -> Option<&Lease> {
        self.levels.first().map(|h| &h.lease)
    }

    /// Settles every level at `units` (charged) or releases them (not charged). The settlement
    /// runs in a task of its own, so a client that leaves while it is under way cannot cancel it.
    pub(crate) async fn settle(mut self, units: i64, charged: bool) {
        let levels = std::mem::take(&mut self.levels);
        if levels.is_empty() {
            return;
        }
        for h in &levels {
            if charged {
                h.metrics.budget_spent(&h.lease.budget.name, units);
            }
        }
        // The request waits for the first attempt (a balance read right after sees it); the
        // retries of one Redis did not take go on without it.
        let (first, tried) = tokio::sync::oneshot::channel();
        tokio::spawn(settle_levels(levels.into_iter().map(|h| (h, units)).collect(), charged, Some(first)));
        let _ = tried.await;
    }
}

/// Settles each level at its units; one that Redis did not take (it stalled, restarted, the
/// breaker was open) is tried again with backoff — the script is idempotent by lease id — for
/// as long as the lease would hold its money, so a call the origin served is not left unpaid
/// by a Redis fault. `first` hears when every level has been tried once.
async fn settle_levels(levels: Vec<(Held, i64)>, charged: bool, first: Option<tokio::sync::oneshot::Sender<()>>) {
    let mut pending = settle_each(levels, charged).await;
    if let Some(f) = first {
        let _ = f.send(());
    }
    let Some(ttl) = pending.iter().map(|(h, _)| h.lease.budget.lease_ttl).min() else { return };
    let deadline = std::time::Instant::now() + ttl;
    let mut wait = std::time::Duration::from_millis(100);
    while !pending.is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(std::time::Duration::from_secs(2));
        pending = settle_each(pending, charged).await;
    }
    for (h, _) in &pending {
        tracing::warn!(budget = %h.lease.budget.name, "budget settlement failed until the lease's end; its money comes back");
    }
}

/// One attempt at each level; the ones Redis did not take come back.
async fn settle_each(levels: Vec<(Held, i64)>, charged: bool) -> Vec<(Held, i64)> {
    let mut left = Vec::new();
    for (h, units) in levels {
        if !h.budgets.settle(&h.lease, units, charged).await {
            left.push((h, units));
        }
    }
    left
}

/// Releases reservations whose answer never came (`Budgets::take_unanswered`: Redis stalled,
/// or a client hung up while its reservation was under way), in the background, retried like
/// any settlement; the next budgeted call of the instance sends them.
fn release_unanswered(ctx: &RequestCtx) {
    let leases = ctx.rt.budgets.take_unanswered();
    if leases.is_empty() {
        return;
    }
    let levels = leases
        .into_iter()
        .map(|lease| {
            (Held { budgets: ctx.rt.budgets.clone(), metrics: ctx.rt.metrics.clone(), lease, if_dropped: 0 }, 0)
        })
        .collect();
    tokio::spawn(settle_levels(levels, false, None));
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        let levels = std::mem::take(&mut self.levels);
        if levels.is_empty() {
            return;
        }
        // Without the flag (a guard never handed to an upstream request) the call is charged,
        // as before: the origin may have been asked.
        let charged = self.asked.as_ref().is_none_or(|a| a.load(std::sync::atomic::Ordering::SeqCst));
        for h in &levels {
            if charged {
                h.metrics.budget_unsettled("dropped");
                h.metrics.budget_spent(&h.lease.budget.name, h.if_dropped);
            }
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(settle_levels(
                levels
                    .into_iter()
                    .map(|h| {
                        let units = h.if_dropped;
                        (h, units)
                    })
                    .collect(),
                charged,
                None,
            ));
        }
    }
}

/// The consumer a call of `purpose` is charged to.
pub(super) fn payer(ctx: &RequestCtx, purpose: Purpose) -> &str {
    match purpose {
        Purpose::Refresh | Purpose::Revalidate => SYSTEM,
        _ if ctx.system => SYSTEM,
        // Validation makes a budgeted route's consumer required, so it is known here.
        _ => ctx.consumer.as_deref().unwrap_or(SYSTEM),
    }
}

/// Reserves the call's cost for its payer. `Ok(None)`: let through unmetered (`fail: open`).
pub(crate) async fn reserve(
    ctx: &RequestCtx,
    b: &RouteBudget,
    purpose: Purpose,
) -> Result<Option<LeaseGuard>, GatewayError> {
    let route = ctx.route();
    let consumer = payer(ctx, purpose);
    let limit = ctx.rt.config.budget_limit(&b.def, consumer);
    if ctx.rt.budgets.has_unanswered() {
        release_unanswered(ctx);
    }
    match ctx.rt.budgets.reserve(&b.def, limit, consumer, b.reserve_units, b.cost_units.is_none()).await {
        Ok(lease) => {
            let if_dropped = b.cost_units.or(b.max_cost_units).unwrap_or(lease.units);
            Ok(Some(LeaseGuard {
                asked: None,
                levels: vec![Held {
                    budgets: ctx.rt.budgets.clone(),
                    metrics: ctx.rt.metrics.clone(),
                    lease,
                    if_dropped,
                }],
            }))
        }
        Err(Refusal::Exhausted { retry_after_s }) => {
            route.metrics.budget_rejected(&route.label);
            Err(GatewayError::BudgetExhausted { budget: b.def.name.clone(), retry_after_s })
        }
        Err(Refusal::Unavailable) if b.def.fail == FailMode::Open => {
            route.metrics.budget_unmetered(&route.label);
            Ok(None)
        }
        Err(Refusal::Unavailable) => Err(GatewayError::BudgetUnavailable),
    }
}

/// What the client's budget has left after this call, for `Weir-Budget-Remaining` — only when
/// the client is the payer (`_system`'s balance is never shown to a client).
fn show_remaining(ctx: &RequestCtx, lease: &Lease, units_after: i64) {
    if lease.consumer != SYSTEM {
        let _ = ctx.budget_remaining.set(units_after);
    }
}

/// Phase 9 at the response head: a failed call or a status that is not charged releases the
/// lease; a fixed cost is settled now; `cost: plugin` hands the guard to the body (`meter`).
pub(crate) async fn at_head(
    ctx: &RequestCtx,
    b: &RouteBudget,
    guard: LeaseGuard,
    status: Option<u16>,
) -> Option<LeaseGuard> {
    let lease = guard.lease()?.clone();
    let charged = status.is_some_and(|s| b.charges(s));
    match (b.cost_units, charged) {
        (Some(cost), true) => {
            show_remaining(ctx, &lease, lease.remaining_units + lease.units - cost);
            guard.settle(cost, true).await;
            None
        }
        (None, true) => {
            show_remaining(ctx, &lease, lease.remaining_units);
            Some(guard)
        }
        (_, false) => {
            show_remaining(ctx, &lease, lease.remaining_units + lease.units);
            guard.settle(0, false).await;
            None
        }
    }
}

/// `charge_hits: true`: a hit costs the route's fixed cost (reserved and settled at once), or is
/// refused like a call when the budget is spent.
pub(crate) async fn charge_hit(ctx: &RequestCtx) -> Result<(), GatewayError> {
    let route = ctx.route();
    let Some(b) = route.route.budget.as_ref().filter(|b| b.charge_hits) else { return Ok(()) };
    let Some(cost) = b.cost_units else { return Ok(()) };
    if let Some(guard) = reserve(ctx, b, Purpose::Forward).await? {
        if let Some(lease) = guard.lease() {
            show_remaining(ctx, lease, lease.remaining_units + lease.units - cost);
        }
        guard.settle(cost, true).await;
    }
    Ok(())
}

/// `cost: plugin`: the body streams through while its head and tail are kept
/// (`body::Metered`); at its end the plugin's `cost` hook prices the call from them, and the
/// lease is settled at that (rounded up to the unit, capped at `max_cost`) — or at `max_cost`
/// when no price can be computed. The lease is renewed while the body streams, so a long
/// stream neither frees its money nor is charged twice.
pub(crate) fn meter(ctx: &RequestCtx, guard: LeaseGuard, resp: Response<Body>) -> Response<Body> {
    let route = ctx.route();
    let (Some(b), Some(plugin_ref)) = (&route.route.budget, &route.route.plugin) else { return resp };
    let Some(plugin) = plugin_ref.loaded.clone() else { return resp };
    let Some(lease) = guard.lease().cloned() else { return resp };
    let preq = plugin.request(&ctx.plugin_parts(None));
    let (parts, body) = resp.into_parts();
    let (status, headers) = (parts.status.as_u16(), parts.headers.clone());
    let budgets = ctx.rt.budgets.clone();
    let metrics = ctx.rt.metrics.clone();
    let max_cost = b.max_cost_units;
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        // Renewal, until settled.
        let (budgets, lease, done) = (budgets, lease.clone(), done.clone());
        let every = lease.budget.lease_ttl / 3;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if done.load(std::sync::atomic::Ordering::Acquire) {
                    return;
                }
                budgets.renew(&lease).await;
            }
        });
    }
    let cap = usize::try_from(plugin_ref.max_body_bytes).unwrap_or(usize::MAX);
    let on_end: body::OnEnd = Box::new(move |kept, how| {
        Box::pin(async move {
            let priced = match how {
                body::Ended::Complete => {
                    let presp = crate::plugin::response_for(&plugin, status, &headers, Some(&kept));
                    match plugin.cost(&preq, &presp) {
                        Ok(Some(d)) => crate::budget::units_ceil(d).ok_or("invalid"),
                        Ok(None) => Err("no_usage"),
                        Err(f) => Err(f.as_str()),
                    }
                }
                body::Ended::Failed => Err("failed"),
            };
            let fallback = max_cost.unwrap_or(lease.units);
            let units = match priced {
                Ok(u) => match max_cost {
                    Some(m) if u > m => {
                        metrics.budget_clamped(&lease.budget.name);
                        m
                    }
                    _ => u,
                },
                Err(reason) => {
                    metrics.budget_unsettled(reason);
                    fallback
                }
            };
            guard.settle(units, true).await;
            done.store(true, std::sync::atomic::Ordering::Release);
        })
    });
    Response::from_parts(parts, body::Metered::new(body, cap, on_end).boxed())
}

/// The upstream call's budget, from reservation to the response head: `reserve` before it
/// leaves, `at_head` once its status is known (or it failed).
pub(crate) async fn upstream_budget(
    ctx: &RequestCtx,
    purpose: Purpose,
) -> Result<Option<(&RouteBudget, LeaseGuard)>, GatewayError> {
    match &ctx.route().route.budget {
        Some(b) => Ok(reserve(ctx, b, purpose).await?.map(|g| (b, g))),
        None => Ok(None),
    }
}
