//! c10d over Gloo on loopback: each test starts its ranks as child processes of this
//! test binary (`--exact NAME` with `BYOL_DIST_TEST_RANK` set), which run the worker
//! half of the same test.

use std::process::{Command, Output};
use std::time::Duration;

use byol_dist::{Backend, DistEnv, ProcessGroup};
use tch::{Device, Kind, Tensor};

const RANK_VAR: &str = "BYOL_DIST_TEST_RANK";

/// In a child: this worker's group. In the parent: `None`.
fn worker(world: usize, timeout_s: u64) -> Option<ProcessGroup> {
    let rank: usize = std::env::var(RANK_VAR).ok()?.parse().unwrap();
    tch::set_num_threads(1);
    let env = DistEnv {
        rank,
        world,
        local_rank: rank,
        local_world: world,
        master_addr: "127.0.0.1".into(),
        master_port: std::env::var("MASTER_PORT").unwrap().parse().unwrap(),
        agent_store: false,
        restart_count: 0,
    };
    Some(ProcessGroup::new(&env, Backend::Gloo, Duration::from_secs(timeout_s)).unwrap())
}

/// Starts `test` as `world` ranks (rank order), their output piped.
fn spawn_ranks(test: &str, world: usize) -> Vec<std::process::Child> {
    let port = byol_dist::launch::free_port().unwrap();
    let exe = std::env::current_exe().unwrap();
    (0..world)
        .map(|r| {
            Command::new(&exe)
                .args(["--exact", test, "--nocapture", "--test-threads", "1"])
                .env(RANK_VAR, r.to_string())
                .env("MASTER_PORT", port.to_string())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect()
}

/// Runs `test` as `world` ranks and returns their outputs (rank order).
fn run_ranks(test: &str, world: usize) -> Vec<Output> {
    spawn_ranks(test, world)
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect()
}

fn assert_all_passed(outs: &[Output]) {
    for (r, o) in outs.iter().enumerate() {
        assert!(
            o.status.success(),
            "rank {r} failed:\n{}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b).abs().max().double_value(&[]);
    d / b.abs().max().double_value(&[]).max(1e-30)
}

#[test]
fn collectives_agree_across_two_ranks() {
    let Some(pg) = worker(2, 60) else {
        return assert_all_passed(&run_ranks("collectives_agree_across_two_ranks", 2));
    };
    let r = pg.rank() as f64;
    let t = Tensor::from_slice(&[1.0f32 + r as f32, 10.0]);
    pg.all_reduce_sum(&[&t]).unwrap();
    assert_eq!(Vec::<f32>::try_from(&t).unwrap(), [3.0, 20.0]);
    let b = Tensor::from_slice(&[r, r * 2.0]);
    pg.broadcast(&b, 1).unwrap();
    assert_eq!(Vec::<f64>::try_from(&b).unwrap(), [1.0, 2.0]);
    let g = pg.all_gather(&Tensor::from_slice(&[r as i64; 3])).unwrap();
    assert_eq!(g.len(), 2);
    assert_eq!(Vec::<i64>::try_from(&g[1]).unwrap(), [1, 1, 1]);
    pg.barrier().unwrap();
    // Gradient averaging over buckets of mixed sizes, a 2-D one channels-last.
    let grads = vec![
        Tensor::full([3, 4], r + 1.0, (Kind::Float, Device::Cpu)),
        Tensor::full([2, 3, 2, 2], 2.0 * r, (Kind::Float, Device::Cpu))
            .contiguous()
            .permute([0, 2, 3, 1])
            .contiguous()
            .permute([0, 3, 1, 2]),
        Tensor::full([7_000_000], r, (Kind::Float, Device::Cpu)),
    ];
    pg.average_gradients(&grads).unwrap();
    assert_eq!(grads[0].mean(Kind::Double).double_value(&[]), 1.5);
    assert_eq!(grads[1].min().double_value(&[]), 1.0);
    assert_eq!(grads[1].max().double_value(&[]), 1.0);
    assert_eq!(grads[2].mean(Kind::Double).double_value(&[]), 0.5);
    assert_eq!(pg.sum_f64(&[r, 1.0], Device::Cpu).unwrap(), [1.0, 2.0]);
    assert!(pg.comm_seconds() > 0.0);
}

/// Fixed float64 input `[8, 3, 4, 5]` and a fixed weighting of the output, so that the
/// loss `Σ y·G` has a non-trivial gradient through the statistics.
fn bn_case() -> (Tensor, Tensor, Tensor, Tensor) {
    tch::manual_seed(7);
    let o = (Kind::Double, Device::Cpu);
    let x = Tensor::randn([8, 3, 4, 5], o) * 2.0 + 0.5;
    let g = Tensor::randn([8, 3, 4, 5], o);
    let w = Tensor::randn([3], o);
    let b = Tensor::randn([3], o);
    (x, g, w, b)
}

/// Single-process reference: `batch_norm` in training mode on `x`.
fn reference(x: &Tensor, g: &Tensor, w: &Tensor, b: &Tensor) -> [Tensor; 6] {
    let x = x.copy().set_requires_grad(true);
    let w = w.copy().set_requires_grad(true);
    let b = b.copy().set_requires_grad(true);
    let rm = Tensor::zeros([3], (Kind::Double, Device::Cpu));
    let rv = Tensor::ones([3], (Kind::Double, Device::Cpu));
    let y = x.batch_norm(
        Some(&w),
        Some(&b),
        Some(&rm),
        Some(&rv),
        true,
        0.1,
        1e-5,
        false,
    );
    (&y * g).sum(Kind::Double).backward();
    [y.detach(), x.grad(), w.grad(), b.grad(), rm, rv]
}

/// The same through SyncBatchNorm on this rank's rows `x[lo..lo+n]`.
fn synced(pg: &ProcessGroup, x: &Tensor, g: &Tensor, w: &Tensor, b: &Tensor) -> [Tensor; 6] {
    let x = x.copy().set_requires_grad(true);
    let w = w.copy().set_requires_grad(true);
    let b = b.copy().set_requires_grad(true);
    let rm = Tensor::zeros([3], (Kind::Double, Device::Cpu));
    let rv = Tensor::ones([3], (Kind::Double, Device::Cpu));
    let y = pg
        .sync_batch_norm(&x, Some(&w), Some(&b), Some((&rm, &rv)), 0.1, 1e-5)
        .unwrap();
    (&y * g).sum(Kind::Double).backward();
    [y.detach(), x.grad(), w.grad(), b.grad(), rm, rv]
}

#[test]
fn sync_batch_norm_at_world_one_equals_batch_norm() {
    let Some(pg) = worker(1, 60) else {
        return assert_all_passed(&run_ranks(
            "sync_batch_norm_at_world_one_equals_batch_norm",
            1,
        ));
    };
    let (x, g, w, b) = bn_case();
    let want = reference(&x, &g, &w, &b);
    let got = synced(&pg, &x, &g, &w, &b);
    for (name, (a, e)) in ["y", "dx", "dw", "db", "running_mean", "running_var"]
        .iter()
        .zip(got.iter().zip(&want))
    {
        let rel = max_rel(a, e);
        assert!(rel < 1e-10, "{name}: relative difference {rel:e}");
    }
}

#[test]
fn sync_batch_norm_on_two_ranks_equals_one_batch() {
    let Some(pg) = worker(2, 60) else {
        return assert_all_passed(&run_ranks(
            "sync_batch_norm_on_two_ranks_equals_one_batch",
            2,
        ));
    };
    let (x, g, w, b) = bn_case();
    let want = reference(&x, &g, &w, &b);
    let lo = 4 * pg.rank() as i64;
    let part = |t: &Tensor| t.narrow(0, lo, 4);
    let got = synced(&pg, &part(&x), &part(&g), &w, &b);
    // Forward and input gradient: this rank's rows of the full batch's.
    for (name, a, e) in [
        ("y", &got[0], part(&want[0])),
        ("dx", &got[1], part(&want[1])),
    ] {
        let rel = max_rel(a, &e);
        assert!(rel < 1e-10, "{name}: relative difference {rel:e}");
    }
    // Parameter gradients are per rank; their sum over ranks is the full batch's.
    for (name, i) in [("dw", 2), ("db", 3)] {
        let s = got[i].copy();
        pg.all_reduce_sum(&[&s]).unwrap();
        let rel = max_rel(&s, &want[i]);
        assert!(rel < 1e-10, "{name}: relative difference {rel:e}");
    }
    for (name, i) in [("running_mean", 4), ("running_var", 5)] {
        let rel = max_rel(&got[i], &want[i]);
        assert!(rel < 1e-10, "{name}: relative difference {rel:e}");
    }
    // Negative control: local statistics (plain batch_norm on the half) differ clearly.
    let local = reference(&part(&x), &part(&g), &w, &b);
    assert!(max_rel(&local[1], &part(&want[1])) > 1e-3);
}

#[test]
fn a_vanished_rank_is_named() {
    let Some(pg) = worker(2, 20) else {
        let outs = run_ranks("a_vanished_rank_is_named", 2);
        assert!(outs[1].status.success());
        let err = String::from_utf8_lossy(&outs[0].stderr);
        assert!(
            err.contains("all_reduce failed on rank 0 of 2")
                && err.contains("rank 1 (last reported step 1) stopped answering"),
            "rank 0 said:\n{err}"
        );
        return;
    };
    pg.report_step(1).unwrap();
    pg.barrier().unwrap();
    if pg.rank() == 1 {
        std::process::exit(0); // vanishes without a word
    }
    pg.report_step(2).unwrap();
    let t = Tensor::ones([4], (Kind::Float, Device::Cpu));
    let e = pg.all_reduce_sum(&[&t]).unwrap_err();
    eprintln!("{e}");
    std::process::exit(1);
}

/// A rank that hangs (alive, never joining the collective) makes the other fail after
/// the group's timeout, naming it.
#[test]
fn a_hanging_rank_is_named_after_the_timeout() {
    let Some(pg) = worker(2, 4) else {
        let outs = run_ranks("a_hanging_rank_is_named_after_the_timeout", 2);
        let err = String::from_utf8_lossy(&outs[0].stderr);
        assert!(
            err.contains("broadcast failed on rank 0 of 2")
                && err.contains("rank 1 (last reported step 7) stopped answering"),
            "rank 0 said:\n{err}"
        );
        return;
    };
    pg.report_step(7).unwrap();
    pg.barrier().unwrap();
    if pg.rank() == 1 {
        // Hangs past rank 0's timeout (4 s) and the grace that follows, then leaves.
        std::thread::sleep(Duration::from_secs(8));
        std::process::exit(0);
    }
    pg.report_step(8).unwrap();
    let t = Tensor::ones([4], (Kind::Float, Device::Cpu));
    let e = pg.broadcast(&t, 1).unwrap_err();
    eprintln!("{e}");
    std::process::exit(1);
}

/// The rank hosting the TCPStore freezes (SIGSTOP): the other fails after the timeout
/// and, since the store cannot answer either, says so within the diagnosis deadline
/// instead of waiting on the store for ever.
#[test]
fn a_frozen_store_host_does_not_hang_the_others() {
    let Some(pg) = worker(2, 4) else {
        let mut ranks = spawn_ranks("a_frozen_store_host_does_not_hang_the_others", 2);
        let other = ranks.pop().unwrap();
        let mut host = ranks.pop().unwrap();
        let t0 = std::time::Instant::now();
        let out = other.wait_with_output().unwrap();
        let took = t0.elapsed().as_secs_f64();
        host.kill().unwrap();
        host.wait().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("broadcast failed on rank 1 of 2") && err.contains("did not answer"),
            "rank 1 said:\n{err}"
        );
        // Timeout (4 s) + grace + deadline, with room for a slow machine.
        assert!(took < 60.0, "rank 1 took {took:.0} s");
        return;
    };
    pg.report_step(3).unwrap();
    pg.barrier().unwrap();
    if pg.rank() == 0 {
        // SAFETY: stops this process (the parent test kills it).
        unsafe { libc::raise(libc::SIGSTOP) };
        std::process::exit(0);
    }
    pg.report_step(4).unwrap();
    let t = Tensor::ones([4], (Kind::Float, Device::Cpu));
    let e = pg.broadcast(&t, 0).unwrap_err();
    eprintln!("{e}");
    std::process::exit(1);
}

/// Rank 0 works alone (a checkpoint, the kNN monitor) for longer than the collective
/// timeout: the other waits for it on the store and the next collective succeeds.
#[test]
fn rank0_work_longer_than_the_collective_timeout_does_not_fail_the_others() {
    let Some(pg) = worker(2, 2) else {
        let outs = run_ranks(
            "rank0_work_longer_than_the_collective_timeout_does_not_fail_the_others",
            2,
        );
        assert_all_passed(&outs);
        return;
    };
    pg.barrier().unwrap();
    if pg.rank() == 0 {
        std::thread::sleep(Duration::from_secs(5)); // 2.5 × the timeout
    }
    let t0 = std::time::Instant::now();
    pg.after_rank0_work("the test's work").unwrap();
    if pg.rank() == 1 {
        assert!(t0.elapsed() > Duration::from_secs(3));
        assert!(pg.comm_seconds() > 3.0, "the wait counts as communication");
    }
    let t = Tensor::ones([4], (Kind::Float, Device::Cpu));
    pg.all_reduce_sum(&[&t]).unwrap();
    assert_eq!(t.double_value(&[0]), 2.0);
    std::process::exit(0);
}

/// MASTER_PORT names a port where another program listens without answering: a rank
/// that is a client of the store fails within the timeout, naming the address and port
/// (c10d's client alone waits far longer).
#[test]
fn a_rank_joining_a_silent_port_fails_within_the_timeout() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in l.incoming() {
            held.push(c); // accepted, never answered
        }
    });
    let env = DistEnv {
        rank: 1,
        world: 2,
        local_rank: 1,
        local_world: 2,
        master_addr: "127.0.0.1".into(),
        master_port: port,
        agent_store: false,
        restart_count: 0,
    };
    let t0 = std::time::Instant::now();
    let e = ProcessGroup::new(&env, Backend::Gloo, Duration::from_secs(3)).unwrap_err();
    let took = t0.elapsed().as_secs_f64();
    let msg = e.to_string();
    assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
    assert!(took < 3.0 + 2.0 + 3.0, "took {took:.1} s: {msg}");
}
