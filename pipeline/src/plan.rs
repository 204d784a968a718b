//! The epoch planner: each epoch's sample order as a pure function of
//! (seed, epoch, rank, world size), over row groups only (no image data).
//!
//! 1. The dataset's row groups are permuted with a generator seeded by (seed, epoch).
//! 2. Consecutive row groups of that permutation form windows of `window` row groups;
//!    the rows of each window are shuffled together. The reader only needs one window's
//!    row groups in memory at a time, so a dataset far larger than RAM still shuffles
//!    well (row groups already mix classes, since `byol-tools` stores rows in a seeded
//!    random order).
//! 3. The epoch's global sequence is cut into `world` contiguous, equal parts; rank `r`
//!    takes part `r`. The last `len % world` samples of the global sequence are dropped
//!    (a different set each epoch, since the order changes), so every rank sees the same
//!    number of samples and no sample is seen twice in an epoch.
//!
//! A [`Cursor`] (epoch, samples consumed) resumes by skipping into the rank's part:
//! nothing before it is read or decoded.
//!
//! Resuming an epoch at another world size (a node lost or added): each earlier world
//! size's progress is a [`Split`] (its world size and every rank's samples consumed). The
//! samples no rank had consumed, concatenated in rank order, are cut again into equal
//! contiguous parts for the new world size ([`resumed_order`]), so each is seen once
//! before the epoch ends (the last `remaining % world` are dropped, as at every epoch).

use serde::{Deserialize, Serialize};

use byol_format::rng::SplitMix64;

/// Where a run stands: epoch and samples of this rank's part already consumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Cursor {
    pub epoch: u64,
    pub consumed: u64,
}

/// How far every rank of an earlier world size got into an epoch before the run was
/// resumed with a different number of ranks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Split {
    pub world: usize,
    /// Samples each rank (rank order) had consumed of its part.
    pub consumed: Vec<u64>,
}

/// Rows of one row group (global row ids are `first_row .. first_row + rows`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupSpan {
    pub first_row: u64,
    pub rows: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanConfig {
    pub seed: u64,
    pub rank: usize,
    pub world: usize,
    /// Row groups shuffled together (the reader keeps this many open).
    pub window: usize,
}

/// A sample in a rank's epoch order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Planned {
    /// Global row id (row groups in manifest order, rows in file order).
    pub row: u64,
    /// Index into the row-group table.
    pub group: u32,
}

fn epoch_rng(seed: u64, epoch: u64, salt: u64) -> SplitMix64 {
    let mut s = SplitMix64::new(seed ^ 0x6279_6F6C_5F70_6C6E);
    let a = s.next_u64();
    SplitMix64::new(a ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt)
}

/// Samples per rank per epoch.
pub fn per_rank(total_rows: u64, world: usize) -> u64 {
    total_rows / world.max(1) as u64
}

/// This rank's order for `epoch`.
pub fn epoch_order(groups: &[GroupSpan], cfg: &PlanConfig, epoch: u64) -> Vec<Planned> {
    assert!(
        cfg.world >= 1 && cfg.rank < cfg.world,
        "rank {} of world {}",
        cfg.rank,
        cfg.world
    );
    let total: u64 = groups.iter().map(|g| g.rows).sum();
    let n = per_rank(total, cfg.world);
    let (lo, hi) = (cfg.rank as u64 * n, (cfg.rank as u64 + 1) * n);
    let mut perm: Vec<u32> = (0..groups.len() as u32).collect();
    epoch_rng(cfg.seed, epoch, 0).shuffle(&mut perm);
    let window = cfg.window.max(1);
    let mut out = Vec::with_capacity(n as usize);
    let mut pos = 0u64; // position of the window's first sample in the global sequence
    let mut rows: Vec<Planned> = Vec::new();
    for (w, chunk) in perm.chunks(window).enumerate() {
        let len: u64 = chunk.iter().map(|&g| groups[g as usize].rows).sum();
        if pos + len > lo && pos < hi {
            rows.clear();
            for &g in chunk {
                let sp = groups[g as usize];
                rows.extend(
                    (sp.first_row..sp.first_row + sp.rows).map(|row| Planned { row, group: g }),
                );
            }
            epoch_rng(cfg.seed, epoch, 1 + w as u64).shuffle(&mut rows);
            let a = lo.saturating_sub(pos) as usize;
            let b = (hi.min(pos + len) - pos) as usize;
            out.extend_from_slice(&rows[a..b]);
        }
        pos += len;
        if pos >= hi {
            break;
        }
    }
    out
}

/// `v` cut into `world` equal contiguous parts (the last `len % world` dropped).
fn cut(v: &[Planned], world: usize) -> Vec<&[Planned]> {
    let n = v.len() / world.max(1);
    (0..world).map(|r| &v[r * n..(r + 1) * n]).collect()
}

/// What no rank has consumed of one part list, in rank order.
fn remaining<'a>(parts: impl Iterator<Item = &'a [Planned]>, consumed: &[u64]) -> Vec<Planned> {
    parts
        .enumerate()
        .flat_map(|(r, p)| {
            let c = consumed.get(r).copied().unwrap_or(0) as usize;
            p[c.min(p.len())..].iter().copied()
        })
        .collect()
}

/// This rank's order for `epoch` when earlier world sizes consumed its first part
/// (`splits`, oldest first): the samples left after the last split, cut into
/// `cfg.world` equal parts. With no splits it is [`epoch_order`].
///
/// # Panics
/// `cfg.rank >= cfg.world`, or a split with world 0.
pub fn resumed_order(
    groups: &[GroupSpan],
    cfg: &PlanConfig,
    epoch: u64,
    splits: &[Split],
) -> Vec<Planned> {
    let Some((first, later)) = splits.split_first() else {
        return epoch_order(groups, cfg, epoch);
    };
    assert!(
        cfg.rank < cfg.world,
        "rank {} of world {}",
        cfg.rank,
        cfg.world
    );
    let parts: Vec<Vec<Planned>> = (0..first.world)
        .map(|rank| {
            let c = PlanConfig {
                rank,
                world: first.world,
                ..*cfg
            };
            epoch_order(groups, &c, epoch)
        })
        .collect();
    let mut rest = remaining(parts.iter().map(|p| p.as_slice()), &first.consumed);
    for s in later {
        rest = remaining(cut(&rest, s.world).into_iter(), &s.consumed);
    }
    cut(&rest, cfg.world)[cfg.rank].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn spans(sizes: &[u64]) -> Vec<GroupSpan> {
        let mut first = 0;
        sizes
            .iter()
            .map(|&rows| {
                let g = GroupSpan {
                    first_row: first,
                    rows,
                };
                first += rows;
                g
            })
            .collect()
    }

    #[test]
    fn order_is_deterministic_and_changes_with_epoch_and_seed() {
        let g = spans(&[10, 7, 13, 10, 1, 9]);
        let cfg = PlanConfig {
            seed: 3,
            rank: 0,
            world: 1,
            window: 2,
        };
        let a = epoch_order(&g, &cfg, 0);
        assert_eq!(a, epoch_order(&g, &cfg, 0));
        assert_eq!(a.len(), 50);
        assert_ne!(a, epoch_order(&g, &cfg, 1));
        assert_ne!(a, epoch_order(&g, &PlanConfig { seed: 4, ..cfg }, 0));
        let set: HashSet<u64> = a.iter().map(|p| p.row).collect();
        assert_eq!(set.len(), 50);
        for p in &a {
            let sp = g[p.group as usize];
            assert!(p.row >= sp.first_row && p.row < sp.first_row + sp.rows);
        }
    }

    /// Property test over sizes, ranks, seeds and windows: ranks are disjoint, equal in
    /// size, and together cover the epoch minus at most world-1 samples.
    #[test]
    fn ranks_are_disjoint_equal_and_cover_the_epoch() {
        let mut r = SplitMix64::new(11);
        for _case in 0..300 {
            let ngroups = 1 + r.below(12) as usize;
            let sizes: Vec<u64> = (0..ngroups).map(|_| r.below(40)).collect();
            let g = spans(&sizes);
            let total: u64 = sizes.iter().sum();
            let world = 1 + r.below(5) as usize;
            let window = 1 + r.below(4) as usize;
            let seed = r.next_u64();
            let epoch = r.below(10);
            let mut all = HashSet::new();
            let mut count = 0;
            for rank in 0..world {
                let o = epoch_order(
                    &g,
                    &PlanConfig {
                        seed,
                        rank,
                        world,
                        window,
                    },
                    epoch,
                );
                assert_eq!(
                    o.len() as u64,
                    total / world as u64,
                    "sizes {sizes:?} world {world}"
                );
                for p in &o {
                    assert!(all.insert(p.row), "row {} twice", p.row);
                }
                count += o.len();
            }
            assert_eq!(count as u64, total - total % world as u64);
            assert!(all.iter().all(|&row| row < total));
        }
    }

    /// The window keeps each stretch of the order inside `window` row groups.
    #[test]
    fn windows_bound_open_row_groups() {
        let g = spans(&[16; 20]);
        let cfg = PlanConfig {
            seed: 1,
            rank: 0,
            world: 1,
            window: 3,
        };
        let o = epoch_order(&g, &cfg, 5);
        for chunk in o.chunks(48) {
            let groups: HashSet<u32> = chunk.iter().map(|p| p.group).collect();
            assert!(groups.len() <= 3, "{groups:?}");
        }
    }

    /// Property test: an epoch interrupted at world sizes a, then b, and finished at c
    /// sees every sample once, minus fewer than `c` (plus the epoch's own remainder).
    #[test]
    fn a_resumed_epoch_at_any_world_size_sees_each_remaining_sample_once() {
        let mut r = SplitMix64::new(5);
        for _case in 0..200 {
            let g = spans(&(0..1 + r.below(8)).map(|_| r.below(30)).collect::<Vec<_>>());
            let total: u64 = g.iter().map(|s| s.rows).sum();
            let base = PlanConfig {
                seed: r.next_u64(),
                rank: 0,
                world: 1,
                window: 1 + r.below(3) as usize,
            };
            let epoch = r.below(4);
            let mut splits: Vec<Split> = Vec::new();
            let mut seen: Vec<u64> = Vec::new();
            for _ in 0..2 {
                let world = 1 + r.below(4) as usize;
                let mut consumed = Vec::new();
                for rank in 0..world {
                    let o = resumed_order(
                        &g,
                        &PlanConfig {
                            rank,
                            world,
                            ..base
                        },
                        epoch,
                        &splits,
                    );
                    let c = r.below(o.len() as u64 + 1).min(o.len() as u64);
                    seen.extend(o[..c as usize].iter().map(|p| p.row));
                    consumed.push(c);
                }
                splits.push(Split { world, consumed });
            }
            let world = 1 + r.below(4) as usize;
            for rank in 0..world {
                let o = resumed_order(
                    &g,
                    &PlanConfig {
                        rank,
                        world,
                        ..base
                    },
                    epoch,
                    &splits,
                );
                seen.extend(o.iter().map(|p| p.row));
            }
            let set: HashSet<u64> = seen.iter().copied().collect();
            assert_eq!(set.len(), seen.len(), "a sample seen twice");
            // Dropped: at most world-1 per cut (three cuts) plus the epoch remainder.
            assert!(
                total - seen.len() as u64 <= 3 * 3 + 3,
                "{} of {total} seen",
                seen.len()
            );
        }
    }
}
