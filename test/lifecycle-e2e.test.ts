import fs from 'node:fs';
import path from 'node:path';

import Database from 'better-sqlite3';
import type { Client } from '@temporalio/client';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { sendMessage, type QueuedMessage } from '../src/cli/commands.js';
import { sessionWorkflowId } from '../src/client/ids.js';
import { connectClient, sessionStatus, stopSession } from '../src/client/session-client.js';
import { HostDb } from '../src/db/host-db.js';
import { CallbackSink, type DeliveredMessage } from '../src/delivery/deliverer.js';
import { DockerCli } from '../src/docker/runtime.js';
import { groupPaths } from '../src/paths.js';
import { inboundPath, readProcessingClaims } from '../src/session/session-files.js';
import { createBerthWorker, type BerthWorker } from '../src/worker.js';
import type { SessionStatus } from '../src/workflows/status.js';
import { removeInstallContainers, waitFor, type PollOptions } from './support/activity-harness.js';
import { AgentVariants } from './support/agent-variants.js';
import { bundleWorkflows, startTestInstall, type TestInstall } from './support/temporal.js';

// The container lifecycle end to end: a real Temporal dev server, a berth
// worker in this process, the real Docker engine and agent images. Each test
// uses its own agent group, so the tests do not depend on one another.

const GLOBAL_IDLE_TIMEOUT_SECONDS = 6;
/** Each wait here spans Temporal workflow steps and Docker, so it allows longer than the harness default. */
const POLLING: PollOptions = { timeoutMs: 90_000, intervalMs: 250 };

const docker = new DockerCli();
const variants = new AgentVariants('e2e');
const delivered: DeliveredMessage[] = [];
let install: TestInstall;
let client: Client;
let worker: BerthWorker;
let workerRun: Promise<void>;
let hostDb: HostDb;
let hangsOnMessage: string;

/** Creates the agent group with the given container.json, before its first message creates the session. */
function configureGroup(folder: string, config: object): void {
  hostDb.ensureAgentGroup(folder);
  const { groupDir, containerJson } = groupPaths(install.settings, folder);
  fs.mkdirSync(groupDir, { recursive: true });
  fs.writeFileSync(containerJson, JSON.stringify(config));
}

function send(folder: string, text: string, settings = install.settings): Promise<QueuedMessage> {
  return sendMessage(settings, hostDb, client, { folder, text });
}

function awaitReply(queued: QueuedMessage): Promise<DeliveredMessage> {
  return waitFor(
    `the reply to ${queued.messageId}`,
    () => delivered.find((message) => message.inReplyTo === queued.messageId),
    POLLING,
  );
}

function awaitExit(queued: QueuedMessage): Promise<SessionStatus> {
  return waitFor(
    `the exit of session ${queued.session.id}`,
    async () => {
      const status = await sessionStatus(client, queued.session.id);
      return status.lastExit !== null && status.state === 'idle' ? status : undefined;
    },
    POLLING,
  );
}

/** Returns the value of one `label: value` line of an exit log's header. */
function headerValue(log: string, label: string): string | undefined {
  const line = log.split('\n').find((row) => row.startsWith(`${label}:`));
  return line?.slice(label.length + 1).trim();
}

function inboundRow(queued: QueuedMessage): { tries: number; status: string; processAfter: string | null } {
  const db = new Database(inboundPath(queued.sessionDir), { readonly: true });
  try {
    return db
      .prepare('SELECT tries, status, process_after AS processAfter FROM messages_in WHERE id = ?')
      .get(queued.messageId) as { tries: number; status: string; processAfter: string | null };
  } finally {
    db.close();
  }
}

beforeAll(async () => {
  hangsOnMessage = await variants.build('hang', { AGENT_HEARTBEAT: '0', AGENT_HANG_ON_MESSAGE: '1' });
  install = await startTestInstall({
    BERTH_IDLE_TIMEOUT_SECONDS: String(GLOBAL_IDLE_TIMEOUT_SECONDS),
    BERTH_STOP_GRACE_SECONDS: '2',
    BERTH_STUCK_CHECK_SECONDS: '2',
    // Supervision reports a changed observation at most every 5 s, so a
    // ceiling below that could judge an agent by an observation made before
    // it took its message. The stuck group below sets its own, shorter limits.
    BERTH_HEARTBEAT_CEILING_SECONDS: '30',
  });
  client = await connectClient(install.settings);
  hostDb = new HostDb(install.settings.hostDbPath);
  worker = await createBerthWorker({
    settings: install.settings,
    client,
    sink: new CallbackSink((message) => void delivered.push(message)),
    workflowBundle: await bundleWorkflows(),
  });
  workerRun = worker.run();
}, 300_000);

afterAll(async () => {
  if (install) await removeInstallContainers(docker, install.settings.installId);
  await worker?.shutdown();
  await workerRun;
  hostDb?.close();
  await client?.connection.close();
  await install?.cleanup();
  await variants.removeAll();
}, 120_000);

describe('session lifecycle end to end', () => {
  it('answers, then stops at the idle timeout', async () => {
    const queued = await send('e2e-idle', 'hello lifecycle');

    const reply = await awaitReply(queued);
    const status = await awaitExit(queued);

    expect(reply.text).toBe('echo: hello lifecycle');
    expect(status.lastExit).toMatchObject({ reason: 'idle', exitKind: 'clean', exitCode: 0 });
    const log = fs.readFileSync(status.lastExit!.logPath, 'utf8');
    expect(path.dirname(status.lastExit!.logPath)).toBe(groupPaths(install.settings, 'e2e-idle').logsDir);
    expect(headerValue(log, 'stop reason')).toBe('idle');
    expect(headerValue(log, 'session')).toBe(queued.session.id);
    expect(log).toContain('close-request: exited by itself');
    expect(await docker.inspect(headerValue(log, 'container')!)).toBeNull();
  });

  it('stops a stuck agent and retries its message', async () => {
    configureGroup('e2e-stuck', {
      imageTag: hangsOnMessage,
      idleTimeoutSeconds: 300,
      stuck: { claimToleranceSeconds: 2, heartbeatCeilingSeconds: 4, spawnGraceSeconds: 0 },
      messageRetry: { maxAttempts: 3, backoffSeconds: 60 },
    });
    const queued = await send('e2e-stuck', 'this one hangs the agent');

    const status = await awaitExit(queued);

    expect(status.lastExit).toMatchObject({
      reason: 'stuck',
      exitKind: 'killed',
      exitCode: 137,
      failedMessages: [],
    });
    expect(status.lastError).toMatch(/^stopped as stuck: /);
    const log = fs.readFileSync(status.lastExit!.logPath, 'utf8');
    expect(headerValue(log, 'stop reason')).toBe('stuck');
    expect(headerValue(log, 'image')).toBe(hangsOnMessage);
    // A stuck agent gets no close request: the stop starts at SIGTERM.
    expect(log).not.toContain('close-request:');
    expect(log).toContain('docker-stop: killed by SIGKILL (exit code 137)');
    expect(readProcessingClaims(queued.sessionDir)).toEqual([]);
    const row = inboundRow(queued);
    expect(row).toMatchObject({ tries: 1, status: 'pending' });
    expect(Date.parse(row.processAfter!)).toBeGreaterThan(status.lastExit!.at);
    expect(delivered.filter((message) => message.inReplyTo === queued.messageId)).toEqual([]);
  });

  it('group idle timeout overrides the global one', async () => {
    const groupIdleSeconds = 45;
    configureGroup('e2e-override', { idleTimeoutSeconds: groupIdleSeconds });
    const queued = await send('e2e-override', 'hello override');
    await awaitReply(queued);

    const running = await waitFor(
      'the running session with an idle deadline',
      async () => {
        const status = await sessionStatus(client, queued.session.id);
        return status.state === 'running' && status.nextDeadline?.kind === 'idle' ? status : undefined;
      },
      POLLING,
    );
    await stopSession(client, queued.session.id, 'test finished');
    const stopped = await awaitExit(queued);

    expect(running.nextDeadline!.at - running.lastActivityAt!).toBe(groupIdleSeconds * 1000);
    expect(stopped.lastExit).toMatchObject({ reason: 'stop-request', exitKind: 'clean' });
  });

  it('warm idle pauses, a message unpauses, the pause window stops', async () => {
    configureGroup('e2e-warm', { idleTimeoutSeconds: 3, warmIdle: { pauseSeconds: 8 } });
    const first = await send('e2e-warm', 'hello warm');
    await awaitReply(first);

    const paused = await waitFor(
      'the paused session',
      async () => {
        const status = await sessionStatus(client, first.session.id);
        return status.state === 'paused' ? status : undefined;
      },
      POLLING,
    );
    const containerName = paused.containerName!;
    expect(paused.nextDeadline?.kind).toBe('pause');
    expect((await docker.inspect(containerName))?.state).toBe('paused');

    const second = await send('e2e-warm', 'hello again');
    const reply = await awaitReply(second);
    expect(reply.text).toBe('echo: hello again');
    // The reply came from the same container, unpaused rather than replaced.
    const woken = await sessionStatus(client, second.session.id);
    expect(woken.containerName).toBe(containerName);
    expect(woken.spawnCount).toBe(1);

    const stopped = await awaitExit(second);
    expect(stopped.spawnCount).toBe(1);
    expect(stopped.lastExit).toMatchObject({ reason: 'warm-idle-expired', exitKind: 'clean', exitCode: 0 });
    const log = fs.readFileSync(stopped.lastExit!.logPath, 'utf8');
    expect(headerValue(log, 'container')).toBe(containerName);
    expect(headerValue(log, 'stop reason')).toBe('warm-idle-expired');
    expect(log).toContain('unpause: unpaused to deliver the stop');
    expect(await docker.inspect(containerName)).toBeNull();
  });

  it('a running container outlives continue-as-new', async () => {
    configureGroup('e2e-handover', { idleTimeoutSeconds: 300 });
    // The first wake starts the workflow, and its input keeps this limit for every later run.
    const settings = { ...install.settings, historyEventLimit: 60 };
    const handle = (sessionId: string) => client.workflow.getHandle(sessionWorkflowId(sessionId));
    const first = await send('e2e-handover', 'message 0', settings);
    await awaitReply(first);
    const firstRunId = (await handle(first.session.id).describe()).runId;
    const { containerName } = await sessionStatus(client, first.session.id);

    const queued = [first];
    for (let i = 1; i <= 12; i += 1) {
      const next = await send('e2e-handover', `message ${i}`, settings);
      await awaitReply(next);
      queued.push(next);
    }

    // The handover waits for supervision to see its cancellation, which comes with a heartbeat's reply.
    await waitFor(
      'the workflow to continue as new',
      async () => {
        const { runId } = await handle(first.session.id).describe();
        return runId !== firstRunId ? runId : undefined;
      },
      POLLING,
    );
    for (const message of queued) {
      expect(delivered.filter((reply) => reply.inReplyTo === message.messageId)).toHaveLength(1);
    }
    const status = await sessionStatus(client, first.session.id);
    expect(status).toMatchObject({ state: 'running', containerName, spawnCount: 1 });
    expect((await docker.inspect(containerName!))?.state).toBe('running');

    await stopSession(client, first.session.id, 'test finished');
    const stopped = await awaitExit(first);
    expect(stopped.lastExit).toMatchObject({ reason: 'stop-request', exitKind: 'clean', exitCode: 0 });
    expect(headerValue(fs.readFileSync(stopped.lastExit!.logPath, 'utf8'), 'container')).toBe(containerName);
  });
});
