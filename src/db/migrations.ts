/**
 * Numbered migrations of the host database, applied in order and recorded in
 * schema_migrations. Append new ones; never edit one that has shipped.
 */
export const MIGRATIONS: readonly string[] = [
  `
  CREATE TABLE agent_groups (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    folder     TEXT NOT NULL UNIQUE,
    provider   TEXT,
    created_at TEXT NOT NULL
  );
  CREATE TABLE messaging_groups (
    id           TEXT PRIMARY KEY,
    channel_type TEXT NOT NULL,
    platform_id  TEXT NOT NULL,
    name         TEXT,
    UNIQUE (channel_type, platform_id)
  );
  CREATE TABLE sessions (
    id                  TEXT PRIMARY KEY,
    agent_group_id      TEXT NOT NULL REFERENCES agent_groups (id),
    messaging_group_id  TEXT REFERENCES messaging_groups (id),
    messaging_group_key TEXT GENERATED ALWAYS AS (COALESCE(messaging_group_id, '')) STORED,
    thread_id           TEXT NOT NULL DEFAULT '',
    provider            TEXT,
    status              TEXT NOT NULL,
    container_status    TEXT NOT NULL,
    last_activity       TEXT,
    created_at          TEXT NOT NULL,
    UNIQUE (agent_group_id, messaging_group_key, thread_id)
  );
  CREATE TABLE users (
    id           TEXT PRIMARY KEY,
    display_name TEXT
  );
  CREATE TABLE user_roles (
    user_id        TEXT NOT NULL REFERENCES users (id),
    role           TEXT NOT NULL CHECK (role IN ('owner', 'global_admin', 'admin')),
    agent_group_id TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (user_id, role, agent_group_id)
  );
  CREATE TABLE destinations (
    agent_group_id TEXT NOT NULL REFERENCES agent_groups (id),
    name           TEXT NOT NULL,
    display_name   TEXT,
    type           TEXT NOT NULL CHECK (type IN ('channel', 'agent')),
    target_id      TEXT NOT NULL,
    PRIMARY KEY (agent_group_id, name)
  );
  `,
];
