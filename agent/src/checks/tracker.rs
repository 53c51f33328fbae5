//! A check's state over time, as Nagios keeps it: SOFT and HARD states, and flapping.
//!
//! - A non-OK result is SOFT until `max_attempts` results in a row are non-OK, then HARD.
//!   OK is always HARD. A HARD state change raises an event; so does a recovery from a
//!   HARD problem. A SOFT problem that recovers raises nothing (Sensu raised an event for
//!   every result, sensu/sensu#1402).
//! - Flapping is the weighted percent of state changes over the last 21 results (newer
//!   changes weigh more, 0.75 to 1.25, as in Nagios). It starts at or above `flap_high`
//!   and stops below `flap_low`: the gap is the hysteresis that keeps a check near one
//!   threshold from starting and stopping on every result (Icinga/icinga2#3303, #4903).
//!   While a check flaps its state changes raise no events; its start and its stop do.
//!   When it stops, a HARD state that differs from the last one announced is announced,
//!   so what an event console shows is the check's state again.
//!
//! The part that must outlive a restart ([`Persisted`]) is what was last announced, so that
//! a recovery while the agent was down is still announced after it.

use std::collections::VecDeque;

use fleetbus_protocol::check::{CheckState, StateType};
use serde::{Deserialize, Serialize};

/// Results the flapping measure looks at.
pub const FLAP_WINDOW: usize = 21;
/// The weight of the oldest state change in the window.
const OLDEST_WEIGHT: f64 = 0.75;
/// The weight of the newest state change in the window.
const NEWEST_WEIGHT: f64 = 1.25;

/// How results become states and events, per check.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// Non-OK results in a row that make a state HARD (at least 1).
    pub max_attempts: u32,
    /// Flapping stops below this percent state change.
    pub flap_low: f64,
    /// Flapping starts at or above this percent state change.
    pub flap_high: f64,
}

/// What a check must remember across agent restarts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Persisted {
    /// The HARD state.
    pub hard: CheckState,
    /// The state of the last state event raised (OK when none was).
    pub announced: CheckState,
    /// Whether the check is flapping (a flapping start was announced, its stop not yet).
    pub flapping: bool,
}

impl Default for Persisted {
    fn default() -> Self {
        Persisted {
            hard: CheckState::Ok,
            announced: CheckState::Ok,
            flapping: false,
        }
    }
}

/// One check's state.
#[derive(Debug, Clone, Default)]
pub struct Tracker {
    kept: Persisted,
    /// The latest result's state.
    current: Option<CheckState>,
    /// Which non-OK result in a row the latest is.
    attempt: u32,
    /// The latest results' states, oldest first, at most [`FLAP_WINDOW`].
    history: VecDeque<CheckState>,
}

/// What one result did.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    /// SOFT or HARD.
    pub state_type: StateType,
    /// Which non-OK result in a row this is (1 for OK).
    pub attempt: u32,
    /// The weighted percent state change over the window.
    pub state_change: f64,
    /// Whether the check is flapping after this result.
    pub flapping: bool,
    /// Events to raise, in order.
    pub events: Vec<Announce>,
    /// Whether [`Tracker::persisted`] changed (and should be saved).
    pub changed: bool,
}

/// An event a result raises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Announce {
    /// The HARD state is now `to` (an OK `to` is a recovery), from `from`.
    State {
        /// The state announced before.
        from: CheckState,
        /// The new HARD state.
        to: CheckState,
    },
    /// The check started flapping.
    FlappingStarted,
    /// The check stopped flapping.
    FlappingStopped,
}

impl Tracker {
    /// A tracker resuming from what was saved.
    pub fn resume(kept: Persisted) -> Tracker {
        Tracker {
            kept,
            ..Tracker::default()
        }
    }

    /// What to save for a restart.
    pub fn persisted(&self) -> &Persisted {
        &self.kept
    }

    /// The HARD state.
    pub fn hard(&self) -> CheckState {
        self.kept.hard
    }

    /// Takes one result in.
    pub fn observe(&mut self, state: CheckState, policy: &Policy) -> Observed {
        let before = self.kept.clone();
        let max_attempts = policy.max_attempts.max(1);
        let previous = self.current.unwrap_or(self.kept.hard);
        let state_type = if state == CheckState::Ok {
            self.attempt = 1;
            self.kept.hard = CheckState::Ok;
            StateType::Hard
        } else if self.kept.hard != CheckState::Ok {
            // a HARD problem stays HARD; a change between problems is a HARD change
            self.attempt = max_attempts;
            self.kept.hard = state;
            StateType::Hard
        } else {
            self.attempt = if previous == CheckState::Ok {
                1
            } else {
                self.attempt.saturating_add(1)
            };
            if self.attempt >= max_attempts {
                self.attempt = max_attempts;
                self.kept.hard = state;
                StateType::Hard
            } else {
                StateType::Soft
            }
        };
        self.current = Some(state);
        if self.history.len() == FLAP_WINDOW {
            self.history.pop_front();
        }
        self.history.push_back(state);
        let state_change = self.state_change();

        let mut events = Vec::new();
        if !self.kept.flapping && state_change >= policy.flap_high {
            self.kept.flapping = true;
            events.push(Announce::FlappingStarted);
        } else if self.kept.flapping && state_change < policy.flap_low {
            self.kept.flapping = false;
            events.push(Announce::FlappingStopped);
        }
        if !self.kept.flapping && self.kept.hard != self.kept.announced {
            events.push(Announce::State {
                from: self.kept.announced,
                to: self.kept.hard,
            });
            self.kept.announced = self.kept.hard;
        }
        Observed {
            state_type,
            attempt: self.attempt,
            state_change,
            flapping: self.kept.flapping,
            events,
            changed: self.kept != before,
        }
    }

    /// The weighted percent state change over the window; a window not yet full counts
    /// as if its missing results were all the oldest one (no change).
    fn state_change(&self) -> f64 {
        let transitions = (FLAP_WINDOW - 1) as f64;
        let skipped = FLAP_WINDOW - self.history.len();
        let mut weighted = 0.0;
        let pairs = self.history.iter().zip(self.history.iter().skip(1));
        for (i, (older, newer)) in pairs.enumerate() {
            if older != newer {
                // position of this transition among the window's 20, oldest 0
                let x = (skipped + i) as f64;
                weighted +=
                    OLDEST_WEIGHT + x * (NEWEST_WEIGHT - OLDEST_WEIGHT) / (transitions - 1.0);
            }
        }
        weighted * 100.0 / transitions
    }
}

#[cfg(test)]
mod tests;
