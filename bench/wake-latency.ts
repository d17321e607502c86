/**
 * Measures message-to-reply latency through the whole stack: the real dev
 * server, the worker, Docker and the reference agent.
 *
 *   npx tsx bench/wake-latency.ts [rounds]
 *
 * Prints the cold latency (a wake that starts a container), the warm latency
 * (the container already runs) and the time for 20 concurrent messages to
 * one session. Run it on an otherwise idle machine.
 */
import { performance } from 'node:perf_hooks';
import { connectClient } from '../src/client/session-client.js';
import { HostDb } from '../src/db/host-db.js';
import { CallbackSink } from '../src/delivery/deliverer.js';
import { DockerCli } from '../src/docker/runtime.js';
import { sendMessage, waitForReplies } from '../src/cli/commands.js';
import { createBerthWorker } from '../src/worker.js';
import { startTestInstall } from '../test/support/temporal.js';
import { LABELS } from '../src/activities/spawn.js';
import { stopSession } from '../src/client/session-client.js';

const rounds = Number(process.argv[2] ?? 5);

function percentile(values: number[], p: number): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;
}

function summary(name: string, values: number[]): string {
  return `${name}: n=${values.length} median=${percentile(values, 50).toFixed(0)} ms p90=${percentile(values, 90).toFixed(0)} ms max=${Math.max(...values).toFixed(0)} ms`;
}

async function main(): Promise<void> {
  const install = await startTestInstall({ BERTH_LOG_LEVEL: 'warn', BERTH_DELIVERY_POLL_MS: '100' });
  const client = await connectClient(install.settings);
  const worker = await createBerthWorker({
    settings: install.settings,
    client,
    sink: new CallbackSink(() => undefined),
  });
  const running = worker.run();
  const hostDb = new HostDb(install.settings.hostDbPath);
  const docker = new DockerCli();
  const timed = async (folder: string, text: string): Promise<number> => {
    const started = performance.now();
    const queued = await sendMessage(install.settings, hostDb, client, { folder, text });
    const count = await waitForReplies(queued, () => undefined, {
      timeoutMs: 120_000,
      settleMs: 0,
      pollMs: 20,
    });
    if (count === 0) throw new Error(`no reply to "${text}"`);
    return performance.now() - started;
  };

  try {
    const cold: number[] = [];
    const warm: number[] = [];
    for (let round = 0; round < rounds; round += 1) {
      const folder = `bench-${round}`;
      cold.push(await timed(folder, `cold ${round}`));
      warm.push(await timed(folder, `warm ${round}`));
      const session = hostDb.listSessions().at(-1)!;
      await stopSession(client, session.id, 'benchmark round done');
    }

    const burstStart = performance.now();
    const queued = await Promise.all(
      Array.from({ length: 20 }, (_, index) =>
        sendMessage(install.settings, hostDb, client, { folder: 'bench-burst', text: `burst ${index}` }),
      ),
    );
    await Promise.all(
      queued.map((q) => waitForReplies(q, () => undefined, { timeoutMs: 120_000, settleMs: 0, pollMs: 20 })),
    );
    const burst = performance.now() - burstStart;

    console.log(summary('cold wake (container start included)', cold));
    console.log(summary('warm message (container running)', warm));
    console.log(`20 concurrent messages to one session, all replies: ${burst.toFixed(0)} ms`);
  } finally {
    for (const container of await docker.list({ [LABELS.install]: install.settings.installId })) {
      await docker.remove(container.name);
    }
    await worker.shutdown();
    await running.catch(() => undefined);
    hostDb.close();
    await client.connection.close();
    await install.cleanup();
  }
}

await main();
