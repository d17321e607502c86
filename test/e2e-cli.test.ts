import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { sendMessage } from '../src/cli/commands.js';
import { sessionStatus } from '../src/client/session-client.js';
import type { SessionSummary } from '../src/cli/commands.js';
import { bundleWorkflows } from './support/temporal.js';
import {
  dockerPs,
  readExitLogs,
  runCli,
  startInstallWithWorker,
  waitFor,
  type InstallWithWorker,
} from './support/install.js';

// End to end against a real Temporal dev server, the real Docker engine and the
// reference agent image berth-agent:latest (built by container/build.sh).
// The tests run in order and share one install: the idle test waits for the
// containers that the earlier tests started.

const IDLE_TIMEOUT_SECONDS = 8;
const BURST_SIZE = 20;

let env: InstallWithWorker;
/** The session that `berth send main hello` created, on the default thread. */
let mainSessionId: string;
/** The session of thread `burst` in group main, which received the concurrent sends. */
let burstSessionId: string;
/** The session of thread `late` in group main, woken again while its container was starting. */
let lateSessionId: string;

beforeAll(async () => {
  env = await startInstallWithWorker(
    { BERTH_IDLE_TIMEOUT_SECONDS: String(IDLE_TIMEOUT_SECONDS), BERTH_STOP_GRACE_SECONDS: '3' },
    { workflowBundle: await bundleWorkflows() },
  );
}, 300_000);

afterAll(async () => {
  await env?.stop();
}, 120_000);

function sessionIdFrom(stderr: string): string {
  const match = /for session (sess-[0-9a-f-]+)/.exec(stderr);
  if (!match) throw new Error(`No session id in the CLI output: ${stderr}`);
  return match[1]!;
}

describe('berth CLI end to end', () => {
  it('send --wait prints the reply', async () => {
    const result = await runCli(env.install, ['send', 'main', 'hello', '--wait', '60']);

    expect(result.stderr).toMatch(/Queued message msg-/);
    expect(result.code, result.stderr).toBe(0);
    expect(result.stdout).toBe('echo: hello\n');
    mainSessionId = sessionIdFrom(result.stderr);
  }, 180_000);

  it('status --json lists the running session', async () => {
    const result = await runCli(env.install, ['status', '--json']);

    expect(result.code, result.stderr).toBe(0);
    const summaries = JSON.parse(result.stdout) as SessionSummary[];
    const summary = summaries.find((entry) => entry.sessionId === mainSessionId);
    expect(summary, result.stdout).toBeDefined();
    expect(summary!.group).toBe('main');
    expect(summary!.state).toBe('running');
    expect(summary!.containerName).toMatch(/^berth-main-/);
  }, 120_000);

  it('search attributes find the session', async () => {
    const query = `SessionId = '${mainSessionId}' AND ContainerState = 'running'`;
    const found = await waitFor(
      `a workflow matching ${query}`,
      async () => {
        const ids: string[] = [];
        for await (const workflow of env.client.workflow.list({ query })) ids.push(workflow.workflowId);
        return ids.length > 0 ? ids : undefined;
      },
      30_000,
    );

    expect(found).toEqual([`berth-session-${mainSessionId}`]);
  }, 60_000);

  it('concurrent sends share one container', async () => {
    const texts = Array.from({ length: BURST_SIZE }, (_, index) => `burst ${index}`);
    const seenContainers = new Set<string>();
    let sampling = true;
    let sessionLabel: string | null = null;
    const sampler = (async () => {
      while (sampling) {
        if (sessionLabel)
          for (const id of await dockerPs(sessionLabel, { all: true })) seenContainers.add(id);
        await new Promise((resolve) => setTimeout(resolve, 200));
      }
    })();

    const queued = await Promise.all(
      texts.map((text) =>
        sendMessage(env.settings, env.hostDb, env.client, { folder: 'main', text, threadId: 'burst' }),
      ),
    );
    const sessionId = queued[0]!.session.id;
    burstSessionId = sessionId;
    sessionLabel = `berth.session=${sessionId}`;
    const ids = new Set(queued.map((entry) => entry.messageId));
    const replies = await waitFor(
      `${BURST_SIZE} replies`,
      () => {
        const found = env.deliveries.filter(
          (message) => message.inReplyTo !== null && ids.has(message.inReplyTo),
        );
        return found.length >= BURST_SIZE ? found : undefined;
      },
      180_000,
    );
    // One more sampling round after the last reply, then stop the sampler.
    await new Promise((resolve) => setTimeout(resolve, 500));
    sampling = false;
    await sampler;

    expect(new Set(queued.map((entry) => entry.session.id)).size).toBe(1);
    expect(replies).toHaveLength(BURST_SIZE);
    const expected = new Map(queued.map((entry, index) => [entry.messageId, `echo: ${texts[index]}`]));
    for (const reply of replies) expect(reply.text).toBe(expected.get(reply.inReplyTo!));
    expect(new Set(replies.map((reply) => reply.inReplyTo)).size).toBe(BURST_SIZE);
    expect(new Set(replies.map((reply) => reply.messageId)).size).toBe(BURST_SIZE);
    expect(seenContainers.size).toBe(1);
    expect((await sessionStatus(env.client, sessionId)).spawnCount).toBe(1);
  }, 300_000);

  it('wake during start adds no container', async () => {
    const first = await sendMessage(env.settings, env.hostDb, env.client, {
      folder: 'main',
      text: 'first',
      threadId: 'late',
    });
    lateSessionId = first.session.id;
    await waitFor(
      'the late session to be starting',
      async () => ((await sessionStatus(env.client, lateSessionId)).state === 'starting' ? true : undefined),
      60_000,
      20,
    );

    const second = await sendMessage(env.settings, env.hostDb, env.client, {
      folder: 'main',
      text: 'second',
      threadId: 'late',
    });

    const ids = new Set([first.messageId, second.messageId]);
    const replies = await waitFor(
      'replies to both messages',
      () => {
        const found = env.deliveries.filter(
          (message) => message.inReplyTo !== null && ids.has(message.inReplyTo),
        );
        return found.length >= 2 ? found : undefined;
      },
      120_000,
    );
    expect(replies.map((reply) => reply.text).sort()).toEqual(['echo: first', 'echo: second']);
    expect((await sessionStatus(env.client, lateSessionId)).spawnCount).toBe(1);
  }, 180_000);

  it('idle timeout stops every container', async () => {
    const installLabel = `berth.install=${env.settings.installId}`;

    await waitFor(
      'no running container of the install',
      async () => ((await dockerPs(installLabel)).length === 0 ? true : undefined),
      120_000,
      500,
    );
    const stopped = await waitFor(
      'the main session to record its exit',
      async () => {
        const status = await sessionStatus(env.client, mainSessionId);
        return status.state === 'idle' && status.lastExit !== null ? status : undefined;
      },
      60_000,
    );

    expect(stopped.lastExit!.reason).toBe('idle');
    const logs = readExitLogs(env.settings, 'main').filter((log) => log.text.includes(mainSessionId));
    expect(logs).toHaveLength(1);
    expect(logs[0]!.file).toBe(stopped.lastExit!.logPath);
    expect(logs[0]!.text).toMatch(/^stop reason: +idle$/m);
  }, 240_000);

  it('idle stop holds without a new message', async () => {
    // A container started by a leftover wake would be running again within this wait.
    await new Promise((resolve) => setTimeout(resolve, IDLE_TIMEOUT_SECONDS * 1000));

    for (const sessionId of [mainSessionId, burstSessionId, lateSessionId]) {
      const status = await sessionStatus(env.client, sessionId);
      expect(status.spawnCount, `containers started for ${sessionId}`).toBe(1);
      expect(status.state, sessionId).toBe('idle');
    }
    expect(await dockerPs(`berth.install=${env.settings.installId}`, { all: true })).toEqual([]);
  }, 120_000);

  it('send after an idle stop starts a new container', async () => {
    const before = await sessionStatus(env.client, mainSessionId);

    const result = await runCli(env.install, ['send', 'main', 'again', '--wait', '60']);

    expect(result.code, result.stderr).toBe(0);
    expect(result.stdout).toBe('echo: again\n');
    expect(sessionIdFrom(result.stderr)).toBe(mainSessionId);
    const after = await sessionStatus(env.client, mainSessionId);
    expect(after.spawnCount).toBe(before.spawnCount + 1);
    expect(after.state).toBe('running');
  }, 180_000);

  it('delivers each reply once', () => {
    const counts = new Map<string, number>();
    for (const message of env.deliveries)
      counts.set(message.messageId, (counts.get(message.messageId) ?? 0) + 1);

    expect([...counts.values()].filter((count) => count > 1)).toEqual([]);
    expect(env.deliveries.length).toBe(BURST_SIZE + 4);
  });
});
