//! The single writer: takes the workers' results back in storage order, fills shards,
//! and records progress after each completed shard.

use std::collections::BTreeMap;
use std::path::Path;

use byol_format::fs::write_atomic;
use byol_format::image::Prepared;
use byol_format::progress::Progress as Display;
use byol_format::shards::{Skipped, Totals};

use super::output::OpenShard;
use super::resume::{Progress, PROGRESS};
use super::{ShardError, ShardOptions, SkipReason};
use crate::source::{Item, Source};

/// A worker's result for the item at a position of the storage order.
pub(super) type Done = (usize, Result<Prepared, SkipReason>);

/// Writes results in storage order into shards; `state` is the run's progress, updated
/// as each shard completes.
pub(super) struct Writer<'a> {
    pub source: &'a Source,
    pub out: &'a Path,
    pub opts: &'a ShardOptions,
    /// The storage order: item indices by position.
    pub order: &'a [usize],
    pub state: &'a mut Progress,
    pub bar: &'a Display,
}

/// The shard being filled and its counters, merged into the progress when it completes.
struct Current {
    open: Option<OpenShard>,
    totals: Totals,
    skipped: Vec<Skipped>,
}

impl Writer<'_> {
    /// Receives every result from position `state.next_pos` on, in any order, and
    /// stores them in order; after each, lets the feeder send one more job (`tokens`).
    ///
    /// # Errors
    /// A shard or the progress file cannot be written, or the workers stopped early.
    pub fn run(
        mut self,
        results: crossbeam_channel::Receiver<Done>,
        tokens: crossbeam_channel::Sender<()>,
    ) -> Result<(), ShardError> {
        let n = self.order.len();
        let mut next = self.state.next_pos;
        let mut pending: BTreeMap<usize, Result<Prepared, SkipReason>> = BTreeMap::new();
        let mut cur = Current {
            open: None,
            totals: Totals {
                per_class: vec![0; self.source.classes.len()],
                ..Totals::default()
            },
            skipped: Vec::new(),
        };
        while next < n {
            let (pos, r) = results.recv().map_err(|_| ShardError::WorkerDied)?;
            pending.insert(pos, r);
            while let Some(r) = pending.remove(&next) {
                let item = &self.source.items[self.order[next]];
                match r {
                    Ok(p) => self.store(&mut cur, item, p, next)?,
                    Err(SkipReason::SourceFile(why)) => {
                        return Err(ShardError::Refused(format!(
                            "{why} (row {} of the source): the file cannot be read, so none of its rows would be stored; fix or remove it",
                            item.key
                        )))
                    }
                    Err(reason) => {
                        tracing::warn!(key = %item.key, %reason, "skipped");
                        cur.skipped.push(Skipped {
                            key: item.key.clone(),
                            reason: reason.to_string(),
                        });
                    }
                }
                next += 1;
                self.bar.inc(1);
                if !cur.skipped.is_empty() || !self.state.skipped.is_empty() {
                    let skipped = self.state.skipped.len() + cur.skipped.len();
                    self.bar.set_message(format!("{skipped} skipped"));
                }
                // Let the feeder run one more item ahead; it may already have finished.
                let _ = tokens.try_send(());
            }
        }
        match cur.open.take() {
            Some(sh) => self.complete(sh, n, &mut cur)?,
            None => {
                merge(self.state, &mut cur);
                self.state.next_pos = n;
            }
        }
        Ok(())
    }

    /// Adds the prepared image of `item` (at position `pos`) to the open shard, opening
    /// one if needed and completing it when full.
    fn store(
        &mut self,
        cur: &mut Current,
        item: &Item,
        p: Prepared,
        pos: usize,
    ) -> Result<(), ShardError> {
        let opts = self.opts;
        let sh = match &mut cur.open {
            Some(sh) => sh,
            None => cur.open.insert(OpenShard::create(
                self.out,
                self.state.shards.len(),
                opts.row_group_rows,
            )?),
        };
        if p.kept {
            cur.totals.kept_original += 1;
        } else {
            cur.totals.reencoded += 1;
        }
        cur.totals.image_bytes += p.bytes.len() as u64;
        if item.label >= 0 {
            cur.totals.per_class[item.label as usize] += 1;
        } else {
            cur.totals.unlabeled += 1;
        }
        sh.push(&item.key, item.label, p);
        if sh.buffered() >= opts.row_group_rows {
            sh.flush_row_group()?;
        }
        let full = opts.rows_per_shard.is_some_and(|r| sh.rows >= r)
            || opts.shard_bytes.is_some_and(|b| sh.image_bytes >= b);
        if full {
            let done = cur.open.take().ok_or(ShardError::WorkerDied)?;
            self.complete(done, pos + 1, cur)?;
        }
        Ok(())
    }

    /// Closes the shard `sh`, merges its counters into the progress and records that the
    /// next shard starts at position `next_pos`.
    fn complete(
        &mut self,
        sh: OpenShard,
        next_pos: usize,
        cur: &mut Current,
    ) -> Result<(), ShardError> {
        let info = sh.finish(self.out)?;
        tracing::debug!(file = %info.file, rows = info.rows, "shard complete");
        self.state.shards.push(info);
        self.state.next_pos = next_pos;
        merge(self.state, cur);
        let text =
            serde_json::to_string(&self.state).map_err(|e| ShardError::Refused(e.to_string()))?;
        write_atomic(&self.out.join(PROGRESS), text.as_bytes())?;
        Ok(())
    }
}

/// Adds the current shard's counters and skips to `state`, and zeroes them.
fn merge(state: &mut Progress, cur: &mut Current) {
    let (t, c) = (&mut state.totals, &mut cur.totals);
    t.kept_original += c.kept_original;
    t.reencoded += c.reencoded;
    t.image_bytes += c.image_bytes;
    t.unlabeled += c.unlabeled;
    for (a, b) in t.per_class.iter_mut().zip(c.per_class.iter_mut()) {
        *a += *b;
        *b = 0;
    }
    c.kept_original = 0;
    c.reencoded = 0;
    c.image_bytes = 0;
    c.unlabeled = 0;
    state.skipped.append(&mut cur.skipped);
}
