//! Where a run stands — step, data cursor, augmentation generator — and how each rank
//! finds its place again from a checkpoint, at the same or another world size.

use byol_dist::ProcessGroup;
use byol_pipeline::augment::SplitMix64;
use byol_pipeline::{Cursor, Split};
use tch::{Device, Tensor};

use crate::error::Result;
use crate::run::{CheckpointState, RankState};

/// What a checkpoint stores of a loop's place (besides the networks).
#[derive(Debug, Clone)]
pub struct Position {
    /// Steps trained (the global step).
    pub step: u64,
    /// This rank's place in the data.
    pub cursor: Cursor,
    /// How earlier world sizes consumed the current epoch (empty but after a resume at
    /// another world size).
    pub splits: Vec<Split>,
    /// This rank's augmentation generator.
    pub rng: SplitMix64,
    /// The last step's loss (NaN before the first).
    pub last_loss: f64,
}

impl Position {
    /// The start of a new run for `rank`.
    pub fn start(seed: u64, rank: usize) -> Position {
        Position {
            step: 0,
            cursor: Cursor::default(),
            splits: Vec::new(),
            rng: rank_generator(seed, rank),
            last_loss: f64::NAN,
        }
    }

    /// Rank `rank` of `world`'s place after checkpoint state `st` (see [`rank_position`]).
    pub fn resumed(st: &CheckpointState, rank: usize, world: usize) -> Position {
        let (cursor, rng, splits) = rank_position(st, rank, world);
        Position {
            step: st.step,
            cursor,
            splits,
            rng,
            last_loss: st.last_loss,
        }
    }

    /// The `state.json` of a checkpoint at this position, with the run's `config` and
    /// every rank's place (`world`, `ranks`: see [`Position::gather`]).
    pub fn checkpoint_state(
        &self,
        config: &crate::config::TrainConfig,
        world: usize,
        ranks: Vec<RankState>,
    ) -> CheckpointState {
        CheckpointState {
            step: self.step,
            cursor: self.cursor,
            aug_rng: self.rng.state(),
            last_loss: self.last_loss,
            config: config.clone(),
            world,
            ranks,
            splits: self.splits.clone(),
        }
    }

    /// Moves to the start of the next epoch.
    pub fn next_epoch(&mut self) {
        self.cursor = Cursor {
            epoch: self.cursor.epoch + 1,
            consumed: 0,
        };
        self.splits.clear();
    }

    /// Every rank's cursor and generator, rank order (a collective with a group; empty
    /// for one process), and the world size.
    ///
    /// # Errors
    /// A failed `all_gather`.
    pub fn gather(
        &self,
        group: Option<&ProcessGroup>,
        device: Device,
    ) -> Result<(usize, Vec<RankState>)> {
        let Some(g) = group else {
            return Ok((1, Vec::new()));
        };
        let mine = [
            self.cursor.epoch as i64,
            self.cursor.consumed as i64,
            self.rng.state() as i64,
        ];
        let all = g.all_gather(&Tensor::from_slice(&mine).to_device(device))?;
        let mut ranks = Vec::with_capacity(all.len());
        for t in all {
            let v = Vec::<i64>::try_from(t.to_device(Device::Cpu))?;
            ranks.push(RankState {
                cursor: Cursor {
                    epoch: v[0] as u64,
                    consumed: v[1] as u64,
                },
                aug_rng: v[2] as u64,
            });
        }
        Ok((g.world(), ranks))
    }
}

/// Rank `rank`'s augmentation generator for a new run: rank 0's is the one-process
/// generator, the others are seeded from (seed, rank).
pub fn rank_generator(seed: u64, rank: usize) -> SplitMix64 {
    SplitMix64::new(
        seed ^ 0x00A5_5A00_B10B_5EED ^ (rank as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
    )
}

/// Where rank `rank` of `world` resumes from checkpoint state `st`: its cursor,
/// generator and the epoch's earlier splits. The same world size continues each rank
/// exactly; another world size re-partitions what no rank has consumed of the current
/// epoch (adding a [`Split`]), and new ranks get generators derived from rank 0's.
pub fn rank_position(
    st: &CheckpointState,
    rank: usize,
    world: usize,
) -> (Cursor, SplitMix64, Vec<Split>) {
    let ranks = if st.ranks.is_empty() {
        vec![RankState {
            cursor: st.cursor,
            aug_rng: st.aug_rng,
        }]
    } else {
        st.ranks.clone()
    };
    let old = ranks.len();
    let rng = match ranks.get(rank) {
        Some(r) => SplitMix64::new(r.aug_rng),
        None => {
            SplitMix64::new(ranks[0].aug_rng ^ (rank as u64).wrapping_mul(0xD1B5_4A32_D192_ED03))
        }
    };
    if old == world {
        return (ranks[rank].cursor, rng, st.splits.clone());
    }
    let epoch = ranks[0].cursor.epoch;
    let consumed: Vec<u64> = ranks.iter().map(|r| r.cursor.consumed).collect();
    let mut splits = st.splits.clone();
    if !(splits.is_empty() && consumed.iter().all(|&c| c == 0)) {
        splits.push(Split {
            world: old,
            consumed,
        });
    }
    (Cursor { epoch, consumed: 0 }, rng, splits)
}
