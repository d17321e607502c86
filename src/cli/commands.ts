import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import Database from 'better-sqlite3';
import type { Client } from '@temporalio/client';
import { sessionWorkflowId } from '../client/ids.js';
import { sessionStatus, wakeSession } from '../client/session-client.js';
import type { HostDb, SessionRecord } from '../db/host-db.js';
import { NotFoundError } from '../errors.js';
import { sessionDir } from '../paths.js';
import {
  initSessionFiles,
  insertInboundMessage,
  outboundPath,
  readFailedMessages,
} from '../session/session-files.js';
import type { Settings } from '../settings.js';
import type { SessionStatus } from '../workflows/status.js';

/** The channel that CLI and terminal-chat messages arrive on. */
export const CLI_CHANNEL = { channelType: 'cli', platformId: 'local' } as const;

export interface QueuedMessage {
  session: SessionRecord;
  messageId: string;
  sessionDir: string;
}

/**
 * Routes a message as a router would: creates the agent group and its
 * session when needed, writes the message into inbound.db, and wakes the
 * session. Once written, the message stays pending in inbound.db even when the wake fails.
 */
export async function sendMessage(
  settings: Settings,
  hostDb: HostDb,
  client: Client,
  request: { folder: string; text: string; threadId?: string },
): Promise<QueuedMessage> {
  const group = hostDb.ensureAgentGroup(request.folder);
  const messaging = hostDb.ensureMessagingGroup(
    CLI_CHANNEL.channelType,
    CLI_CHANNEL.platformId,
    'Command line',
  );
  const session = hostDb.ensureSession(group.id, messaging.id, request.threadId ?? '');
  const dir = sessionDir(settings, group.folder, session.id);
  initSessionFiles(dir);

  const messageId = `msg-${randomUUID()}`;
  insertInboundMessage(dir, {
    id: messageId,
    kind: 'chat',
    content: { text: request.text, sender: 'cli' },
    channelType: CLI_CHANNEL.channelType,
    platformId: CLI_CHANNEL.platformId,
    threadId: request.threadId ?? null,
  });
  await wakeSession(client, settings, session.id);
  return { session, messageId, sessionDir: dir };
}

/**
 * Polls for delivered replies to one message and hands each to `onReply`
 * once. Resolves with the number of replies seen when at least one arrived
 * and no new one came for `settleMs`, or when `timeoutMs` passed.
 */
export async function waitForReplies(
  queued: QueuedMessage,
  onReply: (text: string) => void,
  options: { timeoutMs: number; settleMs?: number; pollMs?: number },
): Promise<number> {
  const seen = new Set<string>();
  const deadline = Date.now() + options.timeoutMs;
  let lastReplyAt = 0;
  for (;;) {
    for (const reply of readDeliveredReplies(queued.sessionDir, queued.messageId)) {
      if (seen.has(reply.id)) continue;
      seen.add(reply.id);
      lastReplyAt = Date.now();
      onReply(reply.text);
    }
    if (seen.size > 0 && Date.now() - lastReplyAt >= (options.settleMs ?? 300)) return seen.size;
    if (Date.now() >= deadline) return seen.size;
    await sleep(options.pollMs ?? 200);
  }
}

function readDeliveredReplies(dir: string, messageId: string): Array<{ id: string; text: string }> {
  if (!fs.existsSync(outboundPath(dir))) return [];
  const db = new Database(outboundPath(dir), { readonly: true, fileMustExist: true });
  try {
    db.pragma('busy_timeout = 5000');
    db.exec(`ATTACH DATABASE '${path.join(dir, 'inbound.db').replace(/'/g, "''")}' AS inbound`);
    const rows = db
      .prepare(
        `SELECT m.id, m.content FROM messages_out m JOIN inbound.delivered d ON d.message_out_id = m.id
         WHERE m.in_reply_to = ? ORDER BY m.seq`,
      )
      .all(messageId) as Array<{ id: string; content: string }>;
    return rows.map((row) => ({ id: row.id, text: textOf(row.content) }));
  } finally {
    db.close();
  }
}

function textOf(content: string): string {
  try {
    const parsed = JSON.parse(content) as { text?: unknown };
    return typeof parsed.text === 'string' ? parsed.text : content;
  } catch {
    return content;
  }
}

export interface SessionSummary {
  sessionId: string;
  group: string;
  threadId: string | null;
  state: string;
  containerName: string | null;
  image: string | null;
  lastActivity: string | null;
  lastActivitySource: string | null;
  nextDeadline: { kind: string; at: string } | null;
  lastError: string | null;
  lastExit: SessionStatus['lastExit'];
  failedMessages: number;
  /** An activity that is failing and being retried right now, such as a spawn while Docker is down. */
  retrying: { activity: string; attempt: number; lastFailure: string | null } | null;
}

/** Returns the status of one session, or of every session when `sessionId` is undefined. */
export async function collectStatus(
  settings: Settings,
  hostDb: HostDb,
  client: Client,
  sessionId?: string,
): Promise<SessionSummary[]> {
  const sessions = sessionId ? [hostDb.getSession(sessionId)] : hostDb.listSessions();
  const summaries: SessionSummary[] = [];
  for (const session of sessions) {
    const group = hostDb.getAgentGroup(session.agentGroupId);
    let status: SessionStatus | null = null;
    try {
      status = await sessionStatus(client, session.id);
    } catch (error) {
      if (!(error instanceof NotFoundError)) throw error;
    }
    const failed = readFailedMessages(sessionDir(settings, group.folder, session.id)).length;
    const retrying = status ? await retryingActivity(client, session.id) : null;
    summaries.push({
      sessionId: session.id,
      group: group.folder,
      threadId: session.threadId || null,
      state: status?.state ?? 'not started',
      containerName: status?.containerName ?? null,
      image: status?.image ?? null,
      lastActivity: iso(status?.lastActivityAt ?? null) ?? session.lastActivity,
      lastActivitySource: status?.lastActivitySource ?? null,
      nextDeadline: status?.nextDeadline
        ? { kind: status.nextDeadline.kind, at: iso(status.nextDeadline.at)! }
        : null,
      lastError: status?.lastError ?? null,
      lastExit: status?.lastExit ?? null,
      failedMessages: failed,
      retrying,
    });
  }
  return summaries;
}

/** Returns the session workflow's pending activity that has failed at least once, if any. */
async function retryingActivity(client: Client, sessionId: string): Promise<SessionSummary['retrying']> {
  const description = await client.workflow.getHandle(sessionWorkflowId(sessionId)).describe();
  for (const pending of description.raw.pendingActivities ?? []) {
    // Supervision runs for the container's whole life, so a past failure (a worker restart) is not a problem now.
    if (pending.activityType?.name === 'superviseContainer') continue;
    const attempt = pending.attempt ?? 1;
    if (attempt > 1 || pending.lastFailure) {
      return {
        activity: pending.activityType?.name ?? 'unknown',
        attempt,
        lastFailure: pending.lastFailure?.message ?? null,
      };
    }
  }
  return null;
}

function describeProblem(summary: SessionSummary): string {
  if (summary.retrying) {
    return `${summary.retrying.activity} retrying (attempt ${summary.retrying.attempt}): ${summary.retrying.lastFailure ?? 'no error yet'}`;
  }
  if (summary.lastError) return summary.lastError;
  return summary.failedMessages > 0 ? `${summary.failedMessages} failed message(s)` : '-';
}

function iso(ms: number | null): string | null {
  return ms === null ? null : new Date(ms).toISOString();
}

/** Status-table label of each deadline kind: the action that the deadline triggers. */
const DEADLINE_LABELS: Record<string, string> = {
  idle: 'idle stop',
  lifetime: 'lifetime stop',
  pause: 'stop after pause',
  'restart-backoff': 'restart backoff ends',
  retry: 'retry',
};

/** Renders summaries as an aligned text table. */
export function formatStatusTable(summaries: SessionSummary[]): string {
  if (summaries.length === 0) return 'No sessions yet. Send one a message with "berth send <group> <text>".';
  const header = ['SESSION', 'GROUP', 'STATE', 'CONTAINER', 'LAST ACTIVITY', 'NEXT DEADLINE', 'ERROR'];
  const rows = summaries.map((s) => [
    s.sessionId,
    s.group,
    s.state,
    s.containerName ?? '-',
    s.lastActivity ? `${s.lastActivity}${s.lastActivitySource ? ` (${s.lastActivitySource})` : ''}` : '-',
    s.nextDeadline
      ? `${DEADLINE_LABELS[s.nextDeadline.kind] ?? s.nextDeadline.kind} at ${s.nextDeadline.at}`
      : '-',
    // Multi-line errors would break the columns.
    describeProblem(s).replace(/\s*\n\s*/g, ' '),
  ]);
  const widths = header.map((title, column) =>
    Math.max(title.length, ...rows.map((row) => row[column]!.length)),
  );
  return [header, ...rows]
    .map((row) =>
      row
        .map((cell, column) => cell.padEnd(widths[column]!))
        .join('  ')
        .trimEnd(),
    )
    .join('\n');
}
