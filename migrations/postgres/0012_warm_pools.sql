-- Warm pools (issue 19). A workspace that claimed a pool member took the member's
-- uid; `claim` (JSON, crate::model::Claim) says which spec hash and time the claimed
-- container counts as provisioned with, until the next provision clears it.
-- Same as migrations/sqlite/0009_warm_pools.sql; here WarmPool rows are also allowed
-- in desired_objects.
ALTER TABLE workspaces ADD COLUMN claim JSONB;
ALTER TABLE desired_objects DROP CONSTRAINT IF EXISTS desired_objects_kind_check;
ALTER TABLE desired_objects ADD CONSTRAINT desired_objects_kind_check
    CHECK (kind IN ('Workspace', 'Team', 'WarmPool'));
