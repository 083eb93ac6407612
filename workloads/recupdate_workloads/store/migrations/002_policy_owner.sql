-- The policy that owns this schema: one row, claimed by the first policy that uses the schema (the operator
-- on reconcile, before it launches any run; local mode; or a job), so that two policies never share one.
-- IF NOT EXISTS: the operator creates this table itself (same definition, operator/recupdate_operator/
-- registry.py) when it claims a schema no job has migrated yet.
CREATE TABLE IF NOT EXISTS policy_owner (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    namespace  text NOT NULL,
    name       text NOT NULL,
    uid        text NOT NULL DEFAULT '',
    claimed_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
