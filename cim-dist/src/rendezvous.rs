//! Rank 0 hands a few bytes (NCCL's unique id) to every other rank over TCP: it listens at
//! `MASTER_PORT`, every other rank connects to `MASTER_ADDR:MASTER_PORT`, says its rank and reads
//! the bytes. Both sides give up after the timeout, naming the ranks that did not come.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use cim_api::{Error, Result};

const MAGIC: &[u8; 8] = b"cim-rdzv";

/// Rank 0 (`payload` is `Some`) sends `payload` to ranks `1..world`; every other rank returns
/// what rank 0 sent. `host:port` is rank 0's address; rank 0 listens on every interface.
pub fn share(
    rank: usize,
    world: usize,
    host: &str,
    port: u16,
    payload: Option<&[u8]>,
    timeout: Duration,
) -> Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    match (rank, payload) {
        (0, Some(p)) => serve(world, port, p, deadline).map(|()| p.to_vec()),
        (0, None) => Err(Error::msg("rendezvous: rank 0 has nothing to hand out")),
        _ => fetch(rank, host, port, deadline, timeout),
    }
}

fn serve(world: usize, port: u16, payload: &[u8], deadline: Instant) -> Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port)).map_err(|e| {
        Error::msg(format!(
            "rendezvous: rank 0 cannot listen on port {port}: {e} (MASTER_PORT; another job may hold it)"
        ))
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::msg(format!("rendezvous: {e}")))?;
    let mut served = vec![false; world];
    served[0] = true;
    while served.iter().any(|s| !s) {
        match listener.accept() {
            Ok((mut stream, peer)) => {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                let mut hello = [0u8; 16];
                if stream.read_exact(&mut hello).is_err() || &hello[..8] != MAGIC {
                    tracing::warn!(%peer, "rendezvous: ignoring a connection that is not a cim rank");
                    continue;
                }
                let r = u64::from_le_bytes(hello[8..].try_into().expect("8 bytes")) as usize;
                if r == 0 || r >= world || served[r] {
                    return Err(Error::msg(format!(
                        "rendezvous: {peer} says it is rank {r}, which is {} in a world of {world}",
                        if r < world && served[r] {
                            "taken"
                        } else {
                            "not a rank"
                        }
                    )));
                }
                let mut msg = (payload.len() as u64).to_le_bytes().to_vec();
                msg.extend_from_slice(payload);
                stream
                    .write_all(&msg)
                    .map_err(|e| Error::msg(format!("rendezvous: sending to rank {r}: {e}")))?;
                served[r] = true;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    let missing: Vec<String> = (0..world)
                        .filter(|&r| !served[r])
                        .map(|r| r.to_string())
                        .collect();
                    return Err(Error::msg(format!(
                        "rendezvous: rank(s) {} did not connect to port {port} within the timeout (dist.timeout_s)",
                        missing.join(", ")
                    )));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(Error::msg(format!("rendezvous: accept: {e}"))),
        }
    }
    Ok(())
}

fn fetch(
    rank: usize,
    host: &str,
    port: u16,
    deadline: Instant,
    timeout: Duration,
) -> Result<Vec<u8>> {
    let mut last = String::from("no address");
    while Instant::now() < deadline {
        let addrs = match (host, port).to_socket_addrs() {
            Ok(a) => a.collect::<Vec<_>>(),
            Err(e) => {
                last = e.to_string();
                vec![]
            }
        };
        for addr in addrs {
            let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
                continue;
            };
            let _ = stream.set_read_timeout(Some(
                deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(100)),
            ));
            let mut hello = MAGIC.to_vec();
            hello.extend_from_slice(&(rank as u64).to_le_bytes());
            let read = stream.write_all(&hello).and_then(|()| {
                let mut len = [0u8; 8];
                stream.read_exact(&mut len)?;
                let mut buf = vec![0u8; u64::from_le_bytes(len) as usize];
                stream.read_exact(&mut buf)?;
                Ok(buf)
            });
            match read {
                Ok(buf) => return Ok(buf),
                Err(e) => last = e.to_string(),
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(Error::msg(format!(
        "rendezvous: rank {rank} could not reach rank 0 at {host}:{port} within {} s ({last}); is rank 0 running, and MASTER_ADDR/MASTER_PORT right?",
        timeout.as_secs()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[test]
    fn rank_zero_hands_its_bytes_to_every_rank() {
        let port = free_port();
        let payload: Vec<u8> = (0..128u8).collect();
        let t = Duration::from_secs(20);
        let peers: Vec<_> = (1..4)
            .map(|r| std::thread::spawn(move || share(r, 4, "127.0.0.1", port, None, t).unwrap()))
            .collect();
        assert_eq!(
            share(0, 4, "127.0.0.1", port, Some(&payload), t).unwrap(),
            payload
        );
        for p in peers {
            assert_eq!(p.join().unwrap(), payload);
        }
    }

    #[test]
    fn missing_ranks_are_named_after_the_timeout() {
        let port = free_port();
        let t = Duration::from_millis(300);
        let peer = std::thread::spawn(move || {
            share(2, 3, "127.0.0.1", port, None, Duration::from_secs(20))
        });
        let e = share(0, 3, "127.0.0.1", port, Some(b"id"), t)
            .unwrap_err()
            .to_string();
        assert!(e.contains("rank(s) 1 did not connect"), "{e}");
        assert_eq!(peer.join().unwrap().unwrap(), b"id");
        let e = share(1, 2, "127.0.0.1", free_port(), None, t)
            .unwrap_err()
            .to_string();
        assert!(e.contains("rank 1 could not reach rank 0"), "{e}");
    }
}
