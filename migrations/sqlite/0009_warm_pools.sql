-- Warm pools (issue 19). A workspace that claimed a pool member took the member's
-- uid; `claim` (JSON, crate::model::Claim) says which spec hash and time the claimed
-- container counts as provisioned with, until the next provision clears it.
-- Same as migrations/postgres/0012_warm_pools.sql.
ALTER TABLE workspaces ADD COLUMN claim TEXT;
