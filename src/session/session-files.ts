import fs from 'node:fs';
import path from 'node:path';
import Database from 'better-sqlite3';
import type { Destination } from '../db/host-db.js';
import { INBOUND_SCHEMA, OUTBOUND_SCHEMA } from './schema.js';
import { parseTimestamp } from '../lifecycle/timestamps.js';

/**
 * The files of one session folder, as the container contract defines them.
 *
 * Every function opens its database, does one thing and closes it again: a
 * connection kept open across a bind mount serves stale pages once the other
 * side writes. The host writes only inbound.db, except that it creates
 * outbound.db's schema and clears claims while no container runs.
 */
export const SESSION_FILES = {
  inbound: 'inbound.db',
  outbound: 'outbound.db',
  heartbeat: '.heartbeat',
  closeRequest: '.close-request',
} as const;

export interface InboundMessage {
  id: string;
  kind: string;
  content: unknown;
  platformId?: string | null;
  channelType?: string | null;
  threadId?: string | null;
  timestamp?: string;
}

export interface OutboundMessage {
  id: string;
  seq: number | null;
  inReplyTo: string | null;
  timestamp: string;
  kind: string;
  platformId: string | null;
  channelType: string | null;
  threadId: string | null;
  content: string;
}

export interface ProcessingClaimRow {
  messageId: string;
  status: string;
  statusChanged: string;
}

export interface SessionRouting {
  channelType: string | null;
  platformId: string | null;
  threadId: string | null;
}

type Mode = 'read' | 'write';

function open(file: string, mode: Mode): Database.Database {
  const db = new Database(file, { readonly: mode === 'read', fileMustExist: mode === 'read' });
  db.pragma('busy_timeout = 5000');
  return db;
}

function withDb<T>(file: string, mode: Mode, work: (db: Database.Database) => T): T {
  const db = open(file, mode);
  try {
    return work(db);
  } finally {
    db.close();
  }
}

export function inboundPath(sessionDir: string): string {
  return path.join(sessionDir, SESSION_FILES.inbound);
}

export function outboundPath(sessionDir: string): string {
  return path.join(sessionDir, SESSION_FILES.outbound);
}

/**
 * Creates the session folder, both databases with their schemas and the
 * heartbeat file. Idempotent: existing files and rows are kept.
 */
export function initSessionFiles(sessionDir: string): void {
  fs.mkdirSync(sessionDir, { recursive: true });
  for (const [file, schema] of [
    [inboundPath(sessionDir), INBOUND_SCHEMA],
    [outboundPath(sessionDir), OUTBOUND_SCHEMA],
  ] as const) {
    withDb(file, 'write', (db) => {
      db.pragma('journal_mode = DELETE');
      db.exec(schema);
    });
  }
  const heartbeat = path.join(sessionDir, SESSION_FILES.heartbeat);
  if (!fs.existsSync(heartbeat)) fs.writeFileSync(heartbeat, '');
}

/** Writes one message into messages_in with the next even sequence number; a repeated id is ignored. */
export function insertInboundMessage(
  sessionDir: string,
  message: InboundMessage,
): { inserted: boolean; seq: number } {
  return withDb(inboundPath(sessionDir), 'write', (db) =>
    db
      .transaction(() => {
        const existing = db.prepare('SELECT seq FROM messages_in WHERE id = ?').get(message.id) as
          { seq: number } | undefined;
        if (existing) return { inserted: false, seq: existing.seq };

        // The host takes even sequence numbers and the container odd ones, so the two never collide.
        const { maxSeq } = db
          .prepare('SELECT COALESCE(MAX(seq), 0) AS maxSeq FROM messages_in WHERE seq % 2 = 0')
          .get() as {
          maxSeq: number;
        };
        const seq = maxSeq + 2;
        db.prepare(
          `INSERT INTO messages_in (id, seq, kind, timestamp, status, platform_id, channel_type, thread_id, content)
         VALUES (?, ?, ?, ?, 'pending', ?, ?, ?, ?)`,
        ).run(
          message.id,
          seq,
          message.kind,
          message.timestamp ?? new Date().toISOString(),
          message.platformId ?? null,
          message.channelType ?? null,
          message.threadId ?? null,
          JSON.stringify(message.content),
        );
        return { inserted: true, seq };
      })
      .immediate(),
  );
}

/** Returns the number of messages_in rows still waiting for the agent. */
export function countPendingMessages(sessionDir: string): number {
  if (!fs.existsSync(inboundPath(sessionDir))) return 0;
  return withDb(inboundPath(sessionDir), 'read', (db) => {
    const row = db.prepare("SELECT COUNT(*) AS n FROM messages_in WHERE status = 'pending'").get() as {
      n: number;
    };
    return row.n;
  });
}

/** Replaces the destinations table with the given rows. */
export function writeDestinations(sessionDir: string, destinations: Destination[]): void {
  withDb(inboundPath(sessionDir), 'write', (db) =>
    db
      .transaction(() => {
        db.prepare('DELETE FROM destinations').run();
        const insert = db.prepare(
          `INSERT INTO destinations (name, display_name, type, channel_type, platform_id, agent_group_id)
         VALUES (?, ?, ?, ?, ?, ?)`,
        );
        for (const d of destinations) {
          insert.run(d.name, d.displayName, d.type, d.channelType, d.platformId, d.agentGroupId);
        }
      })
      .immediate(),
  );
}

/** Writes the single session_routing row. */
export function writeSessionRouting(sessionDir: string, routing: SessionRouting): void {
  withDb(inboundPath(sessionDir), 'write', (db) => {
    db.prepare(
      `INSERT INTO session_routing (id, channel_type, platform_id, thread_id) VALUES (1, ?, ?, ?)
       ON CONFLICT (id) DO UPDATE SET channel_type = excluded.channel_type,
         platform_id = excluded.platform_id, thread_id = excluded.thread_id`,
    ).run(routing.channelType, routing.platformId, routing.threadId);
  });
}

/** Returns outbound messages that inbound.db's `delivered` table does not list yet, in sequence order. */
export function readUndeliveredMessages(sessionDir: string): OutboundMessage[] {
  if (!fs.existsSync(outboundPath(sessionDir))) return [];
  const delivered = readDeliveredIds(sessionDir);
  const rows = withDb(outboundPath(sessionDir), 'read', (db) =>
    db
      .prepare(
        `SELECT id, seq, in_reply_to AS inReplyTo, timestamp, kind, platform_id AS platformId,
           channel_type AS channelType, thread_id AS threadId, content
         FROM messages_out
         WHERE deliver_after IS NULL OR julianday(deliver_after) <= julianday('now')
         ORDER BY seq, timestamp`,
      )
      .all(),
  ) as OutboundMessage[];
  return rows.filter((row) => !delivered.has(row.id));
}

export function readDeliveredIds(sessionDir: string): Set<string> {
  return withDb(inboundPath(sessionDir), 'read', (db) => {
    const rows = db.prepare('SELECT message_out_id AS id FROM delivered').all() as Array<{ id: string }>;
    return new Set(rows.map((row) => row.id));
  });
}

/**
 * Records a delivery. Returns false when the message was already recorded,
 * so a caller racing another path delivers each message once.
 */
export function markDelivered(
  sessionDir: string,
  messageOutId: string,
  platformMessageId: string | null = null,
): boolean {
  return withDb(inboundPath(sessionDir), 'write', (db) => {
    const result = db
      .prepare(
        `INSERT INTO delivered (message_out_id, platform_message_id, status, delivered_at)
         VALUES (?, ?, 'delivered', ?) ON CONFLICT (message_out_id) DO NOTHING`,
      )
      .run(messageOutId, platformMessageId, new Date().toISOString());
    return result.changes === 1;
  });
}

/** Returns processing_ack rows that are still in progress. */
export function readProcessingClaims(sessionDir: string): ProcessingClaimRow[] {
  if (!fs.existsSync(outboundPath(sessionDir))) return [];
  return withDb(outboundPath(sessionDir), 'read', (db) =>
    db
      .prepare(
        `SELECT message_id AS messageId, status, status_changed AS statusChanged
         FROM processing_ack WHERE status = 'processing'`,
      )
      .all(),
  ) as ProcessingClaimRow[];
}

/** Returns the tool timeout the agent declared for the tool in flight, if any. */
export function readDeclaredToolTimeoutMs(sessionDir: string): number | null {
  if (!fs.existsSync(outboundPath(sessionDir))) return null;
  return withDb(outboundPath(sessionDir), 'read', (db) => {
    const row = db
      .prepare('SELECT current_tool, tool_declared_timeout_ms AS timeoutMs FROM container_state WHERE id = 1')
      .get() as { current_tool: string | null; timeoutMs: number | null } | undefined;
    return row?.current_tool ? (row.timeoutMs ?? null) : null;
  });
}

/** Returns the heartbeat file's mtime in epoch ms, or null when it does not exist. */
export function readHeartbeatMtime(sessionDir: string): number | null {
  try {
    return fs.statSync(path.join(sessionDir, SESSION_FILES.heartbeat)).mtimeMs;
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw error;
  }
}

/**
 * Removes the given claims from processing_ack so the agent picks the
 * messages up again. Call only while no container runs for the session:
 * outbound.db has one writer, and while a container runs that is the container.
 */
export function clearProcessingClaims(sessionDir: string, messageIds: string[]): number {
  if (messageIds.length === 0 || !fs.existsSync(outboundPath(sessionDir))) return 0;
  return withDb(outboundPath(sessionDir), 'write', (db) => {
    const remove = db.prepare("DELETE FROM processing_ack WHERE message_id = ? AND status = 'processing'");
    return db.transaction(() => messageIds.reduce((sum, id) => sum + remove.run(id).changes, 0))();
  });
}

/**
 * Counts a failed attempt for each message. Below the limit the message stays
 * pending and waits `backoffMs`; at the limit it is marked failed with the reason.
 */
export function recordFailedAttempts(
  sessionDir: string,
  messageIds: string[],
  options: { maxAttempts: number; backoffMs: number; reason: string; now?: number },
): { retried: string[]; failed: string[] } {
  const retried: string[] = [];
  const failed: string[] = [];
  if (messageIds.length === 0) return { retried, failed };
  const now = options.now ?? Date.now();

  withDb(inboundPath(sessionDir), 'write', (db) =>
    db
      .transaction(() => {
        for (const id of messageIds) {
          const row = db.prepare('SELECT tries FROM messages_in WHERE id = ?').get(id) as
            { tries: number } | undefined;
          if (!row) continue;
          const tries = row.tries + 1;
          if (tries >= options.maxAttempts) {
            db.prepare(
              "UPDATE messages_in SET tries = ?, status = 'failed', status_changed = ?, failure_reason = ? WHERE id = ?",
            ).run(tries, new Date(now).toISOString(), options.reason, id);
            failed.push(id);
          } else {
            // Exponential backoff: the base delay doubles with each failed attempt.
            const delay = options.backoffMs * 2 ** (tries - 1);
            db.prepare(
              'UPDATE messages_in SET tries = ?, process_after = ?, status_changed = ? WHERE id = ?',
            ).run(tries, new Date(now + delay).toISOString(), new Date(now).toISOString(), id);
            retried.push(id);
          }
        }
      })
      .immediate(),
  );
  return { retried, failed };
}

/** Returns messages that were marked failed, with their reasons. */
export function readFailedMessages(
  sessionDir: string,
): Array<{ id: string; tries: number; reason: string | null }> {
  if (!fs.existsSync(inboundPath(sessionDir))) return [];
  return withDb(inboundPath(sessionDir), 'read', (db) =>
    db
      .prepare(
        "SELECT id, tries, failure_reason AS reason FROM messages_in WHERE status = 'failed' ORDER BY seq",
      )
      .all(),
  ) as Array<{ id: string; tries: number; reason: string | null }>;
}

/** Writes the close request the agent watches for; a graceful stop starts here. */
export function writeCloseRequest(sessionDir: string, reason: string): void {
  fs.writeFileSync(path.join(sessionDir, SESSION_FILES.closeRequest), `${reason}\n`);
}

export function clearCloseRequest(sessionDir: string): void {
  fs.rmSync(path.join(sessionDir, SESSION_FILES.closeRequest), { force: true });
}

/** Copies the agent's completed and failed acks into messages_in.status, so pending counts stay true. */
export function syncProcessingAcks(sessionDir: string): number {
  if (!fs.existsSync(outboundPath(sessionDir))) return 0;
  const acks = withDb(outboundPath(sessionDir), 'read', (db) =>
    db
      .prepare("SELECT message_id AS id, status FROM processing_ack WHERE status IN ('completed', 'failed')")
      .all(),
  ) as Array<{ id: string; status: string }>;
  if (acks.length === 0) return 0;
  return withDb(inboundPath(sessionDir), 'write', (db) => {
    const update = db.prepare(
      "UPDATE messages_in SET status = ?, status_changed = ? WHERE id = ? AND status = 'pending'",
    );
    const now = new Date().toISOString();
    return db.transaction(() =>
      acks.reduce((sum, ack) => sum + update.run(ack.status, now, ack.id).changes, 0),
    )();
  });
}

/** Returns the texts of the newest inbound messages, for redaction from logs. */
export function readInboundTexts(sessionDir: string, limit = 500): string[] {
  if (!fs.existsSync(inboundPath(sessionDir))) return [];
  const rows = withDb(inboundPath(sessionDir), 'read', (db) =>
    db.prepare('SELECT content FROM messages_in ORDER BY seq DESC LIMIT ?').all(limit),
  ) as Array<{ content: string }>;
  const texts: string[] = [];
  for (const row of rows) {
    try {
      const parsed = JSON.parse(row.content) as { text?: unknown };
      if (typeof parsed.text === 'string' && parsed.text.trim() !== '') texts.push(parsed.text);
    } catch {
      if (row.content.trim() !== '') texts.push(row.content);
    }
  }
  return texts;
}

/** Parses `process_after` (a zone-less SQLite timestamp is UTC). An unreadable one counts as due now, so its message is not left waiting. */
function dueTime(processAfter: string, now: number): number {
  try {
    return parseTimestamp(processAfter);
  } catch {
    return now;
  }
}

/**
 * Reads when the session's pending messages may be processed, from one query:
 * `nextRetryAt` is the earliest `process_after` of any of them (epoch ms, or
 * null when none has one), and `dueMessages` counts those that may be
 * processed at `now` (no `process_after`, or one already past). Call
 * syncProcessingAcks first, so messages the agent completed are not counted.
 */
export function readPendingSchedule(
  sessionDir: string,
  now: number,
): { nextRetryAt: number | null; dueMessages: number } {
  if (!fs.existsSync(inboundPath(sessionDir))) return { nextRetryAt: null, dueMessages: 0 };
  const rows = withDb(inboundPath(sessionDir), 'read', (db) =>
    db.prepare("SELECT process_after AS processAfter FROM messages_in WHERE status = 'pending'").all(),
  ) as Array<{ processAfter: string | null }>;

  let nextRetryAt: number | null = null;
  let dueMessages = 0;
  for (const { processAfter } of rows) {
    const at = processAfter === null ? null : dueTime(processAfter, now);
    if (at !== null && (nextRetryAt === null || at < nextRetryAt)) nextRetryAt = at;
    if (at === null || at <= now) dueMessages += 1;
  }
  return { nextRetryAt, dueMessages };
}
