import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import Database from 'better-sqlite3';
import { NotFoundError } from '../errors.js';
import { MIGRATIONS } from './migrations.js';

export interface AgentGroup {
  id: string;
  name: string;
  folder: string;
  provider: string | null;
}

export interface MessagingGroup {
  id: string;
  channelType: string;
  platformId: string;
  name: string | null;
}

export interface SessionRecord {
  id: string;
  agentGroupId: string;
  messagingGroupId: string | null;
  threadId: string;
  provider: string | null;
  status: string;
  containerStatus: string;
  lastActivity: string | null;
  createdAt: string;
}

export type Role = 'owner' | 'global_admin' | 'admin';

export interface Destination {
  name: string;
  displayName: string | null;
  type: 'channel' | 'agent';
  channelType: string | null;
  platformId: string | null;
  agentGroupId: string | null;
}

const FOLDER_PATTERN = /^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$/;

/**
 * The host database: agent groups, sessions, users and roles, messaging
 * groups and destinations. Safe to open from several processes at once:
 * WAL mode, a busy timeout, and creations written as insert-or-ignore so that
 * two processes creating the same row end with one.
 */
export class HostDb {
  readonly db: Database.Database;

  constructor(readonly file: string) {
    fs.mkdirSync(path.dirname(file), { recursive: true });
    this.db = new Database(file);
    this.db.pragma('journal_mode = WAL');
    this.db.pragma('busy_timeout = 10000');
    this.db.pragma('foreign_keys = ON');
    this.migrate();
  }

  close(): void {
    this.db.close();
  }

  private migrate(): void {
    this.db.exec(
      'CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)',
    );
    const apply = this.db.transaction((version: number, sql: string) => {
      const done = this.db.prepare('SELECT 1 FROM schema_migrations WHERE version = ?').get(version);
      if (done) return;
      this.db.exec(sql);
      this.db
        .prepare('INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)')
        .run(version, new Date().toISOString());
    });
    for (const [index, sql] of MIGRATIONS.entries()) {
      // IMMEDIATE takes the write lock first, so concurrent processes migrate one at a time.
      apply.immediate(index + 1, sql);
    }
  }

  /** Returns the agent group with this folder, creating it when absent. */
  ensureAgentGroup(folder: string, options: { name?: string; provider?: string | null } = {}): AgentGroup {
    if (!FOLDER_PATTERN.test(folder)) {
      throw new NotFoundError(
        `Invalid agent group folder "${folder}": use 1-64 letters, digits, "-" or "_", starting with a letter or digit.`,
      );
    }
    this.db
      .prepare(
        `INSERT INTO agent_groups (id, name, folder, provider, created_at) VALUES (?, ?, ?, ?, ?)
         ON CONFLICT (folder) DO NOTHING`,
      )
      .run(
        `ag-${randomUUID()}`,
        options.name ?? folder,
        folder,
        options.provider ?? null,
        new Date().toISOString(),
      );
    return this.getAgentGroupByFolder(folder)!;
  }

  getAgentGroupByFolder(folder: string): AgentGroup | undefined {
    return this.db
      .prepare('SELECT id, name, folder, provider FROM agent_groups WHERE folder = ?')
      .get(folder) as AgentGroup | undefined;
  }

  getAgentGroup(id: string): AgentGroup {
    const group = this.db
      .prepare('SELECT id, name, folder, provider FROM agent_groups WHERE id = ?')
      .get(id) as AgentGroup | undefined;
    if (!group) throw new NotFoundError(`Agent group "${id}" not found.`);
    return group;
  }

  listAgentGroups(): AgentGroup[] {
    return this.db
      .prepare('SELECT id, name, folder, provider FROM agent_groups ORDER BY folder')
      .all() as AgentGroup[];
  }

  setAgentGroupProvider(id: string, provider: string | null): void {
    this.db.prepare('UPDATE agent_groups SET provider = ? WHERE id = ?').run(provider, id);
  }

  /** Returns the messaging group for a channel and platform id, creating it when absent. */
  ensureMessagingGroup(channelType: string, platformId: string, name: string | null = null): MessagingGroup {
    this.db
      .prepare(
        `INSERT INTO messaging_groups (id, channel_type, platform_id, name) VALUES (?, ?, ?, ?)
         ON CONFLICT (channel_type, platform_id) DO NOTHING`,
      )
      .run(`mg-${randomUUID()}`, channelType, platformId, name);
    return this.db
      .prepare(
        `SELECT id, channel_type AS channelType, platform_id AS platformId, name
         FROM messaging_groups WHERE channel_type = ? AND platform_id = ?`,
      )
      .get(channelType, platformId) as MessagingGroup;
  }

  getMessagingGroup(id: string): MessagingGroup | undefined {
    return this.db
      .prepare(
        'SELECT id, channel_type AS channelType, platform_id AS platformId, name FROM messaging_groups WHERE id = ?',
      )
      .get(id) as MessagingGroup | undefined;
  }

  /** Returns the session of a group, messaging group and thread, creating it when absent. */
  ensureSession(agentGroupId: string, messagingGroupId: string | null, threadId = ''): SessionRecord {
    this.db
      .prepare(
        `INSERT INTO sessions (id, agent_group_id, messaging_group_id, thread_id, status, container_status, created_at)
         VALUES (?, ?, ?, ?, 'active', 'idle', ?)
         ON CONFLICT (agent_group_id, messaging_group_key, thread_id) DO NOTHING`,
      )
      .run(`sess-${randomUUID()}`, agentGroupId, messagingGroupId, threadId, new Date().toISOString());
    return this.db
      .prepare(`${SESSION_SELECT} WHERE agent_group_id = ? AND messaging_group_key = ? AND thread_id = ?`)
      .get(agentGroupId, messagingGroupId ?? '', threadId) as SessionRecord;
  }

  findSession(id: string): SessionRecord | undefined {
    return this.db.prepare(`${SESSION_SELECT} WHERE id = ?`).get(id) as SessionRecord | undefined;
  }

  /** Returns the session; throws NotFoundError naming the id and how to list sessions. */
  getSession(id: string): SessionRecord {
    const session = this.findSession(id);
    if (!session) {
      throw new NotFoundError(`Session "${id}" not found. Run "berth status" to list the known sessions.`);
    }
    return session;
  }

  listSessions(): SessionRecord[] {
    return this.db.prepare(`${SESSION_SELECT} ORDER BY created_at`).all() as SessionRecord[];
  }

  setSessionProvider(id: string, provider: string | null): void {
    this.db.prepare('UPDATE sessions SET provider = ? WHERE id = ?').run(provider, id);
  }

  updateSessionContainerStatus(id: string, containerStatus: string, lastActivity?: string): void {
    this.db
      .prepare(
        'UPDATE sessions SET container_status = ?, last_activity = COALESCE(?, last_activity) WHERE id = ?',
      )
      .run(containerStatus, lastActivity ?? null, id);
  }

  grantRole(userId: string, role: Role, agentGroupId: string | null = null): void {
    if (role === 'admin' && !agentGroupId) throw new Error('The admin role needs an agent group id.');
    this.db.prepare('INSERT INTO users (id) VALUES (?) ON CONFLICT (id) DO NOTHING').run(userId);
    this.db
      .prepare(
        'INSERT INTO user_roles (user_id, role, agent_group_id) VALUES (?, ?, ?) ON CONFLICT DO NOTHING',
      )
      .run(userId, role, role === 'admin' ? agentGroupId : '');
  }

  revokeRole(userId: string, role: Role, agentGroupId: string | null = null): void {
    this.db
      .prepare('DELETE FROM user_roles WHERE user_id = ? AND role = ? AND agent_group_id = ?')
      .run(userId, role, role === 'admin' ? agentGroupId : '');
  }

  /** Returns owners, global admins and admins of the group, each once, in a stable order. */
  adminUserIds(agentGroupId: string): string[] {
    const rows = this.db
      .prepare(
        `SELECT DISTINCT user_id FROM user_roles
         WHERE role IN ('owner', 'global_admin') OR (role = 'admin' AND agent_group_id = ?)
         ORDER BY user_id`,
      )
      .all(agentGroupId) as Array<{ user_id: string }>;
    return rows.map((row) => row.user_id);
  }

  addChannelDestination(
    agentGroupId: string,
    name: string,
    messagingGroupId: string,
    displayName?: string,
  ): void {
    this.db
      .prepare(
        `INSERT INTO destinations (agent_group_id, name, display_name, type, target_id) VALUES (?, ?, ?, 'channel', ?)
         ON CONFLICT (agent_group_id, name) DO UPDATE SET display_name = excluded.display_name, type = 'channel', target_id = excluded.target_id`,
      )
      .run(agentGroupId, name, displayName ?? null, messagingGroupId);
  }

  addAgentDestination(
    agentGroupId: string,
    name: string,
    targetAgentGroupId: string,
    displayName?: string,
  ): void {
    this.db
      .prepare(
        `INSERT INTO destinations (agent_group_id, name, display_name, type, target_id) VALUES (?, ?, ?, 'agent', ?)
         ON CONFLICT (agent_group_id, name) DO UPDATE SET display_name = excluded.display_name, type = 'agent', target_id = excluded.target_id`,
      )
      .run(agentGroupId, name, displayName ?? null, targetAgentGroupId);
  }

  /** Returns the group's destinations resolved to channel coordinates or agent group ids. */
  destinationsOf(agentGroupId: string): Destination[] {
    const rows = this.db
      .prepare(
        `SELECT d.name, d.display_name, d.type, d.target_id, m.channel_type, m.platform_id
         FROM destinations d LEFT JOIN messaging_groups m ON d.type = 'channel' AND m.id = d.target_id
         WHERE d.agent_group_id = ? ORDER BY d.name`,
      )
      .all(agentGroupId) as Array<{
      name: string;
      display_name: string | null;
      type: 'channel' | 'agent';
      target_id: string;
      channel_type: string | null;
      platform_id: string | null;
    }>;
    return rows.map((row) => ({
      name: row.name,
      displayName: row.display_name,
      type: row.type,
      channelType: row.type === 'channel' ? row.channel_type : null,
      platformId: row.type === 'channel' ? row.platform_id : null,
      agentGroupId: row.type === 'agent' ? row.target_id : null,
    }));
  }
}

const SESSION_SELECT = `SELECT id, agent_group_id AS agentGroupId, messaging_group_id AS messagingGroupId,
  thread_id AS threadId, provider, status, container_status AS containerStatus,
  last_activity AS lastActivity, created_at AS createdAt FROM sessions`;
