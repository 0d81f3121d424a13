//! Listeners own the sockets. Each reads datagrams ([`udp`]) or accepts
//! connections and reads their messages ([`tcp`]), hands every message to a
//! session of its tenant, and carries out the decision: reply, say nothing,
//! close the connection, or stop. A TCP listener behind a load balancer
//! first reads each connection's PROXY header ([`proxy`]).
//!
//! Which sockets to bind and when the process ends is the server's
//! business; what a tenant allows is the tenant's.

mod datagrams;
pub mod proxy;
pub mod tcp;
pub mod udp;
