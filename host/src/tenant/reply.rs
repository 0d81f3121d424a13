//! Reply policy: which replies may leave (max-reply, and for a datagram the
//! UDP amplification bound) and what a failed message gets instead
//! (nothing, or its own bytes when the tenant fails open).
//!
//! Counting and logging a refusal are the listener's business.

use crate::config::{FailurePolicy, TrafficLimits};

/// A tenant's bounds on what goes out.
#[derive(Debug)]
pub struct ReplyPolicy {
    /// Its max-reply and udp-amplification.
    traffic: TrafficLimits,
    /// Whether a failed message gets its own bytes back.
    fail_open: bool,
}

impl ReplyPolicy {
    /// The policy of a tenant with `traffic` limits and `on_failure`.
    pub fn new(traffic: &TrafficLimits, on_failure: FailurePolicy) -> Self {
        Self {
            traffic: *traffic,
            fail_open: on_failure == FailurePolicy::FailOpen,
        }
    }

    /// Checks a reply against the bounds; `udp_request` is the request's
    /// size for a datagram's reply.
    ///
    /// # Errors
    ///
    /// The reason a reply is refused, for the log.
    pub fn vet(&self, reply: &[u8], udp_request: Option<usize>) -> Result<(), String> {
        let traffic = &self.traffic;
        let limit = match udp_request {
            Some(request) => traffic.max_udp_reply(request),
            None => traffic.max_reply,
        };
        if reply.len() <= limit {
            return Ok(());
        }
        Err(match udp_request {
            Some(request) if limit < traffic.max_reply => format!(
                "reply of {} bytes to a {request}-byte datagram refused (udp-amplification {} allows {limit})",
                reply.len(),
                traffic.udp_amplification
            ),
            _ => format!(
                "reply of {} bytes refused (max-reply is {limit})",
                reply.len()
            ),
        })
    }

    /// What a failed message gets: `Some(request)` to send back when the
    /// tenant fails open.
    pub fn failure_reply<'a>(&self, request: &'a [u8]) -> Option<&'a [u8]> {
        self.fail_open.then_some(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(
        max_reply: usize,
        udp_amplification: usize,
        on_failure: FailurePolicy,
    ) -> ReplyPolicy {
        let traffic = TrafficLimits {
            max_reply,
            udp_amplification,
            ..TrafficLimits::default()
        };
        ReplyPolicy::new(&traffic, on_failure)
    }

    #[test]
    fn a_datagram_reply_is_bounded_by_the_amplification_and_max_reply() {
        let policy = policy(1000, 3, FailurePolicy::default());
        assert!(policy.vet(&[0; 300], Some(100)).is_ok());
        let refused = policy.vet(&[0; 301], Some(100)).expect_err("over 3x");
        assert!(
            refused.contains("udp-amplification 3 allows 300"),
            "{refused}"
        );
        // A tiny request may still get the fixed allowance.
        assert!(
            policy
                .vet(&[0; TrafficLimits::UDP_REPLY_ALLOWANCE], Some(1))
                .is_ok()
        );
        let refused = policy
            .vet(&[0; 1001], Some(900))
            .expect_err("over max-reply");
        assert!(refused.contains("max-reply is 1000"), "{refused}");
    }

    #[test]
    fn a_message_reply_is_bounded_by_max_reply_only() {
        let policy = policy(1000, 1, FailurePolicy::default());
        assert!(policy.vet(&[0; 1000], None).is_ok());
        assert!(policy.vet(&[0; 1001], None).is_err());
    }

    #[test]
    fn only_a_tenant_that_fails_open_echoes_a_failed_message() {
        assert_eq!(
            policy(10, 1, FailurePolicy::FailOpen).failure_reply(b"ping"),
            Some(&b"ping"[..])
        );
        assert_eq!(
            policy(10, 1, FailurePolicy::FailClosed).failure_reply(b"ping"),
            None
        );
    }
}
