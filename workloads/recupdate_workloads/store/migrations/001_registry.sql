-- Registry (docs/architecture.md), catalogue, interactions, and the indexes of versioned artefacts.
-- Runs with search_path set to the policy's schema; the vector extension lives in public.
CREATE TABLE runs (
    run_id      text PRIMARY KEY,
    kind        text NOT NULL CHECK (kind IN ('finetune', 'refresh', 'bootstrap')),
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    status      text NOT NULL CHECK (status IN ('running', 'succeeded', 'failed')),
    cost        jsonb NOT NULL DEFAULT '{}'::jsonb,
    error       text
);

CREATE TABLE releases (
    release_id    text PRIMARY KEY,
    base_model    text NOT NULL,
    adapter_uri   text,
    snapshot_id   bigint,
    table_version bigint,
    prompt_hash   text,
    metrics       jsonb NOT NULL DEFAULT '{}'::jsonb,
    gates         jsonb NOT NULL DEFAULT '{}'::jsonb,
    state         text NOT NULL CHECK (state IN ('candidate', 'active', 'rejected', 'retired')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    activated_at  timestamptz,
    run_id        text REFERENCES runs (run_id) ON DELETE SET NULL
);
-- At most one active release per schema.
CREATE UNIQUE INDEX releases_one_active ON releases ((true)) WHERE state = 'active';

CREATE TABLE clusters (
    cluster     integer PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    keywords    text[] NOT NULL DEFAULT '{}',
    embedding   public.vector(384)
);

CREATE TABLE items (
    item_id bigint PRIMARY KEY,
    cluster integer NOT NULL REFERENCES clusters (cluster)
);

CREATE TABLE interactions (
    user_id bigint NOT NULL,
    item_id bigint NOT NULL,
    ts      bigint NOT NULL,
    weight  real NOT NULL
);
CREATE INDEX interactions_ts ON interactions (ts);

-- Evidence snapshots: rows point at per-snapshot tables built aside and published atomically.
CREATE TABLE snapshots (
    snapshot_id    bigserial PRIMARY KEY,
    created_at     timestamptz NOT NULL DEFAULT now(),
    window_start   bigint NOT NULL,
    window_end     bigint NOT NULL,
    scoring        text NOT NULL CHECK (scoring IN ('frequency', 'trend')),
    top_r          integer NOT NULL,
    min_support    integer NOT NULL,
    triples        bigint NOT NULL DEFAULT 0,
    pairs          integer NOT NULL DEFAULT 0,
    borrowed_pairs integer NOT NULL DEFAULT 0,
    state          text NOT NULL CHECK (state IN ('building', 'current', 'retired', 'dropped'))
);
CREATE UNIQUE INDEX snapshots_one_current ON snapshots ((true)) WHERE state = 'current';

-- Transition tables: pair -> ranked clusters, one table per version.
CREATE TABLE transition_tables (
    table_version bigserial PRIMARY KEY,
    created_at    timestamptz NOT NULL DEFAULT now(),
    snapshot_id   bigint,
    adapter_uri   text,
    pairs         integer NOT NULL DEFAULT 0,
    state         text NOT NULL CHECK (state IN ('building', 'published', 'dropped'))
);
