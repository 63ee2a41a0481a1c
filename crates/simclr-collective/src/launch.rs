//! A process's place in a data-parallel run, read from the environment its launcher sets:
//! `torchrun` / `torch.distributed` or SLURM, so a cluster script needs no `--rank`.
//!
//! * torchrun: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`. torchrun's own
//!   agent keeps a store on `MASTER_PORT` (it then sets `TORCHELASTIC_USE_AGENT_STORE=True`), so
//!   rank 0 listens on the next port; a plain launch that sets the variables by hand uses
//!   `MASTER_PORT` itself.
//! * SLURM (`srun`, one task per GPU): `SLURM_PROCID`, `SLURM_STEP_NUM_TASKS` (set for the
//!   tasks of an `srun` step, not for the batch script itself), `SLURM_LOCALID`; rank 0's
//!   host is `MASTER_ADDR` if set, else the first host of `SLURM_JOB_NODELIST` (the compressed
//!   form `gpu[03-04],cpu1` gives `gpu03`); the port is `MASTER_PORT` if set, else
//!   [`slurm_port`] of `SLURM_JOB_ID`, so two jobs on one node do not collide.
//!
//! torchrun's variables win when both are present (torchrun inside an `srun` allocation). A
//! world of one process is no launch (`None`). The result feeds the [`Rendezvous`] as
//! `tcp://host:port`.

use candle_core::{bail, Result};

use crate::Rendezvous;

/// What the launcher's environment says about this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// This process's rank.
    pub rank: usize,
    /// The number of processes.
    pub world_size: usize,
    /// This process's rank on its node (the GPU it should use).
    pub local_rank: usize,
    /// Where the ranks meet.
    pub rendezvous: Rendezvous,
    /// `torchrun` or `slurm`.
    pub launcher: &'static str,
}

/// The port a SLURM job's rank 0 listens on when `MASTER_PORT` is unset: 20000 plus the job id
/// modulo 10000, below the usual ephemeral range.
pub fn slurm_port(job_id: u64) -> u16 {
    20_000 + (job_id % 10_000) as u16
}

/// The first host of a SLURM host list (`node[01-04,07],gpu7` → `node01`).
pub fn first_host(list: &str) -> Option<String> {
    let mut depth = 0usize;
    let first = list
        .split(|c| {
            match c {
                '[' => depth += 1,
                ']' => depth = depth.saturating_sub(1),
                _ => {}
            }
            c == ',' && depth == 0
        })
        .next()?
        .trim();
    let host = match first.split_once('[') {
        None => first.to_string(),
        Some((prefix, rest)) => {
            let (ranges, suffix) = rest.split_once(']')?;
            let start = ranges.split([',', '-']).next()?.trim();
            if start.is_empty() || !start.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            format!("{prefix}{start}{suffix}")
        }
    };
    (!host.is_empty()).then_some(host)
}

/// Reads the launch from `var` (the environment in [`Launch::from_env`]); `None` when no
/// launcher's variables are set. A variable that is set but unusable is an error naming it.
pub fn launch_from(var: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
    let number = |name: &str| -> Result<Option<u64>> {
        match var(name) {
            None => Ok(None),
            Some(v) => match v.trim().parse::<u64>() {
                Ok(n) => Ok(Some(n)),
                Err(_) => bail!("{name}={v:?} is not a non-negative integer"),
            },
        }
    };
    let required = |name: &str, launcher: &str| -> Result<u64> {
        number(name)?
            .ok_or_else(|| candle_core::Error::Msg(format!("{launcher} launch: {name} is not set")))
    };
    let (launcher, rank, world, local, host, port) = if var("WORLD_SIZE").is_some() {
        let launcher = "torchrun";
        let world = required("WORLD_SIZE", launcher)?;
        if world == 1 {
            return Ok(None);
        }
        let rank = required("RANK", launcher)?;
        let local = number("LOCAL_RANK")?.unwrap_or(rank);
        let Some(host) = var("MASTER_ADDR").filter(|h| !h.trim().is_empty()) else {
            bail!("torchrun launch: MASTER_ADDR is not set")
        };
        let port = required("MASTER_PORT", launcher)?;
        let agent_store = var("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v == "True");
        let port = port.saturating_add(u64::from(agent_store));
        (launcher, rank, world, local, host, port)
    } else if var("SLURM_STEP_NUM_TASKS").is_some() {
        // The tasks of an `srun` step; a batch script's own shell (`SLURM_NTASKS` set, no step)
        // is one process, not a rank.
        let launcher = "slurm";
        let world = required("SLURM_STEP_NUM_TASKS", launcher)?;
        if world == 1 {
            return Ok(None);
        }
        let rank = required("SLURM_PROCID", launcher)?;
        let local = number("SLURM_LOCALID")?.unwrap_or(0);
        let host = match var("MASTER_ADDR").filter(|h| !h.trim().is_empty()) {
            Some(h) => h,
            None => {
                let (name, list) = match var("SLURM_JOB_NODELIST") {
                    Some(l) => ("SLURM_JOB_NODELIST", l),
                    None => match var("SLURM_NODELIST") {
                        Some(l) => ("SLURM_NODELIST", l),
                        None => {
                            bail!("slurm launch: neither MASTER_ADDR nor SLURM_JOB_NODELIST is set")
                        }
                    },
                };
                match first_host(&list) {
                    Some(h) => h,
                    None => bail!("{name}={list:?} is not a host list"),
                }
            }
        };
        let port = match number("MASTER_PORT")? {
            Some(p) => p,
            None => u64::from(slurm_port(required("SLURM_JOB_ID", launcher)?)),
        };
        (launcher, rank, world, local, host, port)
    } else {
        return Ok(None);
    };
    if world == 0 || rank >= world {
        bail!("{launcher} launch: rank {rank} is outside a world of {world}")
    }
    let Ok(port) = u16::try_from(port) else {
        bail!("{launcher} launch: port {port} is not a TCP port")
    };
    if port == 0 {
        bail!("{launcher} launch: port 0 is not a TCP port")
    }
    let host = host.trim();
    // An IPv6 address needs brackets in host:port.
    let addr = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    Ok(Some(Launch {
        rank: rank as usize,
        world_size: world as usize,
        local_rank: local as usize,
        rendezvous: Rendezvous::Tcp(addr),
        launcher,
    }))
}

impl Launch {
    /// The launch described by this process's environment, if any.
    pub fn from_env() -> Result<Option<Launch>> {
        launch_from(|name| std::env::var(name).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<Option<Launch>> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        launch_from(|k| map.get(k).cloned())
    }

    #[test]
    fn torchrun_variables_give_rank_world_and_the_masters_address() {
        let l = env(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.5"),
            ("MASTER_PORT", "29500"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((l.rank, l.world_size, l.local_rank), (3, 8, 1));
        assert_eq!(l.rendezvous, Rendezvous::Tcp("10.0.0.5:29500".into()));
        assert_eq!(l.launcher, "torchrun");
        // Under torchrun's agent store, the next port.
        let l = env(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "::1"),
            ("MASTER_PORT", "29500"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(l.rendezvous, Rendezvous::Tcp("[::1]:29501".into()));
        assert_eq!(l.local_rank, 0);
    }

    #[test]
    fn slurm_variables_give_the_first_node_and_a_port_from_the_job() {
        let l = env(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_STEP_NUM_TASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_JOB_NODELIST", "gpu[03-04,07],cpu1"),
            ("SLURM_JOB_ID", "123456"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((l.rank, l.world_size, l.local_rank), (5, 8, 1));
        assert_eq!(l.rendezvous, Rendezvous::Tcp("gpu03:23456".into()));
        assert_eq!(l.launcher, "slurm");
        let l = env(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_STEP_NUM_TASKS", "2"),
            ("SLURM_NODELIST", "node7"),
            ("MASTER_PORT", "4000"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(l.rendezvous, Rendezvous::Tcp("node7:4000".into()));
        // torchrun inside an allocation: its variables win.
        let l = env(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_STEP_NUM_TASKS", "4"),
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "9"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((l.launcher, l.rank, l.world_size), ("torchrun", 1, 2));
    }

    #[test]
    fn host_lists_expand_to_their_first_host() {
        for (list, first) in [
            ("node[01-04,07],gpu7", Some("node01")),
            ("a1,b2", Some("a1")),
            ("rack[2]-ib", Some("rack2-ib")),
            ("x[007-009]", Some("x007")),
            ("x[a-b]", None),
            ("x[01", None),
            ("", None),
        ] {
            assert_eq!(first_host(list).as_deref(), first, "{list}");
        }
    }

    #[test]
    fn no_launcher_is_none_and_bad_values_are_named() {
        assert_eq!(env(&[]).unwrap(), None);
        // One process, or a batch script's shell: no launch, whatever else is missing.
        assert_eq!(env(&[("WORLD_SIZE", "1")]).unwrap(), None);
        assert_eq!(env(&[("SLURM_STEP_NUM_TASKS", "1")]).unwrap(), None);
        assert_eq!(
            env(&[("SLURM_NTASKS", "8"), ("SLURM_PROCID", "0")]).unwrap(),
            None
        );
        for (pairs, says) in [
            (
                vec![
                    ("WORLD_SIZE", "2"),
                    ("RANK", "2"),
                    ("MASTER_ADDR", "h"),
                    ("MASTER_PORT", "1"),
                ],
                "rank 2 is outside a world of 2",
            ),
            (
                vec![("WORLD_SIZE", "two"), ("RANK", "0")],
                "WORLD_SIZE=\"two\"",
            ),
            (
                vec![("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "1")],
                "MASTER_ADDR is not set",
            ),
            (
                vec![
                    ("WORLD_SIZE", "2"),
                    ("RANK", "0"),
                    ("MASTER_ADDR", "h"),
                    ("MASTER_PORT", "70000"),
                ],
                "port 70000",
            ),
            (
                vec![
                    ("WORLD_SIZE", "2"),
                    ("RANK", "0"),
                    ("MASTER_ADDR", "h"),
                    ("MASTER_PORT", "18446744073709551615"),
                    ("TORCHELASTIC_USE_AGENT_STORE", "True"),
                ],
                "is not a TCP port",
            ),
            (
                vec![
                    ("SLURM_STEP_NUM_TASKS", "2"),
                    ("SLURM_PROCID", "0"),
                    ("SLURM_JOB_NODELIST", "n[1"),
                ],
                "SLURM_JOB_NODELIST=\"n[1\"",
            ),
            (
                vec![
                    ("SLURM_STEP_NUM_TASKS", "2"),
                    ("SLURM_PROCID", "0"),
                    ("SLURM_JOB_NODELIST", "n1"),
                ],
                "SLURM_JOB_ID is not set",
            ),
        ] {
            let err = env(&pairs).unwrap_err().to_string();
            assert!(err.contains(says), "{pairs:?}: {err}");
        }
    }
}
