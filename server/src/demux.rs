//! Which service a message on the engine's broker link belongs to: the one decision
//! [`consume`](crate) makes before handing a message on, as a pure function of its topic
//! (no service state, no I/O), so the routing of every topic can be read and tested here.

use fleetbus_protocol::{files as file_topics, Topic};

/// Topics of enrollment (`fleet/enroll/...`), kept away from the rules engine.
pub(crate) const ENROLL_TOPICS: &str = "fleet/enroll/";

/// Where one message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route<'a> {
    /// An enrollment request (to the enroller, never to the engine: replies carry
    /// tokens), with the requesting agent when the topic names one.
    Enrollment(Option<&'a str>),
    /// A topic only the server produces, arriving from the network: the engine refuses
    /// and counts it.
    Forged,
    /// An agent's job status report: to the job service only.
    JobStatus(&'a str),
    /// The server's own job messages seen through the catch-all subscription: nowhere.
    OwnJobTraffic,
    /// A presence message of `agent`: to the job service and to the engine.
    Presence(&'a str),
    /// A file transfer message: to the file service (`chunk` says whether it is a chunk,
    /// which is shed differently when the service is busy).
    File {
        /// True for a chunk.
        chunk: bool,
    },
    /// Everything else: the rules engine.
    Engine,
}

/// The route of a message on `topic`.
pub(crate) fn route(topic: &str) -> Route<'_> {
    if topic.starts_with(ENROLL_TOPICS) {
        return Route::Enrollment(fleetbus_protocol::enroll::requesting_agent(topic));
    }
    let parsed = Topic::parse(topic);
    if parsed.server_only() {
        return Route::Forged;
    }
    match parsed {
        Topic::AgentJobs {
            agent,
            rest: "status",
        } => Route::JobStatus(agent),
        Topic::AgentJobs { .. } | Topic::GroupJobs { .. } => Route::OwnJobTraffic,
        Topic::Presence { agent } => Route::Presence(agent),
        Topic::Files { rest, .. } => Route::File {
            chunk: file_topics::parse_file_rest(rest)
                .is_some_and(|(_, action)| action == file_topics::FileAction::Chunk),
        },
        _ => Route::Engine,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_of_topic_goes_to_its_service() {
        assert_eq!(
            route("fleet/enroll/web-01/request"),
            Route::Enrollment(Some("web-01"))
        );
        assert_eq!(route("fleet/web-01/files/f1/complete"), Route::Forged);
        assert_eq!(route("fleet/web-01/jobs/event"), Route::Forged);
        assert_eq!(route("fleet/server/events/connect"), Route::Forged);
        assert_eq!(
            route("fleet/web-01/jobs/status"),
            Route::JobStatus("web-01")
        );
        assert_eq!(route("fleet/web-01/jobs/notify"), Route::OwnJobTraffic);
        assert_eq!(route("fleet/groups/web/jobs/notify"), Route::OwnJobTraffic);
        assert_eq!(route("fleet/web-01/presence"), Route::Presence("web-01"));
        assert_eq!(
            route("fleet/web-01/files/f1/chunk"),
            Route::File { chunk: true }
        );
        assert_eq!(
            route("fleet/web-01/files/f1/init"),
            Route::File { chunk: false }
        );
        assert_eq!(route("fleet/web-01/telemetry/metrics"), Route::Engine);
        assert_eq!(route("sensors/hall/temperature"), Route::Engine);
    }
}
