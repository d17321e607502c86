import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it, vi } from 'vitest';
import { CONTAINER_GID, CONTAINER_UID } from '../src/activities/prepare.js';
import { loadSessionContext } from '../src/activities/session-context.js';
import { buildRunSpec } from '../src/activities/spawn.js';
import { loadContainerConfig } from '../src/config/container-config.js';
import { DockerCli } from '../src/docker/runtime.js';
import { globalDir } from '../src/paths.js';
import { insertInboundMessage, readUndeliveredMessages } from '../src/session/session-files.js';
import {
  buildDerivedImage,
  createActivityHarness,
  envOf,
  mountsOf,
  removeImage,
  waitFor,
  type ActivityHarness,
  type SessionFixture,
} from './support/activity-harness.js';

/**
 * The container contract against the real Docker engine: what `docker
 * inspect` shows of a spawned container, and what the reference agent in
 * contract-check mode reports from inside it.
 */

const CONTRACT_IMAGE = `berth-contract-check-${randomUUID().slice(0, 8)}:test`;
const isRoot = process.getuid?.() === 0;

const MCP_SERVERS = {
  files: { command: 'mcp-files', args: ['--root', '/workspace'], env: { LOG_LEVEL: 'info' } },
  search: { type: 'http', url: 'https://mcp.example.com/mcp', headers: { 'X-Team': 'infra' } },
};

let harness: ActivityHarness;
let readonlyRoot: string;
let writableRoot: string;

beforeAll(async () => {
  await buildDerivedImage(new DockerCli(), CONTRACT_IMAGE, { AGENT_MODE: 'contract-check' });
});

afterAll(async () => {
  await removeImage(new DockerCli(), CONTRACT_IMAGE);
});

beforeEach(async () => {
  harness = await createActivityHarness({
    allowlist: (dataDir) => ({
      allowedRoots: [
        { path: path.join(dataDir, 'host', 'readonly-root'), allowReadWrite: false },
        { path: path.join(dataDir, 'host', 'writable-root'), allowReadWrite: true },
      ],
    }),
  });
  readonlyRoot = path.join(harness.dataDir, 'host', 'readonly-root');
  writableRoot = path.join(harness.dataDir, 'host', 'writable-root');
  for (const dir of ['docs', 'notes']) fs.mkdirSync(path.join(readonlyRoot, dir), { recursive: true });
  fs.mkdirSync(path.join(writableRoot, 'work'), { recursive: true });
  // A folder the user owns: as root, hand it to the agent's uid so read-write means writable.
  if (isRoot) fs.chownSync(path.join(writableRoot, 'work'), CONTAINER_UID, CONTAINER_GID);
});

afterEach(async () => {
  vi.restoreAllMocks();
  await harness.cleanup();
});

/** Creates a session whose group has every mount kind: the global folder, three additional mounts and the mock provider. */
function fullSession(): SessionFixture {
  fs.mkdirSync(globalDir(harness.settings), { recursive: true });
  const fixture = harness.createSession('contract', { name: 'Contract Team', groupProvider: 'mock' });
  harness.writeContainerJson('contract', {
    mcpServers: MCP_SERVERS,
    additionalMounts: [
      { hostPath: path.join(readonlyRoot, 'docs') },
      { hostPath: path.join(readonlyRoot, 'notes'), readonly: false },
      { hostPath: path.join(writableRoot, 'work'), containerPath: 'work', readonly: false },
    ],
  });
  harness.hostDb.grantRole('user-owner', 'owner');
  harness.hostDb.grantRole('user-global', 'global_admin');
  harness.hostDb.grantRole('user-admin', 'admin', fixture.group.id);
  return fixture;
}

/** Lists every path under `dir`, itself included, whose owner is not `uid`. */
function entriesNotOwnedBy(dir: string, uid: number): string[] {
  const found: string[] = [];
  const visit = (entry: string): void => {
    const stat = fs.lstatSync(entry);
    if (stat.uid !== uid) found.push(`${entry} (uid ${stat.uid})`);
    if (stat.isDirectory()) for (const child of fs.readdirSync(entry)) visit(path.join(entry, child));
  };
  visit(dir);
  return found;
}

describe('container env', () => {
  it('carries every contract variable', async () => {
    const fixture = fullSession();

    const spawned = await harness.wake(fixture);
    const env = envOf(await harness.inspect(spawned.containerName));

    expect(env.TZ).toBe(process.env.TZ ?? Intl.DateTimeFormat().resolvedOptions().timeZone);
    expect(env.AGENT_PROVIDER).toBe('mock');
    expect(env.SESSION_INBOUND_DB_PATH).toBe('/workspace/inbound.db');
    expect(env.SESSION_OUTBOUND_DB_PATH).toBe('/workspace/outbound.db');
    expect(env.SESSION_HEARTBEAT_PATH).toBe('/workspace/.heartbeat');
    expect(env.NANOCLAW_ASSISTANT_NAME).toBe(harness.settings.assistantName);
    expect(env.NANOCLAW_AGENT_GROUP_ID).toBe(fixture.group.id);
    expect(env.NANOCLAW_AGENT_GROUP_NAME).toBe('Contract Team');
    expect(env.NANOCLAW_ADMIN_USER_IDS).toBe('user-admin,user-global,user-owner');
    expect(JSON.parse(env.NANOCLAW_MCP_SERVERS ?? '')).toEqual(MCP_SERVERS);
  });

  it('passes mcpServers of container.json as JSON', async () => {
    const fixture = harness.createSession('mcp');
    const file = harness.writeContainerJson('mcp', { mcpServers: MCP_SERVERS });

    const spawned = await harness.wake(fixture);
    const env = envOf(await harness.inspect(spawned.containerName));

    expect(env.NANOCLAW_MCP_SERVERS).toBe(JSON.stringify(loadContainerConfig(file).config.mcpServers));
    expect(JSON.parse(env.NANOCLAW_MCP_SERVERS ?? '')).toEqual(MCP_SERVERS);
  });

  it('passes an empty MCP object by default', async () => {
    const fixture = harness.createSession('no-mcp');

    const spawned = await harness.wake(fixture);

    expect(envOf(await harness.inspect(spawned.containerName)).NANOCLAW_MCP_SERVERS).toBe('{}');
  });
});

describe('container mounts', () => {
  it('mounts every contract folder with its mode', async () => {
    const fixture = fullSession();

    const spawned = await harness.wake(fixture);
    const mounts = mountsOf(await harness.inspect(spawned.containerName));

    const real = (dir: string): string => fs.realpathSync(dir);
    expect(mounts.get('/workspace')).toEqual({ type: 'bind', source: fixture.sessionDir, readonly: false });
    expect(mounts.get('/workspace/agent')).toEqual({
      type: 'bind',
      source: fixture.paths.groupDir,
      readonly: false,
    });
    expect(mounts.get('/workspace/global')).toEqual({
      type: 'bind',
      source: globalDir(harness.settings),
      readonly: true,
    });
    expect(mounts.get('/home/node/.claude')).toEqual({
      type: 'bind',
      source: fixture.paths.claudeStateDir,
      readonly: false,
    });
    expect(mounts.get('/app/src')).toEqual({
      type: 'bind',
      source: fixture.paths.agentRunnerSrcDir,
      readonly: false,
    });
    expect(mounts.get('/workspace/extra/docs')).toEqual({
      type: 'bind',
      source: real(path.join(readonlyRoot, 'docs')),
      readonly: true,
    });
    expect(mounts.get('/workspace/extra/notes')).toEqual({
      type: 'bind',
      source: real(path.join(readonlyRoot, 'notes')),
      readonly: true,
    });
    expect(mounts.get('/workspace/extra/work')).toEqual({
      type: 'bind',
      source: real(path.join(writableRoot, 'work')),
      readonly: false,
    });
    expect(mounts.get('/workspace/mock-state')).toEqual({
      type: 'bind',
      source: path.join(fixture.sessionDir, 'mock-state'),
      readonly: false,
    });
    expect(mounts.size).toBe(9);
  });

  it('passes every mount with --mount', async () => {
    const fixture = fullSession();

    const spawned = await harness.wake(fixture);
    const container = await harness.inspect(spawned.containerName);

    expect(container.HostConfig.Binds ?? []).toEqual([]);
    expect(container.HostConfig.Mounts?.map((mount) => mount.Type)).toEqual(Array(9).fill('bind'));
    expect(container.Mounts.map((mount) => mount.Type)).toEqual(Array(9).fill('bind'));
  });

  it('omits the global folder when missing', async () => {
    const fixture = harness.createSession('no-global');

    const spawned = await harness.wake(fixture);
    const mounts = mountsOf(await harness.inspect(spawned.containerName));

    expect(fs.existsSync(globalDir(harness.settings))).toBe(false);
    expect(mounts.has('/workspace/global')).toBe(false);
    expect([...mounts.keys()].sort()).toEqual([
      '/app/src',
      '/home/node/.claude',
      '/workspace',
      '/workspace/agent',
    ]);
  });

  it('creates every source before docker run', async () => {
    const fixture = fullSession();

    await harness.wake(fixture);

    expect(harness.docker.runs).toHaveLength(1);
    expect(harness.docker.runs[0]?.spec.mounts).toHaveLength(9);
    expect(harness.docker.runs[0]?.missingSources).toEqual([]);
  });

  it.runIf(isRoot)('leaves no root-owned folder behind', async () => {
    const fixture = fullSession();

    const spawned = await harness.wake(fixture);
    await harness.inspect(spawned.containerName);

    for (const dir of [
      fixture.sessionDir,
      fixture.paths.groupDir,
      fixture.paths.claudeStateDir,
      fixture.paths.agentRunnerSrcDir,
    ]) {
      expect(entriesNotOwnedBy(dir, CONTAINER_UID)).toEqual([]);
    }
  });
});

describe('contract check from inside', () => {
  /** Spawns the contract-check image, sends one message and returns the report it writes into outbound.db. */
  async function contractReport(fixture: SessionFixture): Promise<ContractReport> {
    await harness.wake(fixture, { image: CONTRACT_IMAGE });
    insertInboundMessage(fixture.sessionDir, { id: 'msg-check', kind: 'chat', content: { text: 'check' } });

    const reply = await waitFor('the contract report in outbound.db', () =>
      readUndeliveredMessages(fixture.sessionDir).find((message) => message.inReplyTo === 'msg-check'),
    );
    const content = JSON.parse(reply.content) as { text: string };
    return JSON.parse(content.text) as ContractReport;
  }

  interface ContractReport {
    env: Record<string, string>;
    paths: Record<string, { exists: boolean; writable: boolean }>;
    uid: number;
    gid: number;
  }

  it('reports every contract variable', async () => {
    const fixture = fullSession();

    const report = await contractReport(fixture);

    expect(report.env).toMatchObject({
      TZ: process.env.TZ ?? Intl.DateTimeFormat().resolvedOptions().timeZone,
      AGENT_PROVIDER: 'mock',
      AGENT_MODE: 'contract-check',
      SESSION_INBOUND_DB_PATH: '/workspace/inbound.db',
      SESSION_OUTBOUND_DB_PATH: '/workspace/outbound.db',
      SESSION_HEARTBEAT_PATH: '/workspace/.heartbeat',
      NANOCLAW_ASSISTANT_NAME: harness.settings.assistantName,
      NANOCLAW_AGENT_GROUP_ID: fixture.group.id,
      NANOCLAW_AGENT_GROUP_NAME: 'Contract Team',
      NANOCLAW_ADMIN_USER_IDS: 'user-admin,user-global,user-owner',
    });
    expect(JSON.parse(report.env.NANOCLAW_MCP_SERVERS ?? '')).toEqual(MCP_SERVERS);
  });

  it('reports every path with its writability', async () => {
    const fixture = fullSession();

    const report = await contractReport(fixture);

    expect(report.paths).toEqual({
      '/workspace': { exists: true, writable: true },
      '/workspace/agent': { exists: true, writable: true },
      '/workspace/global': { exists: true, writable: false },
      '/home/node/.claude': { exists: true, writable: true },
      '/app/src': { exists: true, writable: true },
      '/workspace/extra/docs': { exists: true, writable: false },
      '/workspace/extra/notes': { exists: true, writable: false },
      '/workspace/extra/work': { exists: true, writable: true },
    });
  });

  it('reports no global folder when missing', async () => {
    const fixture = harness.createSession('inside-no-global');

    const report = await contractReport(fixture);

    expect(report.paths['/workspace/global']).toEqual({ exists: false, writable: false });
  });

  it('runs as the image user and writes outbound.db', async () => {
    const fixture = harness.createSession('inside-user');

    const report = await contractReport(fixture);

    // The report itself arrived through outbound.db, so the container could write it.
    expect(report.uid).toBe(isRoot ? CONTAINER_UID : process.getuid?.());
    expect(report.gid).toBe(isRoot ? CONTAINER_GID : process.getgid?.());
  });

  it('can write the provider mount', async () => {
    const fixture = fullSession();
    const spawned = await harness.wake(fixture);

    const probe = await harness.docker.exec([
      'container',
      'exec',
      spawned.containerName,
      'node',
      '-e',
      "require('fs').writeFileSync('/workspace/mock-state/probe', 'ok')",
    ]);

    expect(probe.stderr).toBe('');
    expect(probe.exitCode).toBe(0);
    expect(fs.readFileSync(path.join(fixture.sessionDir, 'mock-state', 'probe'), 'utf8')).toBe('ok');
  });
});

describe('user mapping', () => {
  it.runIf(isRoot)('hands session files to uid 1000', async () => {
    const fixture = harness.createSession('owned');

    await harness.run(harness.activities.initFilesystem, { sessionId: fixture.session.id });

    for (const entry of [
      fixture.sessionDir,
      path.join(fixture.sessionDir, 'inbound.db'),
      path.join(fixture.sessionDir, 'outbound.db'),
      path.join(fixture.sessionDir, '.heartbeat'),
      fixture.paths.groupDir,
      fixture.paths.containerJson,
      fixture.paths.claudeStateDir,
      fixture.paths.agentRunnerSrcDir,
    ]) {
      const stat = fs.statSync(entry);
      expect({ entry, uid: stat.uid, gid: stat.gid }).toEqual({
        entry,
        uid: CONTAINER_UID,
        gid: CONTAINER_GID,
      });
    }
  });

  it.runIf(isRoot)('never follows a symlink when handing files over', async () => {
    const fixture = harness.createSession('symlinked');
    await harness.run(harness.activities.initFilesystem, { sessionId: fixture.session.id });
    const outside = path.join(harness.dataDir, 'outside');
    fs.mkdirSync(outside);
    fs.writeFileSync(path.join(outside, 'secret'), 'root only');
    fs.symlinkSync(outside, path.join(fixture.paths.groupDir, 'link-to-dir'));
    fs.symlinkSync(path.join(outside, 'secret'), path.join(fixture.paths.groupDir, 'link-to-file'));

    await harness.run(harness.activities.initFilesystem, { sessionId: fixture.session.id });

    expect(fs.statSync(outside).uid).toBe(0);
    expect(fs.statSync(path.join(outside, 'secret')).uid).toBe(0);
  });

  it('maps another host user with --user and HOME', () => {
    vi.spyOn(process, 'getuid').mockReturnValue(1234);
    vi.spyOn(process, 'getgid').mockReturnValue(2345);
    const fixture = harness.createSession('mapped');

    const spec = buildRunSpec(
      harness.deps,
      loadSessionContext(harness.deps, fixture.session.id),
      harness.spawnRequest(fixture),
    );

    expect(spec.user).toBe('1234:2345');
    expect(spec.env.HOME).toBe('/home/node');
  });

  it.each([0, 1000])('keeps the image user for uid %i', (uid) => {
    vi.spyOn(process, 'getuid').mockReturnValue(uid);
    vi.spyOn(process, 'getgid').mockReturnValue(uid);
    const fixture = harness.createSession('unmapped');

    const spec = buildRunSpec(
      harness.deps,
      loadSessionContext(harness.deps, fixture.session.id),
      harness.spawnRequest(fixture),
    );

    expect(spec.user).toBeUndefined();
    expect(spec.env.HOME).toBeUndefined();
  });
});
