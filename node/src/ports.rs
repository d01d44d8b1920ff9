//! Loopback ports for the local federation, the benchmarks and the tests.
//!
//! A port the kernel picks (`bind` to port 0) comes from its ephemeral
//! range, the same range it draws every outgoing connection's local port
//! from and hands to every other `bind` to port 0 on the host. A port picked
//! that way and released so that a child process (`hufu serve`, a NATS
//! server, chromedriver) can bind it may be handed to someone else first:
//! another test's node in the same process, or a connection. The ports here
//! come from below the ephemeral range instead, at random (so that two
//! processes picking ports at once rarely meet), each at most once per
//! process, and each checked free by binding it.

use std::collections::HashSet;
use std::hash::{BuildHasher, Hasher};
use std::net::TcpListener;
use std::sync::Mutex;

/// The lowest port handed out: above the well-known and most registered
/// services' ports.
const LOWEST: u32 = 10_000;

/// Where the kernel's ephemeral range begins, when it cannot be read.
const EPHEMERAL_DEFAULT: u32 = 32_768;

/// Ports handed out so far in this process.
static HANDED: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// The first port of the kernel's ephemeral range.
fn ephemeral_low() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(EPHEMERAL_DEFAULT)
}

/// A random number: the standard library's hasher is seeded at random.
fn random() -> u32 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish() as u32
}

/// A listener on a loopback port that nobody else in this process has been
/// given, outside the kernel's ephemeral range where it can; bound and
/// listening, so that the port is held until it is dropped.
pub fn loopback_listener() -> std::io::Result<TcpListener> {
    let high = ephemeral_low();
    if high < LOWEST + 1_000 {
        // No room below the ephemeral range: the kernel's pick it is.
        return TcpListener::bind("127.0.0.1:0");
    }
    let span = high - LOWEST;
    let mut handed = HANDED.lock().unwrap_or_else(|e| e.into_inner());
    let handed = handed.get_or_insert_with(HashSet::new);
    // Enough tries that a range mostly taken is still searched.
    for _ in 0..span {
        let port = (LOWEST + random() % span) as u16;
        if !handed.insert(port) {
            continue;
        }
        match TcpListener::bind(("127.0.0.1", port)) {
            Ok(listener) => return Ok(listener),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!("no free loopback port between {LOWEST} and {high}"),
    ))
}

/// A free loopback port, bound and released: for a port that another
/// process must bind itself (a `hufu serve` child, a NATS server,
/// chromedriver), or that must have nothing listening. A node started in
/// this process takes a listener bound beforehand instead.
pub fn free_port() -> std::io::Result<u16> {
    Ok(loopback_listener()?.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_not_handed_out_twice_and_avoid_the_ephemeral_range() {
        let held: Vec<_> = (0..50).map(|_| loopback_listener().unwrap()).collect();
        let released: Vec<_> = (0..50).map(|_| free_port().unwrap()).collect();
        let mut ports: Vec<u16> = held
            .iter()
            .map(|l| l.local_addr().unwrap().port())
            .chain(released)
            .collect();
        let high = ephemeral_low();
        if high >= LOWEST + 1_000 {
            assert!(
                ports
                    .iter()
                    .all(|&p| (LOWEST..high).contains(&u32::from(p)))
            );
        }
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 100, "a port was handed out twice");
    }
}
