//! Launching the ranks of a data-parallel run, all in one place: the collective a rank joins
//! (`simclr pretrain --replicas`, the pipeline's pretraining), this process's place among the
//! ranks (`Replica`), and the other ranks that `--gpus` starts as copies of this program
//! (`ReplicaProcesses`). What a torchrun or SLURM environment says is read by
//! `simclr_collective::Launch`.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use simclr_collective::Rendezvous;

/// This process's place in a pretraining over several GPUs (`cargo xtask pipeline --gpus`):
/// rank `rank` of `world_size` NCCL replicas that meet through `rendezvous`. Every rank runs
/// the pretraining on its share of each global batch; rank 0 alone writes, and alone goes on
/// to the later stages (on its GPU) once the pretraining is done.
#[derive(Debug, Clone)]
pub struct Replica {
    pub rank: usize,
    pub world_size: usize,
    pub rendezvous: Rendezvous,
}

/// The collective of a data-parallel run: one replica, or rank `rank` of `n` over NCCL, meeting
/// through `rendezvous` (`simclr pretrain --replicas`, `cargo xtask pipeline --gpus`).
pub fn replicas(
    n: usize,
    rank: usize,
    rendezvous: Option<&Rendezvous>,
    device: &Device,
) -> Result<std::sync::Arc<dyn simclr_collective::Collective>> {
    if n <= 1 {
        return Ok(std::sync::Arc::new(simclr_collective::SingleReplica));
    }
    if rank >= n {
        bail!("--rank {rank} is outside --replicas {n}")
    }
    let Some(rendezvous) = rendezvous else {
        bail!("--replicas {n} needs --rendezvous <file or tcp://host:port>")
    };
    #[cfg(feature = "nccl")]
    {
        let timeout = std::time::Duration::from_secs(600);
        let r = simclr_collective::NcclReplica::join(rendezvous, device, rank, n, timeout)?;
        Ok(std::sync::Arc::new(r))
    }
    #[cfg(not(feature = "nccl"))]
    {
        let _ = (rendezvous, device);
        bail!("--replicas {n}: this binary was built without NCCL (rebuild with --features nccl)")
    }
}

/// The other ranks of a multi-GPU pipeline, started by rank 0 (`cargo xtask pipeline --gpus`)
/// as copies of the running program with `--rank R --rendezvous ADDR` added to its own
/// arguments. A watcher ends the whole run when one of them fails (rank 0 would otherwise wait
/// in NCCL for ever); dropping the guard stops any that still run.
pub struct ReplicaProcesses {
    children: Arc<std::sync::Mutex<Vec<(usize, std::process::Child)>>>,
    stopping: Arc<std::sync::atomic::AtomicBool>,
    watcher: Option<std::thread::JoinHandle<()>>,
}

/// This program's arguments for a child rank: all of them but the ones the launcher sets
/// itself (`--rank`, `--rendezvous`, `--no-progress`), which clap refuses to see twice.
fn child_args(args: impl Iterator<Item = std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let mut out = Vec::new();
    let mut skip_value = false;
    for a in args {
        if std::mem::take(&mut skip_value) {
            continue;
        }
        let text = a.to_string_lossy();
        match text.as_ref() {
            "--rank" | "--rendezvous" => skip_value = true,
            "--no-progress" => {}
            t if t.starts_with("--rank=") || t.starts_with("--rendezvous=") => {}
            _ => out.push(a),
        }
    }
    out
}

impl ReplicaProcesses {
    /// Starts ranks `1..world_size`.
    pub fn spawn(world_size: usize, rendezvous: &Rendezvous) -> Result<Self> {
        let exe = std::env::current_exe().context("cannot find the running program")?;
        let own = child_args(std::env::args_os().skip(1));
        let mut children: Vec<(usize, std::process::Child)> = Vec::new();
        for rank in 1..world_size {
            let started = std::process::Command::new(&exe)
                .args(&own)
                .args([
                    "--rank",
                    &rank.to_string(),
                    "--rendezvous",
                    &rendezvous.to_string(),
                ])
                .arg("--no-progress")
                .spawn();
            match started {
                Ok(child) => children.push((rank, child)),
                Err(e) => {
                    for (_, mut child) in children {
                        let _ = child.kill();
                        let _ = child.wait();
                    }
                    bail!("cannot start rank {rank} ({}): {e}", exe.display())
                }
            }
        }
        let children = Arc::new(std::sync::Mutex::new(children));
        let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (watched, stop) = (children.clone(), stopping.clone());
        let watcher = std::thread::spawn(move || loop {
            let mut all = watched.lock().unwrap_or_else(|e| e.into_inner());
            if stop.load(std::sync::atomic::Ordering::SeqCst) {
                return; // rank 0 is stopping them itself
            }
            let mut running = 0;
            for (rank, child) in all.iter_mut() {
                match child.try_wait() {
                    Ok(Some(status)) if !status.success() => {
                        eprintln!(
                            "error: pretraining rank {rank} failed ({status}); stopping the run"
                        );
                        for (_, other) in all.iter_mut() {
                            let _ = other.kill();
                        }
                        std::process::exit(1);
                    }
                    Ok(None) => running += 1,
                    // Finished, or no longer ours to wait for.
                    Ok(Some(_)) | Err(_) => {}
                }
            }
            drop(all);
            if running == 0 {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(500));
        });
        Ok(Self {
            children,
            stopping,
            watcher: Some(watcher),
        })
    }

    /// Waits until every rank has finished (they finish with the pretraining).
    pub fn wait(mut self) {
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
    }
}

impl Drop for ReplicaProcesses {
    fn drop(&mut self) {
        if self.watcher.is_some() {
            let mut all = self.children.lock().unwrap_or_else(|e| e.into_inner());
            // Under the lock: the watcher sees the flag before it could see the killed ranks.
            self.stopping
                .store(true, std::sync::atomic::Ordering::SeqCst);
            for (_, child) in all.iter_mut() {
                let _ = child.kill();
            }
        }
    }
}

/// This process's part in a run over `gpus` (`--gpus`, one process per GPU): its device, its
/// place among the ranks, and, on rank 0, the other ranks it starts, meeting through
/// `rendezvous` (default: a fresh file in `out`).
pub fn gpu_ranks(
    gpus: &[usize],
    rank: usize,
    rendezvous: Option<Rendezvous>,
    out: &std::path::Path,
) -> Result<(Device, Replica, Option<ReplicaProcesses>)> {
    let Some(&gpu) = gpus.get(rank) else {
        bail!("--rank {rank} has no GPU in --gpus {gpus:?}")
    };
    let device = crate::args::device(Some(&format!("cuda:{gpu}")))?;
    std::fs::create_dir_all(out)?;
    let rendezvous = rendezvous.unwrap_or_else(|| {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let file = out.join(format!(".rendezvous-{}-{stamp}", std::process::id()));
        Rendezvous::File(file)
    });
    let others = if rank == 0 {
        Some(ReplicaProcesses::spawn(gpus.len(), &rendezvous)?)
    } else {
        None
    };
    let replica = Replica {
        rank,
        world_size: gpus.len(),
        rendezvous,
    };
    Ok((device, replica, others))
}

#[cfg(test)]
mod tests {
    #[test]
    fn child_ranks_get_the_arguments_without_the_launchers_own() {
        let args = [
            "pipeline",
            "--gpus",
            "0,1",
            "--no-progress",
            "--rank",
            "3",
            "--fraction",
            "0.1",
            "--rendezvous=tcp://h:1",
            "--rendezvous",
            "/tmp/x",
            "--rank=2",
            "--out",
            "o",
        ];
        let got = super::child_args(args.iter().map(std::ffi::OsString::from));
        let want = [
            "pipeline",
            "--gpus",
            "0,1",
            "--fraction",
            "0.1",
            "--out",
            "o",
        ];
        assert_eq!(got, want.map(std::ffi::OsString::from));
    }
}
