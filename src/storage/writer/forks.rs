//! Forks on the writer thread (WRITE.md §5): making one (its source checked and its reference
//! count raised in the same batch as the fork), and removing a stream with the reference
//! counting that forks need (soft delete while forks read it, cascading removal of deleted
//! sources once their last fork goes). The writer is the only one to change metadata, and a
//! request that creates or removes a stream commits alone, so a count read here is the count.

use std::sync::Arc;

use super::State;
use crate::forks::MAX_DEPTH;
use crate::meta::{normalize, ForkOf, Framing, SharedMeta, StreamMeta};
use crate::storage::cache::StreamEntry;
use crate::storage::keys;
use crate::storage::tombstones::Ending;
use crate::storage::{now_ms, StorageError};
use crate::writes::Refusal;

/// A fork that may be made.
pub(super) struct ForkPlan {
    /// The fork point: the fork's base (its own messages follow it).
    pub(super) at: u64,
    pub(super) source: Arc<StreamEntry>,
    /// The source's metadata with one more fork.
    pub(super) source_meta: StreamMeta,
}

/// What a removal changed: metadata to publish and streams that left.
#[derive(Default)]
pub(super) struct Removal {
    pub(super) metas: Vec<(Arc<StreamEntry>, SharedMeta)>,
    pub(super) removed: Vec<Arc<str>>,
}

impl State {
    /// Checks a fork request against its source (WRITE.md §5.1, steps 4-6): the source
    /// exists, is not deleted, keeps its history (made by `PUT`), has the fork's content type,
    /// and holds the fork point.
    pub(super) fn plan_fork(
        &mut self,
        db: &sled::Db,
        fork: &ForkOf,
        content_type: &str,
    ) -> Result<Result<ForkPlan, Refusal>, StorageError> {
        let Some(source) = self.cache.get_or_load(db, &fork.source)? else {
            return Ok(Err(Refusal::ForkSourceNotFound));
        };
        let meta = source.meta();
        if meta.deleted {
            return Ok(Err(Refusal::ForkSourceDeleted));
        }
        if source.expired(&meta, now_ms()) {
            return Ok(Err(Refusal::ForkSourceNotFound));
        }
        if !meta.created {
            return Ok(Err(Refusal::ForkSourceTrimmed));
        }
        if normalize(content_type) != normalize(&meta.content_type) {
            return Ok(Err(Refusal::ContentTypeMismatch));
        }
        // The chain's first position is its root's base (the zero token's meaning).
        let mut root = source.clone();
        let mut depth = 1;
        while let Some(up) = root.meta().fork.clone() {
            depth += 1;
            if depth >= MAX_DEPTH {
                return Ok(Err(Refusal::ForkOffset(format!("the source is {MAX_DEPTH} forks deep already"))));
            }
            root = self.cache.get_or_load(db, &up.source)?.ok_or_else(|| crate::storage::corrupt("fork chain"))?;
        }
        let (start, tail) = (root.base, source.allocated.load(std::sync::atomic::Ordering::Acquire));
        let anchor = if fork.anchor == 0 { start } else { fork.anchor };
        if anchor < start || anchor > tail {
            let why = format!("not a position of the source stream (which holds {start} to {tail})");
            return Ok(Err(Refusal::ForkOffset(why)));
        }
        // JSON streams hold one value per position: a sub-offset moves the fork point. Byte
        // streams get the prefix as the fork's first message (the HTTP layer cut it).
        let at = match Framing::of(content_type) {
            Framing::Json => anchor.saturating_add(fork.sub),
            Framing::Raw => anchor,
        };
        if at > tail {
            let why = format!("{} is past the {} values after the fork offset", fork.sub, tail - anchor);
            return Ok(Err(Refusal::ForkSubOffset(why)));
        }
        let source_meta = StreamMeta { forks: meta.forks + 1, ..(*meta).clone() };
        Ok(Ok(ForkPlan { at, source, source_meta }))
    }

    /// Adds the removal of `entry`'s stream to `batch`: a soft delete while forks read it,
    /// else every key (and its tombstone, if `ending`), releasing its source, which goes too
    /// if it was deleted and this was its last fork (and so on up the chain).
    pub(super) fn remove_stream(
        &self,
        db: &sled::Db,
        batch: &mut sled::Batch,
        entry: &Arc<StreamEntry>,
        ending: Option<Ending>,
        out: &mut Removal,
    ) -> Result<(), StorageError> {
        let meta = entry.meta();
        if meta.forks > 0 {
            let deleted = StreamMeta { deleted: true, ..(*meta).clone() };
            batch.insert(&keys::meta_key(entry.id)[..], deleted.encode());
            out.metas.push((entry.clone(), Arc::new(deleted)));
            return Ok(());
        }
        self.remove_keys(db, batch, entry, ending)?;
        out.removed.push(entry.name.clone());
        let mut up = meta.fork.clone();
        while let Some(fork) = up.take() {
            let Some(source) = self.cache.get_or_load(db, &fork.source)? else {
                log::error!("fork source {:?} of a removed stream is missing", fork.source);
                break;
            };
            let current = match out.metas.iter().position(|(e, _)| Arc::ptr_eq(e, &source)) {
                Some(i) => out.metas.remove(i).1,
                None => source.meta(),
            };
            let forks = current.forks.saturating_sub(1);
            if forks == 0 && current.deleted {
                self.remove_keys(db, batch, &source, Some(Ending::Ended))?;
                out.removed.push(source.name.clone());
                up = current.fork.clone();
            } else {
                let released = StreamMeta { forks, ..(*current).clone() };
                batch.insert(&keys::meta_key(source.id)[..], released.encode());
                out.metas.push((source, Arc::new(released)));
            }
        }
        Ok(())
    }
}
