import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { fileURLToPath } from 'node:url';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';

import { HostDb } from '../src/db/host-db.js';
import { MIGRATIONS } from '../src/db/migrations.js';
import { NotFoundError } from '../src/errors.js';

const execFileAsync = promisify(execFile);
const REPO_ROOT = fileURLToPath(new URL('../', import.meta.url));
const HOST_DB_MODULE = path.join(REPO_ROOT, 'src/db/host-db.ts');

let dir: string;
let file: string;
const opened: HostDb[] = [];

function openDb(): HostDb {
  const db = new HostDb(file);
  opened.push(db);
  return db;
}

beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'berth-host-db-'));
  file = path.join(dir, 'berth.db');
});

afterEach(() => {
  for (const db of opened.splice(0)) db.close();
  fs.rmSync(dir, { recursive: true, force: true });
});

/**
 * Script for a child process. It opens (and migrates) the host database, writes
 * its ready file and waits for the go file, so that both children write at the
 * same moment. Then it creates the same group, messaging group and session 20
 * times and prints the distinct ids it got back.
 */
const CHILD_SCRIPT = `
import fs from 'node:fs';
const [modulePath, dbFile, goFile, readyFile] = process.argv.slice(1);
const { HostDb } = await import(modulePath);
const db = new HostDb(dbFile);
fs.writeFileSync(readyFile, '');
while (!fs.existsSync(goFile)) await new Promise((resolve) => setTimeout(resolve, 5));
const ids = [];
for (let round = 0; round < 20; round += 1) {
  const group = db.ensureAgentGroup('main');
  const messaging = db.ensureMessagingGroup('cli', 'local');
  const session = db.ensureSession(group.id, messaging.id, 'thread-1');
  ids.push([group.id, messaging.id, session.id].join(' '));
}
db.close();
process.stdout.write(JSON.stringify([...new Set(ids)]));
`;

function runChild(goFile: string, readyFile: string): Promise<string[]> {
  return execFileAsync(
    process.execPath,
    ['--import', 'tsx', '--input-type=module', '-e', CHILD_SCRIPT, HOST_DB_MODULE, file, goFile, readyFile],
    { cwd: REPO_ROOT, timeout: 60_000 },
  ).then(({ stdout }) => JSON.parse(stdout) as string[]);
}

function countRows(db: HostDb, table: string): number {
  return (db.db.prepare(`SELECT COUNT(*) AS n FROM ${table}`).get() as { n: number }).n;
}

describe('migrations', () => {
  it('create the tables', () => {
    const db = openDb();

    const tables = db.db
      .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
      .all() as Array<{
      name: string;
    }>;
    expect(tables.map((table) => table.name)).toEqual(
      expect.arrayContaining([
        'agent_groups',
        'destinations',
        'messaging_groups',
        'schema_migrations',
        'sessions',
        'user_roles',
        'users',
      ]),
    );
  });

  it('record each version once across reopens', () => {
    openDb().close();
    opened.length = 0;
    const db = openDb();

    const versions = db.db.prepare('SELECT version FROM schema_migrations ORDER BY version').all() as Array<{
      version: number;
    }>;
    expect(versions.map((row) => row.version)).toEqual(MIGRATIONS.map((_, index) => index + 1));
  });

  it('use WAL mode', () => {
    expect(openDb().db.pragma('journal_mode', { simple: true })).toBe('wal');
  });
});

describe('concurrent creation', () => {
  it('two connections end with one session row', () => {
    const first = openDb();
    const second = openDb();

    const groupA = first.ensureAgentGroup('main');
    const groupB = second.ensureAgentGroup('main');
    const sessionA = first.ensureSession(groupA.id, null, 't');
    const sessionB = second.ensureSession(groupB.id, null, 't');

    expect(groupB.id).toBe(groupA.id);
    expect(sessionB.id).toBe(sessionA.id);
    expect(countRows(first, 'agent_groups')).toBe(1);
    expect(countRows(first, 'sessions')).toBe(1);
  });

  it('two processes end with one row each', async () => {
    const goFile = path.join(dir, 'go');
    const readyFiles = [path.join(dir, 'ready-a'), path.join(dir, 'ready-b')];
    const children = readyFiles.map((readyFile) => runChild(goFile, readyFile));
    // Both children have opened and migrated the database before either creates a row.
    while (!readyFiles.every((readyFile) => fs.existsSync(readyFile))) {
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    fs.writeFileSync(goFile, '');

    const [idsA, idsB] = await Promise.all(children);

    expect(idsA).toHaveLength(1);
    expect(idsB).toEqual(idsA);
    const db = openDb();
    expect(countRows(db, 'agent_groups')).toBe(1);
    expect(countRows(db, 'messaging_groups')).toBe(1);
    expect(countRows(db, 'sessions')).toBe(1);
    expect(countRows(db, 'schema_migrations')).toBe(MIGRATIONS.length);
  }, 90_000);

  it('session without messaging group is unique', () => {
    const db = openDb();
    const group = db.ensureAgentGroup('main');

    const first = db.ensureSession(group.id, null);
    const second = db.ensureSession(group.id, null);

    expect(second.id).toBe(first.id);
    expect(countRows(db, 'sessions')).toBe(1);
  });
});

describe('ensureAgentGroup', () => {
  it('rejects a folder that is a path', () => {
    const db = openDb();

    expect(() => db.ensureAgentGroup('../x')).toThrow(/"\.\.\/x"/);
  });
});

describe('getSession', () => {
  it('names the id and how to list sessions', () => {
    const db = openDb();

    expect(() => db.getSession('sess-missing')).toThrow(NotFoundError);
    expect(() => db.getSession('sess-missing')).toThrow(/sess-missing.*berth status/);
  });
});

describe('roles', () => {
  it('adminUserIds lists each admin once', () => {
    const db = openDb();
    const group = db.ensureAgentGroup('main');
    db.grantRole('owner-1', 'owner');
    db.grantRole('global-1', 'global_admin');
    db.grantRole('admin-1', 'admin', group.id);
    // A user with several roles is listed once.
    db.grantRole('owner-1', 'admin', group.id);
    db.grantRole('owner-1', 'owner');

    expect(db.adminUserIds(group.id)).toEqual(['admin-1', 'global-1', 'owner-1']);
  });

  it('adminUserIds leaves out admins of another group', () => {
    const db = openDb();
    const main = db.ensureAgentGroup('main');
    const other = db.ensureAgentGroup('other');
    db.grantRole('other-admin', 'admin', other.id);

    expect(db.adminUserIds(main.id)).toEqual([]);
    expect(db.adminUserIds(other.id)).toEqual(['other-admin']);
  });

  it('revokeRole removes the grant', () => {
    const db = openDb();
    const group = db.ensureAgentGroup('main');
    db.grantRole('admin-1', 'admin', group.id);

    db.revokeRole('admin-1', 'admin', group.id);

    expect(db.adminUserIds(group.id)).toEqual([]);
  });

  it('grantRole rejects an admin without a group', () => {
    expect(() => openDb().grantRole('admin-1', 'admin')).toThrow(/agent group/);
  });
});

describe('destinations', () => {
  it('resolve a channel to its coordinates', () => {
    const db = openDb();
    const group = db.ensureAgentGroup('main');
    const channel = db.ensureMessagingGroup('telegram', 'chat-42', 'Family');

    db.addChannelDestination(group.id, 'family', channel.id, 'Family chat');

    expect(db.destinationsOf(group.id)).toEqual([
      {
        name: 'family',
        displayName: 'Family chat',
        type: 'channel',
        channelType: 'telegram',
        platformId: 'chat-42',
        agentGroupId: null,
      },
    ]);
  });

  it('resolve an agent to its group id', () => {
    const db = openDb();
    const group = db.ensureAgentGroup('main');
    const helper = db.ensureAgentGroup('helper');

    db.addAgentDestination(group.id, 'helper', helper.id);

    expect(db.destinationsOf(group.id)).toEqual([
      {
        name: 'helper',
        displayName: null,
        type: 'agent',
        channelType: null,
        platformId: null,
        agentGroupId: helper.id,
      },
    ]);
  });

  it('replace a name on a second add', () => {
    const db = openDb();
    const group = db.ensureAgentGroup('main');
    const helper = db.ensureAgentGroup('helper');
    const channel = db.ensureMessagingGroup('cli', 'local');
    db.addAgentDestination(group.id, 'target', helper.id);

    db.addChannelDestination(group.id, 'target', channel.id);

    const [destination] = db.destinationsOf(group.id);
    expect(destination).toMatchObject({
      type: 'channel',
      channelType: 'cli',
      platformId: 'local',
      agentGroupId: null,
    });
  });

  it('belong to their own group only', () => {
    const db = openDb();
    const main = db.ensureAgentGroup('main');
    const other = db.ensureAgentGroup('other');
    db.addAgentDestination(main.id, 'other', other.id);

    expect(db.destinationsOf(other.id)).toEqual([]);
  });
});
