use super::*;
use CheckState::{Critical as C, Ok as O, Unknown as U, Warning as W};

fn policy(max_attempts: u32) -> Policy {
    Policy {
        max_attempts,
        flap_low: 5.0,
        flap_high: 20.0,
    }
}

/// Feeds `states` to a new tracker; every event raised, with the number (from 1) of the
/// result that raised it.
fn events(states: &[CheckState], policy: &Policy) -> Vec<(usize, Announce)> {
    let mut t = Tracker::default();
    let mut out = Vec::new();
    for (n, &s) in states.iter().enumerate() {
        for e in t.observe(s, policy).events {
            out.push((n + 1, e));
        }
    }
    out
}

/// A policy that never flaps (no change rate reaches 101 %).
fn steady(max_attempts: u32) -> Policy {
    Policy {
        flap_low: 101.0,
        flap_high: 101.0,
        ..policy(max_attempts)
    }
}

fn to(from: CheckState, to: CheckState) -> Announce {
    Announce::State { from, to }
}

#[test]
fn a_problem_turns_hard_on_the_last_attempt_and_only_then_raises_an_event() {
    let mut t = Tracker::default();
    let p = policy(3);
    let first = t.observe(C, &p);
    assert_eq!((first.state_type, first.attempt), (StateType::Soft, 1));
    assert!(first.events.is_empty() && !first.changed);
    // a change between problems while SOFT goes on counting
    let second = t.observe(W, &p);
    assert_eq!((second.state_type, second.attempt), (StateType::Soft, 2));
    let third = t.observe(C, &p);
    assert_eq!((third.state_type, third.attempt), (StateType::Hard, 3));
    assert_eq!(third.events, vec![to(O, C)]);
    assert!(third.changed);
    // staying CRITICAL raises nothing more
    let fourth = t.observe(C, &p);
    assert_eq!((fourth.state_type, fourth.attempt), (StateType::Hard, 3));
    assert!(fourth.events.is_empty() && !fourth.changed);
}

#[test]
fn recovery_hard_changes_and_soft_blips_raise_exactly_their_events() {
    let p = steady(3);
    assert_eq!(
        events(&[C, C, C, C, W, W, O, O, C, O, U, U, O], &p),
        vec![(3, to(O, C)), (5, to(C, W)), (7, to(W, O))],
        "a SOFT problem that recovers (results 9 and 11-12) raises nothing"
    );
    assert_eq!(
        events(&[U, O, W], &steady(1)),
        vec![(1, to(O, U)), (2, to(U, O)), (3, to(O, W))]
    );
}

#[test]
fn a_restart_resumes_the_announced_state_so_a_recovery_is_still_raised() {
    let p = policy(2);
    let mut before = Tracker::default();
    before.observe(C, &p);
    let hard = before.observe(C, &p);
    assert!(hard.changed);
    let saved = serde_json::to_string(before.persisted()).unwrap();
    let mut after = Tracker::resume(serde_json::from_str(&saved).unwrap());
    assert_eq!(after.hard(), C);
    assert_eq!(after.observe(O, &p).events, vec![to(C, O)]);
    // and a problem that goes on is not raised again
    let mut again = Tracker::resume(serde_json::from_str(&saved).unwrap());
    let still = again.observe(C, &p);
    assert!(still.events.is_empty());
    assert_eq!(still.state_type, StateType::Hard);
}

/// Alternating results: state events until the 5th result reaches 20 % (24.2 %), then
/// only the flapping start; steady OK results end it once the weighted changes fall below
/// 5 %, and, the check being OK as last announced, nothing else.
#[test]
fn flapping_starts_once_and_stops_once_with_no_state_events_between() {
    let p = policy(1);
    let mut states = Vec::new();
    for n in 0..16 {
        states.push(if n % 2 == 0 { C } else { O });
    }
    states.extend([O; 25]);
    let got = events(&states, &p);
    assert_eq!(
        &got[..5],
        &[
            (1, to(O, C)),
            (2, to(C, O)),
            (3, to(O, C)),
            (4, to(C, O)),
            (5, Announce::FlappingStarted)
        ]
    );
    assert_eq!(got.len(), 6, "{got:?}");
    assert_eq!(got[5].1, Announce::FlappingStopped);
    assert!(got[5].0 > 16, "{got:?}");
}

/// A check that stops flapping in a state other than the one last announced announces
/// it, right after the flapping stop.
#[test]
fn a_check_that_stops_flapping_while_critical_announces_critical() {
    let p = policy(1);
    let mut states = vec![C, O, C, O, C, O];
    states.extend([C; 25]);
    let got = events(&states, &p);
    let stop = got
        .iter()
        .position(|(_, e)| *e == Announce::FlappingStopped)
        .unwrap();
    assert_eq!(got[stop + 1], (got[stop].0, to(O, C)), "{got:?}");
    assert_eq!(got.len(), stop + 2, "{got:?}");
}

/// Between the thresholds nothing happens: a flapping check whose change rate settles
/// between 5 % and 20 % keeps flapping, and a steady one whose rate rises into that band
/// does not start.
#[test]
fn between_the_thresholds_the_flapping_state_holds() {
    let p = policy(1);
    let mut t = Tracker::default();
    for s in [C, O, C, O, C] {
        t.observe(s, &p);
    }
    assert!(t.persisted().flapping);
    // one change in every 5 results: about 4 changes in the window, 15-25 % at first,
    // then about 20 %: between the thresholds or above, never below 5 %
    let mut state = C;
    for n in 0..60 {
        if n % 5 == 0 {
            state = if state == C { O } else { C };
        }
        let seen = t.observe(state, &p);
        assert!(seen.state_change >= 5.0, "{n}: {}", seen.state_change);
        assert!(
            !seen.events.contains(&Announce::FlappingStopped),
            "stopped at {n} ({} %)",
            seen.state_change
        );
    }
    // a steady check with two changes in a full window (about 10 %) does not start
    let mut calm = Tracker::default();
    let mut results = vec![O; 21];
    results[8..15].fill(W);
    for s in results {
        let seen = calm.observe(s, &p);
        assert!(seen.state_change < 20.0);
        assert!(!seen.flapping);
    }
}
