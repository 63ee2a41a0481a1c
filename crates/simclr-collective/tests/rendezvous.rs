//! The rendezvous with threads standing in for the processes: every rank gets rank 0's secret,
//! through a file and through TCP, and bad situations give errors that name the address.

use std::time::Duration;

use simclr_collective::Rendezvous;

fn secret() -> Vec<u8> {
    (0..128u32).map(|i| (i * 7 + 3) as u8).collect()
}

/// Runs `world` ranks on threads, rank 0 last so that the others wait for it.
fn run_all(r: &Rendezvous, world: usize) -> Vec<Vec<u8>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (1..world)
            .chain([0])
            .map(|rank| {
                let r = r.clone();
                s.spawn(move || {
                    if rank == 0 {
                        std::thread::sleep(Duration::from_millis(300));
                    }
                    let got = r
                        .exchange(rank, world, 128, Duration::from_secs(20), || Ok(secret()))
                        .unwrap();
                    (rank, got)
                })
            })
            .collect();
        let mut out: Vec<(usize, Vec<u8>)> =
            handles.into_iter().map(|h| h.join().unwrap()).collect();
        out.sort_by_key(|(rank, _)| *rank);
        out.into_iter().map(|(_, s)| s).collect()
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn every_rank_gets_rank_zeros_secret_through_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nccl-id");
    let r: Rendezvous = path.to_str().unwrap().parse().unwrap();
    assert_eq!(r, Rendezvous::File(path.clone()));
    for got in run_all(&r, 4) {
        assert_eq!(got, secret());
    }
    assert!(path.exists(), "the file stays until the group has formed");
    r.finish(1);
    assert!(path.exists(), "only rank 0 removes it");
    r.finish(0);
    assert!(!path.exists());
}

#[test]
fn every_rank_gets_rank_zeros_secret_through_tcp() {
    let r: Rendezvous = format!("tcp://127.0.0.1:{}", free_port()).parse().unwrap();
    let all = run_all(&r, 3);
    assert_eq!(all.len(), 3);
    for got in all {
        assert_eq!(got, secret());
    }
}

#[test]
fn addresses_parse_or_say_what_is_wrong() {
    assert_eq!(
        "file:///tmp/x".parse::<Rendezvous>().unwrap(),
        Rendezvous::File("/tmp/x".into())
    );
    assert_eq!(
        "tcp://node0:29500".parse::<Rendezvous>().unwrap(),
        Rendezvous::Tcp("node0:29500".into())
    );
    for bad in ["tcp://node0", "tcp://:29500", "tcp://node0:http", ""] {
        assert!(bad.parse::<Rendezvous>().is_err(), "{bad:?} parsed");
    }
}

#[test]
fn a_missing_rank_zero_times_out_with_the_address_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("never-written");
    let r = Rendezvous::File(path.clone());
    let err = r
        .exchange(1, 2, 128, Duration::from_millis(300), || unreachable!())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("never-written") && err.contains("no id from rank 0"),
        "{err}"
    );

    let addr = format!("127.0.0.1:{}", free_port());
    let r = Rendezvous::Tcp(addr.clone());
    let err = r
        .exchange(1, 2, 128, Duration::from_millis(300), || unreachable!())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&addr) && err.contains("not reachable"),
        "{err}"
    );
    // Rank 0 waiting for a rank that never comes.
    let err = r
        .exchange(0, 2, 128, Duration::from_millis(300), || Ok(secret()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("ranks [1] did not connect"), "{err}");
}

#[test]
fn a_file_of_the_wrong_size_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("id");
    std::fs::write(&path, b"short").unwrap();
    let err = Rendezvous::File(path)
        .exchange(1, 2, 128, Duration::from_secs(1), || unreachable!())
        .unwrap_err()
        .to_string();
    assert!(err.contains("has 5"), "{err}");
}

#[test]
fn a_bad_rank_is_refused() {
    let err = Rendezvous::File("x".into())
        .exchange(2, 2, 128, Duration::from_secs(1), || Ok(secret()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("rank 2 is outside a world of 2"), "{err}");
}
