//! How the replicas of a data-parallel run meet: rank 0 creates a secret (NCCL's 128-byte
//! unique id) and every other rank must receive it before the group can form.
//!
//! Two ways, chosen by the address:
//!
//! * a file, `path` or `file://path`: rank 0 writes it (to a temporary name, then a rename, so
//!   no reader sees half of it) and the others poll for it. For one machine, or several with a
//!   shared file system. Rank 0 removes it once the group has formed ([`Rendezvous::finish`]),
//!   so the next launch cannot pick up a stale id.
//! * TCP, `tcp://host:port`: rank 0 listens on that address and hands the secret to each of the
//!   other ranks, which connect (retrying until rank 0 is up). For several machines without a
//!   shared file system; `host` is rank 0's address as the others see it.
//!
//! Both wait at most the given timeout and then fail with an error naming the address. The
//! exchange needs no GPU, so the tests run it with threads.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{bail, Result};

/// The greeting of the TCP exchange: a tag and a version, so a stray connection is refused.
const MAGIC: &[u8; 8] = b"SIMCLRv1";

/// Where the replicas meet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rendezvous {
    /// A file that rank 0 writes and the others read.
    File(PathBuf),
    /// `host:port` where rank 0 listens.
    Tcp(String),
}

impl std::str::FromStr for Rendezvous {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if let Some(addr) = s.strip_prefix("tcp://") {
            match addr.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                    Ok(Self::Tcp(addr.to_string()))
                }
                _ => Err(format!("{s}: expected tcp://HOST:PORT")),
            }
        } else {
            let path = s.strip_prefix("file://").unwrap_or(s);
            if path.is_empty() {
                return Err("an empty rendezvous path".into());
            }
            Ok(Self::File(PathBuf::from(path)))
        }
    }
}

impl std::fmt::Display for Rendezvous {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(p) => write!(f, "{}", p.display()),
            Self::Tcp(a) => write!(f, "tcp://{a}"),
        }
    }
}

impl Rendezvous {
    /// Hands rank 0's secret to every rank: rank 0 calls `create` and publishes the result
    /// (for TCP, it returns once all `world_size − 1` others have it); every other rank waits
    /// for it. The secret must be `len` bytes. Returns the secret on every rank.
    pub fn exchange(
        &self,
        rank: usize,
        world_size: usize,
        len: usize,
        timeout: Duration,
        create: impl FnOnce() -> Result<Vec<u8>>,
    ) -> Result<Vec<u8>> {
        if rank >= world_size {
            bail!("rank {rank} is outside a world of {world_size}")
        }
        if rank == 0 {
            let secret = create()?;
            if secret.len() != len {
                bail!(
                    "rendezvous: the secret is {} bytes, expected {len}",
                    secret.len()
                )
            }
            match self {
                Self::File(path) => publish_file(path, &secret)?,
                Self::Tcp(addr) => serve_tcp(addr, &secret, world_size, timeout)?,
            }
            Ok(secret)
        } else {
            match self {
                Self::File(path) => read_file(path, len, timeout),
                Self::Tcp(addr) => fetch_tcp(addr, rank, world_size, len, timeout),
            }
        }
    }

    /// Called by every rank once the group has formed: rank 0 removes the file.
    pub fn finish(&self, rank: usize) {
        if let (0, Self::File(path)) = (rank, self) {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn publish_file(path: &Path, secret: &[u8]) -> Result<()> {
    simclr_fs::write_atomic(path, secret).map_err(|e| {
        candle_core::Error::Msg(format!(
            "{}: cannot write the rendezvous id: {e}",
            path.display()
        ))
    })
}

fn read_file(path: &Path, len: usize, timeout: Duration) -> Result<Vec<u8>> {
    let start = Instant::now();
    loop {
        match std::fs::read(path) {
            Ok(b) if b.len() == len => return Ok(b),
            Ok(b) => bail!(
                "{}: a rendezvous id is {len} bytes, this file has {} (a file left by another run?)",
                path.display(),
                b.len()
            ),
            Err(_) if start.elapsed() < timeout => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => bail!("{}: no id from rank 0 after {timeout:?}: {e}", path.display()),
        }
    }
}

fn io_err(addr: &str, what: &str, e: std::io::Error) -> candle_core::Error {
    candle_core::Error::Msg(format!("rendezvous tcp://{addr}: {what}: {e}"))
}

/// Rank 0: accepts one connection from each other rank and answers each with the secret.
fn serve_tcp(addr: &str, secret: &[u8], world_size: usize, timeout: Duration) -> Result<()> {
    let listener = TcpListener::bind(addr).map_err(|e| io_err(addr, "cannot listen", e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| io_err(addr, "cannot listen", e))?;
    let start = Instant::now();
    let mut joined = vec![false; world_size];
    joined[0] = true;
    while joined.iter().any(|j| !j) {
        match listener.accept() {
            Ok((mut stream, _)) => {
                stream
                    .set_nonblocking(false)
                    .and_then(|_| stream.set_read_timeout(Some(Duration::from_secs(10))))
                    .map_err(|e| io_err(addr, "connection", e))?;
                let mut hello = [0u8; 16];
                if stream.read_exact(&mut hello).is_err() || &hello[..8] != MAGIC {
                    continue; // not one of ours: ignore it
                }
                let rank = u32::from_le_bytes(hello[8..12].try_into().expect("4 bytes")) as usize;
                let world = u32::from_le_bytes(hello[12..16].try_into().expect("4 bytes")) as usize;
                if world != world_size || rank == 0 || rank >= world_size || joined[rank] {
                    bail!(
                        "rendezvous tcp://{addr}: a replica says it is rank {rank} of {world}; \
                         expected a new rank in 1..{world_size} of {world_size}"
                    )
                }
                let mut reply = (secret.len() as u32).to_le_bytes().to_vec();
                reply.extend_from_slice(secret);
                stream
                    .write_all(&reply)
                    .map_err(|e| io_err(addr, &format!("cannot answer rank {rank}"), e))?;
                joined[rank] = true;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if start.elapsed() > timeout {
                    let missing: Vec<usize> = (0..world_size).filter(|&r| !joined[r]).collect();
                    bail!("rendezvous tcp://{addr}: ranks {missing:?} did not connect within {timeout:?}")
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(io_err(addr, "accept", e)),
        }
    }
    Ok(())
}

/// Every other rank: connects (retrying until rank 0 listens) and reads the secret.
fn fetch_tcp(
    addr: &str,
    rank: usize,
    world_size: usize,
    len: usize,
    timeout: Duration,
) -> Result<Vec<u8>> {
    let start = Instant::now();
    let mut stream = loop {
        let attempt = addr
            .to_socket_addrs()
            .and_then(|mut a| a.next().ok_or_else(|| std::io::ErrorKind::NotFound.into()))
            .and_then(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)));
        match attempt {
            Ok(s) => break s,
            Err(_) if start.elapsed() < timeout => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => {
                return Err(io_err(
                    addr,
                    &format!("rank 0 not reachable after {timeout:?}"),
                    e,
                ))
            }
        }
    };
    let mut hello = MAGIC.to_vec();
    hello.extend_from_slice(&(rank as u32).to_le_bytes());
    hello.extend_from_slice(&(world_size as u32).to_le_bytes());
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|_| stream.write_all(&hello))
        .map_err(|e| io_err(addr, "cannot greet rank 0", e))?;
    let mut size = [0u8; 4];
    stream
        .read_exact(&mut size)
        .map_err(|e| io_err(addr, "no answer from rank 0", e))?;
    let got = u32::from_le_bytes(size) as usize;
    if got != len {
        bail!("rendezvous tcp://{addr}: rank 0 sent {got} bytes, expected {len}")
    }
    let mut secret = vec![0u8; len];
    stream
        .read_exact(&mut secret)
        .map_err(|e| io_err(addr, "truncated answer from rank 0", e))?;
    Ok(secret)
}
