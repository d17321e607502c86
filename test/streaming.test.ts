import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import Database from 'better-sqlite3';
import type { Logger } from '@temporalio/common';
import { MockActivityEnvironment } from '@temporalio/testing';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';

import type { ActivityDeps } from '../src/activities/deps.js';
import { createActivities } from '../src/activities/index.js';
import { LABELS } from '../src/activities/spawn.js';
import type { ContainerExit, SuperviseRequest } from '../src/activities/types.js';
import { HostDb } from '../src/db/host-db.js';
import { CallbackSink, Deliverer, type DeliveredMessage } from '../src/delivery/deliverer.js';
import { DeliveryLoop } from '../src/delivery/delivery-loop.js';
import { DockerCli, type ContainerInfo } from '../src/docker/runtime.js';
import { OUTPUT_END_MARKER, OUTPUT_START_MARKER } from '../src/lifecycle/output-markers.js';
import { createOneCli } from '../src/onecli/onecli.js';
import { sessionDir } from '../src/paths.js';
import { createDefaultRegistry } from '../src/providers/registry.js';
import { insertInboundMessage, outboundPath } from '../src/session/session-files.js';
import { loadSettings, type Settings } from '../src/settings.js';
import type { ActivityNotice } from '../src/workflows/session.js';

// Output blocks streamed from a container's stdout: superviseContainer
// delivers them at once, and the outbound.db poll must not deliver them again.

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
  deps: ActivityDeps;
  activities: ReturnType<typeof createActivities>;
  sessionId: string;
  sessionDir: string;
  dataDir: string;
  delivered: DeliveredMessage[];
  activitySignals: ActivityNotice[];
  logs: LogEntry[];
}

const harnesses: Harness[] = [];
const builtImages: string[] = [];
const docker = new DockerCli();

function createHarness(dockerCli: DockerCli = docker): Harness {
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'berth-streaming-'));
  const settings = loadSettings({
    ...process.env,
    BERTH_DATA_DIR: dataDir,
    BERTH_MOUNT_ALLOWLIST: path.join(dataDir, 'no-such-allowlist.json'),
  });
  const hostDb = new HostDb(settings.hostDbPath);
  const delivered: DeliveredMessage[] = [];
  const activitySignals: ActivityNotice[] = [];
  const deps: ActivityDeps = {
    settings,
    hostDb,
    docker: dockerCli,
    oneCli: createOneCli({ url: undefined, requireCredentials: false }),
    providers: createDefaultRegistry(),
    signals: {
      activity: async (_sessionId, notice) => {
        activitySignals.push(notice);
      },
      observation: async () => undefined,
    },
    deliverer: new Deliverer(new CallbackSink((message) => void delivered.push(message))),
    pollIntervalMs: 200,
  };

  const folder = `streaming-${randomUUID().slice(0, 8)}`;
  const group = hostDb.ensureAgentGroup(folder);
  const session = hostDb.ensureSession(group.id, null);
  const harness: Harness = {
    settings,
    hostDb,
    deps,
    activities: createActivities(deps),
    sessionId: session.id,
    sessionDir: sessionDir(settings, folder, session.id),
    dataDir,
    delivered,
    activitySignals,
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
  const tag = `berth-test-streaming-${name}:${randomUUID().slice(0, 8)}`;
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

function runActivity<A extends unknown[], R>(
  harness: Harness,
  fn: (...args: A) => Promise<R>,
  ...args: A
): Promise<R> {
  return new MockActivityEnvironment(undefined, { logger: recordingLogger(harness.logs) }).run(fn, ...args);
}

async function startAgent(harness: Harness, image: string): Promise<SuperviseRequest> {
  const { activities, sessionId } = harness;
  await runActivity(harness, activities.initFilesystem, { sessionId });
  const containerName = `berth-test-streaming-${randomUUID().slice(0, 12)}`;
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

function stopAgent(harness: Harness, request: SuperviseRequest) {
  return runActivity(harness, harness.activities.stopContainer, {
    sessionId: harness.sessionId,
    containerName: request.containerName,
    graceMs: 5000,
    closeRequest: true,
    reason: 'idle',
  });
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

function supervise(harness: Harness, request: SuperviseRequest): Promise<ContainerExit> {
  const result = runActivity(harness, harness.activities.superviseContainer, request);
  // Keeps a rejection from counting as unhandled before the test awaits it.
  result.catch(() => undefined);
  return result;
}

function deliveryLoop(harness: Harness): DeliveryLoop {
  return new DeliveryLoop(harness.settings, harness.hostDb, harness.deps.deliverer, harness.deps.signals);
}

/** Counts the agent's replies to a message in outbound.db, delivered or not. */
function outboundReplyCount(harness: Harness, messageId: string): number {
  const db = new Database(outboundPath(harness.sessionDir), { readonly: true });
  try {
    const row = db.prepare('SELECT COUNT(*) AS count FROM messages_out WHERE in_reply_to = ?').get(messageId);
    return (row as { count: number }).count;
  } finally {
    db.close();
  }
}

const repliesTo = (harness: Harness, messageId: string) =>
  harness.delivered.filter((message) => message.inReplyTo === messageId);

/** A DockerCli whose one container has already exited after printing `stdout`. */
class ExitedContainerDocker extends DockerCli {
  constructor(private readonly stdout: string) {
    super();
  }

  override async inspect(name: string): Promise<ContainerInfo> {
    const now = new Date().toISOString();
    return {
      id: 'scripted',
      name,
      image: BASE_IMAGE,
      state: 'exited',
      exitCode: 0,
      oomKilled: false,
      startedAt: now,
      finishedAt: now,
      labels: {},
      mounts: [],
      env: {},
    };
  }

  override async followStdout(_name: string, onChunk: (chunk: Buffer) => void): Promise<void> {
    onChunk(Buffer.from(this.stdout));
  }
}

const block = (value: unknown) => `${OUTPUT_START_MARKER}\n${JSON.stringify(value)}\n${OUTPUT_END_MARKER}\n`;

let printsMalformed: string;

beforeAll(async () => {
  printsMalformed = await buildVariant('malformed', { AGENT_PRINT_MALFORMED: '1' });
});

afterEach(async () => {
  for (const harness of harnesses.splice(0)) await removeHarness(harness);
});

afterAll(async () => {
  for (const tag of builtImages) await docker.exec(['image', 'rm', '--force', tag]);
});

describe('streamed output', () => {
  it('delivers a reply via the stream', async () => {
    const harness = createHarness();
    const request = await startAgent(harness, BASE_IMAGE);
    const supervision = supervise(harness, request);
    const messageId = sendMessage(harness, 'stream this');

    await waitFor(() => repliesTo(harness, messageId).length > 0, 'the streamed reply');
    await stopAgent(harness, request);
    await supervision;

    const [reply] = repliesTo(harness, messageId);
    expect(reply).toMatchObject({ via: 'stream', text: 'echo: stream this', sessionId: harness.sessionId });
    expect(harness.activitySignals.map((notice) => notice.source)).toContain('output');
  });

  it('poll skips a streamed reply', async () => {
    const harness = createHarness();
    const request = await startAgent(harness, BASE_IMAGE);
    const supervision = supervise(harness, request);
    const messageId = sendMessage(harness, 'deliver me once');
    await waitFor(() => repliesTo(harness, messageId).length > 0, 'the streamed reply');
    await waitFor(() => outboundReplyCount(harness, messageId) === 1, 'the reply in outbound.db');

    const polled = await deliveryLoop(harness).pass();
    await stopAgent(harness, request);
    await supervision;

    expect(polled).toBe(0);
    expect(repliesTo(harness, messageId)).toHaveLength(1);
  });

  it('stream skips a polled reply', async () => {
    const harness = createHarness();
    const request = await startAgent(harness, BASE_IMAGE);
    const messageId = sendMessage(harness, 'poll me first');
    await waitFor(async () => (await deliveryLoop(harness).pass()) > 0, 'the polled reply');
    await stopAgent(harness, request);

    await supervise(harness, request);

    expect(repliesTo(harness, messageId).map((message) => message.via)).toEqual(['outbound']);
  });

  it('skips a malformed block and goes on', async () => {
    const harness = createHarness();
    const request = await startAgent(harness, printsMalformed);
    const supervision = supervise(harness, request);
    const first = sendMessage(harness, 'one');
    await waitFor(() => repliesTo(harness, first).length === 2, 'both replies to the first message');
    const second = sendMessage(harness, 'two');
    await waitFor(() => repliesTo(harness, second).length === 2, 'both replies to the second message');
    await stopAgent(harness, request);
    await supervision;

    expect(repliesTo(harness, first).map((message) => [message.via, message.text])).toEqual([
      ['stream', 'echo: one'],
      ['stream', 'echo: one (second reply)'],
    ]);
    expect(repliesTo(harness, second).map((message) => message.text)).toEqual([
      'echo: two',
      'echo: two (second reply)',
    ]);
    const skipped = harness.logs.filter((entry) => entry.message === 'malformed output block skipped');
    expect(skipped).toHaveLength(2);
    expect(skipped[0]?.level).toBe('WARN');
  });

  it('delivers repeated id-less blocks each', async () => {
    const stdout = block({ result: 'done' }) + block({ result: 'done' });
    const harness = createHarness(new ExitedContainerDocker(stdout));
    await runActivity(harness, harness.activities.initFilesystem, { sessionId: harness.sessionId });
    const request = {
      sessionId: harness.sessionId,
      containerName: 'berth-test-scripted',
      startedAt: Date.now(),
    };

    await supervise(harness, request);

    expect(harness.delivered.map((message) => message.text)).toEqual(['done', 'done']);
  });

  it('retry skips id-less blocks delivered before', async () => {
    const stdout = block({ result: 'first' }) + block({ result: 'second' });
    const harness = createHarness(new ExitedContainerDocker(stdout));
    await runActivity(harness, harness.activities.initFilesystem, { sessionId: harness.sessionId });
    const request = {
      sessionId: harness.sessionId,
      containerName: 'berth-test-scripted',
      startedAt: Date.now(),
    };

    await supervise(harness, request);
    await supervise(harness, request);

    expect(harness.delivered.map((message) => message.text)).toEqual(['first', 'second']);
  });
});
