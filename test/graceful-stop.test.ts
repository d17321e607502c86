import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';

import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';

import type { ContainerExit, StopReason, StopStep } from '../src/activities/types.js';
import { DockerCli } from '../src/docker/runtime.js';
import { groupPaths } from '../src/paths.js';
import { insertInboundMessage, readUndeliveredMessages } from '../src/session/session-files.js';
import { createSessionHarness, waitUntil, type SessionHarness } from './support/activity-harness.js';
import { AGENT_IMAGE, AgentVariants } from './support/agent-variants.js';

// Graceful stop and per-exit logs against the real Docker engine: each test
// starts a real agent container, stops it with stopContainer and records the
// exit with recordExit, both run as activities under MockActivityEnvironment.

/** Stands in for a OneCLI API key. It must never reach an exit log. */
const FAKE_API_KEY = `onecli-test-key-${randomUUID()}`;
const GRACE_MS = 3000;

const docker = new DockerCli();
const harnesses: SessionHarness[] = [];
const variants = new AgentVariants('stop');

/** Creates a harness with the fake OneCLI key in its settings. It drops activity logs, which no test reads. */
async function createHarness(env: Record<string, string> = {}): Promise<SessionHarness> {
  const harness = await createSessionHarness('stop', {
    env: { ONECLI_API_KEY: FAKE_API_KEY, ...env },
    activityLogs: 'discard',
  });
  harnesses.push(harness);
  return harness;
}

interface Started {
  containerName: string;
  image: string;
  startedAt: number;
}

/** Inserts a chat message and waits until the agent has written its reply to outbound.db. */
async function sendAndAwaitReply(harness: SessionHarness, text: string): Promise<string> {
  const id = `msg-${randomUUID()}`;
  insertInboundMessage(harness.sessionDir, { id, kind: 'chat', content: { text } });
  await waitUntil(`the agent's reply to ${id}`, () =>
    readUndeliveredMessages(harness.sessionDir).some((message) => message.inReplyTo === id),
  );
  return id;
}

/** Reads the exit of a container that has stopped, as superviseContainer would report it. */
async function exitOf(containerName: string): Promise<ContainerExit> {
  const info = await docker.inspect(containerName);
  if (info === null) throw new Error(`Container ${containerName} is gone before its exit was read.`);
  expect(info.state).toBe('exited');
  return {
    exitCode: info.exitCode,
    oomKilled: info.oomKilled,
    finishedAt: info.finishedAt ? Date.parse(info.finishedAt) : Date.now(),
    inspected: true,
  };
}

async function stopAgent(harness: SessionHarness, started: Started, reason = 'idle'): Promise<StopStep[]> {
  const { steps } = await harness.run(harness.activities.stopContainer, {
    sessionId: harness.sessionId,
    containerName: started.containerName,
    graceMs: GRACE_MS,
    closeRequest: true,
    reason,
  });
  return steps;
}

async function recordExit(
  harness: SessionHarness,
  started: Started,
  exit: ContainerExit,
  stopSteps: StopStep[],
  stopReason: StopReason = 'idle',
) {
  return harness.run(harness.activities.recordExit, {
    sessionId: harness.sessionId,
    containerName: started.containerName,
    image: started.image,
    startedAt: started.startedAt,
    exit,
    stopReason,
    stopSteps,
    failedClaims: false,
    messageRetry: { maxAttempts: 3, backoffMs: 1000 },
  });
}

function exitLogFiles(harness: SessionHarness): string[] {
  const { logsDir } = harness.fixture.paths;
  if (!fs.existsSync(logsDir)) return [];
  return fs
    .readdirSync(logsDir)
    .filter((name) => /^container-.*\.log$/.test(name))
    .sort();
}

/** Returns the value of one `label: value` line of an exit log's header. */
function headerValue(log: string, label: string): string | undefined {
  const line = log.split('\n').find((row) => row.startsWith(`${label}:`));
  return line?.slice(label.length + 1).trim();
}

const stepsOf = (steps: StopStep[]) => steps.map(({ step, outcome }) => `${step}: ${outcome}`);

let ignoresClose: string;
let defaultSigterm: string;
let ignoresAll: string;
let reportsEnv: string;
// What a gateway's proxy variable looks like: credentials inside the URL, unknown to the host's own settings.
const FAKE_PROXY_TOKEN = 'proxy-token-3f9c2a71';
const FAKE_PROXY_WITH_TOKEN = `http://agent:${FAKE_PROXY_TOKEN}@127.0.0.1:9`;

beforeAll(async () => {
  ignoresClose = await variants.build('ignore-close', { AGENT_IGNORE_CLOSE_REQUEST: '1' });
  defaultSigterm = await variants.build('default-sigterm', {
    AGENT_IGNORE_CLOSE_REQUEST: '1',
    AGENT_DEFAULT_SIGTERM: '1',
  });
  ignoresAll = await variants.build('ignore-all', {
    AGENT_IGNORE_CLOSE_REQUEST: '1',
    AGENT_IGNORE_SIGTERM: '1',
  });
  // A key that the gateway handed to the container shows up in the contract-check report on stdout.
  reportsEnv = await variants.build('reports-env', {
    AGENT_IGNORE_CLOSE_REQUEST: '1',
    AGENT_IGNORE_SIGTERM: '1',
    AGENT_MODE: 'contract-check',
    ONECLI_API_KEY: FAKE_API_KEY,
    HTTPS_PROXY: FAKE_PROXY_WITH_TOKEN,
  });
});

afterEach(async () => {
  for (const harness of harnesses.splice(0)) await harness.cleanup();
});

afterAll(async () => {
  await variants.removeAll();
});

describe('stopContainer', () => {
  it('close request ends the agent cleanly', async () => {
    const harness = await createHarness();
    const started = await harness.startAgent(AGENT_IMAGE);
    await sendAndAwaitReply(harness, 'hello before the stop');

    const steps = await stopAgent(harness, started);
    const recorded = await recordExit(harness, started, await exitOf(started.containerName), steps);

    expect(stepsOf(steps)).toEqual(['close-request: written', 'close-request: exited by itself']);
    expect(recorded.exitKind).toBe('clean');
    const log = fs.readFileSync(recorded.logPath, 'utf8');
    expect(headerValue(log, 'exit code')).toBe('0');
    expect(headerValue(log, 'meaning')).toBe('exited cleanly');
  });

  it('SIGTERM stops agent ignoring close request', async () => {
    const harness = await createHarness();
    const started = await harness.startAgent(ignoresClose);

    const steps = await stopAgent(harness, started);
    const exit = await exitOf(started.containerName);
    const recorded = await recordExit(harness, started, exit, steps);

    // The reference agent handles SIGTERM and exits with code 0.
    expect(stepsOf(steps).slice(0, 2)).toEqual([
      'close-request: written',
      `close-request: still running after ${GRACE_MS} ms`,
    ]);
    expect(steps.map((step) => step.step)).toContain('sigterm');
    expect(exit.exitCode).toBe(0);
    expect(recorded.exitKind).toBe('clean');
  });

  it('unhandled SIGTERM exits with 143', async () => {
    const harness = await createHarness();
    const started = await harness.startAgent(defaultSigterm);

    const steps = await stopAgent(harness, started);
    const exit = await exitOf(started.containerName);
    const recorded = await recordExit(harness, started, exit, steps);

    expect(exit.exitCode).toBe(143);
    expect(recorded.exitKind).toBe('sigterm');
    const log = fs.readFileSync(recorded.logPath, 'utf8');
    expect(headerValue(log, 'meaning')).toBe('stopped by SIGTERM (exit code 143)');
  });

  it('agent ignoring SIGTERM is killed', async () => {
    const harness = await createHarness();
    const started = await harness.startAgent(ignoresAll);

    const steps = await stopAgent(harness, started);
    const exit = await exitOf(started.containerName);
    const recorded = await recordExit(harness, started, exit, steps);

    expect(exit.exitCode).toBe(137);
    expect(exit.oomKilled).toBe(false);
    expect(recorded.exitKind).toBe('killed');
    expect(stepsOf(steps).at(-1)).toContain('killed');
    const log = fs.readFileSync(recorded.logPath, 'utf8');
    expect(headerValue(log, 'meaning')).toBe('killed by SIGKILL (exit code 137)');
  });

  it('container already gone counts as stopped', async () => {
    const harness = await createHarness();
    const started = await harness.startAgent(AGENT_IMAGE);
    const steps = await stopAgent(harness, started);
    await recordExit(harness, started, await exitOf(started.containerName), steps);

    const again = await stopAgent(harness, started);

    expect(await docker.inspect(started.containerName)).toBeNull();
    expect(stepsOf(again)).toEqual(['check: already stopped']);
  });

  it('never-started container counts as stopped', async () => {
    const harness = await createHarness();

    const steps = await stopAgent(harness, {
      containerName: 'berth-test-never-started',
      image: AGENT_IMAGE,
      startedAt: 0,
    });

    expect(stepsOf(steps)).toEqual(['check: already stopped']);
  });
});

describe('recordExit', () => {
  it('writes a log under the group folder', async () => {
    const harness = await createHarness();
    const started = await harness.startAgent(AGENT_IMAGE);
    await sendAndAwaitReply(harness, 'hello');
    const steps = await stopAgent(harness, started);

    const recorded = await recordExit(harness, started, await exitOf(started.containerName), steps);

    expect(path.dirname(recorded.logPath)).toBe(
      path.join(harness.settings.groupsDir, harness.folder, 'logs'),
    );
    expect(exitLogFiles(harness)).toEqual([path.basename(recorded.logPath)]);
  });

  it('names the container, its exit and its mounts', async () => {
    const harness = await createHarness();
    const started = await harness.startAgent(AGENT_IMAGE);
    await sendAndAwaitReply(harness, 'hello');
    const steps = await stopAgent(harness, started);

    const recorded = await recordExit(harness, started, await exitOf(started.containerName), steps);
    const log = fs.readFileSync(recorded.logPath, 'utf8');

    expect(headerValue(log, 'session')).toBe(harness.sessionId);
    expect(headerValue(log, 'container')).toBe(started.containerName);
    expect(headerValue(log, 'image')).toBe(AGENT_IMAGE);
    expect(headerValue(log, 'duration')).toMatch(/^\d+\.\d{3} s$/);
    expect(headerValue(log, 'exit code')).toBe('0');
    expect(headerValue(log, 'meaning')).toBe('exited cleanly');
    expect(headerValue(log, 'stop reason')).toBe('idle');
    expect(log).toContain(`${harness.sessionDir} -> /workspace (rw)`);
    expect(log).toContain('=== stop steps ===');
    expect(log).toMatch(/=== stdout \(tail\) ===\n---NANOCLAW_OUTPUT_START---/);
    expect(log).toMatch(/=== stderr \(tail\) ===\n\[agent\] started/);
  });

  it('removes the container', async () => {
    const harness = await createHarness();
    const started = await harness.startAgent(AGENT_IMAGE);
    const steps = await stopAgent(harness, started);

    await recordExit(harness, started, await exitOf(started.containerName), steps);

    expect(await docker.inspect(started.containerName)).toBeNull();
  });

  it('keeps full output only for a non-zero exit', async () => {
    const clean = await createHarness();
    const cleanStart = await clean.startAgent(AGENT_IMAGE);
    const cleanSteps = await stopAgent(clean, cleanStart);
    const killed = await createHarness();
    const killedStart = await killed.startAgent(ignoresAll);
    const killedSteps = await stopAgent(killed, killedStart);

    const cleanLog = await recordExit(clean, cleanStart, await exitOf(cleanStart.containerName), cleanSteps);
    const killedLog = await recordExit(
      killed,
      killedStart,
      await exitOf(killedStart.containerName),
      killedSteps,
    );

    expect(fs.readFileSync(cleanLog.logPath, 'utf8')).not.toContain('(full) ===');
    const killedText = fs.readFileSync(killedLog.logPath, 'utf8');
    expect(killedText).toContain('=== stdout (full) ===');
    expect(killedText).toContain('=== stderr (full) ===');
  });

  it('omits message text', async () => {
    const harness = await createHarness();
    const started = await harness.startAgent(ignoresAll);
    const secretText = `meet at the ${randomUUID()} pier`;
    await sendAndAwaitReply(harness, secretText);
    const steps = await stopAgent(harness, started);

    const recorded = await recordExit(harness, started, await exitOf(started.containerName), steps);
    const log = fs.readFileSync(recorded.logPath, 'utf8');

    expect(log).toContain('=== stdout (full) ===');
    expect(log).toContain('echo: [redacted]');
    expect(log).not.toContain(secretText);
  });

  it('omits the OneCLI API key', async () => {
    const harness = await createHarness();
    const started = await harness.startAgent(reportsEnv);
    await sendAndAwaitReply(harness, 'report your environment');
    const steps = await stopAgent(harness, started);

    const recorded = await recordExit(harness, started, await exitOf(started.containerName), steps);
    const log = fs.readFileSync(recorded.logPath, 'utf8');

    expect(harness.settings.onecli.apiKey).toBe(FAKE_API_KEY);
    expect(log).toContain('ONECLI_API_KEY');
    expect(log).not.toContain(FAKE_API_KEY);
  });

  it('omits a proxy token from the container environment', async () => {
    const harness = await createHarness();
    const started = await harness.startAgent(reportsEnv);
    await sendAndAwaitReply(harness, 'report your environment');
    const steps = await stopAgent(harness, started);

    const recorded = await recordExit(harness, started, await exitOf(started.containerName), steps);
    const log = fs.readFileSync(recorded.logPath, 'utf8');

    expect(log).toContain('HTTPS_PROXY');
    expect(log).not.toContain(FAKE_PROXY_TOKEN);
  });

  it('retry after removal writes no second log', async () => {
    const harness = await createHarness();
    const started = await harness.startAgent(AGENT_IMAGE);
    await sendAndAwaitReply(harness, 'hello');
    const steps = await stopAgent(harness, started);
    const exit = await exitOf(started.containerName);

    const first = await recordExit(harness, started, exit, steps);
    const retry = await recordExit(harness, started, exit, steps);

    expect(retry.logPath).toBe(first.logPath);
    expect(exitLogFiles(harness)).toEqual([path.basename(first.logPath)]);
    expect(fs.readFileSync(first.logPath, 'utf8')).toContain('---NANOCLAW_OUTPUT_START---');
  });

  it('survives a container.json broken after spawn', async () => {
    const harness = await createHarness();
    const started = await harness.startAgent(AGENT_IMAGE);
    const steps = await stopAgent(harness, started);
    fs.writeFileSync(groupPaths(harness.settings, harness.folder).containerJson, '{ "idleTimeoutSeconds": ');

    const recorded = await recordExit(harness, started, await exitOf(started.containerName), steps);

    expect(await docker.inspect(started.containerName)).toBeNull();
    const log = fs.readFileSync(recorded.logPath, 'utf8');
    expect(headerValue(log, 'container')).toBe(started.containerName);
    // The mounts come from docker inspect, so a broken container.json does not hide them.
    expect(log).not.toContain('Mounts unknown');
    expect(log).toContain('-> /workspace (rw)');
  });

  it('retention keeps the newest logs', async () => {
    const harness = await createHarness({ BERTH_EXIT_LOGS_KEPT: '2' });
    await harness.run(harness.activities.initFilesystem, { sessionId: harness.sessionId });
    const endings = [Date.UTC(2026, 0, 1, 10), Date.UTC(2026, 0, 1, 11), Date.UTC(2026, 0, 1, 12)];

    const paths: string[] = [];
    for (const [index, finishedAt] of endings.entries()) {
      const started = {
        containerName: `berth-test-gone-${index}`,
        image: AGENT_IMAGE,
        startedAt: finishedAt - 1000,
      };
      const exit = { exitCode: 0, oomKilled: false, finishedAt, inspected: true };
      paths.push((await recordExit(harness, started, exit, [])).logPath);
    }

    expect(exitLogFiles(harness)).toEqual(paths.slice(1).map((file) => path.basename(file)));
  });
});
