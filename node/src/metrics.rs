//! Prometheus metrics: request counts and latencies per method, failed
//! handshakes, status writes, replica positions and ages, expiry times;
//! served as text over plain HTTP at `/metrics` by the console's listener
//! (the `console` module).

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

pub struct Metrics {
    registry: Registry,
    pub requests: Family<Labels, Counter>,
    pub latency: Family<Labels, Histogram>,
    pub handshake_failures: Counter,
    pub status_writes: Counter,
    pub last_sequence: Gauge,
    pub feed_changes: Counter,
    pub feed_served: Counter,
    pub feed_refused: Counter,
    pub trust_refused: Counter,
    pub trust_version: Gauge,
    pub replica_head: Family<Labels, Gauge>,
    pub replica_skew: Family<Labels, Gauge>,
    pub admitted: Family<Vec<(&'static str, &'static str)>, Counter>,
    pub shed: Family<Vec<(&'static str, &'static str)>, Counter>,
    pub in_flight: Gauge,
    pub admission_limit: Gauge,
    pub queued: Gauge,
    pub handshakes: Family<Vec<(&'static str, &'static str)>, Counter>,
    pub connections: Gauge,
    /// Places for terminals' connections (`places`).
    pub requests_arrived: Counter,
    pub requests_cancelled: Counter,
    pub caller_places: Gauge,
    pub caller_places_held: Gauge,
    pub caller_places_paused: Gauge,
    pub caller_places_waiting: Gauge,
    pub connections_taken_back: Counter,
    pub stream_limits_sent: Counter,
    pub scheduling_delay: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub audit_conflicts: Gauge,
    pub audit_log_size: Gauge,
    pub store_unmerged: Gauge,
    pub store_writable: Gauge,
    pub audit_published_size: Gauge,
    pub audit_published_time: Gauge,
    pub witness_failures: Family<Labels, Counter>,
    pub replica_sequence: Family<Labels, Gauge>,
    pub replica_age: Family<Labels, Gauge>,
    pub replica_max_age: Gauge,
    pub certificate_expiry: Family<Labels, Gauge>,
    pub code_key_created: Gauge,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("hufu");
        let requests = Family::<Labels, Counter>::default();
        let latency = Family::<Labels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_05, 2.0, 18))
        });
        let handshake_failures = Counter::default();
        let status_writes = Counter::default();
        let last_sequence = Gauge::default();
        let feed_changes = Counter::default();
        let feed_served = Counter::default();
        let feed_refused = Counter::default();
        let trust_refused = Counter::default();
        let trust_version = Gauge::default();
        let replica_head = Family::<Labels, Gauge>::default();
        let replica_skew = Family::<Labels, Gauge>::default();
        let admitted = Family::<Vec<(&'static str, &'static str)>, Counter>::default();
        let shed = Family::<Vec<(&'static str, &'static str)>, Counter>::default();
        let in_flight = Gauge::default();
        let admission_limit = Gauge::default();
        let queued = Gauge::default();
        let handshakes = Family::<Vec<(&'static str, &'static str)>, Counter>::default();
        let connections = Gauge::default();
        let caller_places = Gauge::default();
        let requests_arrived = Counter::default();
        let requests_cancelled = Counter::default();
        registry.register(
            "requests_arrived",
            "requests HTTP/2 handed to the node (streams its callers cancelled before that are not counted)",
            requests_arrived.clone(),
        );
        registry.register(
            "requests_cancelled",
            "requests their callers cancelled before the node answered",
            requests_cancelled.clone(),
        );
        let caller_places_held = Gauge::default();
        let caller_places_paused = Gauge::default();
        let caller_places_waiting = Gauge::default();
        let connections_taken_back = Counter::default();
        let stream_limits_sent = Counter::default();
        let scheduling_delay = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "caller_places",
            "busy terminals' connections the node serves at once now: cut when its scheduling delay passes limits.scheduling_delay_target_ms",
            caller_places.clone(),
        );
        registry.register(
            "caller_places_held",
            "terminals' connections being served now",
            caller_places_held.clone(),
        );
        registry.register(
            "caller_places_paused",
            "terminals' connections paused now: their callers may open no stream (HTTP/2 stream limit 0), so their calls wait in their own processes",
            caller_places_paused.clone(),
        );
        registry.register(
            "caller_places_waiting",
            "new connections waiting for a place before their handshake",
            caller_places_waiting.clone(),
        );
        registry.register(
            "connections_taken_back",
            "terminals' connections closed because their callers opened streams beyond the limit the node had set",
            connections_taken_back.clone(),
        );
        registry.register(
            "stream_limits_sent",
            "SETTINGS frames the node added to terminals' connections to change their stream limit (pauses, their ends, fewer streams during a surge)",
            stream_limits_sent.clone(),
        );
        registry.register(
            "scheduling_delay_seconds",
            "how late the node's timers fire, the least of the probes in 100 ms: how long work queues for the CPU",
            scheduling_delay.clone(),
        );
        registry.register(
            "admission_queued",
            "calls waiting for admission now",
            queued.clone(),
        );
        registry.register(
            "tls_handshakes",
            "mutual TLS handshakes completed, by kind (full, resumed)",
            handshakes.clone(),
        );
        registry.register(
            "connections",
            "client connections open now (after their handshake)",
            connections.clone(),
        );
        registry.register(
            "admitted",
            "requests admitted, by class (federation, serving, bulk)",
            admitted.clone(),
        );
        registry.register(
            "shed",
            "requests refused by admission control, by class and reason (queue_full, waited, expired, deadline, streams, body)",
            shed.clone(),
        );
        registry.register("in_flight", "requests being handled now", in_flight.clone());
        registry.register(
            "admission_limit",
            "requests in flight the node admits now, adaptive unless fixed by limits.max_in_flight (classes get 100/90/50% of it)",
            admission_limit.clone(),
        );
        let audit_conflicts = Gauge::default();
        let audit_log_size = Gauge::default();
        let store_unmerged = Gauge::default();
        registry.register(
            "store_unmerged",
            "statuses written (durable in the change log) but not yet merged into the status store's buckets; near 0 at rest",
            store_unmerged.clone(),
        );
        let store_writable = Gauge::default();
        registry.register(
            "store_writable",
            "1 while the status store accepts writes; 0 while its disk refuses them or statuses keep failing to merge into its buckets (health says NOT_SERVING, the log says why)",
            store_writable.clone(),
        );
        let audit_published_size = Gauge::default();
        registry.register(
            "audit_conflicts",
            "conflicting signed checkpoints this node's witness has found in other provinces' audit logs, ever (evidence kept); anything above 0 is an alarm",
            audit_conflicts.clone(),
        );
        registry.register(
            "audit_log_size",
            "entries in this node's audit log",
            audit_log_size.clone(),
        );
        registry.register(
            "audit_published_size",
            "size of this node's latest published (witnessed) audit checkpoint",
            audit_published_size.clone(),
        );
        let audit_published_time = Gauge::default();
        let witness_failures = Family::<Labels, Counter>::default();
        registry.register(
            "audit_published_time_seconds",
            "when this node's latest published audit checkpoint was cosigned (unix seconds, newest cosignature)",
            audit_published_time.clone(),
        );
        registry.register(
            "audit_witness_failures",
            "checkpoints of this node's audit log a member's witness did not cosign, by province",
            witness_failures.clone(),
        );
        let replica_sequence = Family::<Labels, Gauge>::default();
        let replica_age = Family::<Labels, Gauge>::default();
        let replica_max_age = Gauge::default();
        let certificate_expiry = Family::<Labels, Gauge>::default();
        let code_key_created = Gauge::default();
        registry.register(
            "replica_sequence",
            "sequence of the newest status change held, by province (this province: its own change log)",
            replica_sequence.clone(),
        );
        registry.register(
            "replica_age_seconds",
            "age of the newest signed head held, by province (refreshed every few seconds)",
            replica_age.clone(),
        );
        registry.register(
            "replica_max_age_seconds",
            "replica age beyond which this node asks the issuer instead (federation.max_replica_age_secs)",
            replica_max_age.clone(),
        );
        registry.register(
            "certificate_expiry_time_seconds",
            "when this node's certificates expire (unix seconds), by certificate (node, ca)",
            certificate_expiry.clone(),
        );
        registry.register(
            "code_key_created_time_seconds",
            "when the active code-signing key was made (unix seconds); rotate keys before they grow old",
            code_key_created.clone(),
        );
        registry.register(
            "feed_changes_applied",
            "status changes of other provinces received and stored durably",
            feed_changes.clone(),
        );
        registry.register(
            "feed_changes_served",
            "status changes sent to subscribers (own and relayed)",
            feed_served.clone(),
        );
        registry.register(
            "feed_batches_refused",
            "replicated batches refused: bad signature, broken chain, gap or replay",
            feed_refused.clone(),
        );
        registry.register(
            "trust_lists_refused",
            "trust list versions refused: too few or bad signatures, rollback, gap",
            trust_refused.clone(),
        );
        registry.register(
            "trust_list_version",
            "version of the trust list in force",
            trust_version.clone(),
        );
        registry.register(
            "replica_head_time_ms",
            "when a signed head last confirmed the replica (unix ms: the issuer's time, capped at arrival), by province; age = now - this",
            replica_head.clone(),
        );
        registry.register(
            "replica_clock_skew_ms",
            "issuer's head time minus this node's time when the head arrived, by province; well above 0 means the issuer's clock runs ahead",
            replica_skew.clone(),
        );
        registry.register(
            "requests",
            "gRPC requests handled, by method and status code",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "gRPC request handling time, by method",
            latency.clone(),
        );
        registry.register(
            "handshake_failures",
            "connections refused during the mutual TLS handshake",
            handshake_failures.clone(),
        );
        registry.register(
            "status_writes",
            "status changes stored durably",
            status_writes.clone(),
        );
        registry.register(
            "change_log_sequence",
            "sequence number of the newest entry in this province's status-change log",
            last_sequence.clone(),
        );
        Arc::new(Metrics {
            registry,
            requests,
            latency,
            handshake_failures,
            status_writes,
            last_sequence,
            feed_changes,
            feed_served,
            feed_refused,
            trust_refused,
            trust_version,
            replica_head,
            replica_skew,
            admitted,
            shed,
            in_flight,
            admission_limit,
            queued,
            handshakes,
            connections,
            requests_arrived,
            requests_cancelled,
            caller_places,
            caller_places_held,
            caller_places_paused,
            caller_places_waiting,
            connections_taken_back,
            stream_limits_sent,
            scheduling_delay,
            audit_conflicts,
            audit_log_size,
            store_unmerged,
            store_writable,
            audit_published_size,
            audit_published_time,
            witness_failures,
            replica_sequence,
            replica_age,
            replica_max_age,
            certificate_expiry,
            code_key_created,
        })
    }

    /// Records one finished request.
    pub fn observe(&self, method: &'static str, started: Instant, code: tonic::Code) {
        self.requests
            .get_or_create(&vec![
                ("method", method.to_owned()),
                ("code", format!("{code:?}")),
            ])
            .inc();
        self.latency
            .get_or_create(&vec![("method", method.to_owned())])
            .observe(started.elapsed().as_secs_f64());
    }

    pub fn replica_head_time(&self, p: hufu_certs::Province, time_ms: i64) {
        self.replica_head
            .get_or_create(&vec![("province", p.to_string())])
            .set(time_ms);
    }

    pub fn replica_clock_skew(&self, p: hufu_certs::Province, skew_ms: i64) {
        self.replica_skew
            .get_or_create(&vec![("province", p.to_string())])
            .set(skew_ms);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
