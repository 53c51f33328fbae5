//! The running rules engine: the durable record path of the server.
//!
//! ```text
//! dispatch(topic, payload)
//!   decode → de-duplicate (agent, stream, epoch, seq) → route
//!   → backpressure check per target sink → append to the write-ahead log
//! committer (group commit, every `commit_interval`)
//!   fsync the log → acknowledge the committed records to their agents
//!   → wake the sink workers (they read only durable entries)
//!   → every `snapshot_interval`: save the de-duplication state, truncate the log below
//!     the slowest sink
//! windows (every second)
//!   close the rules' `aggregate` windows that are over: append their roll-ups
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use crate::groups::AgentGroups;
use crate::position::PositionFile;
use crate::worker::WorkerSetup;
use chrono::{TimeZone, Utc};
use fleetbus_config::ConfigError;
use fleetbus_protocol::{validate_id, Ack, Message, Topic};
use fleetbus_sinks::BUILTIN_DEAD_LETTERS;
use fleetbus_support::Publisher;

use crate::tail::{TailCache, TailEntry};
use crate::tap::{Seen, TapHandle, Taps};
use crate::topology::Topology;
use crate::worker::{spawn_sink, DeadLetters, SinkHandle, SinkStats, SinkStatsSnapshot};
use fleetbus_wal::{
    DeadLetter, Dedup, DedupLimits, Produced, RecordKey, Wal, WalEntry, WalOptions,
};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use fleetbus_rules::router::{encode_made, Made, Router, Routing, RuleStatsSnapshot};
use fleetbus_rules::ruleset::{RuleSet, RulesError};

/// Encoded bytes of the newest log entries kept decoded for the sink workers.
const TAIL_CACHE_BYTES: u64 = 16 * 1024 * 1024;

/// Tunables of the durable record path.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Longest wait between an append and its group commit (fsync + acknowledgement).
    pub commit_interval: Duration,
    /// How often the de-duplication state is saved and the log truncated.
    pub snapshot_interval: Duration,
    /// Log segment size.
    pub wal: WalOptions,
    /// The name acknowledgements give this store (see [`fleetbus_protocol::Ack::store`]).
    pub store: String,
    /// What one agent can make the de-duplication state remember.
    pub dedup: DedupLimits,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            commit_interval: Duration::from_millis(2),
            snapshot_interval: Duration::from_secs(5),
            wal: WalOptions::default(),
            store: fleetbus_protocol::ack::SERVER_STORE.to_string(),
            dedup: DedupLimits::default(),
        }
    }
}

/// What [`Engine::dispatch_routed`] did with a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dispatched {
    /// Appended to the write-ahead log at `index`, for these sinks.
    Appended {
        /// Its log index (durable once [`Engine::durable`] is past it).
        index: u64,
        /// The sinks it goes to.
        sinks: Vec<String>,
    },
    /// A record already accepted before (acknowledged again, not stored again).
    Duplicate,
    /// No rule matched.
    Unrouted,
    /// Not accepted: a target sink's backlog is full, or the log could not be written.
    Refused,
    /// The payload could not be decoded.
    Undecodable,
    /// A topic the engine does not route (the server's own acknowledgements and replies).
    Ignored,
    /// A message from the network on a topic only the server produces (a forged file
    /// completion, job event or broker event): refused.
    Forged,
}

/// Engine-wide counters.
#[derive(Debug, Default)]
struct Counters {
    received: AtomicU64,
    decode_errors: AtomicU64,
    invalid_names: AtomicU64,
    forged: AtomicU64,
    unrouted: AtomicU64,
    duplicates: AtomicU64,
    refused: AtomicU64,
}

/// A copy of every counter of the engine at one moment.
#[derive(Debug, Clone, Default)]
pub struct EngineStats {
    /// Messages handed to the engine.
    pub received: u64,
    /// Messages whose payload could not be decoded (logged and skipped).
    pub decode_errors: u64,
    /// Telemetry whose agent or stream name cannot be used (not an id: bad characters,
    /// longer than 128): stored in the built-in dead-letter sink instead of routed.
    pub invalid_names: u64,
    /// Messages from the network on topics only the server produces (refused).
    pub forged: u64,
    /// (agent, stream) pairs the de-duplication state remembers.
    pub dedup_streams: u64,
    /// Streams the de-duplication state forgot (too many for one agent, or idle).
    pub dedup_forgotten: u64,
    /// Messages no rule matched.
    pub unrouted: u64,
    /// Records recognised as already accepted (acknowledged again, not stored again).
    pub duplicates: u64,
    /// Records refused because a target sink's share of the log is full (not
    /// acknowledged: the agent sends them again later).
    pub refused: u64,
    /// Log index up to which entries are durable.
    pub durable: u64,
    /// Every rule's counters.
    pub rules: Vec<RuleStatsSnapshot>,
    /// The generation of the rules in effect (1 at start, one more per reload).
    pub generation: u64,
    /// Reloads: the last failure, and how many failed.
    pub reloads: crate::reload::ReloadStatus,
    /// Counters per sink (its lag in log entries is `durable − position`).
    pub sinks: Vec<(String, SinkStatsSnapshot)>,
}

impl EngineStats {
    /// Messages written by sink `name` (0 if there is no such sink).
    pub fn written(&self, name: &str) -> u64 {
        self.sinks
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s.written)
            .unwrap_or(0)
    }
}

struct IngestState {
    dedup: Dedup,
    acks: HashMap<String, Ack>,
}

pub(crate) struct Inner {
    /// The rules and sinks messages are routed by now (swapped by a reload).
    topology: RwLock<Arc<Topology>>,
    /// The counters of sinks a reload removed that are still delivering what the log
    /// routed to them (the log is kept for them).
    pub(crate) draining: Mutex<Vec<(String, Arc<SinkStats>)>>,
    /// Where the data lives (file sinks write under it; the log is in `wal/`).
    pub(crate) data_dir: PathBuf,
    pub(crate) wal: Arc<Wal>,
    pub(crate) tail: Arc<TailCache>,
    state: Mutex<IngestState>,
    pub(crate) wake: Notify,
    /// Where acknowledgements go (on `fleet/{agent}/acks`).
    pub(crate) publisher: Publisher,
    /// The open live views (`fleetbus rules tap`).
    taps: Arc<Taps>,
    counters: Counters,
    dedup_path: PathBuf,
    /// The store name acknowledgements carry.
    store: String,
    /// The WAL index the saved de-duplication snapshot covers, and when it was saved.
    last_snapshot: Mutex<(u64, Instant)>,
    /// Bounds the log lines of write-ahead log errors (a full disk fails every append and
    /// every commit).
    log_errors: fleetbus_support::Throttle,
    /// Reloads: the generation in effect, the last failure.
    pub(crate) reloads: Mutex<crate::reload::ReloadStatus>,
    /// Each agent's groups, stamped onto its messages.
    groups: AgentGroups,
    /// Bounds the log lines of agents left out of a full groups table.
    groups_full: fleetbus_support::Throttle,
}

/// The rules engine with its log, committer and sink workers running.
pub struct Engine {
    pub(crate) inner: Arc<Inner>,
    // taken by the one shutdown (the engine may be shared while the server stops); a
    // reload replaces the workers of the sinks it changes
    pub(crate) sinks: Mutex<Vec<SinkHandle>>,
    /// One reload at a time.
    pub(crate) reloading: tokio::sync::Mutex<()>,
    committer: Mutex<Option<JoinHandle<()>>>,
    stop: watch::Sender<bool>,
}

impl Engine {
    /// Opens the write-ahead log under `data_dir/wal` (replaying it), builds every sink of
    /// `rules` (file sinks write under `data_dir`) and starts the committer and the sink
    /// workers on the current tokio runtime. Acknowledgements go out through `publisher` (on
    /// `fleet/{agent}/acks`), and `mqtt` sinks without a `url` republish through it.
    pub async fn start(
        rules: RuleSet,
        data_dir: &Path,
        options: EngineOptions,
        publisher: Publisher,
    ) -> Result<Engine, RulesError> {
        let wal_dir = data_dir.join("wal");
        let fail = |what: String| RulesError::from(ConfigError::invalid(&wal_dir, what));
        let (wal, _) = Wal::open(&wal_dir, options.wal).map_err(|e| fail(e.to_string()))?;
        let wal = Arc::new(wal);
        let dedup_path = wal_dir.join("dedup.json");
        let (dedup, snapshot_upto) = Dedup::load(&dedup_path).map_err(|e| fail(e.to_string()))?;
        let mut dedup = dedup.with_limits(options.dedup);
        let state_dir = wal_dir.join("sinks");

        // recover every sink and find where it resumes
        let mut built = Vec::new();
        for (name, config) in &rules.sinks {
            let place = fleetbus_sinks::SinkPlace {
                name,
                data_dir,
                state_dir: &state_dir,
                broker: &publisher,
            };
            let mut sink = config
                .build(&place)
                .map_err(|e| fail(format!("sink `{name}`: {e}")))?;
            let position = PositionFile::new(&state_dir, name);
            let saved = position
                .load()
                .map_err(|e| fail(format!("sink `{name}`: {e}")))?;
            let start = sink
                .recover(saved)
                .await
                .map_err(|e| fail(format!("sink `{name}`: recovery failed: {e}")))?
                .max(wal.first_index())
                // a torn tail cut on open may end the log before a saved position: those
                // entries are gone and their indexes go to new entries
                .min(wal.next_index());
            built.push((name.clone(), config.clone(), sink, position, start));
        }

        // replay the log: de-duplication state after the snapshot, backlog per sink
        let stats: Vec<Arc<SinkStats>> = built
            .iter()
            .map(|_| Arc::new(SinkStats::default()))
            .collect();
        let from = built
            .iter()
            .map(|b| b.4)
            .chain([snapshot_upto])
            .min()
            .unwrap_or(0);
        let mut replayed = 0u64;
        wal.read_all(from, |index, entry, size| {
            replayed += 1;
            if index >= snapshot_upto {
                if let Some(key) = &entry.key {
                    dedup.record(key, entry.received_ms);
                }
            }
            for (b, st) in built.iter().zip(&stats) {
                if index >= b.4 && entry.goes_to(&b.0) {
                    st.routed(size);
                }
            }
        })
        .map_err(|e| fail(e.to_string()))?;
        if replayed > 0 {
            tracing::info!(
                entries = replayed,
                from,
                durable = wal.durable(),
                "write-ahead log replayed"
            );
        }

        let filters = rules.filters();
        let dead_letters_sink = built
            .iter()
            .position(|b| b.0 == BUILTIN_DEAD_LETTERS)
            .ok_or_else(|| fail("the built-in dead-letter sink is missing".into()))?;
        let tail = Arc::new(TailCache::new(TAIL_CACHE_BYTES));
        let topology = Topology {
            generation: 1,
            router: Router::new(rules.rules),
            filters,
            sink_names: built.iter().map(|b| b.0.clone()).collect(),
            sink_configs: built.iter().map(|b| b.1.clone()).collect(),
            sink_limits: built.iter().map(|b| b.1.buffer.max_bytes).collect(),
            sink_stats: stats.clone(),
            dead_letters_sink,
        };
        let inner = Arc::new(Inner {
            topology: RwLock::new(Arc::new(topology)),
            draining: Mutex::new(Vec::new()),
            data_dir: data_dir.to_path_buf(),
            wal: wal.clone(),
            tail: tail.clone(),
            state: Mutex::new(IngestState {
                dedup,
                acks: HashMap::new(),
            }),
            wake: Notify::new(),
            publisher,
            counters: Counters::default(),
            dedup_path,
            store: options.store.clone(),
            last_snapshot: Mutex::new((snapshot_upto, Instant::now())),
            log_errors: fleetbus_support::Throttle::new(Duration::from_secs(10)),
            reloads: Mutex::new(crate::reload::ReloadStatus::default()),
            taps: Arc::default(),
            groups: AgentGroups::default(),
            groups_full: fleetbus_support::Throttle::new(Duration::from_secs(60)),
        });
        let dead_letters: Arc<dyn DeadLetters> = inner.clone();
        let sinks = built
            .into_iter()
            .zip(stats)
            .map(|((name, config, sink, position, start), stats)| {
                let setup = worker_setup(name, &config, position, start, stats);
                spawn_sink(sink, setup, wal.clone(), tail.clone(), dead_letters.clone())
            })
            .collect();
        let (stop, stop_rx) = watch::channel(false);
        tokio::spawn(run_windows(inner.clone(), stop_rx.clone()));
        let committer = tokio::spawn(run_committer(inner.clone(), options, stop_rx));
        Ok(Engine {
            inner,
            sinks: Mutex::new(sinks),
            reloading: tokio::sync::Mutex::new(()),
            committer: Mutex::new(Some(committer)),
            stop,
        })
    }

    /// The topic filters the engine must be subscribed to (those of the rules in effect).
    pub fn filters(&self) -> Vec<String> {
        self.inner.topology().filters.clone()
    }

    /// Ingests one published message (see the module documentation).
    pub fn dispatch(&self, topic: &str, payload: &[u8]) {
        self.inner.dispatch(topic, payload);
    }

    /// Ingests one message that came from the network (through a broker): a message on a
    /// topic only the server produces ([`Topic::server_only`]: file completions, job
    /// events, broker events) is forged, whoever sent it, and refused; enrollment messages
    /// are never routed.
    pub fn dispatch_from_network(&self, topic: &str, payload: &[u8]) -> Dispatched {
        let parsed = Topic::parse(topic);
        if parsed.is_enrollment() {
            // requests and (sealed) tokens: never routed to a sink
            return Dispatched::Ignored;
        }
        if parsed.server_only() {
            let n = self.inner.counters.forged.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(%topic, forged_total = n, "message refused: only the server produces messages on this topic");
            }
            return Dispatched::Forged;
        }
        self.inner.dispatch(topic, payload)
    }

    /// Records `groups` as `agent`'s: its messages accepted from now on carry them
    /// ([`WalEntry::groups`]). The caller says which groups count: the credential's when
    /// security is enforced, else those of the agent's birth message.
    pub fn set_agent_groups(&self, agent: &str, groups: &[String]) {
        if !self.inner.groups.set(agent, groups) {
            if let Some(left_out) = self.inner.groups_full.admit() {
                tracing::warn!(%agent, max_agents = crate::groups::MAX_AGENTS, similar_not_logged = left_out, "groups table full: this agent's messages carry no groups");
            }
        }
    }

    /// Ingests one message and says what became of it (for server-side producers such as
    /// the file service, which must know where its completion message went).
    pub fn dispatch_routed(&self, topic: &str, payload: &[u8]) -> Dispatched {
        self.inner.dispatch(topic, payload)
    }

    /// Where each of `sinks` puts the completed file that the completion message
    /// (`topic`, `payload`) describes: `NAME: file PATH` (relative to the data directory),
    /// `NAME: s3://BUCKET/KEY`... For an agent told where its upload landed.
    pub fn file_destinations(&self, topic: &str, payload: &[u8], sinks: &[String]) -> Vec<String> {
        let Ok(msg) = Message::decode(topic, payload) else {
            return sinks.to_vec();
        };
        let topology = self.inner.topology();
        sinks
            .iter()
            .map(|name| {
                let described = topology
                    .index(name)
                    .and_then(|i| topology.sink_configs[i].file_destination(&msg));
                match described {
                    Some(place) => format!("{name}: {place}"),
                    None => name.clone(),
                }
            })
            .collect()
    }

    /// Opens a live view of what the engine does with the messages `filter` matches
    /// (with `rule`: only that rule's part, on the topics it listens to); see
    /// [`crate::tap`]. Closed when the handle is dropped.
    pub fn tap(
        &self,
        filter: fleetbus_rules::TopicFilter,
        rule: Option<String>,
    ) -> Result<TapHandle, String> {
        if let Some(name) = &rule {
            if !self
                .inner
                .topology()
                .router
                .rules()
                .iter()
                .any(|r| &r.name == name)
            {
                return Err(format!("no rule named `{name}` in effect"));
            }
        }
        self.inner.taps.open(filter, rule)
    }

    /// Log index up to which entries are durable (fsynced).
    pub fn durable(&self) -> u64 {
        self.inner.wal.durable()
    }

    /// The saved resume position of sink `name`: log entries below it are written.
    pub fn sink_position(&self, name: &str) -> Option<u64> {
        let topology = self.inner.topology();
        match topology.index(name) {
            Some(i) => Some(topology.sink_stats[i].position.load(Ordering::Relaxed)),
            None => self
                .inner
                .draining()
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, s)| s.position.load(Ordering::Relaxed)),
        }
    }

    /// Every counter.
    pub fn stats(&self) -> EngineStats {
        let topology = self.inner.topology();
        let c = &self.inner.counters;
        let durable = self.inner.wal.durable();
        let (dedup_streams, dedup_forgotten) = {
            let state = self.inner.lock();
            (state.dedup.streams() as u64, state.dedup.forgotten())
        };
        EngineStats {
            received: c.received.load(Ordering::Relaxed),
            decode_errors: c.decode_errors.load(Ordering::Relaxed),
            invalid_names: c.invalid_names.load(Ordering::Relaxed),
            forged: c.forged.load(Ordering::Relaxed),
            dedup_streams,
            dedup_forgotten,
            unrouted: c.unrouted.load(Ordering::Relaxed),
            duplicates: c.duplicates.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            durable,
            rules: topology.router.stats(),
            sinks: topology
                .sink_names
                .iter()
                .zip(&topology.sink_stats)
                .map(|(name, stats)| (name.clone(), stats.snapshot()))
                .chain(
                    self.inner
                        .draining()
                        .iter()
                        .map(|(name, stats)| (name.clone(), stats.snapshot())),
                )
                .collect(),
            generation: topology.generation,
            reloads: self.inner.reload_status(),
        }
    }

    /// Graceful stop: a last group commit (with its acknowledgements), then every sink
    /// writes what is durable, within `deadline`, then the de-duplication snapshot. What a
    /// sink could not write stays in the log for the next start. Returns the names of the
    /// sinks still writing at the deadline (left to finish or to the process's exit, never
    /// aborted). Messages dispatched after this are appended but never acknowledged:
    /// their agents send them again.
    pub async fn shutdown(&self, deadline: Duration) -> Vec<String> {
        let started = Instant::now();
        // open `aggregate` windows close early, their roll-ups marked partial, before the
        // last commit
        self.inner.close_windows(true);
        let _ = self.stop.send(true);
        let committer = self
            .committer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(committer) = committer {
            if tokio::time::timeout(deadline, committer).await.is_err() {
                tracing::warn!("last group commit still running at the shutdown deadline");
            }
        }
        let sinks = std::mem::take(&mut *self.sinks.lock().unwrap_or_else(|p| p.into_inner()));
        let mut late = Vec::new();
        for sink in sinks {
            let name = sink.name().to_string();
            if !sink.close(deadline.saturating_sub(started.elapsed())).await {
                late.push(format!("sink {name}"));
            }
        }
        save_snapshot(&self.inner);
        late
    }
}

impl Inner {
    fn dispatch(&self, topic: &str, payload: &[u8]) -> Dispatched {
        if !self.taps.wants(topic) {
            return self.dispatch_seen(topic, payload, None);
        }
        let mut seen = Seen::default();
        let outcome = self.dispatch_seen(topic, payload, Some(&mut seen));
        let said = match outcome {
            Dispatched::Appended { .. } => "appended",
            Dispatched::Duplicate => "duplicate",
            Dispatched::Unrouted => "unrouted",
            Dispatched::Refused => "refused",
            Dispatched::Undecodable => "undecodable",
            Dispatched::Ignored | Dispatched::Forged => return outcome,
        };
        self.taps.offer(topic, said, seen);
        outcome
    }

    /// [`Inner::dispatch`], telling `seen` (when a tap wants the message) what it did.
    fn dispatch_seen(
        &self,
        topic: &str,
        payload: &[u8],
        mut seen: Option<&mut Seen>,
    ) -> Dispatched {
        let parsed = Topic::parse(topic);
        if matches!(parsed, Topic::Acks { .. } | Topic::Replies { .. }) {
            // our own acknowledgements and replies, seen through the catch-all subscription
            return Dispatched::Ignored;
        }
        self.counters.received.fetch_add(1, Ordering::Relaxed);
        let mut msg = match Message::decode(topic, payload) {
            Ok(m) => m,
            Err(e) => {
                let n = self.counters.decode_errors.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(%topic, error = %e, bytes = payload.len(), undecodable_total = n, "message skipped: payload is neither a record nor JSON");
                }
                return Dispatched::Undecodable;
            }
        };
        let key = fleetbus_sinks::record_key(&msg);
        // the log keeps milliseconds: so does the message sinks see
        let received_ms = msg.received.timestamp_millis();
        if let Some(t) = Utc.timestamp_millis_opt(received_ms).single() {
            msg.received = t;
        }
        // names that reach paths and keys must be ids: a message with another name is
        // kept, with the reason, in the built-in dead-letter sink instead of being routed
        let invalid = match parsed {
            Topic::Telemetry { agent, stream } => validate_id("agent id", agent)
                .and_then(|()| validate_id("stream", stream))
                .err(),
            _ => None,
        };
        let dead_letter = invalid.map(|e| {
            let n = self.counters.invalid_names.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(%topic, error = %e, invalid_names_total = n, "message with an unusable name kept in the dead-letter sink");
            }
            DeadLetter {
                sink: "ingest".into(),
                error: e.to_string(),
                attempts: 0,
                failed_at_ms: received_ms,
            }
        });
        let groups = parsed
            .agent()
            .map(|agent| self.groups.of(agent))
            .unwrap_or_default();
        let mut routing = Routing::default();
        if let Some(seen) = seen.as_deref_mut() {
            seen.message = Some(msg.body.clone());
            seen.received = Some(msg.received);
            routing.trace = Some(Vec::new());
        }
        // routed wholly by one generation of the rules: a reload that takes effect between
        // the routing and the lock routes the message again
        let (topology, targets, mut state) = loop {
            let topology = self.topology();
            let targets = match dead_letter {
                Some(_) => vec![topology.dead_letters_sink],
                None => {
                    // filters, conditions and transforms, outside the lock: nothing here
                    // changes a rule's state until `settle`
                    topology.router.route(&msg, &mut routing);
                    routing.targets(&topology.router)
                }
            };
            let state = self.lock();
            if self.topology().generation == topology.generation {
                break (topology, targets, state);
            }
        };
        if let Some(seen) = seen.as_deref_mut() {
            seen.topology = Some(topology.clone());
        }
        let mut traced = |routing: &mut Routing| {
            if let Some(seen) = seen.as_deref_mut() {
                seen.trace = routing.trace.take().unwrap_or_default();
            }
        };
        if let Some(k) = &key {
            if state.dedup.is_duplicate(k) {
                self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
                add_ack(&mut state.acks, k);
                drop(state);
                self.wake.notify_one();
                traced(&mut routing);
                return Dispatched::Duplicate;
            }
        }
        if let Some(&full) = targets.iter().find(|&&t| {
            topology.sink_stats[t].pending_bytes.load(Ordering::Relaxed) >= topology.sink_limits[t]
        }) {
            let n = self.counters.refused.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(sink = %topology.sink_names[full], refused_total = n, "sink backlog full: records for it are not accepted (agents keep them and retry)");
            }
            traced(&mut routing);
            return Dispatched::Refused;
        }
        // new and accepted: now the stateful operations decide
        let entries = match dead_letter {
            Some(dl) => vec![WalEntry {
                dead_letter: Some(dl),
                ..entry(
                    &topology,
                    topic,
                    payload.to_vec(),
                    received_ms,
                    &targets,
                    &groups,
                )
            }],
            None => {
                topology.router.settle(&mut routing, received_ms);
                traced(&mut routing);
                entries_of(&topology, topic, payload, received_ms, &routing, &groups)
            }
        };
        let outcome = if entries.is_empty() {
            self.counters.unrouted.fetch_add(1, Ordering::Relaxed);
            Dispatched::Unrouted
        } else {
            let last = entries.len() - 1;
            let mut appended = None;
            let mut all_sinks: Vec<String> = Vec::new();
            for (n, mut entry) in entries.into_iter().enumerate() {
                // only the last entry of an input says it was accepted: a crash between
                // two appends leaves a record its agent sends again, never half of it
                // known as a duplicate
                if n == last {
                    entry.key = key.clone();
                }
                let message = match &entry.produced {
                    None => Some(msg.clone()),
                    Some(_) => fleetbus_sinks::decode_entry(&entry).ok(),
                };
                for name in &entry.sinks {
                    if !all_sinks.contains(name) {
                        all_sinks.push(name.clone());
                    }
                }
                match self.append(&topology, entry, message) {
                    Ok(index) => appended = Some(index),
                    Err(e) => {
                        self.counters.refused.fetch_add(1, Ordering::Relaxed);
                        if let Some(left_out) = self.log_errors.admit() {
                            tracing::error!(error = %e, similar_errors_not_logged = left_out, "cannot append to the write-ahead log: record not accepted (the agent keeps it)");
                        }
                        return Dispatched::Refused;
                    }
                }
            }
            match appended {
                Some(index) => Dispatched::Appended {
                    index,
                    sinks: all_sinks,
                },
                None => Dispatched::Unrouted,
            }
        };
        if let Some(k) = &key {
            state.dedup.record(k, received_ms);
            add_ack(&mut state.acks, k);
        }
        drop(state);
        self.wake.notify_one();
        outcome
    }

    /// Appends the roll-ups of the `aggregate` windows that are over (with `all`, of every
    /// open window, marked partial) for their rules' sinks.
    fn close_windows(&self, all: bool) {
        if !self.topology().router.aggregates() {
            return;
        }
        let state = self.lock();
        let topology = self.topology();
        let now_ms = Utc::now().timestamp_millis();
        for out in topology.router.close_windows(now_ms, all) {
            let (Made::Message(body), Some(topic)) = (&out.made, &out.topic) else {
                continue;
            };
            let groups = Topic::parse(topic)
                .agent()
                .map(|agent| self.groups.of(agent))
                .unwrap_or_default();
            let entry = WalEntry {
                produced: Some(Produced {
                    rule: topology.router.rules()[out.rule].name.clone(),
                    part: out.part,
                }),
                ..entry(
                    &topology,
                    topic,
                    encode_made(body),
                    now_ms,
                    &out.sinks,
                    &groups,
                )
            };
            let message = fleetbus_sinks::decode_entry(&entry).ok();
            if let Err(e) = self.append(&topology, entry, message) {
                if let Some(left_out) = self.log_errors.admit() {
                    tracing::error!(error = %e, similar_errors_not_logged = left_out, "cannot append an aggregate roll-up to the write-ahead log: it is lost");
                }
            }
        }
        drop(state);
        self.wake.notify_one();
    }

    /// Appends `entry` (the caller holds the ingest lock), counts it in the backlog of each
    /// of its sinks, and keeps it in the tail cache with its decoded `message`.
    fn append(
        &self,
        topology: &Topology,
        entry: WalEntry,
        message: Option<Message>,
    ) -> Result<u64, fleetbus_wal::WalError> {
        let (index, size) = self.wal.append(&entry)?;
        for name in &entry.sinks {
            if let Some(t) = topology.index(name) {
                topology.sink_stats[t].routed(size);
            }
        }
        if let Some(message) = message {
            self.tail.insert(TailEntry {
                index,
                entry: Arc::new(entry),
                size,
                message: Arc::new(message),
            });
        }
        Ok(index)
    }

    /// The rules and sinks in effect.
    pub(crate) fn topology(&self) -> Arc<Topology> {
        self.topology
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Swaps in `next` (under the ingest lock: at a message boundary), first moving the
    /// state of the stateful operations whose rule and configuration it keeps.
    pub(crate) fn switch(&self, next: Topology) -> Arc<Topology> {
        let _state = self.lock();
        let mut slot = self.topology.write().unwrap_or_else(|p| p.into_inner());
        next.router.take_state_from(&slot.router);
        std::mem::replace(&mut *slot, Arc::new(next))
    }

    /// The counters of the sinks a reload removed that are still delivering.
    pub(crate) fn draining(&self) -> MutexGuard<'_, Vec<(String, Arc<SinkStats>)>> {
        self.draining.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reload_status(&self) -> crate::reload::ReloadStatus {
        self.reloads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn lock(&self) -> MutexGuard<'_, IngestState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One group commit: fsync, then acknowledge. Returns the durable index.
    async fn commit(&self) -> Option<u64> {
        let (handle, upto, acks) = {
            let mut state = self.lock();
            match self.wal.begin_commit() {
                Ok((handle, upto)) => (handle, upto, std::mem::take(&mut state.acks)),
                Err(e) => {
                    if let Some(left_out) = self.log_errors.admit() {
                        tracing::error!(error = %e, similar_errors_not_logged = left_out, "write-ahead log commit failed; retrying");
                    }
                    return None;
                }
            }
        };
        let synced = tokio::task::spawn_blocking(move || handle.sync_data()).await;
        if !matches!(synced, Ok(Ok(()))) {
            if let Some(left_out) = self.log_errors.admit() {
                tracing::error!(result = ?synced, similar_errors_not_logged = left_out, "write-ahead log fsync failed; acknowledgements held back");
            }
            // put the acknowledgements back for the next attempt
            let mut state = self.lock();
            for (agent, ack) in acks {
                for (stream, sa) in ack.streams {
                    for (lo, hi) in sa.ranges {
                        for seq in lo..=hi {
                            let key = RecordKey {
                                agent: agent.clone(),
                                stream: stream.clone(),
                                epoch: sa.epoch,
                                seq,
                            };
                            add_ack(&mut state.acks, &key);
                        }
                    }
                }
            }
            return None;
        }
        self.wal.finish_commit(upto);
        for (agent, mut ack) in acks {
            ack.store.clone_from(&self.store);
            match ack.encode() {
                Ok(payload) => {
                    let topic = fleetbus_protocol::topics::acks(&agent);
                    if let Err(e) = self.publisher.publish(topic, payload) {
                        // the agent sends the records again and is acknowledged then
                        tracing::debug!(%agent, error = %e, "acknowledgement not published");
                    }
                }
                Err(e) => tracing::error!(%agent, error = %e, "cannot encode an acknowledgement"),
            }
        }
        Some(upto)
    }
}

impl DeadLetters for Inner {
    fn append(&self, target: &str, mut entries: Vec<WalEntry>) -> Result<(), String> {
        {
            let _state = self.lock();
            let topology = self.topology();
            // a dead-letter sink a reload removed: the built-in one takes its letters
            let t = match topology.index(target) {
                Some(t) => t,
                None => {
                    let t = topology.dead_letters_sink;
                    tracing::warn!(sink = %target, "dead letters for a sink the rules no longer have go to the built-in dead-letter sink");
                    for e in &mut entries {
                        e.sinks = vec![topology.sink_names[t].clone()];
                    }
                    t
                }
            };
            for entry in &entries {
                let (_, size) = self.wal.append(entry).map_err(|e| e.to_string())?;
                topology.sink_stats[t].routed(size);
            }
        }
        self.wake.notify_one();
        Ok(())
    }
}

/// A log entry of `payload` for `sinks` (not a dead letter, without a key).
fn entry(
    topology: &Topology,
    topic: &str,
    payload: Vec<u8>,
    received_ms: i64,
    sinks: &[usize],
    groups: &[String],
) -> WalEntry {
    WalEntry {
        topic: topic.to_string(),
        payload,
        received_ms,
        sinks: sinks
            .iter()
            .map(|&t| topology.sink_names[t].clone())
            .collect(),
        key: None,
        dead_letter: None,
        groups: groups.to_vec(),
        produced: None,
    }
}

/// The log entries of a settled routing, in order: each transform failure (the
/// message as published, a dead letter for the rule's `on_error` sink), each message
/// a rule made, then the message as published for the sinks that take it so.
fn entries_of(
    topology: &Topology,
    topic: &str,
    payload: &[u8],
    received_ms: i64,
    routing: &Routing,
    groups: &[String],
) -> Vec<WalEntry> {
    let mut out = Vec::with_capacity(routing.produced.len() + 1);
    for made in &routing.produced {
        let rule = &topology.router.rules()[made.rule].name;
        out.push(match &made.made {
            Made::Failed(error) => WalEntry {
                dead_letter: Some(DeadLetter {
                    sink: format!("rule:{rule}"),
                    error: error.clone(),
                    attempts: 0,
                    failed_at_ms: received_ms,
                }),
                ..entry(
                    topology,
                    topic,
                    payload.to_vec(),
                    received_ms,
                    &made.sinks,
                    groups,
                )
            },
            Made::Message(body) => WalEntry {
                produced: Some(Produced {
                    rule: rule.clone(),
                    part: made.part,
                }),
                ..entry(
                    topology,
                    // a roll-up is on its window's own topic
                    made.topic.as_deref().unwrap_or(topic),
                    encode_made(body),
                    received_ms,
                    &made.sinks,
                    groups,
                )
            },
        });
    }
    if !routing.direct.is_empty() {
        out.push(entry(
            topology,
            topic,
            payload.to_vec(),
            received_ms,
            &routing.direct,
            groups,
        ));
    }
    out
}

/// What the worker of sink `name` needs.
pub(crate) fn worker_setup(
    name: String,
    config: &fleetbus_sinks::SinkConfig,
    position: PositionFile,
    start: u64,
    stats: Arc<SinkStats>,
) -> WorkerSetup {
    let rejected_to = config
        .dead_letter
        .as_deref()
        .unwrap_or(BUILTIN_DEAD_LETTERS)
        .to_string();
    WorkerSetup {
        name,
        batch: config.batch(),
        dead_letter: config.dead_letter.clone(),
        rejected_to,
        position,
        start,
        stats,
    }
}

fn add_ack(acks: &mut HashMap<String, Ack>, key: &RecordKey) {
    let ack = match acks.get_mut(&key.agent) {
        Some(a) => a,
        None => acks.entry(key.agent.clone()).or_default(),
    };
    let stream = match ack.streams.get_mut(&key.stream) {
        Some(s) => s,
        None => ack.streams.entry(key.stream.clone()).or_default(),
    };
    if stream.epoch != key.epoch {
        stream.epoch = key.epoch;
        stream.ranges.clear();
    }
    match stream.ranges.last_mut() {
        Some(last) if last.1 + 1 == key.seq => last.1 = key.seq,
        _ => stream.ranges.push((key.seq, key.seq)),
    }
}

/// Saves the de-duplication state (consistent with the durable log) and truncates the log
/// below what every sink has finished and the snapshot covers.
/// A de-duplication state that did not change is saved again at most this often (the
/// log is truncated only below a saved snapshot).
const UNCHANGED_SNAPSHOT_EVERY: Duration = Duration::from_secs(60);

fn save_snapshot(inner: &Inner) {
    let (dedup, upto) = {
        let mut state = inner.lock();
        state.dedup.forget_idle(Utc::now().timestamp_millis());
        let last = *inner
            .last_snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if !state.dedup.dirty() && last.1.elapsed() < UNCHANGED_SNAPSHOT_EVERY {
            // nothing to save: truncate below the snapshot already on disk
            drop(state);
            truncate(inner, last.0);
            return;
        }
        state.dedup.mark_saved();
        // everything appended so far is covered once committed; take the state under the
        // same lock as the commit point so they match
        match inner.wal.begin_commit() {
            Ok((handle, upto)) => {
                let dedup = state.dedup.clone();
                drop(state);
                if let Err(e) = handle.sync_data() {
                    tracing::error!(error = %e, "fsync before saving the de-duplication state failed");
                    return;
                }
                inner.wal.finish_commit(upto);
                (dedup, upto)
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot commit before saving the de-duplication state");
                return;
            }
        }
    };
    if let Err(e) = dedup.save(&inner.dedup_path, upto) {
        tracing::error!(error = %e, "cannot save the de-duplication state; the log is kept");
        inner.lock().dedup.mark_dirty();
        return;
    }
    *inner
        .last_snapshot
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = (upto, Instant::now());
    truncate(inner, upto);
}

/// Deletes log segments below both `saved` (the saved snapshot's position) and the slowest
/// sink's position.
fn truncate(inner: &Inner, saved: u64) {
    let topology = inner.topology();
    let slowest = topology
        .sink_stats
        .iter()
        .chain(inner.draining().iter().map(|(_, s)| s))
        .map(|s| s.position.load(Ordering::Relaxed))
        .min()
        .unwrap_or(saved);
    if let Err(e) = inner.wal.truncate_before(slowest.min(saved)) {
        tracing::error!(error = %e, "cannot truncate the write-ahead log");
    }
}

/// Closes the `aggregate` windows that are over, every second, until `stop`.
async fn run_windows(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => return,
        }
        if !inner.topology().router.aggregates() {
            continue;
        }
        let inner = inner.clone();
        // blocking disk writes (the appends) off the async workers
        let _ = tokio::task::spawn_blocking(move || inner.close_windows(false)).await;
    }
}

async fn run_committer(inner: Arc<Inner>, options: EngineOptions, mut stop: watch::Receiver<bool>) {
    let mut last_snapshot = Instant::now();
    loop {
        let stopping = tokio::select! {
            _ = inner.wake.notified() => false,
            _ = tokio::time::sleep(options.snapshot_interval) => false,
            _ = stop.changed() => true,
        };
        if !stopping {
            // group commit: let more appends join this fsync
            tokio::time::sleep(options.commit_interval).await;
        }
        inner.commit().await;
        if stopping || last_snapshot.elapsed() >= options.snapshot_interval {
            let inner2 = inner.clone();
            let _ = tokio::task::spawn_blocking(move || save_snapshot(&inner2)).await;
            last_snapshot = Instant::now();
        }
        if stopping {
            return;
        }
    }
}
