//! The harness itself: real redis-server processes on ephemeral ports, stopped by PID.

// Test code: a panic is how a failed expectation is reported.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use weir_e2e::RedisServer;

#[test]
fn redis_servers_start_on_distinct_ephemeral_ports_and_stop_on_drop() {
    let a = RedisServer::start();
    let b = RedisServer::start();
    assert_ne!(a.port, b.port);
    assert_ne!(a.port, 6379);
    assert_eq!(a.command("PING").as_deref(), Some("+PONG"));
    assert_eq!(b.command("SET weir:k v").as_deref(), Some("+OK"));
    assert_eq!(a.command("EXISTS weir:k").as_deref(), Some(":0"), "instances must be separate");
    let (port, pid) = (a.port, a.pid());
    drop(a);
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "redis {pid} still listening after drop");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| s.contains(" Z ")).unwrap_or(true)
    );
}

#[test]
fn redis_with_requirepass_refuses_unauthenticated_commands() {
    let r = RedisServer::start_with(&["--requirepass", "s3cret"]);
    let reply = r.command("GET x").unwrap_or_default();
    assert!(reply.starts_with("-NOAUTH"), "{reply}");
}
