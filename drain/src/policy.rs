//! The enforcement hook on the drain thread: a guest's `PolicyQuery` is answered here, from
//! a [`PolicyGate`] the daemon plugs in (vigil-opcontrol's drain-side view), without leaving
//! the io_uring loop. Allow and deny answer at once; a hold parks the query in the gate and
//! [`PolicyGate::poll`] releases it when a resume or terminate arrives (the gate's owner
//! wakes the loop through [`crate::DrainHandle::waker`]).

/// The gate's answer to a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GateAnswer {
    Allow,
    /// Denied, with a sentence for the guest and a short label for the audit event.
    Deny {
        reason: String,
        label: &'static str,
    },
    /// Parked: answered later through [`PolicyGate::poll`].
    Hold,
}

/// A held query that has its answer now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateRelease {
    pub conn_token: u64,
    pub query_id: u64,
    pub allow: bool,
    pub reason: String,
    pub label: &'static str,
    pub held_ns: u64,
    pub op_id: String,
    pub action: String,
}

/// What the drain asks of the op-control state. Implementations must be cheap on the allow
/// path: this runs on the drain thread for every query.
pub trait PolicyGate: Send + 'static {
    /// Answers (or parks) one query.
    #[allow(clippy::too_many_arguments)]
    fn query(
        &mut self,
        conn_token: u64,
        query_id: u64,
        cell: &str,
        run: &str,
        op_id: &str,
        action: &str,
        now_ns: u64,
    ) -> GateAnswer;
    /// Applies pending state changes and appends the held queries they release.
    fn poll(&mut self, now_ns: u64, out: &mut Vec<GateRelease>);
    /// Forgets the held queries of a closed connection.
    fn cancel_conn(&mut self, conn_token: u64);
}
