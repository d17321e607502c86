import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import Database from 'better-sqlite3';
import type { Logger } from '@temporalio/common';
import { CancelledFailure } from '@temporalio/common';
import { MockActivityEnvironment } from '@temporalio/testing';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';

import type { ActivityDeps } from '../src/activities/deps.js';
import { createActivities } from '../src/activities/index.js';
import { LABELS } from '../src/activities/spawn.js';
import type { ContainerExit, SessionObservation, SuperviseRequest } from '../src/activities/types.js';
import { HostDb } from '../src/db/host-db.js';
import { CallbackSink, Deliverer, type DeliveredMessage } from '../src/delivery/deliverer.js';
import { DockerCli } from '../src/docker/runtime.js';
import { createOneCli } from '../src/onecli/onecli.js';
import { groupPaths, sessionDir } from '../src/paths.js';
import { createDefaultRegistry } from '../src/providers/registry.js';
import {
  inboundPath,
  insertInboundMessage,
  readFailedMessages,
  readProcessingClaims,
} from '../src/session/session-files.js';
import { loadSettings, type Settings } from '../src/settings.js';
import type { ActivityNotice } from '../src/workflows/session.js';

// superviseContainer against real agent containers, run as an activity under
// MockActivityEnvironment with recording fakes for the workflow signals and
// the delivery sink. Also the exits it reports: out of memory, and a crash
// while a message is claimed, which recordExit turns into a retry.

const BASE_IMAGE = 'berth-agent:latest';

interface LogEntry {
  level: string;
  message: string;
  meta?: Record<string, unknown>;
}

/** Keeps the activity's log entries for assertions instead of printing them. */
function recordingLogger(entries: LogEntry[]): Logger {
  const add = (level: string) => (message: string, meta?: Record<string, unknown>) => {
    entries.push({ level, message, meta });
  };
  return {
    log: (level, message, meta) => entries.push({ level, message, meta }),
    trace: add('TRACE'),
    debug: add('DEBUG'),
    info: add('INFO'),
    warn: add('WARN'),
    error: add('ERROR'),
  };
}

interface Harness {
  settings: Settings;
  hostDb: HostDb;
  activities: ReturnType<typeof createActivities>;
  sessionId: string;
  folder: string;
  sessionDir: string;
  dataDir: string;
  delivered: DeliveredMessage[];
  activitySignals: ActivityNotice[];
  observations: SessionObservation[];
  logs: LogEntry[];
}

const docker = new DockerCli();
const harnesses: Harness[] = [];
const builtImages: string[] = [];

function createHarness(): Harness {
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'berth-supervise-'));
  const settings = loadSettings({
    ...process.env,
    BERTH_DATA_DIR: dataDir,
    BERTH_MOUNT_ALLOWLIST: path.join(dataDir, 'no-such-allowlist.json'),
  });
  const hostDb = new HostDb(settings.hostDbPath);
  const delivered: DeliveredMessage[] = [];
  const activitySignals: ActivityNotice[] = [];
  const observations: SessionObservation[] = [];
  const deps: ActivityDeps = {
    settings,
    hostDb,
    docker,
    oneCli: createOneCli({ url: undefined, requireCredentials: false }),
    providers: createDefaultRegistry(),
    signals: {
      activity: async (_sessionId, notice) => {
        activitySignals.push(notice);
      },
      observation: async (_sessionId, observation) => {
        observations.push(observation);
      },
    },
    deliverer: new Deliverer(new CallbackSink((message) => void delivered.push(message))),
    pollIntervalMs: 200,
  };

  const folder = `supervise-${randomUUID().slice(0, 8)}`;
  const group = hostDb.ensureAgentGroup(folder);
  const session = hostDb.ensureSession(group.id, null);
  const harness: Harness = {
    settings,
    hostDb,
    activities: createActivities(deps),
    sessionId: session.id,
    folder,
    sessionDir: sessionDir(settings, folder, session.id),
    dataDir,
    delivered,
    activitySignals,
    observations,
    logs: [],
  };
  harnesses.push(harness);
  return harness;
}

async function removeHarness(harness: Harness): Promise<void> {
  for (const container of await docker.list({ [LABELS.install]: harness.settings.installId })) {
    await docker.remove(container.name);
  }
  harness.hostDb.close();
  fs.rmSync(harness.dataDir, { recursive: true, force: true });
}

/** Builds `FROM berth-agent:latest` with the given environment, so a test gets an agent that misbehaves on purpose. */
async function buildVariant(name: string, env: Record<string, string>): Promise<string> {
  const tag = `berth-test-supervise-${name}:${randomUUID().slice(0, 8)}`;
  const contextDir = fs.mkdtempSync(path.join(os.tmpdir(), 'berth-variant-'));
  try {
    const envLine = Object.entries(env)
      .map(([key, value]) => `${key}=${value}`)
      .join(' ');
    fs.writeFileSync(path.join(contextDir, 'Dockerfile'), `FROM ${BASE_IMAGE}\nENV ${envLine}\n`);
    await docker.build(
      { contextDir, dockerfile: path.join(contextDir, 'Dockerfile'), tag, buildArgs: {}, labels: {} },
      () => undefined,
    );
  } finally {
    fs.rmSync(contextDir, { recursive: true, force: true });
  }
  builtImages.push(tag);
  return tag;
}

function activityEnvironment(harness: Harness, heartbeatDetails?: unknown): MockActivityEnvironment {
  return new MockActivityEnvironment(heartbeatDetails === undefined ? undefined : { heartbeatDetails }, {
    logger: recordingLogger(harness.logs),
  });
}

function runActivity<A extends unknown[], R>(
  harness: Harness,
  fn: (...args: A) => Promise<R>,
  ...args: A
): Promise<R> {
  return activityEnvironment(harness).run(fn, ...args);
}

function writeContainerJson(harness: Harness, config: object): void {
  const { groupDir, containerJson } = groupPaths(harness.settings, harness.folder);
  fs.mkdirSync(groupDir, { recursive: true });
  fs.writeFileSync(containerJson, JSON.stringify(config));
}

/** Runs initFilesystem and spawnContainer, as a wake does, and returns the supervision request. */
async function startAgent(harness: Harness, image: string): Promise<SuperviseRequest> {
  const { activities, sessionId } = harness;
  await runActivity(harness, activities.initFilesystem, { sessionId });
  const containerName = `berth-test-supervise-${randomUUID().slice(0, 12)}`;
  const spawned = await runActivity(harness, activities.spawnContainer, {
    sessionId,
    containerName,
    image,
    provider: 'claude',
    adminUserIds: [],
    workflowRunId: 'test-run',
  });
  return { sessionId, containerName, startedAt: spawned.startedAt };
}

function sendMessage(harness: Harness, text: string): string {
  const id = `msg-${randomUUID()}`;
  insertInboundMessage(harness.sessionDir, { id, kind: 'chat', content: { text } });
  return id;
}

async function waitFor(
  probe: () => boolean | Promise<boolean>,
  description: string,
  timeoutMs = 60_000,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await probe())) {
    if (Date.now() > deadline) throw new Error(`Timed out after ${timeoutMs} ms waiting for ${description}.`);
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
}

/** Supervision that runs in the background while the test acts. */
interface Running {
  environment: MockActivityEnvironment;
  heartbeats: unknown[];
  result: Promise<ContainerExit>;
}

function supervise(harness: Harness, request: SuperviseRequest, heartbeatDetails?: unknown): Running {
  const environment = activityEnvironment(harness, heartbeatDetails);
  const heartbeats: unknown[] = [];
  environment.on('heartbeat', (details: unknown) => heartbeats.push(details));
  const result: Promise<ContainerExit> = environment.run(harness.activities.superviseContainer, request);
  // Keeps a rejection from counting as unhandled before the test awaits it.
  result.catch(() => undefined);
  return { environment, heartbeats, result };
}

/** Cancels supervision and returns what the activity threw. */
async function cancel(running: Running): Promise<unknown> {
  running.environment.cancel();
  return running.result.then(
    () => new Error('superviseContainer returned after cancellation'),
    (error: unknown) => error,
  );
}

function inboundRow(
  harness: Harness,
  id: string,
): { tries: number; status: string; processAfter: string | null } {
  const db = new Database(inboundPath(harness.sessionDir), { readonly: true });
  try {
    return db
      .prepare('SELECT tries, status, process_after AS processAfter FROM messages_in WHERE id = ?')
      .get(id) as { tries: number; status: string; processAfter: string | null };
  } finally {
    db.close();
  }
}

const retryPolicy = { maxAttempts: 2, backoffMs: 1000 };

/** Records a crashed container's exit the way the workflow does after supervision returns. */
function recordCrash(harness: Harness, request: SuperviseRequest, image: string, exit: ContainerExit) {
  return runActivity(harness, harness.activities.recordExit, {
    sessionId: harness.sessionId,
    containerName: request.containerName,
    image,
    startedAt: request.startedAt,
    exit,
    stopReason: 'crash',
    stopSteps: [],
    failedClaims: true,
    messageRetry: retryPolicy,
  });
}

let exitsSoon: string;
let hangsOnMessage: string;
let allocates: string;
let crashesOnMessage: string;

beforeAll(async () => {
  exitsSoon = await buildVariant('exit-soon', { AGENT_EXIT_AFTER_MS: '1500' });
  hangsOnMessage = await buildVariant('hang', { AGENT_HANG_ON_MESSAGE: '1' });
  allocates = await buildVariant('allocate', { AGENT_ALLOCATE_MB: '512' });
  crashesOnMessage = await buildVariant('crash', { AGENT_CRASH_ON_MESSAGE: '1' });
});

afterEach(async () => {
  for (const harness of harnesses.splice(0)) await removeHarness(harness);
});

afterAll(async () => {
  for (const tag of builtImages) await docker.exec(['image', 'rm', '--force', tag]);
});

describe('superviseContainer', () => {
  it('heartbeats while the container runs', async () => {
    const harness = createHarness();
    const running = supervise(harness, await startAgent(harness, BASE_IMAGE));

    await waitFor(() => running.heartbeats.length >= 3, 'three heartbeats');

    expect(await cancel(running)).toBeInstanceOf(CancelledFailure);
  });

  it('reports claims and heartbeat in observations', async () => {
    const harness = createHarness();
    const request = await startAgent(harness, hangsOnMessage);
    const running = supervise(harness, request);
    const messageId = sendMessage(harness, 'wait for it');

    await waitFor(
      () => harness.observations.some((seen) => seen.claims.some((claim) => claim.messageId === messageId)),
      'an observation with the claim',
    );
    await cancel(running);

    const seen = harness.observations.find((observation) => observation.claims.length > 0)!;
    expect(seen.claims).toEqual([{ messageId, claimedAt: expect.any(String), status: 'processing' }]);
    expect(seen.pendingMessages).toBe(1);
    expect(seen.heartbeatMtime).toBeGreaterThan(request.startedAt);
    expect(seen.declaredToolTimeoutMs).toBeNull();
  });

  it('first observation arrives at once', async () => {
    const harness = createHarness();
    const running = supervise(harness, await startAgent(harness, BASE_IMAGE));

    await waitFor(() => harness.observations.length > 0, 'the first observation');
    await cancel(running);

    expect(harness.observations[0]).toMatchObject({ claims: [], pendingMessages: 0 });
  });

  it('returns the exit of a container that ends itself', async () => {
    const harness = createHarness();
    const request = await startAgent(harness, exitsSoon);

    const exit = await supervise(harness, request).result;

    expect(exit).toMatchObject({ exitCode: 3, oomKilled: false, inspected: true });
    expect(exit.finishedAt).toBeGreaterThanOrEqual(request.startedAt);
  });

  it('reports a vanished container as not inspected', async () => {
    const harness = createHarness();
    const request = await startAgent(harness, BASE_IMAGE);
    const running = supervise(harness, request);
    await waitFor(() => running.heartbeats.length > 0, 'the first heartbeat');

    await docker.remove(request.containerName);

    expect(await running.result).toMatchObject({ exitCode: null, inspected: false });
  });

  it('cancellation leaves the container running', async () => {
    const harness = createHarness();
    const request = await startAgent(harness, BASE_IMAGE);
    const running = supervise(harness, request);
    await waitFor(() => running.heartbeats.length > 0, 'the first heartbeat');

    const error = await cancel(running);

    expect(error).toBeInstanceOf(CancelledFailure);
    expect((await docker.inspect(request.containerName))?.state).toBe('running');
    expect(fs.existsSync(path.join(harness.sessionDir, '.close-request'))).toBe(false);
  });

  it('retry picks up the same container', async () => {
    const harness = createHarness();
    const request = await startAgent(harness, BASE_IMAGE);
    const containerId = (await docker.inspect(request.containerName))?.id;
    const first = supervise(harness, request);
    const firstMessage = sendMessage(harness, 'before the worker crash');
    await waitFor(() => harness.delivered.some((m) => m.inReplyTo === firstMessage), 'the first reply');
    await cancel(first);

    const retry = supervise(harness, request, first.heartbeats.at(-1));
    const secondMessage = sendMessage(harness, 'after the worker crash');
    await waitFor(() => harness.delivered.some((m) => m.inReplyTo === secondMessage), 'the second reply');
    await runActivity(harness, harness.activities.stopContainer, {
      sessionId: harness.sessionId,
      containerName: request.containerName,
      graceMs: 5000,
      closeRequest: true,
      reason: 'idle',
    });
    const exit = await retry.result;

    expect(exit).toMatchObject({ exitCode: 0, inspected: true });
    expect((await docker.inspect(request.containerName))?.id).toBe(containerId);
    expect(harness.delivered.map((message) => message.inReplyTo)).toEqual([firstMessage, secondMessage]);
  });
});

describe('exit after a limit or crash', () => {
  it('memory limit ends in an oom exit', async () => {
    const harness = createHarness();
    writeContainerJson(harness, { resources: { memory: '64m' } });
    const request = await startAgent(harness, allocates);

    const exit = await supervise(harness, request).result;
    const recorded = await recordCrash(harness, request, allocates, exit);

    expect(exit).toMatchObject({ exitCode: 137, oomKilled: true });
    expect(recorded.exitKind).toBe('oom');
    expect(fs.readFileSync(recorded.logPath, 'utf8')).toContain('killed by the out-of-memory killer');
  });

  it('crash while claimed schedules a retry', async () => {
    const harness = createHarness();
    const request = await startAgent(harness, crashesOnMessage);
    const messageId = sendMessage(harness, 'this one crashes the agent');

    const exit = await supervise(harness, request).result;
    const recorded = await recordCrash(harness, request, crashesOnMessage, exit);

    expect(exit.exitCode).toBe(3);
    expect(recorded).toMatchObject({ exitKind: 'error', retriedMessages: [messageId], failedMessages: [] });
    expect(readProcessingClaims(harness.sessionDir)).toEqual([]);
    const row = inboundRow(harness, messageId);
    expect(row).toMatchObject({ tries: 1, status: 'pending' });
    expect(Date.parse(row.processAfter!)).toBeGreaterThan(exit.finishedAt);
  });

  it('crash at the last attempt fails the message', async () => {
    const harness = createHarness();
    await activityEnvironment(harness).run(harness.activities.initFilesystem, {
      sessionId: harness.sessionId,
    });
    const messageId = sendMessage(harness, 'this one crashes the agent');
    for (let attempt = 1; attempt <= retryPolicy.maxAttempts; attempt++) {
      const request = await startAgent(harness, crashesOnMessage);
      const exit = await supervise(harness, request).result;
      await recordCrash(harness, request, crashesOnMessage, exit);
    }

    const failed = readFailedMessages(harness.sessionDir);

    expect(failed).toEqual([{ id: messageId, tries: 2, reason: expect.stringContaining('(crash)') }]);
    expect(readProcessingClaims(harness.sessionDir)).toEqual([]);
  });
});
