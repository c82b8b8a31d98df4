//! Range: the revision a read is at, each shard's cut at it, the shards'
//! answers (and the batch overlay) merged into one page.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::join_all;
use ste_etcd_proto::mvccpb::{event::EventType, KeyValue};
use ste_etcd_proto::pb::{
    range_request::{SortOrder, SortTarget},
    RangeRequest, RangeResponse,
};

use crate::error::{StoreError, StoreResult};
use crate::history::key_in_range;
use crate::keys::{clamp_range, next_key};
use crate::shard::kv::translate_kv;
use crate::shard::{CutLookup, Shard};
use crate::store::Store;

impl Store {
    /// Resolves a requested read revision (0 = current) against the window.
    pub(crate) fn read_revision(&self, requested: i64) -> StoreResult<i64> {
        let current = self.sequencer.published();
        if requested <= 0 {
            return Ok(current);
        }
        if requested > current {
            return Err(StoreError::FutureRevision);
        }
        if requested < self.history.compact_revision()
            || requested < self.range_floor.load(Ordering::Acquire)
        {
            return Err(StoreError::Compacted);
        }
        Ok(requested)
    }

    pub async fn range(&self, req: RangeRequest) -> StoreResult<RangeResponse> {
        self.check_open()?;
        if req.key.is_empty() {
            return Err(StoreError::EmptyKey);
        }
        check_range_options(&req)?;
        if let Some(answer) = self.cached_range(&req) {
            return Ok(answer);
        }
        let (revision, reads) = self.plan_read(&req).await?;
        // Keys are spread evenly, so a page of `limit` needs about limit/n keys
        // from each shard: ask for a little more than that and fetch the rest
        // of a shard only if the merge shows it may hold keys of the page.
        let lazy = req.limit > 0
            && !req.count_only
            && reads.len() > 1
            && req.sort_order != SortOrder::Descend as i32
            && reads
                .iter()
                .all(|(_, cut)| matches!(cut, CutLookup::At(_) | CutLookup::Empty));
        let first_limit = if lazy {
            let n = reads.len() as i64;
            (req.limit / n + req.limit / (4 * n) + 16).min(req.limit)
        } else {
            req.limit
        };
        let answers = join_all(
            reads
                .iter()
                .map(|(shard, cut)| self.read_shard_at(shard, &req, *cut, revision, first_limit)),
        )
        .await;
        let mut count = 0;
        let mut parts = Vec::with_capacity(answers.len());
        for answer in answers {
            let (shard_count, shard_kvs, shard_more) = answer?;
            count += shard_count;
            parts.push((shard_kvs, shard_more));
        }
        if lazy {
            loop {
                let mut fetched: Vec<&Bytes> = parts
                    .iter()
                    .flat_map(|(kvs, _)| kvs.iter().map(|kv| &kv.key))
                    .collect();
                // The page ends at the limit-th key fetched so far (or is open-ended).
                let boundary = if fetched.len() >= req.limit as usize {
                    fetched.sort();
                    Some(fetched[req.limit as usize - 1].clone())
                } else {
                    None
                };
                let behind: Vec<usize> = parts
                    .iter()
                    .enumerate()
                    .filter(|(_, (kvs, more))| {
                        *more
                            && match (kvs.last(), &boundary) {
                                (Some(last), Some(boundary)) => last.key < *boundary,
                                _ => true,
                            }
                    })
                    .map(|(i, _)| i)
                    .collect();
                if behind.is_empty() {
                    break;
                }
                let more = join_all(behind.iter().map(|&i| {
                    let (shard, cut) = &reads[i];
                    let after = parts[i].0.last().map(|kv| next_key(&kv.key));
                    let next = RangeRequest {
                        key: after.unwrap_or_else(|| req.key.clone()),
                        ..req.clone()
                    };
                    async move {
                        self.read_shard_at(shard, &next, *cut, revision, first_limit)
                            .await
                    }
                }))
                .await;
                for (&i, answer) in behind.iter().zip(more) {
                    let (_, shard_kvs, shard_more) = answer?;
                    parts[i].0.extend(shard_kvs);
                    parts[i].1 = shard_more;
                }
            }
        }
        let mut kvs: Vec<KeyValue> = parts.into_iter().flat_map(|(kvs, _)| kvs).collect();
        if req.count_only {
            kvs.clear();
        } else {
            kvs.sort_by(|a, b| a.key.cmp(&b.key));
            if req.sort_order == SortOrder::Descend as i32 {
                kvs.reverse();
            }
        }
        let mut more = false;
        if req.limit > 0 && kvs.len() > req.limit as usize {
            kvs.truncate(req.limit as usize);
        }
        if req.limit > 0 && !req.count_only && count > kvs.len() as i64 {
            more = true;
        }
        if req.range_end.is_empty() && !req.keys_only {
            if let Some(kv) = kvs.first() {
                self.remember_read(kv);
            }
        }
        if req.keys_only {
            for kv in &mut kvs {
                kv.value = Bytes::new();
            }
        }
        // A Range at revision 0 answers with the revision its data was read
        // at. A later one (what is published by now) would be ahead of the
        // data: kube-apiserver lists, then watches from this header, and
        // would never see the writes in between. A Range at an explicit
        // revision answers, like etcd, with the current revision (the
        // client knows what it asked; headers never go back).
        let header = if req.revision > 0 {
            self.sequencer.published().max(revision)
        } else {
            revision
        };
        Ok(RangeResponse {
            header: Some(self.header(header)),
            kvs,
            more,
            count,
        })
    }

    /// The revision a Range reads at, and each shard's cut at it. A read at
    /// revision 0 never answers ErrCompacted (etcd would not): if it raced
    /// a shard's history being reset (the shard lost its data and was just
    /// reconciled at g), it reads again once g is published.
    async fn plan_read(
        &self,
        req: &RangeRequest,
    ) -> StoreResult<(i64, Vec<(Arc<Shard>, CutLookup)>)> {
        for _ in 0..3 {
            let revision = self.read_revision(req.revision)?;
            let shards = if req.range_end.is_empty() {
                let located = self.shard_for_key(&req.key)?;
                // Looked up before checking for moves: a move updates the index
                // only after raising `last_move`.
                if revision < self.last_move.load(Ordering::Acquire) {
                    self.shard_list()
                } else {
                    vec![located]
                }
            } else {
                self.shard_list()
            };
            let mut reads = Vec::new();
            let mut reset_at = None;
            for shard in &shards {
                let removed_at = shard.removed_at.load(Ordering::Acquire);
                if removed_at != 0 && revision >= removed_at {
                    continue;
                }
                shard.require_loaded()?;
                let (cut, first) = {
                    let cuts = shard.cuts.lock().expect("cuts lock");
                    (cuts.at(revision), cuts.first_revision())
                };
                if req.revision <= 0 && cut == CutLookup::Unknown {
                    reset_at = first;
                    break;
                }
                reads.push((shard.clone(), cut));
            }
            match reset_at {
                None => return Ok((revision, reads)),
                Some(g) => {
                    let _ = tokio::time::timeout(
                        self.config.shard_timeout,
                        self.sequencer.wait_published(g),
                    )
                    .await;
                }
            }
        }
        Err(StoreError::unavailable(
            "(several)",
            "a shard's history is being reset after it lost its data; retry",
        ))
    }

    /// One shard's part of a Range at global `revision`: its count and kvs
    /// (with global revisions), at most `limit` + what the batch overlay needs.
    async fn read_shard_at(
        &self,
        shard: &Shard,
        req: &RangeRequest,
        cut: CutLookup,
        revision: i64,
        limit: i64,
    ) -> StoreResult<(i64, Vec<KeyValue>, bool)> {
        let Some((key, range_end)) = clamp_range(&req.key, &req.range_end) else {
            return Ok((0, Vec::new(), false));
        };
        let read = |shard_revision: i64, extra: i64| {
            shard.range(RangeRequest {
                key: key.clone(),
                range_end: range_end.clone(),
                limit: if limit > 0 { limit + extra } else { 0 },
                revision: shard_revision,
                count_only: req.count_only,
                ..Default::default()
            })
        };
        let translate_all = |answer: RangeResponse| -> StoreResult<(i64, Vec<KeyValue>, bool)> {
            let kvs = answer
                .kvs
                .into_iter()
                .map(|kv| translate_kv(&shard.id, kv))
                .collect::<StoreResult<Vec<_>>>()?;
            Ok((answer.count, kvs, answer.more))
        };
        match cut {
            CutLookup::Unknown => Err(StoreError::Compacted),
            CutLookup::Empty => Ok((0, Vec::new(), false)),
            CutLookup::At(shard_revision) => {
                let answer = read(shard_revision, 0)
                    .await
                    .map_err(|e| shard_read_error(shard, e))?;
                translate_all(answer)
            }
            CutLookup::Within { base, from } => {
                // The batch's events up to `revision`, applied to the shard before the batch.
                let overlay = self.history.read(from, revision, |e| {
                    key_in_range(e.key(), &req.key, &req.range_end)
                })?;
                let (mut count, kvs, more) = match base {
                    Some(shard_revision) => translate_all(
                        read(shard_revision, overlay.len() as i64)
                            .await
                            .map_err(|e| shard_read_error(shard, e))?,
                    )?,
                    None => (0, Vec::new(), false),
                };
                let last_read = kvs.last().map(|kv| kv.key.clone());
                let mut by_key: BTreeMap<Bytes, KeyValue> =
                    kvs.into_iter().map(|kv| (kv.key.clone(), kv)).collect();
                for stored in overlay {
                    let existed = stored.event.prev_kv.is_some();
                    let Some(kv) = stored.event.kv.clone() else {
                        continue;
                    };
                    if stored.event.r#type == EventType::Put as i32 {
                        if !existed {
                            count += 1;
                        }
                        if !req.count_only {
                            by_key.insert(kv.key.clone(), kv);
                        }
                    } else {
                        if existed {
                            count -= 1;
                        }
                        by_key.remove(&kv.key);
                    }
                }
                if more {
                    // Keys past the last one read may have others before them on the shard.
                    if let Some(last) = last_read {
                        by_key.retain(|key, _| *key <= last);
                    }
                }
                Ok((count, by_key.into_values().collect(), more))
            }
        }
    }
}

/// What a shard's refusal of a read at one of its revisions means to the client:
/// - "compacted": our own concurrent Compact won the race, ErrCompacted;
/// - "future revision": the shard is behind a revision it answered before,
///   so its etcd lost its data and is being reconciled: Unavailable, so the
///   client retries (etcd's own ErrFutureRev would be a lie: the revision
///   the client asked is not in the future).
fn shard_read_error(shard: &Shard, err: StoreError) -> StoreError {
    match err {
        StoreError::ShardRejected(status) if status.message().contains("compacted") => {
            StoreError::Compacted
        }
        StoreError::ShardRejected(status) if status.message().contains("future revision") => {
            StoreError::unavailable(
                shard.id.as_str(),
                "its etcd lost its data and is being reconciled; retry",
            )
        }
        other => other,
    }
}

pub(crate) fn check_range_options(req: &RangeRequest) -> StoreResult<()> {
    let sort_by_key = req.sort_target == SortTarget::Key as i32;
    match SortOrder::try_from(req.sort_order) {
        Ok(SortOrder::None) | Ok(SortOrder::Ascend) if sort_by_key || req.sort_order == 0 => {}
        Ok(SortOrder::Descend) if sort_by_key && req.limit == 0 => {}
        _ => {
            return Err(StoreError::Unsupported(format!(
                "range sorting other than by key (sort_order={}, sort_target={}; descending only without limit)",
                req.sort_order, req.sort_target
            )))
        }
    }
    if req.min_mod_revision != 0
        || req.max_mod_revision != 0
        || req.min_create_revision != 0
        || req.max_create_revision != 0
    {
        return Err(StoreError::Unsupported(
            "range filters on min/max mod or create revision".into(),
        ));
    }
    Ok(())
}
