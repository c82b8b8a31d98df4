//! Maintenance.Status for the whole store, from every shard's.

use futures::future::join_all;
use ste_etcd_proto::pb::StatusResponse;

use crate::error::{StoreError, StoreResult};
use crate::store::{Store, MIN_REPORTED_ETCD_VERSION};

impl Store {
    pub async fn status(&self) -> StoreResult<StatusResponse> {
        let shards = self.shard_list();
        let answers = join_all(shards.iter().map(|s| s.status())).await;
        let mut db_size = 0;
        let mut db_size_in_use = 0;
        let mut db_size_quota = 0;
        let mut versions = Vec::new();
        let mut errors = Vec::new();
        for (shard, answer) in shards.iter().zip(answers) {
            match answer {
                Ok(status) => {
                    db_size += status.db_size;
                    db_size_in_use += status.db_size_in_use;
                    db_size_quota += status.db_size_quota;
                    versions.push(status.version);
                    errors.extend(
                        status
                            .errors
                            .into_iter()
                            .map(|e| format!("shard {}: {e}", shard.id)),
                    );
                }
                Err(err) => errors.push(format!("shard {} unreachable: {err}", shard.id)),
            }
        }
        if versions.is_empty() {
            return Err(StoreError::NotReady(format!(
                "no shard answered a status request: {}",
                errors.join("; ")
            )));
        }
        let version = versions
            .into_iter()
            .min_by_key(|v| version_key(v))
            .filter(|v| version_key(v) >= version_key(MIN_REPORTED_ETCD_VERSION))
            .unwrap_or_else(|| MIN_REPORTED_ETCD_VERSION.to_string());
        let revision = self.sequencer.published();
        Ok(StatusResponse {
            header: Some(self.header(revision)),
            version,
            db_size,
            leader: self.config.member_id,
            raft_index: revision as u64,
            raft_term: 1,
            raft_applied_index: revision as u64,
            errors,
            db_size_in_use,
            is_learner: false,
            storage_version: String::new(),
            db_size_quota,
            downgrade_info: None,
        })
    }
}

fn version_key(version: &str) -> Vec<u64> {
    version
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .take(3)
        .map(|s| s.parse().unwrap_or(0))
        .collect()
}
