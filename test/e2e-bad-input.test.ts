import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import Database from 'better-sqlite3';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import type { SessionSummary } from '../src/cli/commands.js';
import { collectStatus } from '../src/cli/commands.js';
import { groupPaths, sessionDir } from '../src/paths.js';
import { bundleWorkflows } from './support/temporal.js';
import {
  dockerPs,
  runCli,
  startInstallWithWorker,
  waitFor,
  type InstallWithWorker,
} from './support/install.js';

// Bad input and an unreachable Docker engine, end to end against a real
// Temporal dev server. The worker runs Docker through a wrapper script that
// fails like an engine that is down until the test creates its "healthy" file,
// and from then on passes every command to the real docker binary.

const DOCKER_DOWN_MESSAGE =
  'Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker daemon running?';

let env: InstallWithWorker;
let scriptDir: string;

function dockerWrapperScript(realDocker: string): string {
  return [
    '#!/bin/sh',
    `if [ -e "${path.join(scriptDir, 'healthy')}" ]; then exec "${realDocker}" "$@"; fi`,
    `echo "${DOCKER_DOWN_MESSAGE}" >&2`,
    'exit 1',
    '',
  ].join('\n');
}

beforeAll(async () => {
  scriptDir = fs.mkdtempSync(path.join(os.tmpdir(), 'berth-docker-wrapper-'));
  const realDocker = execFileSync('sh', ['-c', 'command -v docker'], { encoding: 'utf8' }).trim();
  const wrapper = path.join(scriptDir, 'docker');
  fs.writeFileSync(wrapper, dockerWrapperScript(realDocker), { mode: 0o755 });

  env = await startInstallWithWorker(
    { BERTH_IDLE_TIMEOUT_SECONDS: '30', BERTH_STOP_GRACE_SECONDS: '3' },
    { workflowBundle: await bundleWorkflows(), workerSettings: { dockerBinary: wrapper } },
  );
}, 300_000);

afterAll(async () => {
  await env?.stop();
  fs.rmSync(scriptDir, { recursive: true, force: true });
}, 120_000);

function setDockerHealthy(healthy: boolean): void {
  const flag = path.join(scriptDir, 'healthy');
  if (healthy) fs.writeFileSync(flag, '');
  else fs.rmSync(flag, { force: true });
}

function queuedFrom(stderr: string): { messageId: string; sessionId: string } {
  const match = /Queued message (msg-[0-9a-f-]+) for session (sess-[0-9a-f-]+)/.exec(stderr);
  if (!match) throw new Error(`No "Queued message" line in the CLI output: ${stderr}`);
  return { messageId: match[1]!, sessionId: match[2]! };
}

function inboundStatus(folder: string, sessionId: string, messageId: string): string | undefined {
  const file = path.join(sessionDir(env.settings, folder, sessionId), 'inbound.db');
  const db = new Database(file, { readonly: true, fileMustExist: true });
  try {
    const row = db.prepare('SELECT status FROM messages_in WHERE id = ?').get(messageId) as
      { status: string } | undefined;
    return row?.status;
  } finally {
    db.close();
  }
}

async function statusJson(sessionId: string): Promise<SessionSummary> {
  const result = await runCli(env.install, ['status', sessionId, '--json']);
  expect(result.code, result.stderr).toBe(0);
  return JSON.parse(result.stdout) as SessionSummary;
}

describe('unknown session', () => {
  it('stop exits non-zero naming the session', async () => {
    const result = await runCli(env.install, ['stop', 'sess-does-not-exist']);

    expect(result.code).not.toBe(0);
    expect(result.stderr).toContain('sess-does-not-exist');
    expect(result.stderr).toContain('berth status');
  }, 120_000);

  it('status exits non-zero naming the session', async () => {
    const result = await runCli(env.install, ['status', 'sess-does-not-exist']);

    expect(result.code).not.toBe(0);
    expect(result.stderr).toContain('sess-does-not-exist');
    expect(result.stderr).toContain('berth status');
    expect(result.stdout).toBe('');
  }, 120_000);
});

describe('invalid group folder', () => {
  it('send exits non-zero naming the value', async () => {
    const result = await runCli(env.install, ['send', '../x', 'hello']);

    expect(result.code).not.toBe(0);
    expect(result.stderr).toContain('"../x"');
    expect(env.hostDb.listAgentGroups()).toEqual([]);
    expect(fs.existsSync(path.join(env.settings.dataDir, 'x'))).toBe(false);
  }, 120_000);
});

describe('malformed container.json', () => {
  it('fails the wake naming the file and field', async () => {
    const paths = groupPaths(env.settings, 'broken');
    fs.mkdirSync(paths.groupDir, { recursive: true });
    fs.writeFileSync(paths.containerJson, JSON.stringify({ idleTimeoutSeconds: 'ten' }));

    const sent = await runCli(env.install, ['send', 'broken', 'hello']);
    expect(sent.code, sent.stderr).toBe(0);
    const { sessionId, messageId } = queuedFrom(sent.stderr);

    const summary = await waitFor(
      'the wake to fail',
      async () => {
        const current = await statusJson(sessionId);
        return current.lastError !== null ? current : undefined;
      },
      60_000,
      500,
    );
    expect(summary.lastError).toContain('InvalidContainerConfigError');
    expect(summary.lastError).toContain(paths.containerJson);
    expect(summary.lastError).toContain('idleTimeoutSeconds');
    expect(summary.state).toBe('idle');
    expect(summary.retrying).toBeNull();
    expect(inboundStatus('broken', sessionId, messageId)).toBe('pending');
    expect(await dockerPs(`berth.session=${sessionId}`, { all: true })).toEqual([]);
    expect(JSON.parse(fs.readFileSync(paths.containerJson, 'utf8'))).toEqual({ idleTimeoutSeconds: 'ten' });
  }, 180_000);
});

describe('docker unreachable', () => {
  let sessionId: string;
  let firstMessageId: string;

  it('status shows the activity retrying', async () => {
    setDockerHealthy(false);
    const sent = await runCli(env.install, ['send', 'offline', 'while docker is down']);
    expect(sent.code, sent.stderr).toBe(0);
    ({ sessionId, messageId: firstMessageId } = queuedFrom(sent.stderr));

    // NOTE: ensureImage gives up after 3 attempts (about 3 s), so this poll must land inside that window
    // until the session workflow retries a Docker outage for longer.
    const summary = await waitFor(
      'a retrying activity in berth status',
      async () => {
        const current = await statusJson(sessionId);
        return current.retrying !== null ? current : undefined;
      },
      60_000,
      500,
    );

    expect(['ensureImage', 'spawnContainer']).toContain(summary.retrying!.activity);
    expect(summary.retrying!.lastFailure).toContain('Cannot connect to the Docker daemon');
    expect(summary.containerName).toBeNull();
  }, 180_000);

  it('leaves the message pending during the outage', async () => {
    // A 20 s outage, about as long as a Docker engine restart takes (an estimate).
    await new Promise((resolve) => setTimeout(resolve, 20_000));

    expect(inboundStatus('offline', sessionId, firstMessageId)).toBe('pending');
    expect(env.deliveries.filter((message) => message.sessionId === sessionId)).toEqual([]);
    expect(await dockerPs(`berth.session=${sessionId}`, { all: true })).toEqual([]);
  }, 120_000);

  it('answers the pending message once docker is back', async () => {
    setDockerHealthy(true);

    // No new message and no new wake: the session's own retries must reach the engine again.
    const reply = await waitFor(
      'the reply to the message sent while docker was down',
      () => env.deliveries.find((message) => message.inReplyTo === firstMessageId),
      120_000,
      500,
    ).catch(async (error: unknown) => {
      throw new Error(`${(error as Error).message} Status: ${JSON.stringify(await statusJson(sessionId))}`);
    });

    expect(reply.text).toBe('echo: while docker is down');
  }, 240_000);

  it('same worker answers a new message', async () => {
    setDockerHealthy(true);

    const sent = await runCli(env.install, ['send', 'offline', 'docker is back', '--wait', '90']);

    expect(sent.code, sent.stderr).toBe(0);
    expect(sent.stdout).toBe('echo: docker is back\n');
    expect(queuedFrom(sent.stderr).sessionId).toBe(sessionId);
    const replies = await waitFor(
      'replies to both messages',
      () => {
        const found = env.deliveries.filter((message) => message.sessionId === sessionId);
        return found.length >= 2 ? found : undefined;
      },
      60_000,
    );
    expect(replies.map((reply) => reply.text).sort()).toEqual([
      'echo: docker is back',
      'echo: while docker is down',
    ]);
    const summaries = await collectStatus(env.settings, env.hostDb, env.client, sessionId);
    expect(summaries[0]!.state).toBe('running');
  }, 240_000);
});
