import { randomUUID } from 'node:crypto';

import Database from 'better-sqlite3';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';

import type { ContainerExit, SuperviseRequest } from '../src/activities/types.js';
import { DeliveryLoop } from '../src/delivery/delivery-loop.js';
import type { ContainerInfo } from '../src/docker/runtime.js';
import { OUTPUT_END_MARKER, OUTPUT_START_MARKER } from '../src/lifecycle/output-markers.js';
import { insertInboundMessage, outboundPath } from '../src/session/session-files.js';
import {
  CountingDockerCli,
  createSessionHarness,
  waitUntil,
  type SessionHarness,
} from './support/activity-harness.js';
import { AGENT_IMAGE, AgentVariants } from './support/agent-variants.js';

// Output blocks streamed from a container's stdout: superviseContainer
// delivers them at once, and the outbound.db poll must not deliver them again.

const harnesses: SessionHarness[] = [];
const variants = new AgentVariants('streaming');

/** Creates a harness whose activity logs the tests read from `harness.logs`. */
async function createHarness(docker?: CountingDockerCli): Promise<SessionHarness> {
  const harness = await createSessionHarness('streaming', { docker, activityLogs: 'record' });
  harnesses.push(harness);
  return harness;
}

function stopAgent(harness: SessionHarness, request: SuperviseRequest) {
  return harness.run(harness.activities.stopContainer, {
    sessionId: harness.sessionId,
    containerName: request.containerName,
    graceMs: 5000,
    closeRequest: true,
    reason: 'idle',
  });
}

function sendMessage(harness: SessionHarness, text: string): string {
  const id = `msg-${randomUUID()}`;
  insertInboundMessage(harness.sessionDir, { id, kind: 'chat', content: { text } });
  return id;
}

function supervise(harness: SessionHarness, request: SuperviseRequest): Promise<ContainerExit> {
  const result = harness.run(harness.activities.superviseContainer, request);
  // Keeps a rejection from counting as unhandled before the test awaits it.
  result.catch(() => undefined);
  return result;
}

function deliveryLoop(harness: SessionHarness): DeliveryLoop {
  return new DeliveryLoop(harness.settings, harness.hostDb, harness.deps.deliverer, harness.deps.signals);
}

/** Counts the agent's replies to a message in outbound.db, delivered or not. */
function outboundReplyCount(harness: SessionHarness, messageId: string): number {
  const db = new Database(outboundPath(harness.sessionDir), { readonly: true });
  try {
    const row = db.prepare('SELECT COUNT(*) AS count FROM messages_out WHERE in_reply_to = ?').get(messageId);
    return (row as { count: number }).count;
  } finally {
    db.close();
  }
}

const repliesTo = (harness: SessionHarness, messageId: string) =>
  harness.delivered.filter((message) => message.inReplyTo === messageId);

/** A DockerCli whose one container has already exited after printing `stdout`. */
class ExitedContainerDocker extends CountingDockerCli {
  constructor(private readonly stdout: string) {
    super();
  }

  override async inspect(name: string): Promise<ContainerInfo> {
    const now = new Date().toISOString();
    return {
      id: 'scripted',
      name,
      image: AGENT_IMAGE,
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
  printsMalformed = await variants.build('malformed', { AGENT_PRINT_MALFORMED: '1' });
});

afterEach(async () => {
  for (const harness of harnesses.splice(0)) await harness.cleanup();
});

afterAll(async () => {
  await variants.removeAll();
});

describe('streamed output', () => {
  it('delivers a reply via the stream', async () => {
    const harness = await createHarness();
    const request = await harness.startAgent(AGENT_IMAGE);
    const supervision = supervise(harness, request);
    const messageId = sendMessage(harness, 'stream this');

    await waitUntil('the streamed reply', () => repliesTo(harness, messageId).length > 0);
    await stopAgent(harness, request);
    await supervision;

    const [reply] = repliesTo(harness, messageId);
    expect(reply).toMatchObject({ via: 'stream', text: 'echo: stream this', sessionId: harness.sessionId });
    expect(harness.activityNotices.map((notice) => notice.source)).toContain('output');
  });

  it('poll skips a streamed reply', async () => {
    const harness = await createHarness();
    const request = await harness.startAgent(AGENT_IMAGE);
    const supervision = supervise(harness, request);
    const messageId = sendMessage(harness, 'deliver me once');
    await waitUntil('the streamed reply', () => repliesTo(harness, messageId).length > 0);
    await waitUntil('the reply in outbound.db', () => outboundReplyCount(harness, messageId) === 1);

    const polled = await deliveryLoop(harness).pass();
    await stopAgent(harness, request);
    await supervision;

    expect(polled).toBe(0);
    expect(repliesTo(harness, messageId)).toHaveLength(1);
  });

  it('stream skips a polled reply', async () => {
    const harness = await createHarness();
    const request = await harness.startAgent(AGENT_IMAGE);
    const messageId = sendMessage(harness, 'poll me first');
    await waitUntil('the polled reply', async () => (await deliveryLoop(harness).pass()) > 0);
    await stopAgent(harness, request);

    await supervise(harness, request);

    expect(repliesTo(harness, messageId).map((message) => message.via)).toEqual(['outbound']);
  });

  it('skips a malformed block and goes on', async () => {
    const harness = await createHarness();
    const request = await harness.startAgent(printsMalformed);
    const supervision = supervise(harness, request);
    const first = sendMessage(harness, 'one');
    await waitUntil('both replies to the first message', () => repliesTo(harness, first).length === 2);
    const second = sendMessage(harness, 'two');
    await waitUntil('both replies to the second message', () => repliesTo(harness, second).length === 2);
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
    const harness = await createHarness(new ExitedContainerDocker(stdout));
    await harness.run(harness.activities.initFilesystem, { sessionId: harness.sessionId });
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
    const harness = await createHarness(new ExitedContainerDocker(stdout));
    await harness.run(harness.activities.initFilesystem, { sessionId: harness.sessionId });
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
