//! `byol train --nproc-per-node N`: starts N local workers of the same command with
//! torchrun's environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`,
//! `MASTER_ADDR=127.0.0.1`, `MASTER_PORT` = a free port, and `OMP_NUM_THREADS` = the
//! cores divided by N unless set), so that a single-node user needs
//! no Python. Each worker runs in its own process group: a terminal's Ctrl-C reaches the
//! launcher only, which forwards every SIGINT/SIGTERM to all workers (they then stop
//! after the same step, see the trainer). Worker stderr lines are prefixed `[rank R]`;
//! rank 0's stdout (the `--json` summary) passes through unchanged, other ranks' stdout
//! is prefixed. When a worker fails, the launcher names it, stops the others (SIGTERM,
//! then SIGKILL after [`LaunchOptions::grace`]) and exits non-zero: with the exit code
//! of the worker that failed first when it exited (a config or data error: 2), 130 after
//! a second signal, else 1 (the first failure was a signal). Workers still running [`LaunchOptions::stop_timeout`] after a
//! forwarded signal are killed. A worker whose launcher dies gets SIGHUP
//! (`PR_SET_PDEATHSIG`), a stop request, and libtorch's C++ warnings are off unless
//! `TORCH_CPP_LOG_LEVEL` is set.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{DistError, Result};

/// Environment variables of an outer launcher that must not leak into the workers.
const CLEARED: &[&str] = &[
    "TORCHELASTIC_USE_AGENT_STORE",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_RUN_ID",
    "GROUP_RANK",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
];

#[derive(Debug, Clone)]
pub struct LaunchOptions {
    /// Workers to start (the world size).
    pub nproc: usize,
    /// The program and its arguments (the same command without `--nproc-per-node`).
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// How long stopped workers get between SIGTERM and SIGKILL.
    pub grace: Duration,
    /// How long workers get to stop after a forwarded SIGINT/SIGTERM before SIGKILL.
    pub stop_timeout: Duration,
}

/// Removes `--nproc-per-node N` / `--nproc-per-node=N` from a command line.
pub fn without_nproc_flag(args: &[OsString]) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut skip = false;
    for a in args {
        if skip {
            skip = false;
            continue;
        }
        let s = a.to_string_lossy();
        if s == "--nproc-per-node" {
            skip = true;
        } else if !s.starts_with("--nproc-per-node=") {
            out.push(a.clone());
        }
    }
    out
}

/// A free TCP port on 127.0.0.1 (bound, then released for rank 0's TCPStore).
///
/// # Errors
/// No port could be bound.
pub fn free_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with code {c}"),
        (None, Some(s)) => format!("was killed by signal {s}"),
        _ => "ended".into(),
    }
}

fn pipe_lines<R: Read + Send + 'static>(
    r: R,
    prefix: Option<String>,
    to_stdout: bool,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(r);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let mut buf = Vec::with_capacity(line.len() + 12);
            if let Some(p) = &prefix {
                buf.extend_from_slice(p.as_bytes());
            }
            buf.extend_from_slice(&line);
            if !buf.ends_with(b"\n") {
                buf.push(b'\n');
            }
            // A closed terminal must not kill the launcher.
            let _ = if to_stdout {
                std::io::stdout().lock().write_all(&buf)
            } else {
                std::io::stderr().lock().write_all(&buf)
            };
        }
    })
}

fn signal_all(children: &[Child], alive: &[bool], sig: i32) {
    for (c, &a) in children.iter().zip(alive) {
        if a {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }
}

/// Runs the workers to completion; returns the launcher's exit code: 0 when every worker
/// exited 0, else the code of the worker that failed first, or 1 when a signal ended it
/// (130 after a second forwarded signal). The failing worker is named on stderr.
///
/// # Errors
/// A worker could not be started, or no free port was found.
pub fn run(opts: &LaunchOptions) -> Result<i32> {
    let n = opts.nproc;
    if n == 0 {
        return Err(DistError::Launch(
            "--nproc-per-node must be at least 1".into(),
        ));
    }
    let port = free_port().map_err(|e| DistError::Launch(format!("finding a free port: {e}")))?;
    let signals = Arc::new(AtomicUsize::new(0));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let s = Arc::clone(&signals);
        // SAFETY: the handler only touches an atomic.
        unsafe {
            signal_hook::low_level::register(sig, move || {
                s.fetch_add(1, Ordering::SeqCst);
            })
        }
        .map_err(|e| DistError::Launch(format!("installing signal handlers: {e}")))?;
    }
    eprintln!(
        "byol: starting {n} workers (MASTER_ADDR=127.0.0.1 MASTER_PORT={port}, Gloo/NCCL by device)"
    );
    // Like torchrun, keep n workers from each starting one libtorch thread per core:
    // each gets its share of the cores unless OMP_NUM_THREADS is set.
    let cores = byol_format::cores();
    let omp = std::env::var("OMP_NUM_THREADS").unwrap_or_else(|_| (cores / n).max(1).to_string());
    let mut children = Vec::with_capacity(n);
    let mut pipes = Vec::new();
    for rank in 0..n {
        let mut cmd = Command::new(&opts.program);
        cmd.args(&opts.args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env("OMP_NUM_THREADS", &omp)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if std::env::var_os("TORCH_CPP_LOG_LEVEL").is_none() {
            // libtorch's c10d warnings (one per connection retry, with a C++ stack) would
            // bury byol's own one-line errors.
            cmd.env("TORCH_CPP_LOG_LEVEL", "ERROR");
        }
        for v in CLEARED {
            cmd.env_remove(v);
        }
        // SAFETY: prctl(2) is async-signal-safe; it runs in the child before exec.
        // A worker whose launcher dies (even by SIGKILL) gets SIGHUP, which byol train
        // takes as a stop request however often it comes (it can come more than once):
        // it stops after the same step as the others, with a checkpoint.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGHUP);
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(source) => {
                let alive = vec![true; children.len()];
                signal_all(&children, &alive, libc::SIGKILL);
                for c in children.iter_mut() {
                    let _ = Child::wait(c);
                }
                return Err(DistError::Spawn { rank, source });
            }
        };
        let out = child.stdout.take().expect("piped");
        let err = child.stderr.take().expect("piped");
        let out_prefix = (rank > 0).then(|| format!("[rank {rank}] "));
        pipes.push(pipe_lines(out, out_prefix, true));
        pipes.push(pipe_lines(err, Some(format!("[rank {rank}] ")), false));
        children.push(child);
    }
    let mut alive = vec![true; n];
    let mut forwarded = 0usize;
    // The first failure: its description and exit code (None: ended by a signal).
    let mut failed: Option<(String, Option<i32>)> = None;
    let mut kill_at: Option<Instant> = None;
    let mut stop_deadline: Option<Instant> = None;
    while alive.iter().any(|&a| a) {
        let got = signals.load(Ordering::SeqCst);
        if got > forwarded {
            if forwarded == 0 {
                eprintln!("byol: signal received; forwarding it to the workers (they stop after the same step and checkpoint; a second signal stops them at once, without one)");
                stop_deadline = Some(Instant::now() + opts.stop_timeout);
            } else {
                eprintln!("byol: second signal: the workers stop at once, without a checkpoint");
            }
            forwarded = got;
            signal_all(&children, &alive, libc::SIGINT);
        }
        if stop_deadline.is_some_and(|t| Instant::now() >= t) {
            eprintln!(
                "byol: workers still running {} s after the signal are killed",
                opts.stop_timeout.as_secs()
            );
            signal_all(&children, &alive, libc::SIGKILL);
            stop_deadline = None;
        }
        // Failures seen in one round: the root cause is preferably a worker killed by a
        // signal other than SIGABRT (the others abort when a peer vanishes), then one
        // that exited non-zero.
        let mut round: Vec<(u8, usize, String, Option<i32>)> = Vec::new();
        for (rank, c) in children.iter_mut().enumerate() {
            if !alive[rank] {
                continue;
            }
            if let Ok(Some(status)) = c.try_wait() {
                alive[rank] = false;
                if !status.success() {
                    let what = format!("worker rank {rank} (pid {}) {}", c.id(), describe(status));
                    let priority = match status.signal() {
                        Some(libc::SIGABRT) => 2,
                        Some(_) => 0,
                        None => 1,
                    };
                    round.push((priority, rank, what, status.code()));
                }
            }
        }
        round.sort();
        for (_, _, what, code) in round {
            if failed.is_none() {
                eprintln!("byol: {what}; stopping the other workers");
                failed = Some((what, code));
                signal_all(&children, &alive, libc::SIGTERM);
                kill_at = Some(Instant::now() + opts.grace);
            } else {
                eprintln!("byol: {what}");
            }
        }
        if kill_at.is_some_and(|t| Instant::now() >= t) {
            for (rank, c) in children.iter().enumerate().filter(|(r, _)| alive[*r]) {
                eprintln!(
                    "byol: worker rank {rank} (pid {}) did not stop within {} s and is killed (it may hang)",
                    c.id(),
                    opts.grace.as_secs()
                );
            }
            signal_all(&children, &alive, libc::SIGKILL);
            kill_at = None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for p in pipes {
        let _ = p.join();
    }
    Ok(match failed {
        None => 0,
        Some(_) if forwarded >= 2 => {
            eprintln!("byol: interrupted twice: the workers stopped without a final checkpoint (the run keeps its last complete one)");
            130
        }
        // The root cause's own code (a config or data error is 2 on every rank, but the
        // others may be stopped before they reach it): deterministic whatever the timing.
        Some((what, code)) => {
            eprintln!("byol: the job failed: {what}");
            code.filter(|&c| c != 0).unwrap_or(1)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nproc_flag_is_removed_in_both_forms() {
        let a: Vec<OsString> = [
            "train",
            "--nproc-per-node",
            "2",
            "--out",
            "r",
            "--nproc-per-node=3",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        let b: Vec<String> = without_nproc_flag(&a)
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect();
        assert_eq!(b, ["train", "--out", "r"]);
    }

    /// Regression: a config error that rank 0 reached first made the launcher exit 1,
    /// not 2, when the others were stopped before reaching it.
    #[test]
    fn a_config_error_exits_with_its_code_when_the_other_workers_are_stopped_first() {
        let opts = LaunchOptions {
            nproc: 2,
            program: "/bin/sh".into(),
            args: vec![
                "-c".into(),
                "if [ \"$RANK\" = 0 ]; then exit 2; else exec sleep 60; fi".into(),
            ],
            grace: Duration::from_secs(5),
            stop_timeout: Duration::from_secs(5),
        };
        let t0 = Instant::now();
        assert_eq!(run(&opts).unwrap(), 2);
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "rank 1 was not stopped"
        );
    }
}
