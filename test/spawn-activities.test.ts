import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import Database from 'better-sqlite3';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it, vi } from 'vitest';
import { LABELS } from '../src/activities/spawn.js';
import { DockerCli } from '../src/docker/runtime.js';
import { logger } from '../src/logger.js';
import { oneCliFilesDir } from '../src/paths.js';
import { createDefaultRegistry, type ProviderRegistry } from '../src/providers/registry.js';
import { insertInboundMessage } from '../src/session/session-files.js';
import { containerNameFor } from '../src/workflows/session.js';
import {
  activityFailure,
  buildDerivedImage,
  createActivityHarness,
  envOf,
  mountsOf,
  removeImage,
  type ActivityHarness,
  type HarnessOptions,
} from './support/activity-harness.js';
import {
  DEFAULT_CONTAINER_CONFIG,
  FAKE_OAUTH_TOKEN,
  FAKE_PROXY_URL,
  start as startGateway,
  type FakeGateway,
} from './support/onecli-gateway.js';

/**
 * The spawn-side activities against the real Docker engine: image selection,
 * mount validation, providers, OneCLI, admin ids, routing, filesystem
 * initialization, container names and container.json rejection.
 */

const TAGGED_IMAGE = `berth-test-image-tag-${randomUUID().slice(0, 8)}:v1`;
const DOCKER_NAME = /^[a-zA-Z0-9][a-zA-Z0-9_.-]+$/;

let activeHarness: ActivityHarness | undefined;

beforeAll(async () => {
  await buildDerivedImage(new DockerCli(), TAGGED_IMAGE, { BERTH_TEST_IMAGE: 'tagged' });
});

afterAll(async () => {
  await removeImage(new DockerCli(), TAGGED_IMAGE);
});

afterEach(async () => {
  vi.restoreAllMocks();
  await activeHarness?.cleanup();
  activeHarness = undefined;
});

async function setup(options: HarnessOptions = {}): Promise<ActivityHarness> {
  activeHarness = await createActivityHarness(options);
  return activeHarness;
}

/** Returns an allowlist with one read-only root and one read-write root under `<dataDir>/host`. */
function hostRootsAllowlist(dataDir: string): object {
  return {
    allowedRoots: [
      { path: path.join(dataDir, 'host', 'readonly-root'), allowReadWrite: false },
      { path: path.join(dataDir, 'host', 'writable-root'), allowReadWrite: true },
    ],
  };
}

function makeHostDir(harness: ActivityHarness, ...segments: string[]): string {
  const dir = path.join(harness.dataDir, 'host', ...segments);
  fs.mkdirSync(dir, { recursive: true });
  return dir;
}

function readInbound<T>(sessionDir: string, sql: string): T[] {
  const db = new Database(path.join(sessionDir, 'inbound.db'), { readonly: true });
  try {
    return db.prepare(sql).all() as T[];
  } finally {
    db.close();
  }
}

describe('image selection', () => {
  it('prefers imageTag over packages', async () => {
    const harness = await setup();
    const fixture = harness.createSession('tagged');
    harness.writeContainerJson('tagged', { imageTag: TAGGED_IMAGE, packages: { apt: ['jq'] } });

    const ensured = await harness.run(harness.activities.ensureImage, { sessionId: fixture.session.id });

    expect(ensured).toEqual({ image: TAGGED_IMAGE, warning: null });
    expect(harness.docker.builds).toEqual([]);
  });

  it('runs the imageTag image', async () => {
    const harness = await setup();
    const fixture = harness.createSession('tagged-run');
    harness.writeContainerJson('tagged-run', { imageTag: TAGGED_IMAGE });

    const spawned = await harness.wake(fixture);

    expect((await harness.inspect(spawned.containerName)).Config.Image).toBe(TAGGED_IMAGE);
  });

  it('falls back to the default image', async () => {
    const harness = await setup();
    const fixture = harness.createSession('plain');

    const ensured = await harness.run(harness.activities.ensureImage, { sessionId: fixture.session.id });

    expect(ensured).toEqual({ image: harness.settings.defaultImage, warning: null });
  });

  it('rejects a missing imageTag image', async () => {
    const harness = await setup();
    const fixture = harness.createSession('missing-tag');
    harness.writeContainerJson('missing-tag', { imageTag: 'berth-no-such-image:missing' });

    const failure = await activityFailure(
      harness.run(harness.activities.ensureImage, { sessionId: fixture.session.id }),
    );

    expect(failure.type).toBe('NotFoundError');
    expect(failure.nonRetryable).toBe(true);
    expect(failure.message).toContain('"berth-no-such-image:missing"');
    expect(failure.message).toContain('missing-tag');
  });
});

describe('mount validation at spawn', () => {
  it('mounts read-only unless the root allows rw', async () => {
    const harness = await setup({ allowlist: hostRootsAllowlist });
    const fixture = harness.createSession('mounts');
    harness.writeContainerJson('mounts', {
      additionalMounts: [
        { hostPath: makeHostDir(harness, 'readonly-root', 'default') },
        { hostPath: makeHostDir(harness, 'readonly-root', 'asked-rw'), readonly: false },
        { hostPath: makeHostDir(harness, 'writable-root', 'default'), containerPath: 'rw-default' },
        {
          hostPath: makeHostDir(harness, 'writable-root', 'asked-rw'),
          containerPath: 'rw-asked',
          readonly: false,
        },
      ],
    });

    const spawned = await harness.wake(fixture);
    const mounts = mountsOf(await harness.inspect(spawned.containerName));

    expect(mounts.get('/workspace/extra/default')?.readonly).toBe(true);
    expect(mounts.get('/workspace/extra/asked-rw')?.readonly).toBe(true);
    expect(mounts.get('/workspace/extra/rw-default')?.readonly).toBe(true);
    expect(mounts.get('/workspace/extra/rw-asked')?.readonly).toBe(false);
  });

  it('rejects a blocked mount before docker run', async () => {
    const harness = await setup({ allowlist: hostRootsAllowlist });
    const fixture = harness.createSession('blocked');
    const sshDir = makeHostDir(harness, 'writable-root', '.ssh');
    harness.writeContainerJson('blocked', { additionalMounts: [{ hostPath: sshDir }] });

    const failure = await activityFailure(harness.wake(fixture));

    expect(failure.type).toBe('MountRejectedError');
    expect(failure.nonRetryable).toBe(true);
    expect(failure.message).toContain(sshDir);
    expect(failure.message).toContain('".ssh"');
    expect(harness.docker.runs).toEqual([]);
    expect(await harness.containers()).toEqual([]);
  });

  it('rejects a mount of berth state', async () => {
    // A root that covers the whole data directory still must not expose other sessions.
    const harness = await setup({
      allowlist: (dataDir: string) => ({ allowedRoots: [{ path: dataDir, allowReadWrite: false }] }),
    });
    const fixture = harness.createSession('state-mount');
    const other = harness.createSession('other-group');
    await harness.wake(other);
    harness.writeContainerJson('state-mount', {
      additionalMounts: [{ hostPath: harness.settings.sessionsDir }],
    });

    const failure = await activityFailure(harness.wake(fixture));

    expect(failure.type).toBe('MountRejectedError');
    expect(failure.message).toContain("berth's own state");
    expect(harness.docker.runs.filter((run) => run.spec.name.includes('state-mount'))).toEqual([]);
  });

  it('blocks every mount without an allowlist', async () => {
    const harness = await setup();
    const fixture = harness.createSession('no-allowlist');
    const first = makeHostDir(harness, 'first');
    const second = makeHostDir(harness, 'second');
    harness.writeContainerJson('no-allowlist', {
      additionalMounts: [{ hostPath: first }, { hostPath: second }],
    });
    const warn = vi.spyOn(logger, 'warn');

    const failure = await activityFailure(harness.wake(fixture));

    expect(failure.type).toBe('MountRejectedError');
    expect(failure.nonRetryable).toBe(true);
    expect(failure.message).toContain('2 of 2 additional mounts rejected');
    expect(failure.message).toContain(`no mount allowlist at ${harness.settings.mountAllowlistPath}`);
    const allowlistWarnings = warn.mock.calls.filter(
      ([, message]) => message === 'no mount allowlist: every additional mount is blocked',
    );
    expect(allowlistWarnings).toHaveLength(1);
    expect(harness.docker.runs).toEqual([]);
    expect(await harness.containers()).toEqual([]);
  });

  it('starts without an allowlist when nothing is mounted', async () => {
    const harness = await setup();
    const fixture = harness.createSession('no-extra');

    const spawned = await harness.wake(fixture);

    expect(spawned.adopted).toBe(false);
    expect(await harness.containers()).toEqual([spawned.containerName]);
  });

  it('rejects a provider mount behind a symlink', async () => {
    const harness = await setup({ allowlist: hostRootsAllowlist });
    const fixture = harness.createSession('planted', { groupProvider: 'mock' });
    await harness.run(harness.activities.initFilesystem, { sessionId: fixture.session.id });
    const outside = makeHostDir(harness, 'outside');
    // What an agent could leave in its own session folder for the next spawn.
    fs.symlinkSync(outside, path.join(fixture.sessionDir, 'mock-state'));

    const failure = await activityFailure(harness.wake(fixture));

    expect(failure.type).toBe('MountRejectedError');
    expect(failure.message).toContain(outside);
    expect(harness.docker.runs).toEqual([]);
  });

  it('creates no mount point behind a symlink', async () => {
    const harness = await setup({ allowlist: hostRootsAllowlist });
    const fixture = harness.createSession('planted-extra');
    harness.writeContainerJson('planted-extra', {
      additionalMounts: [{ hostPath: makeHostDir(harness, 'readonly-root', 'docs') }],
    });
    await harness.run(harness.activities.initFilesystem, { sessionId: fixture.session.id });
    const outside = makeHostDir(harness, 'outside');
    fs.symlinkSync(outside, path.join(fixture.sessionDir, 'extra'));

    const spawned = await harness.wake(fixture);

    expect(
      mountsOf(await harness.inspect(spawned.containerName)).get('/workspace/extra/docs')?.readonly,
    ).toBe(true);
    expect(fs.readdirSync(outside)).toEqual([]);
  });
});

describe('provider', () => {
  function registryWith(...names: string[]): ProviderRegistry {
    const registry = createDefaultRegistry();
    for (const name of names) registry.register({ name, contribute: () => ({ env: {}, mounts: [] }) });
    return registry;
  }

  it.each([
    { session: 'alpha', group: 'beta', file: 'gamma', expected: 'alpha' },
    { session: null, group: 'beta', file: 'gamma', expected: 'beta' },
    { session: null, group: null, file: 'gamma', expected: 'gamma' },
    { session: null, group: null, file: undefined, expected: 'claude' },
  ])('resolves $expected', async ({ session, group, file, expected }) => {
    const harness = await setup({ providers: registryWith('alpha', 'beta', 'gamma') });
    const fixture = harness.createSession('providers', { sessionProvider: session, groupProvider: group });
    harness.writeContainerJson('providers', file === undefined ? {} : { provider: file });

    const plan = await harness.run(harness.activities.loadSessionPlan, { sessionId: fixture.session.id });

    expect(plan.provider).toBe(expected);
  });

  it('rejects an unknown provider', async () => {
    const harness = await setup();
    const fixture = harness.createSession('unknown-provider', { groupProvider: 'codex' });

    const failure = await activityFailure(
      harness.run(harness.activities.loadSessionPlan, { sessionId: fixture.session.id }),
    );

    expect(failure.type).toBe('NotFoundError');
    expect(failure.nonRetryable).toBe(true);
    expect(failure.message).toContain('"codex"');
  });

  it('adds the mock env and mount', async () => {
    const harness = await setup();
    const fixture = harness.createSession('mock', { sessionProvider: 'mock' });

    const spawned = await harness.wake(fixture);
    const container = await harness.inspect(spawned.containerName);

    expect(envOf(container).AGENT_PROVIDER).toBe('mock');
    expect(envOf(container).MOCK_PROVIDER).toBe('1');
    expect(mountsOf(container).get('/workspace/mock-state')).toEqual({
      type: 'bind',
      source: path.join(fixture.sessionDir, 'mock-state'),
      readonly: false,
    });
  });
});

describe('OneCLI at spawn', () => {
  let gateway: FakeGateway;
  const savedTmpdir = process.env.TMPDIR;

  beforeEach(async () => {
    gateway = await startGateway();
  });

  afterEach(async () => {
    await gateway.close();
    if (savedTmpdir === undefined) delete process.env.TMPDIR;
    else process.env.TMPDIR = savedTmpdir;
  });

  /** Starts a harness that uses the gateway, with os.tmpdir(), where the SDK writes the CA certificate, in its data dir. */
  async function setupWithGateway(url: string, required: boolean): Promise<ActivityHarness> {
    const harness = await setup({ env: { ONECLI_URL: url, BERTH_ONECLI_REQUIRED: String(required) } });
    process.env.TMPDIR = makeHostDir(harness, 'tmp');
    return harness;
  }

  async function stoppedGatewayUrl(): Promise<string> {
    const stopped = await startGateway();
    await stopped.close();
    return stopped.url;
  }

  it('ensures the agent with group name and id', async () => {
    const harness = await setupWithGateway(gateway.url, true);
    const fixture = harness.createSession('onecli', { name: 'OneCLI Team' });

    const result = await harness.run(harness.activities.ensureAgent, { sessionId: fixture.session.id });

    expect(result).toEqual({ ensured: true });
    expect(gateway.calls[0]).toMatchObject({
      method: 'POST',
      path: '/v1/agents',
      body: { name: 'OneCLI Team', identifier: fixture.group.id },
    });
  });

  it('passes the gateway env and certificate', async () => {
    const harness = await setupWithGateway(gateway.url, true);
    const fixture = harness.createSession('onecli-env');

    const spawned = await harness.wake(fixture);
    const container = await harness.inspect(spawned.containerName);

    expect(envOf(container)).toMatchObject({
      HTTPS_PROXY: FAKE_PROXY_URL,
      HTTP_PROXY: FAKE_PROXY_URL,
      NODE_EXTRA_CA_CERTS: DEFAULT_CONTAINER_CONFIG.caCertificateContainerPath,
      CLAUDE_CODE_OAUTH_TOKEN: FAKE_OAUTH_TOKEN,
    });
    const certificate = mountsOf(container).get(DEFAULT_CONTAINER_CONFIG.caCertificateContainerPath);
    expect(certificate?.type).toBe('bind');
    expect(certificate?.readonly).toBe(true);
    // The group's own copy is mounted, not the file in os.tmpdir() that every group shares.
    expect(path.dirname(certificate!.source)).toBe(
      path.join(oneCliFilesDir(harness.settings), fixture.group.id),
    );
    expect(fs.readFileSync(certificate!.source, 'utf8')).toBe(DEFAULT_CONTAINER_CONFIG.caCertificate);
    expect(container.HostConfig.ExtraHosts).toContain('host.docker.internal:host-gateway');
    expect(gateway.calls.map((call) => call.path)).toContain(
      `/v1/container-config?agent=${fixture.group.id}`,
    );
  });

  it('starts without the gateway when optional', async () => {
    const harness = await setupWithGateway(await stoppedGatewayUrl(), false);
    const fixture = harness.createSession('onecli-down');
    const warn = vi.spyOn(logger, 'warn');

    const spawned = await harness.wake(fixture);
    const env = envOf(await harness.inspect(spawned.containerName));

    expect(env.HTTPS_PROXY).toBeUndefined();
    expect(env.CLAUDE_CODE_OAUTH_TOKEN).toBeUndefined();
    expect(warn.mock.calls.map(([, message]) => message)).toContain(
      'OneCLI credentials unavailable; starting the container without them',
    );
  });

  it('fails the spawn without the gateway when required', async () => {
    const harness = await setupWithGateway(await stoppedGatewayUrl(), true);
    const fixture = harness.createSession('onecli-required');
    await harness.run(harness.activities.initFilesystem, { sessionId: fixture.session.id });

    const failure = await activityFailure(
      harness.run(harness.activities.spawnContainer, harness.spawnRequest(fixture)),
    );

    expect(failure.type).toBe('CredentialsUnavailableError');
    expect(failure.message).toContain('BERTH_ONECLI_REQUIRED=false');
    expect(harness.docker.runs).toEqual([]);
    expect(await harness.containers()).toEqual([]);
  });
});

describe('admin user ids', () => {
  it('lists each admin once', async () => {
    const harness = await setup();
    const fixture = harness.createSession('admins');
    const other = harness.createSession('other-group');
    harness.hostDb.grantRole('u-owner', 'owner');
    harness.hostDb.grantRole('u-owner', 'admin', fixture.group.id);
    harness.hostDb.grantRole('u-global', 'global_admin');
    harness.hostDb.grantRole('u-global', 'owner');
    harness.hostDb.grantRole('u-admin', 'admin', fixture.group.id);
    harness.hostDb.grantRole('u-other', 'admin', other.group.id);

    const spawned = await harness.wake(fixture);

    expect(envOf(await harness.inspect(spawned.containerName)).NANOCLAW_ADMIN_USER_IDS).toBe(
      'u-admin,u-global,u-owner',
    );
  });

  it('shows a role change at the next wake', async () => {
    const harness = await setup();
    const fixture = harness.createSession('role-change');
    harness.hostDb.grantRole('u-owner', 'owner');
    harness.hostDb.grantRole('u-admin', 'admin', fixture.group.id);
    const first = await harness.wake(fixture);
    await harness.docker.remove(first.containerName);

    harness.hostDb.revokeRole('u-admin', 'admin', fixture.group.id);
    harness.hostDb.grantRole('u-new', 'admin', fixture.group.id);
    const second = await harness.wake(fixture, {
      containerName: containerNameFor(fixture.group.folder, fixture.session.id, 2),
    });

    expect(envOf(await harness.inspect(second.containerName)).NANOCLAW_ADMIN_USER_IDS).toBe('u-new,u-owner');
  });
});

describe('syncSessionRouting', () => {
  interface DestinationRow {
    name: string;
    display_name: string | null;
    type: string;
    channel_type: string | null;
    platform_id: string | null;
    agent_group_id: string | null;
  }

  interface RoutingRow {
    channel_type: string | null;
    platform_id: string | null;
    thread_id: string | null;
  }

  it('writes destinations and routing', async () => {
    const harness = await setup();
    const fixture = harness.createSession('routing', {
      channel: { channelType: 'discord', platformId: 'D42' },
      threadId: 'thread-1',
    });
    const helper = harness.createSession('helper');
    const team = harness.hostDb.ensureMessagingGroup('slack', 'C123');
    harness.hostDb.addChannelDestination(fixture.group.id, 'team-chat', team.id, 'Team chat');
    harness.hostDb.addAgentDestination(fixture.group.id, 'helper', helper.group.id);

    await harness.run(harness.activities.syncSessionRouting, { sessionId: fixture.session.id });

    expect(
      readInbound<DestinationRow>(fixture.sessionDir, 'SELECT * FROM destinations ORDER BY name'),
    ).toEqual([
      {
        name: 'helper',
        display_name: null,
        type: 'agent',
        channel_type: null,
        platform_id: null,
        agent_group_id: helper.group.id,
      },
      {
        name: 'team-chat',
        display_name: 'Team chat',
        type: 'channel',
        channel_type: 'slack',
        platform_id: 'C123',
        agent_group_id: null,
      },
    ]);
    expect(
      readInbound<RoutingRow>(
        fixture.sessionDir,
        'SELECT channel_type, platform_id, thread_id FROM session_routing',
      ),
    ).toEqual([{ channel_type: 'discord', platform_id: 'D42', thread_id: 'thread-1' }]);
  });

  it('rewrites both after a change', async () => {
    const harness = await setup();
    const fixture = harness.createSession('rerouting', {
      channel: { channelType: 'discord', platformId: 'D42' },
    });
    const helper = harness.createSession('helper');
    const team = harness.hostDb.ensureMessagingGroup('slack', 'C123');
    harness.hostDb.addChannelDestination(fixture.group.id, 'team-chat', team.id);
    harness.hostDb.addAgentDestination(fixture.group.id, 'helper', helper.group.id);
    await harness.run(harness.activities.syncSessionRouting, { sessionId: fixture.session.id });

    const moved = harness.hostDb.ensureMessagingGroup('slack', 'C999');
    harness.hostDb.addChannelDestination(fixture.group.id, 'team-chat', moved.id);
    harness.hostDb.db.prepare("DELETE FROM destinations WHERE name = 'helper'").run();
    const telegram = harness.hostDb.ensureMessagingGroup('telegram', 'T7');
    harness.hostDb.db
      .prepare('UPDATE sessions SET messaging_group_id = ? WHERE id = ?')
      .run(telegram.id, fixture.session.id);
    await harness.run(harness.activities.syncSessionRouting, { sessionId: fixture.session.id });

    expect(
      readInbound<Pick<DestinationRow, 'name' | 'platform_id'>>(
        fixture.sessionDir,
        'SELECT name, platform_id FROM destinations ORDER BY name',
      ),
    ).toEqual([{ name: 'team-chat', platform_id: 'C999' }]);
    expect(
      readInbound<RoutingRow>(
        fixture.sessionDir,
        'SELECT channel_type, platform_id, thread_id FROM session_routing',
      ),
    ).toEqual([{ channel_type: 'telegram', platform_id: 'T7', thread_id: null }]);
  });

  it('returns the admin ids', async () => {
    const harness = await setup();
    const fixture = harness.createSession('routing-admins');
    harness.hostDb.grantRole('u-owner', 'owner');

    const result = await harness.run(harness.activities.syncSessionRouting, {
      sessionId: fixture.session.id,
    });

    expect(result).toEqual({ adminUserIds: ['u-owner'] });
  });
});

describe('initFilesystem', () => {
  it('creates group and session files', async () => {
    const harness = await setup();
    const fixture = harness.createSession('fresh');

    await harness.run(harness.activities.initFilesystem, { sessionId: fixture.session.id });

    for (const dir of [
      fixture.paths.groupDir,
      fixture.paths.logsDir,
      fixture.paths.claudeStateDir,
      fixture.paths.agentRunnerSrcDir,
      fixture.sessionDir,
    ]) {
      expect(fs.statSync(dir).isDirectory()).toBe(true);
    }
    for (const file of ['inbound.db', 'outbound.db', '.heartbeat']) {
      expect(fs.existsSync(path.join(fixture.sessionDir, file))).toBe(true);
    }
    expect(JSON.parse(fs.readFileSync(fixture.paths.containerJson, 'utf8'))).toEqual({
      mcpServers: {},
      packages: { apt: [], npm: [] },
      additionalMounts: [],
    });
  });

  it('is idempotent', async () => {
    const harness = await setup();
    const fixture = harness.createSession('twice');
    await harness.run(harness.activities.initFilesystem, { sessionId: fixture.session.id });
    const before = fs.readFileSync(fixture.paths.containerJson);

    await harness.run(harness.activities.initFilesystem, { sessionId: fixture.session.id });

    expect(fs.readFileSync(fixture.paths.containerJson)).toEqual(before);
    expect(fs.readdirSync(fixture.sessionDir).sort()).toEqual(['.heartbeat', 'inbound.db', 'outbound.db']);
  });

  it('keeps existing files', async () => {
    const harness = await setup();
    const fixture = harness.createSession('kept');
    const configText = '{\n  "idleTimeoutSeconds": 60 }\n';
    harness.writeContainerJson('kept', configText);
    await harness.run(harness.activities.initFilesystem, { sessionId: fixture.session.id });
    const notes = path.join(fixture.paths.groupDir, 'CLAUDE.md');
    const state = path.join(fixture.paths.claudeStateDir, 'settings.json');
    const source = path.join(fixture.paths.agentRunnerSrcDir, 'index.ts');
    fs.writeFileSync(notes, 'group notes');
    fs.writeFileSync(state, '{"theme":"dark"}');
    fs.writeFileSync(source, 'export {};');
    insertInboundMessage(fixture.sessionDir, { id: 'msg-kept', kind: 'chat', content: { text: 'hi' } });

    await harness.run(harness.activities.initFilesystem, { sessionId: fixture.session.id });

    expect(fs.readFileSync(fixture.paths.containerJson, 'utf8')).toBe(configText);
    expect(fs.readFileSync(notes, 'utf8')).toBe('group notes');
    expect(fs.readFileSync(state, 'utf8')).toBe('{"theme":"dark"}');
    expect(fs.readFileSync(source, 'utf8')).toBe('export {};');
    expect(readInbound<{ id: string }>(fixture.sessionDir, 'SELECT id FROM messages_in')).toEqual([
      { id: 'msg-kept' },
    ]);
  });
});

describe('container names and adoption', () => {
  it.each([
    ['main', 'sess-4f2c9d1e-8b7a-4c3d-9e2f-1a2b3c4d5e6f'],
    ['Team_A', 'sess-0123'],
    ['9lives', 'sess-ffff'],
    ['a'.repeat(64), 'sess-4f2c9d1e-8b7a-4c3d-9e2f-1a2b3c4d5e6f'],
  ])('names %s validly and stably', (folder, sessionId) => {
    const name = containerNameFor(folder, sessionId, 3);

    expect(name).toMatch(DOCKER_NAME);
    expect(containerNameFor(folder, sessionId, 3)).toBe(name);
    expect(containerNameFor(folder, sessionId, 4)).not.toBe(name);
  });

  it('starts a container under that name', async () => {
    const harness = await setup();
    const fixture = harness.createSession(`Long_${'x'.repeat(59)}`);

    const spawned = await harness.wake(fixture);

    expect(spawned.containerName).toMatch(DOCKER_NAME);
    expect((await harness.inspect(spawned.containerName)).Name).toBe(`/${spawned.containerName}`);
  });

  it('adopts the container of an earlier attempt', async () => {
    const harness = await setup();
    const fixture = harness.createSession('retried');
    await harness.run(harness.activities.initFilesystem, { sessionId: fixture.session.id });
    const request = harness.spawnRequest(fixture);

    const first = await harness.run(harness.activities.spawnContainer, request);
    const second = await harness.run(harness.activities.spawnContainer, request);

    expect(first.adopted).toBe(false);
    expect(second.adopted).toBe(true);
    expect(second.containerId).toBe(first.containerId);
    expect(harness.docker.runs).toHaveLength(1);
    expect(await harness.containers()).toEqual([request.containerName]);
  });

  it('labels install, session, group and run', async () => {
    const harness = await setup();
    const fixture = harness.createSession('labelled');

    const spawned = await harness.wake(fixture, { workflowRunId: 'run-label-check' });

    expect((await harness.inspect(spawned.containerName)).Config.Labels).toMatchObject({
      [LABELS.install]: harness.settings.installId,
      [LABELS.session]: fixture.session.id,
      [LABELS.group]: fixture.group.id,
      [LABELS.workflowRun]: 'run-label-check',
    });
  });
});

describe('container.json rejection', () => {
  it('names the file and the field', async () => {
    const harness = await setup();
    const fixture = harness.createSession('broken');
    const text = '{\n  "idleTimeoutSeconds": "soon",\n  "packages": { "apt": "jq" }\n}\n';
    const file = harness.writeContainerJson('broken', text);

    const failure = await activityFailure(
      harness.run(harness.activities.loadSessionPlan, { sessionId: fixture.session.id }),
    );

    expect(failure.type).toBe('InvalidContainerConfigError');
    expect(failure.nonRetryable).toBe(true);
    expect(failure.message).toContain(file);
    expect(failure.message).toContain('idleTimeoutSeconds');
    expect(failure.message).toContain('packages.apt');
    expect(fs.readFileSync(file, 'utf8')).toBe(text);
  });

  it('rejects invalid JSON unchanged', async () => {
    const harness = await setup();
    const fixture = harness.createSession('not-json');
    const text = '{ "mcpServers": ';
    const file = harness.writeContainerJson('not-json', text);

    const failure = await activityFailure(
      harness.run(harness.activities.loadSessionPlan, { sessionId: fixture.session.id }),
    );

    expect(failure.type).toBe('InvalidContainerConfigError');
    expect(failure.nonRetryable).toBe(true);
    expect(failure.message).toContain(file);
    expect(fs.readFileSync(file, 'utf8')).toBe(text);
  });

  it('still syncs routing', async () => {
    const harness = await setup();
    const fixture = harness.createSession('broken-routing');
    harness.writeContainerJson('broken-routing', '{ "mcpServers": ');
    harness.hostDb.grantRole('u-owner', 'owner');

    const result = await harness.run(harness.activities.syncSessionRouting, {
      sessionId: fixture.session.id,
    });

    expect(result.adminUserIds).toEqual(['u-owner']);
  });
});
