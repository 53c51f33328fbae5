//! TCP_NODELAY for every connection rumqttd accepts.
//!
//! rumqttd binds its listener itself and never sets TCP_NODELAY, so a small packet it
//! writes (a PUBACK, a file-chunk reply) while an earlier one is unacknowledged waits for
//! the peer's delayed ACK: 40 ms on Linux, per round trip. A windowed upload then crawls
//! at a few MB/s. Linux copies TCP_NODELAY from a listening socket to every socket it
//! accepts, so we find rumqttd's listening socket among our own descriptors once it is up
//! and set the option there.

use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, RawFd};

/// Sets TCP_NODELAY on this process's listening TCP socket bound to `addr`. Returns
/// whether one was found.
pub(crate) fn set_on_listener(addr: SocketAddr) -> std::io::Result<bool> {
    let mut found = false;
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let Some(fd) = entry?
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<RawFd>().ok())
        else {
            continue;
        };
        let Ok(target) = std::fs::read_link(format!("/proc/self/fd/{fd}")) else {
            continue; // closed since the directory was read
        };
        if !target.to_string_lossy().starts_with("socket:") {
            continue;
        }
        // SAFETY: `fd` is open in this process (its /proc entry was just read) and is only
        // borrowed for the getsockopt/setsockopt calls below; nothing here closes it.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let socket = socket2::SockRef::from(&fd);
        let is_listener = socket.is_listener().unwrap_or(false);
        let bound = socket.local_addr().ok().and_then(|a| a.as_socket());
        if is_listener && bound == Some(addr) {
            socket.set_tcp_nodelay(true)?;
            found = true;
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn connections_accepted_after_it_have_nodelay() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let before = TcpStream::connect(addr).unwrap();
        let (accepted_before, _) = listener.accept().unwrap();
        assert!(!accepted_before.nodelay().unwrap());
        assert!(super::set_on_listener(addr).unwrap(), "listener not found");
        let _after = TcpStream::connect(addr).unwrap();
        let (accepted_after, _) = listener.accept().unwrap();
        assert!(accepted_after.nodelay().unwrap());
        drop(before);
    }

    #[test]
    fn another_address_is_not_touched() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let other = std::net::SocketAddr::from(([127, 0, 0, 2], port));
        assert!(!super::set_on_listener(other).unwrap());
    }
}
