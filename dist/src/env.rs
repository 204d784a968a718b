//! The distributed environment torchrun sets (and `byol train --nproc-per-node` sets for
//! its workers): `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`,
//! `MASTER_PORT`, `TORCHELASTIC_USE_AGENT_STORE`, `TORCHELASTIC_RESTART_COUNT`.

use crate::DistError;

/// One worker's place in the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    pub local_world: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// torchrun's agent hosts the TCPStore: every rank is a client.
    pub agent_store: bool,
    /// torchrun's restart count (the store prefix of this attempt).
    pub restart_count: u64,
}

impl DistEnv {
    /// Reads the process environment. `Ok(None)` when `WORLD_SIZE` is unset or 1: the
    /// single-process path.
    ///
    /// # Errors
    /// [`DistError::Env`] for a missing or malformed variable, naming it.
    pub fn from_env() -> Result<Option<DistEnv>, DistError> {
        DistEnv::from_lookup(|k| std::env::var(k).ok())
    }

    /// [`DistEnv::from_env`] over any lookup (tests).
    ///
    /// # Errors
    /// As [`DistEnv::from_env`].
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Option<DistEnv>, DistError> {
        let Some(world_s) = get("WORLD_SIZE") else {
            if let Some(r) = get("RANK") {
                return Err(bad("RANK", &r, "is set but WORLD_SIZE is not (launch with torchrun or `byol train --nproc-per-node N`, or unset RANK)"));
            }
            return Ok(None);
        };
        let world = parse::<usize>("WORLD_SIZE", &world_s)?;
        if world == 0 {
            return Err(bad("WORLD_SIZE", &world_s, "must be at least 1"));
        }
        if world == 1 {
            if let Some(r) = get("RANK").filter(|r| r.trim() != "0") {
                return Err(bad("RANK", &r, "must be 0 with WORLD_SIZE=1"));
            }
            return Ok(None);
        }
        let need = |k: &'static str| {
            get(k).ok_or_else(|| bad(k, "", "not set (WORLD_SIZE is; launch with torchrun or `byol train --nproc-per-node N`)"))
        };
        let rank_s = need("RANK")?;
        let rank = parse::<usize>("RANK", &rank_s)?;
        if rank >= world {
            return Err(bad(
                "RANK",
                &rank_s,
                &format!("must be below WORLD_SIZE={world}"),
            ));
        }
        let local_rank = match get("LOCAL_RANK") {
            Some(s) => parse("LOCAL_RANK", &s)?,
            None => rank,
        };
        let local_world = match get("LOCAL_WORLD_SIZE") {
            Some(s) => parse("LOCAL_WORLD_SIZE", &s)?,
            None => world,
        };
        if local_rank >= local_world.max(1) {
            return Err(bad(
                "LOCAL_RANK",
                &local_rank.to_string(),
                &format!("must be below LOCAL_WORLD_SIZE={local_world}"),
            ));
        }
        let master_addr = need("MASTER_ADDR")?;
        if master_addr.is_empty() {
            return Err(bad("MASTER_ADDR", "", "is empty"));
        }
        let port_s = need("MASTER_PORT")?;
        let master_port = parse::<u16>("MASTER_PORT", &port_s)?;
        if master_port == 0 {
            return Err(bad("MASTER_PORT", &port_s, "must be a port, 1 to 65535"));
        }
        let agent_store = match get("TORCHELASTIC_USE_AGENT_STORE") {
            None => false,
            Some(s) => match s.as_str() {
                "True" | "true" | "1" => true,
                "False" | "false" | "0" | "" => false,
                _ => {
                    return Err(bad(
                        "TORCHELASTIC_USE_AGENT_STORE",
                        &s,
                        "must be True or False",
                    ))
                }
            },
        };
        let restart_count = match get("TORCHELASTIC_RESTART_COUNT") {
            Some(s) => parse("TORCHELASTIC_RESTART_COUNT", &s)?,
            None => 0,
        };
        Ok(Some(DistEnv {
            rank,
            world,
            local_rank,
            local_world,
            master_addr,
            master_port,
            agent_store,
            restart_count,
        }))
    }
}

fn bad(var: &'static str, value: &str, reason: &str) -> DistError {
    DistError::Env {
        var,
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

fn parse<T: std::str::FromStr + num_bounds::Max>(
    var: &'static str,
    s: &str,
) -> Result<T, DistError> {
    if s.trim().is_empty() {
        return Err(bad(var, s, "is empty"));
    }
    s.trim().parse().map_err(|_| {
        bad(
            var,
            s,
            &format!("is not an integer from 0 to {}", T::MAX_TEXT),
        )
    })
}

mod num_bounds {
    /// The largest value of an integer type, as text for messages.
    pub trait Max {
        const MAX_TEXT: &'static str;
    }
    impl Max for usize {
        const MAX_TEXT: &'static str = "2^64 - 1";
    }
    impl Max for u16 {
        const MAX_TEXT: &'static str = "65535";
    }
    impl Max for u64 {
        const MAX_TEXT: &'static str = "2^64 - 1";
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<Option<DistEnv>, DistError> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        DistEnv::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn no_environment_or_world_one_is_single_process() {
        assert_eq!(env(&[]).unwrap(), None);
        assert_eq!(env(&[("WORLD_SIZE", "1"), ("RANK", "0")]).unwrap(), None);
    }

    #[test]
    fn torchrun_environment_is_read() {
        let e = env(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29500"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
            ("TORCHELASTIC_RESTART_COUNT", "2"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((e.rank, e.world, e.local_rank, e.local_world), (3, 4, 1, 2));
        assert!(e.agent_store);
        assert_eq!((e.master_port, e.restart_count), (29500, 2));
    }

    #[test]
    fn bad_variables_are_named() {
        let base = [
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "1"),
        ];
        let msg = |e: DistError| e.to_string();
        let e = env(&base).unwrap_err();
        assert!(msg(e).starts_with("RANK"), "missing RANK");
        let mut v = base.to_vec();
        v.push(("RANK", "2"));
        assert!(msg(env(&v).unwrap_err()).contains("below WORLD_SIZE=2"));
        let mut v = base.to_vec();
        v[2] = ("MASTER_PORT", "70000");
        v.push(("RANK", "0"));
        assert!(msg(env(&v).unwrap_err()).starts_with("MASTER_PORT=\"70000\""));
        assert!(msg(env(&[("WORLD_SIZE", "two")]).unwrap_err()).starts_with("WORLD_SIZE"));
        assert!(msg(env(&[("RANK", "1")]).unwrap_err()).contains("WORLD_SIZE is not"));
        assert!(msg(env(&[("WORLD_SIZE", "1"), ("RANK", "3")]).unwrap_err()).contains("must be 0"));
        let mut v = base.to_vec();
        v.push(("RANK", "0"));
        v[2] = ("MASTER_PORT", "0");
        assert!(msg(env(&v).unwrap_err()).contains("1 to 65535"));
        v[2] = ("MASTER_PORT", "");
        assert!(msg(env(&v).unwrap_err()).contains("is empty"));
        v[2] = ("MASTER_PORT", "1");
        v.push(("LOCAL_RANK", "3"));
        v.push(("LOCAL_WORLD_SIZE", "2"));
        assert!(msg(env(&v).unwrap_err()).contains("below LOCAL_WORLD_SIZE=2"));
    }
}
