//! The step loop driven by a loop other than BYOL's: a linear classifier on the
//! canvases, with its own step, metrics row and checkpoint, through the same runtime,
//! batch plan, position, stop signal and cadence `byol train` uses.

use std::path::{Path, PathBuf};

use byol_pipeline::loader::Batch;
use byol_pipeline::{Dataset, Loader};
use byol_trainer::config::{DeviceChoice, TrainConfig};
use byol_trainer::error::Result;
use byol_trainer::run::{self, RankState};
use byol_trainer::train::step_loop::{Interval, Step, StepOutput};
use byol_trainer::train::{
    BatchPlan, Cadence, LoopContext, Position, Runtime, StepLoop, StopSignal,
};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

/// Softmax regression on 32×32 canvases, plain SGD.
struct Linear {
    run: PathBuf,
    vs: nn::VarStore,
    lin: nn::Linear,
    saved: Vec<u64>,
}

impl Step for Linear {
    fn step(&mut self, b: &mut Batch, _pos: &mut Position) -> Result<StepOutput> {
        let x = b.images().to_kind(Kind::Float).flatten(1, -1) / 255.0;
        let y = Tensor::from_slice(b.labels());
        let logits = self.lin.forward(&x);
        let loss = logits.cross_entropy_for_logits(&y);
        let correct = logits.argmax(1, false).eq_tensor(&y).sum(Kind::Float);
        for mut v in self.vs.trainable_variables() {
            v.zero_grad();
        }
        loss.backward();
        tch::no_grad(|| {
            for mut v in self.vs.trainable_variables() {
                let g = v.grad();
                let _ = v.f_sub_(&(g * 0.1)).expect("sgd");
            }
        });
        Ok(StepOutput {
            loss: loss.double_value(&[]),
            sums: vec![correct.double_value(&[])],
        })
    }

    fn report(&mut self, pos: &Position, i: &Interval) -> Result<(serde_json::Value, String)> {
        let acc = i.sums[0] / i.images as f64;
        let row = serde_json::json!({ "step": pos.step, "loss": pos.last_loss, "acc": acc });
        Ok((row, format!("acc {acc:.3}")))
    }

    fn save(&mut self, pos: &Position, world: usize, ranks: Vec<RankState>) -> Result<PathBuf> {
        assert_eq!((world, ranks.len()), (1, 0), "one process gathers nothing");
        let state = serde_json::json!({ "step": pos.step, "epoch": pos.cursor.epoch });
        let dir = run::write_checkpoint(&self.run, pos.step, 100, |tmp| {
            self.vs.save(tmp.join("linear.safetensors"))?;
            run::write_state(tmp, &state)
        })?;
        self.saved.push(pos.step);
        Ok(dir)
    }
}

fn run_loop(
    run: &Path,
    loader: &Loader,
    (rt, plan): (&Runtime, BatchPlan),
    (pos, stop_at, stop): (Position, u64, StopSignal),
    step: &mut Linear,
) -> byol_trainer::train::LoopSummary {
    let ctx = LoopContext {
        run,
        rt,
        group: None,
        batch: plan,
        stop,
        latest: None,
        progress: false,
        name: "linear",
        max_decode_failure_rate: 0.01,
        tracking: byol_trainer::run::Tracking {
            tensorboard: true,
            mlflow: None,
        },
    };
    let cadence = Cadence {
        total: 3 * loader.batches_per_epoch(),
        stop_at,
        log_every: 2,
        checkpoint_every: 3,
    };
    let mut lp = StepLoop::new(ctx, pos, cadence, loader).expect("loop");
    lp.run(loader, step).expect("run");
    lp.finish(loader, step).expect("finish")
}

/// Rows every `log_every` steps, checkpoints every `checkpoint_every` steps, at the
/// epoch end and at the stop; a stop signal ends the loop before its next step without
/// a new checkpoint; a loop resumed from the position continues the epochs.
#[test]
fn a_loop_other_than_byols_drives_the_step_loop() {
    let tmp = tempfile::tempdir().unwrap();
    let data = super::train::dataset_of(tmp.path(), "src", "ds", 128, 4);
    let run = tmp.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    let mut cfg = TrainConfig::default();
    cfg.train.device = DeviceChoice::Cpu;
    cfg.train.batch = 16;
    cfg.data.canvas = 32;
    cfg.data.decode_threads = 1;
    let rt = Runtime::local(&cfg.train).unwrap();
    let plan = BatchPlan::new(cfg.train.batch, &rt).unwrap();
    assert_eq!((plan.per_rank, plan.world, plan.images(3)), (16, 1, 48));
    let ds = Dataset::open(&data).unwrap();
    let loader = Loader::new(
        ds,
        plan.loader_config(&cfg),
        byol_pipeline::opencv_decoder(),
    )
    .unwrap();
    assert_eq!(loader.batches_per_epoch(), 8);
    let vs = nn::VarStore::new(Device::Cpu);
    let lin = nn::linear(vs.root() / "fc", 3 * 32 * 32, 4, Default::default());
    let mut step = Linear {
        run: run.clone(),
        vs,
        lin,
        saved: Vec::new(),
    };

    let s = run_loop(
        &run,
        &loader,
        (&rt, plan),
        (Position::start(0, 0), 10, StopSignal::new()),
        &mut step,
    );
    assert_eq!((s.step, s.epoch, s.images), (10, 1, 160));
    assert!(s.last_loss.is_finite() && !s.stopped_by_signal);
    // Every 3 steps, the epoch end (8) and the stop (10).
    assert_eq!(step.saved, [3, 6, 8, 9, 10]);
    let on_disk: Vec<Option<u64>> = run::list_checkpoints(&run)
        .iter()
        .map(|p| run::checkpoint_step(p))
        .collect();
    assert_eq!(on_disk, [3, 6, 8, 9, 10].map(Some));
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(run::metrics_path(&run))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let steps: Vec<u64> = rows.iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [2, 4, 6, 8, 10]);
    assert!(rows
        .iter()
        .all(|r| (0.0..=1.0).contains(&r["acc"].as_f64().unwrap())));

    // A stop asked for before the next step: nothing trained, no new checkpoint.
    let stop = StopSignal::new();
    stop.set();
    let mut pos = Position::start(0, 0);
    pos.step = 10;
    pos.cursor = byol_pipeline::Cursor {
        epoch: 1,
        consumed: 32,
    };
    let s = run_loop(
        &run,
        &loader,
        (&rt, plan),
        (pos.clone(), 24, stop),
        &mut step,
    );
    assert_eq!(s.step, 10);
    assert!(s.stopped_by_signal);
    assert_eq!(step.saved.len(), 5);

    // Resumed from the position, the loop finishes epoch 1 and stops at 20.
    let s = run_loop(
        &run,
        &loader,
        (&rt, plan),
        (pos, 20, StopSignal::new()),
        &mut step,
    );
    assert_eq!((s.step, s.epoch, s.images), (20, 2, 160));
    assert_eq!(step.saved, [3, 6, 8, 9, 10, 12, 15, 16, 18, 20]);
}
