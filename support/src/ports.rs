//! Free loopback ports for tests, benchmarks and the demo, which must tell a server its
//! port before it starts (rumqttd cannot listen on port 0 and report the port it got).
//!
//! The port comes from the OS (a listener on port 0, closed again), and this process never
//! hands out the same one twice: tests of one binary run side by side, and two of them
//! asking at nearly the same moment could otherwise be given the same just-closed port.

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::Mutex;

/// Ports this process has handed out.
static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A TCP port on 127.0.0.1 that the OS gave a moment ago and that this process has not
/// handed out before.
pub fn free_port() -> std::io::Result<u16> {
    let mut guard = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    let given = guard.get_or_insert_with(HashSet::new);
    for _ in 0..100 {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if given.insert(port) {
            return Ok(port);
        }
    }
    Err(std::io::Error::other(
        "the OS keeps giving ports this process already handed out",
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_port_is_never_handed_out_twice() {
        let ports: Vec<u16> = (0..200).map(|_| super::free_port().unwrap()).collect();
        let unique: std::collections::HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(unique.len(), ports.len());
        // and each is one a listener can take
        let port = super::free_port().unwrap();
        std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    }
}
