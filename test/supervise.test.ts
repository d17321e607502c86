import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';

import Database from 'better-sqlite3';
import { CancelledFailure } from '@temporalio/common';
import type { MockActivityEnvironment } from '@temporalio/testing';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';

import type { ContainerExit, SuperviseRequest } from '../src/activities/types.js';
import { DockerCli } from '../src/docker/runtime.js';
import {
  inboundPath,
  insertInboundMessage,
  readFailedMessages,
  readProcessingClaims,
} from '../src/session/session-files.js';
import { createSessionHarness, waitUntil, type SessionHarness } from './support/activity-harness.js';
import { AGENT_IMAGE, AgentVariants } from './support/agent-variants.js';

// superviseContainer against real agent containers, run as an activity under
// MockActivityEnvironment with recording fakes for the workflow signals and
// the delivery sink. Also the exits it reports: out of memory, and a crash
// while a message is claimed, which recordExit turns into a retry.

const docker = new DockerCli();
const harnesses: SessionHarness[] = [];
const variants = new AgentVariants('supervise');

/** Creates a harness that keeps activity logs in `harness.logs` instead of printing them. */
async function createHarness(): Promise<SessionHarness> {
  const harness = await createSessionHarness('supervise', { activityLogs: 'record' });
  harnesses.push(harness);
  return harness;
}

function sendMessage(harness: SessionHarness, text: string): string {
  const id = `msg-${randomUUID()}`;
  insertInboundMessage(harness.sessionDir, { id, kind: 'chat', content: { text } });
  return id;
}

/** Supervision that runs in the background while the test acts. */
interface Running {
  environment: MockActivityEnvironment;
  heartbeats: unknown[];
  result: Promise<ContainerExit>;
}

function supervise(harness: SessionHarness, request: SuperviseRequest, heartbeatDetails?: unknown): Running {
  const environment = harness.environment(heartbeatDetails === undefined ? undefined : { heartbeatDetails });
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
  harness: SessionHarness,
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
function recordCrash(harness: SessionHarness, request: SuperviseRequest, image: string, exit: ContainerExit) {
  return harness.run(harness.activities.recordExit, {
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
  exitsSoon = await variants.build('exit-soon', { AGENT_EXIT_AFTER_MS: '1500' });
  hangsOnMessage = await variants.build('hang', { AGENT_HANG_ON_MESSAGE: '1' });
  allocates = await variants.build('allocate', { AGENT_ALLOCATE_MB: '512' });
  crashesOnMessage = await variants.build('crash', { AGENT_CRASH_ON_MESSAGE: '1' });
});

afterEach(async () => {
  for (const harness of harnesses.splice(0)) await harness.cleanup();
});

afterAll(async () => {
  await variants.removeAll();
});

describe('superviseContainer', () => {
  it('heartbeats while the container runs', async () => {
    const harness = await createHarness();
    const running = supervise(harness, await harness.startAgent(AGENT_IMAGE));

    await waitUntil('three heartbeats', () => running.heartbeats.length >= 3);

    expect(await cancel(running)).toBeInstanceOf(CancelledFailure);
  });

  it('reports claims and heartbeat in observations', async () => {
    const harness = await createHarness();
    const request = await harness.startAgent(hangsOnMessage);
    const running = supervise(harness, request);
    const messageId = sendMessage(harness, 'wait for it');

    await waitUntil('an observation with the claim', () =>
      harness.observations.some((seen) => seen.claims.some((claim) => claim.messageId === messageId)),
    );
    await cancel(running);

    const seen = harness.observations.find((observation) => observation.claims.length > 0)!;
    expect(seen.claims).toEqual([{ messageId, claimedAt: expect.any(String), status: 'processing' }]);
    expect(seen.pendingMessages).toBe(1);
    expect(seen.heartbeatMtime).toBeGreaterThan(request.startedAt);
    expect(seen.declaredToolTimeoutMs).toBeNull();
  });

  it('first observation arrives at once', async () => {
    const harness = await createHarness();
    const running = supervise(harness, await harness.startAgent(AGENT_IMAGE));

    await waitUntil('the first observation', () => harness.observations.length > 0);
    await cancel(running);

    expect(harness.observations[0]).toMatchObject({ claims: [], pendingMessages: 0 });
  });

  it('returns the exit of a container that ends itself', async () => {
    const harness = await createHarness();
    const request = await harness.startAgent(exitsSoon);

    const exit = await supervise(harness, request).result;

    expect(exit).toMatchObject({ exitCode: 3, oomKilled: false, inspected: true });
    expect(exit.finishedAt).toBeGreaterThanOrEqual(request.startedAt);
  });

  it('reports a vanished container as not inspected', async () => {
    const harness = await createHarness();
    const request = await harness.startAgent(AGENT_IMAGE);
    const running = supervise(harness, request);
    await waitUntil('the first heartbeat', () => running.heartbeats.length > 0);

    await docker.remove(request.containerName);

    expect(await running.result).toMatchObject({ exitCode: null, inspected: false });
  });

  it('cancellation leaves the container running', async () => {
    const harness = await createHarness();
    const request = await harness.startAgent(AGENT_IMAGE);
    const running = supervise(harness, request);
    await waitUntil('the first heartbeat', () => running.heartbeats.length > 0);

    const error = await cancel(running);

    expect(error).toBeInstanceOf(CancelledFailure);
    expect((await docker.inspect(request.containerName))?.state).toBe('running');
    expect(fs.existsSync(path.join(harness.sessionDir, '.close-request'))).toBe(false);
  });

  it('retry picks up the same container', async () => {
    const harness = await createHarness();
    const request = await harness.startAgent(AGENT_IMAGE);
    const containerId = (await docker.inspect(request.containerName))?.id;
    const first = supervise(harness, request);
    const firstMessage = sendMessage(harness, 'before the worker crash');
    await waitUntil('the first reply', () => harness.delivered.some((m) => m.inReplyTo === firstMessage));
    await cancel(first);

    const retry = supervise(harness, request, first.heartbeats.at(-1));
    const secondMessage = sendMessage(harness, 'after the worker crash');
    await waitUntil('the second reply', () => harness.delivered.some((m) => m.inReplyTo === secondMessage));
    await harness.run(harness.activities.stopContainer, {
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
    const harness = await createHarness();
    harness.writeContainerJson(harness.folder, { resources: { memory: '64m' } });
    const request = await harness.startAgent(allocates);

    const exit = await supervise(harness, request).result;
    const recorded = await recordCrash(harness, request, allocates, exit);

    expect(exit).toMatchObject({ exitCode: 137, oomKilled: true });
    expect(recorded.exitKind).toBe('oom');
    expect(fs.readFileSync(recorded.logPath, 'utf8')).toContain('killed by the out-of-memory killer');
  });

  it('crash while claimed schedules a retry', async () => {
    const harness = await createHarness();
    const request = await harness.startAgent(crashesOnMessage);
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
    const harness = await createHarness();
    await harness.run(harness.activities.initFilesystem, {
      sessionId: harness.sessionId,
    });
    const messageId = sendMessage(harness, 'this one crashes the agent');
    for (let attempt = 1; attempt <= retryPolicy.maxAttempts; attempt++) {
      const request = await harness.startAgent(crashesOnMessage);
      const exit = await supervise(harness, request).result;
      await recordCrash(harness, request, crashesOnMessage, exit);
    }

    const failed = readFailedMessages(harness.sessionDir);

    expect(failed).toEqual([{ id: messageId, tries: 2, reason: expect.stringContaining('(crash)') }]);
    expect(readProcessingClaims(harness.sessionDir)).toEqual([]);
  });
});
