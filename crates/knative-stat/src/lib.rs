//! The messages of Knative's stat protocol: what the activator sends the
//! autoscaler over its websocket (`ws://autoscaler.knative-serving:8080`),
//! one protobuf `WireStatMessages` per binary websocket message.
//!
//! Followed from knative.dev/serving v0.42.2
//! `pkg/autoscaler/metrics/stat.proto`. Shared by ste-bench (which sends
//! them as the activator does) and ste-activator-bridge (whose stat tap
//! reads them on their way to the autoscaler), so both agree on one copy.

/// `metrics.Stat` (stat.proto).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Stat {
    #[prost(string, tag = "1")]
    pub pod_name: String,
    #[prost(double, tag = "2")]
    pub average_concurrent_requests: f64,
    #[prost(double, tag = "3")]
    pub average_proxied_concurrent_requests: f64,
    #[prost(double, tag = "4")]
    pub request_count: f64,
    #[prost(double, tag = "5")]
    pub proxied_request_count: f64,
    #[prost(double, tag = "6")]
    pub process_uptime: f64,
    #[prost(int64, tag = "7")]
    pub timestamp: i64,
}

/// `metrics.WireStatMessage` (stat.proto): a stat for one revision
/// (`name` is the revision's name).
#[derive(Clone, PartialEq, prost::Message)]
pub struct WireStatMessage {
    #[prost(string, tag = "1")]
    pub namespace: String,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(message, optional, tag = "3")]
    pub stat: Option<Stat>,
}

/// `metrics.WireStatMessages` (stat.proto): one websocket message.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WireStatMessages {
    #[prost(message, repeated, tag = "1")]
    pub messages: Vec<WireStatMessage>,
}

impl Stat {
    /// True when the stat reports load: requests held or arrived in its
    /// period (the activator's first request of a revision sends
    /// concurrency 1 and request count 1 at once).
    pub fn has_load(&self) -> bool {
        self.average_concurrent_requests > 0.0 || self.request_count > 0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn a_message_round_trips_and_starts_with_field_one() {
        let m = WireStatMessages {
            messages: vec![WireStatMessage {
                namespace: "default".into(),
                name: "r-00001".into(),
                stat: Some(Stat {
                    average_concurrent_requests: 1.0,
                    request_count: 1.0,
                    ..Stat::default()
                }),
            }],
        };
        let bytes = m.encode_to_vec();
        assert_eq!(bytes[0], 0x0a);
        assert_eq!(WireStatMessages::decode(bytes.as_slice()).unwrap(), m);
    }

    #[test]
    fn load_is_concurrency_or_requests() {
        assert!(!Stat::default().has_load());
        let held = Stat {
            average_concurrent_requests: 0.5,
            ..Stat::default()
        };
        assert!(held.has_load());
        let arrived = Stat {
            request_count: 1.0,
            ..Stat::default()
        };
        assert!(arrived.has_load());
    }
}
