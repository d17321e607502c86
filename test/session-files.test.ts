import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import Database from 'better-sqlite3';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';

import {
  inboundPath,
  initSessionFiles,
  insertInboundMessage,
  markDelivered,
  outboundPath,
  readFailedMessages,
  readPendingSchedule,
  readUndeliveredMessages,
  recordFailedAttempts,
  syncProcessingAcks,
} from '../src/session/session-files.js';

let dir: string;

beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'berth-session-files-'));
  initSessionFiles(dir);
});

afterEach(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

/** Runs `work` on one of the session's files with a short-lived connection, as the container would. */
function withFile<T>(file: string, work: (db: Database.Database) => T): T {
  const db = new Database(file);
  try {
    return work(db);
  } finally {
    db.close();
  }
}

/** Writes a reply into outbound.db the way an agent does. */
function writeReply(id: string, seq: number, inReplyTo: string | null = null): void {
  withFile(outboundPath(dir), (db) =>
    db
      .prepare(
        `INSERT INTO messages_out (id, seq, in_reply_to, timestamp, kind, content)
         VALUES (?, ?, ?, ?, 'chat', ?)`,
      )
      .run(id, seq, inReplyTo, new Date().toISOString(), JSON.stringify({ text: `reply ${id}` })),
  );
}

/** Writes a processing_ack row the way an agent does. */
function writeAck(messageId: string, status: string): void {
  withFile(outboundPath(dir), (db) =>
    db
      .prepare('INSERT INTO processing_ack (message_id, status, status_changed) VALUES (?, ?, ?)')
      .run(messageId, status, new Date().toISOString()),
  );
}

function inboundRow(id: string): { status: string; tries: number; process_after: string | null } {
  return withFile(inboundPath(dir), (db) =>
    db.prepare('SELECT status, tries, process_after FROM messages_in WHERE id = ?').get(id),
  ) as { status: string; tries: number; process_after: string | null };
}

function chat(id: string): { id: string; kind: string; content: { text: string } } {
  return { id, kind: 'chat', content: { text: id } };
}

describe('insertInboundMessage', () => {
  it('assigns even sequence numbers', () => {
    const first = insertInboundMessage(dir, chat('m1'));
    const second = insertInboundMessage(dir, chat('m2'));
    const third = insertInboundMessage(dir, chat('m3'));

    expect(first).toEqual({ inserted: true, seq: 2 });
    expect(second).toEqual({ inserted: true, seq: 4 });
    expect(third).toEqual({ inserted: true, seq: 6 });
  });

  it('skips odd numbers written by the container', () => {
    insertInboundMessage(dir, chat('m1'));
    withFile(inboundPath(dir), (db) =>
      db
        .prepare(
          "INSERT INTO messages_in (id, seq, kind, timestamp, content) VALUES ('agent-1', 7, 'chat', 'now', '{}')",
        )
        .run(),
    );

    expect(insertInboundMessage(dir, chat('m2')).seq).toBe(4);
  });

  it('ignores a repeated id', () => {
    insertInboundMessage(dir, chat('m1'));
    const repeat = insertInboundMessage(dir, { ...chat('m1'), content: { text: 'changed' } });

    expect(repeat).toEqual({ inserted: false, seq: 2 });
    const rows = withFile(inboundPath(dir), (db) =>
      db.prepare('SELECT content FROM messages_in').all(),
    ) as Array<{
      content: string;
    }>;
    expect(rows).toHaveLength(1);
    expect(JSON.parse(rows[0]!.content)).toEqual({ text: 'm1' });
  });

  it('stores the message as pending', () => {
    insertInboundMessage(dir, chat('m1'));

    expect(inboundRow('m1').status).toBe('pending');
  });
});

describe('initSessionFiles', () => {
  it('uses the delete journal mode on both files', () => {
    for (const file of [inboundPath(dir), outboundPath(dir)]) {
      const mode = withFile(file, (db) => db.pragma('journal_mode', { simple: true }));
      expect(mode, file).toBe('delete');
    }
  });

  it('keeps existing rows when run again', () => {
    insertInboundMessage(dir, chat('m1'));
    initSessionFiles(dir);

    expect(inboundRow('m1').status).toBe('pending');
  });

  it('creates the heartbeat file', () => {
    expect(fs.existsSync(path.join(dir, '.heartbeat'))).toBe(true);
  });
});

describe('readUndeliveredMessages', () => {
  it('excludes delivered messages', () => {
    writeReply('out-1', 1);
    writeReply('out-2', 3);
    markDelivered(dir, 'out-1');

    expect(readUndeliveredMessages(dir).map((message) => message.id)).toEqual(['out-2']);
  });

  it('returns messages in sequence order', () => {
    writeReply('out-b', 5, 'm2');
    writeReply('out-a', 3, 'm1');

    const messages = readUndeliveredMessages(dir);
    expect(messages.map((message) => message.id)).toEqual(['out-a', 'out-b']);
    expect(messages[0]!.inReplyTo).toBe('m1');
  });

  it('holds back a future deliver_after', () => {
    writeReply('out-now', 1);
    withFile(outboundPath(dir), (db) =>
      db
        .prepare(
          `INSERT INTO messages_out (id, seq, timestamp, deliver_after, kind, content)
           VALUES ('out-later', 3, ?, ?, 'chat', '{}')`,
        )
        .run(new Date().toISOString(), new Date(Date.now() + 3_600_000).toISOString()),
    );

    expect(readUndeliveredMessages(dir).map((message) => message.id)).toEqual(['out-now']);
  });
});

describe('markDelivered', () => {
  it('returns true the first time', () => {
    expect(markDelivered(dir, 'out-1')).toBe(true);
  });

  it('returns false the second time', () => {
    markDelivered(dir, 'out-1');

    expect(markDelivered(dir, 'out-1', 'platform-2')).toBe(false);
  });
});

describe('recordFailedAttempts', () => {
  const options = { maxAttempts: 3, backoffMs: 1000, reason: 'container crashed', now: Date.UTC(2026, 0, 1) };

  it('backs off below the limit', () => {
    insertInboundMessage(dir, chat('m1'));

    const result = recordFailedAttempts(dir, ['m1'], options);

    expect(result).toEqual({ retried: ['m1'], failed: [] });
    const row = inboundRow('m1');
    expect(row.status).toBe('pending');
    expect(row.tries).toBe(1);
    expect(row.process_after).toBe(new Date(options.now + 1000).toISOString());
  });

  it('doubles the backoff on each attempt', () => {
    insertInboundMessage(dir, chat('m1'));
    recordFailedAttempts(dir, ['m1'], options);

    recordFailedAttempts(dir, ['m1'], options);

    expect(inboundRow('m1').process_after).toBe(new Date(options.now + 2000).toISOString());
  });

  it('marks the message failed at the limit', () => {
    insertInboundMessage(dir, chat('m1'));
    recordFailedAttempts(dir, ['m1'], options);
    recordFailedAttempts(dir, ['m1'], options);

    const result = recordFailedAttempts(dir, ['m1'], options);

    expect(result).toEqual({ retried: [], failed: ['m1'] });
    expect(inboundRow('m1')).toMatchObject({ status: 'failed', tries: 3 });
    expect(readFailedMessages(dir)).toEqual([{ id: 'm1', tries: 3, reason: 'container crashed' }]);
  });

  it('skips unknown message ids', () => {
    expect(recordFailedAttempts(dir, ['missing'], options)).toEqual({ retried: [], failed: [] });
  });
});

describe('syncProcessingAcks', () => {
  it('copies completed and failed acks into messages_in', () => {
    for (const id of ['m1', 'm2', 'm3']) insertInboundMessage(dir, chat(id));
    writeAck('m1', 'completed');
    writeAck('m2', 'failed');
    writeAck('m3', 'processing');

    const changed = syncProcessingAcks(dir);

    expect(changed).toBe(2);
    expect(inboundRow('m1').status).toBe('completed');
    expect(inboundRow('m2').status).toBe('failed');
    expect(inboundRow('m3').status).toBe('pending');
  });

  it('changes nothing on a second run', () => {
    insertInboundMessage(dir, chat('m1'));
    writeAck('m1', 'completed');
    syncProcessingAcks(dir);

    expect(syncProcessingAcks(dir)).toBe(0);
  });

  it('returns 0 without an outbound file', () => {
    fs.rmSync(outboundPath(dir));

    expect(syncProcessingAcks(dir)).toBe(0);
  });
});

describe('readPendingSchedule', () => {
  const NOW = Date.parse('2026-12-04T12:00:00.000Z');

  function setProcessAfter(id: string, value: string): void {
    withFile(inboundPath(dir), (db) =>
      db.prepare('UPDATE messages_in SET process_after = ? WHERE id = ?').run(value, id),
    );
  }

  it('counts pending messages due now', () => {
    for (const id of ['now', 'past', 'future', 'done']) insertInboundMessage(dir, chat(id));
    // Zone-less, as SQLite writes it: UTC, one minute before NOW.
    setProcessAfter('past', '2026-12-04 11:59:00');
    setProcessAfter('future', '2026-12-04T12:05:00.000Z');
    writeAck('done', 'completed');
    syncProcessingAcks(dir);

    expect(readPendingSchedule(dir, NOW)).toEqual({
      nextRetryAt: Date.parse('2026-12-04T11:59:00.000Z'),
      dueMessages: 2,
    });
  });

  it('counts an unreadable time as due', () => {
    insertInboundMessage(dir, chat('m1'));
    setProcessAfter('m1', 'soon');

    expect(readPendingSchedule(dir, NOW)).toEqual({ nextRetryAt: NOW, dueMessages: 1 });
  });

  it('returns 0 without an inbound file', () => {
    fs.rmSync(inboundPath(dir));

    expect(readPendingSchedule(dir, NOW)).toEqual({ nextRetryAt: null, dueMessages: 0 });
  });
});
