-- What each workspace's agent last reported to the registry (register, update-card,
-- heartbeat), as the original platform's runtimes send it: one JSON document per
-- workspace (crate::model::AgentReport). Same as migrations/sqlite/0008_agent_reports.sql.
CREATE TABLE agent_reports (
    workspace_uid TEXT PRIMARY KEY NOT NULL,
    report        TEXT NOT NULL
);
