//! The capacity a table's steps are multiples of, and what the same
//! closed loop serves when its calls are spread over every one of the
//! crowd's connections.

use std::time::Duration;

use super::{CAPACITY_WINDOWS, Run};
use crate::loadgen::{Figures, closed_loop};
use crate::output::outln;

/// Which of the crowd's connections a closed loop's calls go over.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Over {
    /// One connection a call in flight: the first `in_flight` of them.
    Few,
    /// Each call on the next connection, round all of them: every call
    /// alone on a connection the node last read from a thousand calls ago,
    /// as in a crowd, with the node as busy as in the closed loop.
    All,
}

/// Connection index of call `k` (numbered across the whole loop) sent by
/// `worker`, over `conns` connections of which `used` carry the loop.
pub(super) fn connection(over: Over, k: u64, worker: usize, used: usize, conns: usize) -> usize {
    match over {
        Over::Few => worker % used.max(1),
        Over::All => (k % conns.max(1) as u64) as usize,
    }
}

impl Run<'_> {
    /// `in_flight` calls kept in flight for one window.
    pub(super) async fn closed(&self, in_flight: usize, over: Over) -> Figures {
        let (conns, call) = (self.conns.to_vec(), self.call.clone());
        let in_flight = in_flight.min(conns.len() * 8);
        let used = conns.len().min(in_flight);
        closed_loop(self.seconds, in_flight, move |k, w| {
            let channel = conns[connection(over, k, w, used, conns.len())].clone();
            let call = call(channel, k, Duration::from_secs(5));
            async move { call.await.is_ok() }
        })
        .await
    }

    /// Measures the capacity and prints it: the mean of two windows in a
    /// row with `in_flight` calls in flight over as many connections and
    /// the side traffic running, then one window without the side traffic,
    /// and one more spread over all the connections.
    ///
    /// The mean of two: on a shared machine the node's speed moves by a
    /// quarter from one 5 s window to the next (eight windows in a row read
    /// 1,334 to 2,365/s in one run), so the higher of two windows
    /// overstates it, and overstates every ratio's denominator (by 8% on
    /// average against the mean of eight windows in six runs). Not with 200
    /// calls in flight (the crowd's shape): a node with places then pauses
    /// some of the callers and serves fewer calls than it could (5% fewer
    /// on average in those runs), which would flatter every ratio. The side
    /// traffic (status writes and their replication) runs meanwhile, as it
    /// does in every step: at a tenth of a core it takes a large share of
    /// the node, so a capacity measured without it would count as lost what
    /// the node spent on the writes the steps ask of it.
    ///
    /// Spread over all the connections, the loop keeps the node as busy,
    /// but each call arrives alone on a connection whose state (TLS, HTTP/2,
    /// buffers) has gone cold meanwhile. From 1x on a step's calls come so:
    /// what the node serves spread is about the most a step's callers can
    /// get, whatever the node's overload rules.
    pub(super) async fn capacity(
        &self,
        title: &str,
        in_flight: usize,
        phase: &dyn Fn(&str),
    ) -> f64 {
        let mut windows = Vec::new();
        let mut writes_beside = 0;
        for window in 0..CAPACITY_WINDOWS {
            let (load, writes) = match self.side {
                Some(side) => {
                    let (load, writes) = tokio::join!(
                        self.closed(in_flight, Over::Few),
                        side.write(self.seconds, 900_000 + window * 10_000)
                    );
                    (load, writes.ok)
                }
                None => (self.closed(in_flight, Over::Few).await, 0),
            };
            windows.push(load.rate());
            writes_beside += writes;
        }
        let capacity = windows.iter().sum::<f64>() / windows.len() as f64;
        let each = windows
            .iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(" and ");
        // Both without the side traffic, so that they compare.
        let alone = match self.side {
            Some(_) => {
                phase("capacity without the writes");
                Some(self.closed(in_flight, Over::Few).await.rate())
            }
            None => None,
        };
        phase("capacity over every connection");
        let spread = self.closed(in_flight, Over::All).await.rate();
        let conns = self.conns.len();
        match alone {
            Some(alone) => outln!(
                "{title}\ncapacity (closed loop, {in_flight} calls in flight, the mean of {CAPACITY_WINDOWS} windows, with the status writes and their replication running): {capacity:.0}/s ({each}), with {writes_beside} status writes acknowledged meanwhile; without them: {alone:.0}/s; without them and each call on the next of all {conns} connections: {spread:.0}/s ({:.2} of {alone:.0})",
                spread / alone
            ),
            None => outln!(
                "{title}\ncapacity (closed loop, {in_flight} calls in flight, the mean of {CAPACITY_WINDOWS} windows): {capacity:.0}/s ({each}); each call on the next of all {conns} connections: {spread:.0}/s ({:.2} of it)",
                spread / capacity
            ),
        }
        capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_few_connections_carry_one_call_each_and_all_take_turns() {
        // 64 in flight over 1,000 connections: worker w always on w.
        assert_eq!(connection(Over::Few, 5, 3, 64, 1000), 3);
        assert_eq!(connection(Over::Few, 999, 3, 64, 1000), 3);
        // Spread: calls 0..2000 visit every connection twice, whoever sends.
        let mut seen = vec![0u32; 1000];
        for k in 0..2000u64 {
            seen[connection(Over::All, k, (k % 64) as usize, 64, 1000)] += 1;
        }
        assert!(seen.iter().all(|&n| n == 2));
    }
}
