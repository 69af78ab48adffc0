//! Rate control: which targets of a job get their envelope, and when.
//!
//! A [`Rollout`] is a pure state machine, with no I/O and no clock of its own: every
//! event carries `now`, and every call returns the [`Action`]s the control plane must
//! carry out. That keeps the rules testable with a clock the tests control, and the
//! engine's part down to "send this, record that".
//!
//! The rules, as in Systems Manager's Run Command:
//! - At most `max_concurrency` targets are in flight (delivered or in progress).
//! - Errors are targets that failed or timed out. Once they exceed `max_errors`, no new
//!   target starts and the ones not started become cancelled. Targets already in flight
//!   run to the end. Undeliverable targets are not errors (as in Systems Manager): an
//!   unreachable machine says nothing about whether the command is safe to spread.
//! - With the exponential ramp, one target goes first, and the in-flight limit grows by
//!   one with each target that finishes: 1, then 2 more, then 4 more, and so on, up to
//!   `max_concurrency`.
//! - Targets that are online go first. An offline target waits (pending) until it comes
//!   back; if that does not happen before the delivery deadline, it is undeliverable.
//!   A plain job (no rate control) sends every target its envelope at once, offline or
//!   not, for the broker to queue.
//! - A target delivered but not started by the delivery deadline is undeliverable too:
//!   the agent would refuse the envelope as expired anyway.
//! - A target in progress with no result by its run deadline plus a grace period is
//!   timed out, so a vanished agent cannot hold a slot for ever.

use std::collections::HashMap;

use drover_protocol::job::{FailureKind, JobResult, ResultStatus};
use drover_protocol::manifest::World;
use drover_protocol::worlds::Output;
use serde::{Deserialize, Serialize};

/// Extra time past a target's deadline before the server gives up on its result. The
/// agent reports a job started before it fetches and compiles the plugin, which the job's
/// deadline does not cover, so this leaves room for that too.
pub const RESULT_GRACE_MS: u64 = 120_000;

/// Why a target the operator cancelled before it was sent has no result.
const CANCELLED_BY_OPERATOR: &str = "cancelled by the operator before it was sent";

/// A target's state. The first four are live; the rest are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TargetState {
    /// Not sent yet.
    Pending,
    /// The envelope is with the broker; the agent has not said it started.
    Delivered,
    /// The agent said it started.
    InProgress,
    /// It ran and succeeded (for commands: exit code 0).
    Success,
    /// It ran and failed, or the agent refused it.
    Failed,
    /// It did not finish within its timeout.
    TimedOut,
    /// The operator cancelled it, or `max_errors` stopped it before it started.
    Cancelled,
    /// The agent was not reachable before the delivery deadline.
    Undeliverable,
}

impl TargetState {
    /// Every state, in display order.
    pub const ALL: [TargetState; 8] = [
        TargetState::Pending,
        TargetState::Delivered,
        TargetState::InProgress,
        TargetState::Success,
        TargetState::Failed,
        TargetState::TimedOut,
        TargetState::Cancelled,
        TargetState::Undeliverable,
    ];

    /// The name used in the store, the API and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            TargetState::Pending => "pending",
            TargetState::Delivered => "delivered",
            TargetState::InProgress => "in_progress",
            TargetState::Success => "success",
            TargetState::Failed => "failed",
            TargetState::TimedOut => "timed_out",
            TargetState::Cancelled => "cancelled",
            TargetState::Undeliverable => "undeliverable",
        }
    }

    /// Parses [`as_str`](Self::as_str).
    pub fn parse(s: &str) -> Option<TargetState> {
        TargetState::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// Whether nothing more will happen to the target.
    pub fn is_final(self) -> bool {
        !matches!(
            self,
            TargetState::Pending | TargetState::Delivered | TargetState::InProgress
        )
    }

    /// Whether the target holds a concurrency slot.
    pub fn in_flight(self) -> bool {
        matches!(self, TargetState::Delivered | TargetState::InProgress)
    }

    /// Whether the target counts against `max_errors`.
    pub fn is_error(self) -> bool {
        matches!(self, TargetState::Failed | TargetState::TimedOut)
    }
}

/// A count, or a percentage of the targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Amount {
    /// Exactly this many.
    Count(u32),
    /// This percentage of the targets.
    Percent(u32),
}

impl Amount {
    /// Parses `N` or `N%`.
    pub fn parse(s: &str) -> Result<Amount, String> {
        let s = s.trim();
        let (digits, percent) = match s.strip_suffix('%') {
            Some(d) => (d, true),
            None => (s, false),
        };
        let n: u32 = digits
            .parse()
            .map_err(|_| format!("{s:?} is not a count or a percentage such as 10 or 10%"))?;
        if percent {
            if n > 100 {
                return Err(format!("{s:?}: a percentage must be at most 100%"));
            }
            Ok(Amount::Percent(n))
        } else {
            Ok(Amount::Count(n))
        }
    }

    /// The count for `targets` targets: percentages round up for concurrency (so 10% of
    /// 5 is 1, never 0) and down for errors (so 10% of 5 allows none).
    fn resolve(self, targets: usize, round_up: bool) -> usize {
        match self {
            Amount::Count(n) => n as usize,
            Amount::Percent(p) => {
                let scaled = targets * p as usize;
                if round_up {
                    scaled.div_ceil(100)
                } else {
                    scaled / 100
                }
            }
        }
    }
}

impl std::fmt::Display for Amount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Amount::Count(n) => write!(f, "{n}"),
            Amount::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// How fast a job spreads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Ramp {
    /// Up to `max_concurrency` at once from the start.
    #[default]
    None,
    /// One target first, then doubling.
    Exponential,
}

impl Ramp {
    /// Parses `none` or `exponential`.
    pub fn parse(s: &str) -> Result<Ramp, String> {
        match s {
            "none" => Ok(Ramp::None),
            "exponential" => Ok(Ramp::Exponential),
            _ => Err(format!("ramp {s:?} must be none or exponential")),
        }
    }
}

/// A job's rate-control settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RatePolicy {
    /// Most targets in flight at once; all of them when absent.
    pub max_concurrency: Option<Amount>,
    /// Most errors before the job stops spreading; no limit when absent.
    pub max_errors: Option<Amount>,
    /// How fast it spreads.
    #[serde(default)]
    pub ramp: Ramp,
    /// After this many ms from creation, a target not started is undeliverable.
    pub delivery_timeout_ms: u64,
    /// After this many ms from its start, a target with no result is timed out
    /// ([`RESULT_GRACE_MS`] is added).
    pub run_timeout_ms: u64,
    /// Whether offline targets are sent their envelope at once too, for the broker to
    /// queue (a plain job), rather than waiting for their agent to come back.
    #[serde(default)]
    pub send_to_offline: bool,
}

/// What the engine must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send this agent its envelope (it is now delivered).
    Dispatch(String),
    /// Send this agent a cancel request (it is in flight).
    Cancel(String),
    /// Record a final state the server decided, with the reason.
    Settle(String, TargetState, String),
}

#[derive(Debug, Clone)]
struct Target {
    agent: String,
    state: TargetState,
    online: bool,
    /// When it went in flight, or started.
    since_ms: u64,
}

/// One job's targets and the rules for them.
#[derive(Debug, Clone)]
pub struct Rollout {
    policy: RatePolicy,
    created_ms: u64,
    targets: Vec<Target>,
    index: HashMap<String, usize>,
    max_concurrency: usize,
    max_errors: Option<usize>,
    cancelled: bool,
    stopped_by_errors: bool,
    /// The most targets ever in flight at once.
    peak_in_flight: usize,
}

/// A target as the rollout is rebuilt after a restart.
#[derive(Debug, Clone)]
pub struct Restored {
    /// The agent.
    pub agent: String,
    /// Its recorded state.
    pub state: TargetState,
    /// Whether it is online now.
    pub online: bool,
    /// When it was delivered or started, Unix ms.
    pub since_ms: u64,
}

impl Rollout {
    /// A rollout with every target pending. `online` says which agents are online now.
    pub fn new(
        policy: RatePolicy,
        created_ms: u64,
        agents: &[String],
        online: impl Fn(&str) -> bool,
    ) -> Rollout {
        let restored: Vec<Restored> = agents
            .iter()
            .map(|a| Restored {
                agent: a.clone(),
                state: TargetState::Pending,
                online: online(a),
                since_ms: 0,
            })
            .collect();
        Rollout::restore(policy, created_ms, restored, false)
    }

    /// A rollout rebuilt from recorded states.
    pub fn restore(
        policy: RatePolicy,
        created_ms: u64,
        targets: Vec<Restored>,
        cancelled: bool,
    ) -> Rollout {
        let n = targets.len();
        let max_concurrency = policy
            .max_concurrency
            .map_or(n, |a| a.resolve(n, true))
            .max(1);
        let max_errors = policy.max_errors.map(|a| a.resolve(n, false));
        let targets: Vec<Target> = targets
            .into_iter()
            .map(|t| Target {
                agent: t.agent,
                state: t.state,
                online: t.online,
                since_ms: t.since_ms,
            })
            .collect();
        let index = targets
            .iter()
            .enumerate()
            .map(|(i, t)| (t.agent.clone(), i))
            .collect();
        let mut r = Rollout {
            policy,
            created_ms,
            targets,
            index,
            max_concurrency,
            max_errors,
            cancelled,
            stopped_by_errors: false,
            peak_in_flight: 0,
        };
        r.peak_in_flight = r.in_flight();
        r
    }

    /// The in-flight limit after resolving percentages.
    pub fn max_concurrency(&self) -> usize {
        self.max_concurrency
    }

    /// The most targets that were ever in flight at once.
    pub fn peak_in_flight(&self) -> usize {
        self.peak_in_flight
    }

    /// Targets in flight now.
    pub fn in_flight(&self) -> usize {
        self.targets.iter().filter(|t| t.state.in_flight()).count()
    }

    /// Whether every target is final.
    pub fn is_done(&self) -> bool {
        self.targets.iter().all(|t| t.state.is_final())
    }

    /// Whether errors stopped the rollout.
    pub fn stopped_by_errors(&self) -> bool {
        self.stopped_by_errors
    }

    /// A target's state.
    pub fn state(&self, agent: &str) -> Option<TargetState> {
        self.index.get(agent).map(|&i| self.targets[i].state)
    }

    /// Whether `agent` is a target.
    pub fn has(&self, agent: &str) -> bool {
        self.index.contains_key(agent)
    }

    /// The job's first moves.
    pub fn start(&mut self, now: u64) -> Vec<Action> {
        self.tick(now)
    }

    /// An agent came online (or went offline).
    pub fn set_online(&mut self, agent: &str, online: bool, now: u64) -> Vec<Action> {
        if let Some(&i) = self.index.get(agent) {
            self.targets[i].online = online;
        }
        if online { self.tick(now) } else { Vec::new() }
    }

    /// The agent said it started.
    pub fn started(&mut self, agent: &str, now: u64) {
        if let Some(&i) = self.index.get(agent) {
            let t = &mut self.targets[i];
            if t.state == TargetState::Delivered {
                t.state = TargetState::InProgress;
                t.since_ms = now;
            }
        }
    }

    /// A target reached a final state (a result arrived). Returns what follows.
    pub fn finished(&mut self, agent: &str, state: TargetState, now: u64) -> Vec<Action> {
        debug_assert!(state.is_final());
        if let Some(&i) = self.index.get(agent) {
            // A late result still tells the truth about the target, but a target the
            // server already settled keeps counting as it was for the rules.
            let t = &mut self.targets[i];
            if !t.state.is_final() {
                t.state = state;
            }
        }
        self.tick(now)
    }

    /// Records a final state without acting on it; the next [`tick`](Self::tick) does.
    pub fn mark(&mut self, agent: &str, state: TargetState) {
        if let Some(&i) = self.index.get(agent) {
            let t = &mut self.targets[i];
            if !t.state.is_final() {
                t.state = state;
            }
        }
    }

    /// The operator cancelled the job: pending targets become cancelled, and the ones in
    /// flight are asked to stop.
    pub fn cancel(&mut self, now: u64) -> Vec<Action> {
        let _ = now;
        self.cancelled = true;
        let mut actions: Vec<Action> = self
            .targets
            .iter()
            .filter(|t| t.state.in_flight())
            .map(|t| Action::Cancel(t.agent.clone()))
            .collect();
        actions.extend(self.cancel_pending(CANCELLED_BY_OPERATOR));
        actions
    }

    /// Settles every pending target as cancelled, saying why.
    fn cancel_pending(&mut self, why: &str) -> Vec<Action> {
        let mut actions = Vec::new();
        for t in &mut self.targets {
            if t.state == TargetState::Pending {
                t.state = TargetState::Cancelled;
                actions.push(Action::Settle(
                    t.agent.clone(),
                    TargetState::Cancelled,
                    why.to_string(),
                ));
            }
        }
        actions
    }

    /// Applies deadlines and starts what the limits allow.
    pub fn tick(&mut self, now: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        let delivery_deadline = self
            .created_ms
            .saturating_add(self.policy.delivery_timeout_ms);
        for t in &mut self.targets {
            let settle = match t.state {
                TargetState::Pending | TargetState::Delivered if now >= delivery_deadline => {
                    let why = if t.state == TargetState::Pending {
                        "the agent was not reachable before the delivery timeout"
                    } else {
                        "the agent did not start the job before the delivery timeout"
                    };
                    Some((TargetState::Undeliverable, why.to_string()))
                }
                TargetState::InProgress
                    if now
                        >= t.since_ms
                            .saturating_add(self.policy.run_timeout_ms)
                            .saturating_add(RESULT_GRACE_MS) =>
                {
                    Some((
                        TargetState::TimedOut,
                        format!(
                            "no result from the agent {} s after its timeout",
                            RESULT_GRACE_MS / 1000
                        ),
                    ))
                }
                _ => None,
            };
            if let Some((state, why)) = settle {
                t.state = state;
                actions.push(Action::Settle(t.agent.clone(), state, why));
            }
        }

        let errors = self.targets.iter().filter(|t| t.state.is_error()).count();
        if !self.stopped_by_errors
            && let Some(max) = self.max_errors
            && errors > max
        {
            self.stopped_by_errors = true;
        }
        if self.cancelled {
            // Pending targets were settled by `cancel`; after a restart in between, here.
            actions.extend(self.cancel_pending(CANCELLED_BY_OPERATOR));
            return actions;
        }
        if self.stopped_by_errors {
            let why = format!(
                "not started: {errors} error(s) exceeded max-errors {}",
                self.max_errors.unwrap_or(0)
            );
            actions.extend(self.cancel_pending(&why));
            return actions;
        }

        let finished = self.targets.iter().filter(|t| t.state.is_final()).count();
        let limit = match self.policy.ramp {
            Ramp::None => self.max_concurrency,
            Ramp::Exponential => self.max_concurrency.min(finished + 1),
        };
        let mut in_flight = self.in_flight();
        // Online targets first, in order; offline ones wait for their agent, unless the
        // job leaves them to the broker.
        for t in &mut self.targets {
            if in_flight >= limit {
                break;
            }
            if t.state == TargetState::Pending && (t.online || self.policy.send_to_offline) {
                t.state = TargetState::Delivered;
                t.since_ms = now;
                in_flight += 1;
                actions.push(Action::Dispatch(t.agent.clone()));
            }
        }
        self.peak_in_flight = self.peak_in_flight.max(in_flight);
        actions
    }
}

/// The state a result puts its target in, and a short detail for failures.
///
/// A plugin that succeeded can still report work that failed, in its world's terms: a
/// command runner's command that exited with a non-zero code (see
/// [`Output::failure`]).
pub fn state_of(r: &JobResult, world: World) -> (TargetState, Option<String>) {
    match r.status {
        ResultStatus::Succeeded => {
            let failed = r
                .output
                .as_ref()
                .and_then(|o| Output::parse(world, o).ok())
                .and_then(|o| o.failure());
            match failed {
                Some(why) => (TargetState::Failed, Some(why)),
                None => (TargetState::Success, None),
            }
        }
        ResultStatus::Failed | ResultStatus::Rejected => {
            let (kind, message) = r
                .failure
                .as_ref()
                .map(|f| (Some(f.kind), f.message.clone()))
                .unwrap_or((None, r.status.as_str().to_string()));
            let state = match kind {
                Some(FailureKind::Timeout) => TargetState::TimedOut,
                Some(FailureKind::Cancelled) => TargetState::Cancelled,
                Some(FailureKind::Stale) => TargetState::Undeliverable,
                _ => TargetState::Failed,
            };
            (state, Some(message))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60_000;

    fn policy(conc: Option<&str>, errors: Option<&str>, ramp: Ramp) -> RatePolicy {
        RatePolicy {
            max_concurrency: conc.map(|s| Amount::parse(s).unwrap()),
            max_errors: errors.map(|s| Amount::parse(s).unwrap()),
            ramp,
            delivery_timeout_ms: 10 * MIN,
            run_timeout_ms: MIN,
            send_to_offline: false,
        }
    }

    fn agents(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("a{i:02}")).collect()
    }

    fn dispatched(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Dispatch(id) => Some(id.clone()),
                _ => None,
            })
            .collect()
    }

    fn settled(actions: &[Action], state: TargetState) -> usize {
        actions
            .iter()
            .filter(|a| matches!(a, Action::Settle(_, s, _) if *s == state))
            .count()
    }

    #[test]
    fn amounts_parse_and_resolve() {
        let cases: &[(&str, usize, bool, usize)] = &[
            ("10", 1000, true, 10),
            ("10%", 1000, true, 100),
            ("10%", 5, true, 1),
            ("10%", 5, false, 0),
            ("50%", 3, true, 2),
            ("50%", 3, false, 1),
            ("100%", 7, true, 7),
            ("0", 7, false, 0),
        ];
        for &(s, n, up, want) in cases {
            assert_eq!(Amount::parse(s).unwrap().resolve(n, up), want, "{s} of {n}");
        }
        for bad in ["", "x", "-1", "101%", "1.5", "%"] {
            assert!(Amount::parse(bad).is_err(), "{bad:?} should not parse");
        }
    }

    /// Runs a rollout where every target finishes (with `outcome(i)`) as soon as it is
    /// dispatched, one at a time, and returns the dispatch order and final states.
    fn drive(
        p: RatePolicy,
        n: usize,
        outcome: impl Fn(usize) -> TargetState,
    ) -> (Vec<Vec<String>>, Rollout) {
        let ids = agents(n);
        let mut r = Rollout::new(p, 0, &ids, |_| true);
        let mut waves = Vec::new();
        let mut queue = dispatched(&r.start(0));
        while !queue.is_empty() {
            waves.push(queue.clone());
            let mut next = Vec::new();
            for id in queue {
                let i: usize = id[1..].parse().unwrap();
                r.started(&id, 1);
                assert!(r.in_flight() <= r.max_concurrency());
                next.extend(dispatched(&r.finished(&id, outcome(i), 2)));
            }
            queue = next;
        }
        (waves, r)
    }

    #[test]
    fn concurrency_errors_and_ramp_table() {
        use TargetState::*;
        struct Case {
            name: &'static str,
            policy: RatePolicy,
            n: usize,
            failing: &'static [usize],
            first_wave: usize,
            success: usize,
            failed: usize,
            cancelled: usize,
        }
        let cases = [
            Case {
                name: "no limits: everything at once",
                policy: policy(None, None, Ramp::None),
                n: 10,
                failing: &[],
                first_wave: 10,
                success: 10,
                failed: 0,
                cancelled: 0,
            },
            Case {
                name: "max concurrency 3",
                policy: policy(Some("3"), None, Ramp::None),
                n: 10,
                failing: &[],
                first_wave: 3,
                success: 10,
                failed: 0,
                cancelled: 0,
            },
            Case {
                name: "max concurrency 25%",
                policy: policy(Some("25%"), None, Ramp::None),
                n: 10,
                failing: &[],
                first_wave: 3,
                success: 10,
                failed: 0,
                cancelled: 0,
            },
            Case {
                name: "max errors 0 stops at the first failure",
                policy: policy(Some("1"), Some("0"), Ramp::None),
                n: 5,
                failing: &[1],
                first_wave: 1,
                success: 1,
                failed: 1,
                cancelled: 3,
            },
            Case {
                name: "max errors 1 tolerates one failure",
                policy: policy(Some("1"), Some("1"), Ramp::None),
                n: 5,
                failing: &[1],
                first_wave: 1,
                success: 4,
                failed: 1,
                cancelled: 0,
            },
            Case {
                name: "max errors 1 stops at the second failure",
                policy: policy(Some("1"), Some("1"), Ramp::None),
                n: 6,
                failing: &[1, 3],
                first_wave: 1,
                success: 2,
                failed: 2,
                cancelled: 2,
            },
            Case {
                name: "max errors 20% of 10 is 2",
                policy: policy(Some("1"), Some("20%"), Ramp::None),
                n: 10,
                failing: &[0, 1, 2],
                first_wave: 1,
                success: 0,
                failed: 3,
                cancelled: 7,
            },
            Case {
                name: "in-flight targets finish after the error limit",
                policy: policy(Some("4"), Some("0"), Ramp::None),
                n: 8,
                failing: &[0],
                first_wave: 4,
                success: 3,
                failed: 1,
                cancelled: 4,
            },
            Case {
                name: "exponential ramp starts with one",
                policy: policy(Some("100%"), None, Ramp::Exponential),
                n: 15,
                failing: &[],
                first_wave: 1,
                success: 15,
                failed: 0,
                cancelled: 0,
            },
        ];
        for c in cases {
            let fail = |i: usize| {
                if c.failing.contains(&i) {
                    Failed
                } else {
                    Success
                }
            };
            let (waves, r) = drive(c.policy, c.n, fail);
            let count = |s| {
                (0..c.n)
                    .filter(|i| r.state(&format!("a{i:02}")) == Some(s))
                    .count()
            };
            assert_eq!(waves[0].len(), c.first_wave, "{}: first wave", c.name);
            assert_eq!(count(Success), c.success, "{}: success", c.name);
            assert_eq!(count(Failed), c.failed, "{}: failed", c.name);
            assert_eq!(count(Cancelled), c.cancelled, "{}: cancelled", c.name);
            assert!(r.is_done(), "{}: done", c.name);
            assert!(
                r.peak_in_flight() <= r.max_concurrency(),
                "{}: peak {} over {}",
                c.name,
                r.peak_in_flight(),
                r.max_concurrency()
            );
        }
    }

    #[test]
    fn exponential_ramp_doubles_when_waves_complete() {
        let ids = agents(20);
        let mut r = Rollout::new(policy(Some("6"), None, Ramp::Exponential), 0, &ids, |_| {
            true
        });
        let mut wave = dispatched(&r.start(0));
        let mut sizes = Vec::new();
        while !wave.is_empty() {
            sizes.push(wave.len());
            // The whole wave finishes before anything new is looked at.
            let mut next = Vec::new();
            for id in &wave {
                r.started(id, 1);
            }
            for id in &wave {
                next.extend(dispatched(&r.finished(id, TargetState::Success, 2)));
            }
            wave = next;
        }
        // 1, then 2 (limit 2 after one finished), 4, then capped at 6.
        assert_eq!(sizes[..3], [1, 2, 4]);
        assert!(sizes[3..].iter().all(|&s| s <= 6), "{sizes:?}");
        assert_eq!(sizes.iter().sum::<usize>(), 20);
        assert_eq!(r.peak_in_flight(), 6);
    }

    #[test]
    fn offline_targets_wait_for_their_agent_until_the_delivery_deadline() {
        let ids = agents(3);
        let mut r = Rollout::new(policy(None, None, Ramp::None), 0, &ids, |a| a != "a01");
        assert_eq!(dispatched(&r.start(0)), ["a00", "a02"]);
        assert_eq!(r.state("a01"), Some(TargetState::Pending));
        // Back online within the delivery timeout: it gets the job.
        assert_eq!(dispatched(&r.set_online("a01", true, 5 * MIN)), ["a01"]);

        let mut r = Rollout::new(policy(None, None, Ramp::None), 0, &ids, |a| a != "a01");
        r.start(0);
        assert!(r.tick(10 * MIN - 1).is_empty());
        let a = r.tick(10 * MIN);
        // a01 never came back; a00 and a02 were delivered but never started.
        assert_eq!(settled(&a, TargetState::Undeliverable), 3);
        // Too late: coming online now sends nothing.
        assert!(dispatched(&r.set_online("a01", true, 11 * MIN)).is_empty());
        assert!(r.is_done());
    }

    #[test]
    fn offline_targets_do_not_hold_slots_and_online_ones_go_first() {
        let ids = agents(4);
        let mut r = Rollout::new(policy(Some("2"), None, Ramp::None), 0, &ids, |a| {
            a == "a02" || a == "a03"
        });
        assert_eq!(dispatched(&r.start(0)), ["a02", "a03"]);
        assert!(
            dispatched(&r.set_online("a00", true, 1)).is_empty(),
            "no slot free"
        );
        assert_eq!(
            dispatched(&r.finished("a02", TargetState::Success, 2)),
            ["a00"]
        );
    }

    #[test]
    fn a_target_that_never_reports_times_out_with_a_grace_period() {
        let ids = agents(2);
        let mut r = Rollout::new(policy(Some("1"), None, Ramp::None), 0, &ids, |_| true);
        assert_eq!(dispatched(&r.start(0)), ["a00"]);
        r.started("a00", 1_000);
        assert!(r.tick(1_000 + MIN + RESULT_GRACE_MS - 1).is_empty());
        let a = r.tick(1_000 + MIN + RESULT_GRACE_MS);
        assert_eq!(settled(&a, TargetState::TimedOut), 1);
        assert_eq!(dispatched(&a), ["a01"], "the freed slot is used");
        // Its result still arrives later: the rules keep the server's verdict.
        r.finished("a00", TargetState::Success, 2 * MIN);
        assert_eq!(r.state("a00"), Some(TargetState::TimedOut));
    }

    #[test]
    fn cancel_settles_pending_targets_and_stops_the_ones_in_flight() {
        let ids = agents(5);
        let mut r = Rollout::new(policy(Some("2"), None, Ramp::None), 0, &ids, |_| true);
        r.start(0);
        r.started("a00", 1);
        let a = r.cancel(2);
        assert_eq!(settled(&a, TargetState::Cancelled), 3);
        let stops: Vec<_> = a
            .iter()
            .filter_map(|x| match x {
                Action::Cancel(id) => Some(id.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(stops, ["a00", "a01"]);
        // Finishing in-flight targets starts nothing new.
        assert!(dispatched(&r.finished("a00", TargetState::Cancelled, 3)).is_empty());
        assert!(dispatched(&r.finished("a01", TargetState::Success, 3)).is_empty());
        assert!(r.is_done());
    }

    #[test]
    fn undeliverable_targets_are_not_errors() {
        let ids = agents(3);
        let mut r = Rollout::new(policy(Some("1"), Some("0"), Ramp::None), 0, &ids, |a| {
            a != "a00"
        });
        assert_eq!(dispatched(&r.start(0)), ["a01"]);
        r.started("a01", 1);
        assert_eq!(
            dispatched(&r.finished("a01", TargetState::Success, 2)),
            ["a02"]
        );
        let a = r.tick(10 * MIN);
        // a00 never came back and a02 never started: both undeliverable, no stop.
        assert_eq!(settled(&a, TargetState::Undeliverable), 2);
        assert!(!r.stopped_by_errors());
    }

    #[test]
    fn a_cancelled_rollout_restored_after_a_restart_settles_what_was_not_sent() {
        let targets = vec![
            Restored {
                agent: "a".into(),
                state: TargetState::Pending,
                online: true,
                since_ms: 0,
            },
            Restored {
                agent: "b".into(),
                state: TargetState::InProgress,
                online: true,
                since_ms: 0,
            },
        ];
        let mut r = Rollout::restore(policy(None, None, Ramp::None), 0, targets, true);
        let a = r.tick(1);
        assert_eq!(settled(&a, TargetState::Cancelled), 1);
        assert!(dispatched(&a).is_empty());
        assert_eq!(r.state("a"), Some(TargetState::Cancelled));
    }

    #[test]
    fn restored_rollouts_keep_their_counts() {
        let targets = vec![
            Restored {
                agent: "a".into(),
                state: TargetState::InProgress,
                online: true,
                since_ms: 0,
            },
            Restored {
                agent: "b".into(),
                state: TargetState::Pending,
                online: true,
                since_ms: 0,
            },
        ];
        let mut r = Rollout::restore(policy(Some("1"), None, Ramp::None), 0, targets, false);
        assert!(dispatched(&r.tick(1)).is_empty(), "a still holds the slot");
        assert_eq!(dispatched(&r.finished("a", TargetState::Success, 2)), ["b"]);
    }
}
