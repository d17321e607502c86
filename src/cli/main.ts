import { spawnSync } from 'node:child_process';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';
import { Command, InvalidArgumentError } from 'commander';
import type { Client } from '@temporalio/client';
import { connectClient, stopSession } from '../client/session-client.js';
import { HostDb } from '../db/host-db.js';
import { CallbackSink, ConsoleSink } from '../delivery/deliverer.js';
import { startDevServer } from '../dev-server.js';
import { BerthError } from '../errors.js';
import { logger } from '../logger.js';
import { loadSettings, type Settings } from '../settings.js';
import { createBerthWorker } from '../worker.js';
import { collectStatus, formatStatusTable, sendMessage, waitForReplies } from './commands.js';
import { buildGroupImageNow } from './build-image.js';

const REPO_ROOT = fileURLToPath(new URL('../../', import.meta.url));

function positiveNumber(value: string): number {
  const parsed = Number(value);
  if (!Number.isFinite(parsed) || parsed <= 0)
    throw new InvalidArgumentError(`expected a positive number of seconds, got "${value}".`);
  return parsed;
}

async function withClient<T>(
  settings: Settings,
  work: (client: Client, hostDb: HostDb) => Promise<T>,
): Promise<T> {
  const hostDb = new HostDb(settings.hostDbPath);
  let client: Client | null = null;
  try {
    client = await connectClient(settings).catch((error: unknown) => {
      throw new Error(
        `Could not reach the Temporal server at ${settings.temporalAddress} (${(error as Error).message}). Start it with "berth dev" or "npm start".`,
      );
    });
    return await work(client, hostDb);
  } finally {
    hostDb.close();
    await client?.connection.close();
  }
}

/** Runs the worker until SIGINT or SIGTERM, then stops it and runs `extra` (stopping the dev server). */
async function runWorkerUntilSignal(settings: Settings, extra?: () => Promise<void>): Promise<void> {
  const client = await connectClient(settings).catch((error: unknown) => {
    throw new Error(
      `Could not reach the Temporal server at ${settings.temporalAddress} (${(error as Error).message}). Start it with "berth dev", or set BERTH_TEMPORAL_ADDRESS.`,
    );
  });
  const worker = await createBerthWorker({ settings, client, sink: new ConsoleSink() });
  let stopping: Promise<void> | null = null;
  const stop = (): Promise<void> =>
    (stopping ??= (async () => {
      await worker.shutdown();
      await extra?.();
      await client.connection.close();
    })());
  process.once('SIGINT', () => void stop());
  process.once('SIGTERM', () => void stop());
  // Temporal's runtime also shuts the workers down on SIGINT, so run() can return before stop() is done.
  await worker.run();
  await stop();
}

/**
 * Ends a long-running command once its own shutdown is complete. With
 * Temporal's TypeScript SDK 1.24 the process stayed alive about 9 s after
 * every worker and connection had closed, with no JavaScript handle left,
 * which made quitting look stuck.
 */
function exitAfterShutdown(): never {
  process.exit(process.exitCode ?? 0);
}

function buildReferenceImage(): void {
  process.stderr.write('Checking the reference agent image (the first build takes a few minutes)...\n');
  const result = spawnSync('bash', [`${REPO_ROOT}container/build.sh`], {
    stdio: ['ignore', 'inherit', 'inherit'],
  });
  if (result.status !== 0)
    throw new Error('Building the reference agent image failed; see the output above.');
}

/** Runs the terminal chat of `npm start`: each line goes to agent group `main`, and replies print as they arrive. */
async function startChat(settings: Settings): Promise<void> {
  // Keep the chat readable: only warnings and errors reach the terminal unless a level was chosen.
  if (process.env.BERTH_LOG_LEVEL === undefined) logger.level = 'warn';
  buildReferenceImage();
  const server = await startDevServer(settings);
  const client = await connectClient(settings);
  const unanswered = new Set<string>();
  const worker = await createBerthWorker({
    settings,
    client,
    sink: new CallbackSink((message) => {
      if (message.inReplyTo) unanswered.delete(message.inReplyTo);
      process.stdout.write(
        `\n${settings.assistantName}> ${message.text ?? JSON.stringify(message.content)}\nyou> `,
      );
    }),
  });
  const workerRun = worker.run();
  const hostDb = new HostDb(settings.hostDbPath);

  process.stdout.write(
    `berth is running. Temporal Web UI: ${server.uiUrl}\nType a message for agent group "main"; Ctrl-D or Ctrl-C quits.\nyou> `,
  );
  // With a terminal, readline must write to stdout too, or it echoes nothing of what the user types.
  const input = readline.createInterface({
    input: process.stdin,
    output: process.stdin.isTTY ? process.stdout : undefined,
    terminal: process.stdin.isTTY,
  });
  let closing = false;
  let closed: Promise<void> | null = null;
  // Both SIGINT and the end of input call this, and each caller waits for the one shutdown to finish.
  const close = (): Promise<void> => (closed ??= shutDown());
  const shutDown = async (): Promise<void> => {
    closing = true;
    input.close();
    // The worker and the dev server may each take several seconds to stop, so the user sees why the prompt is gone.
    process.stderr.write(
      '\nStopping the worker and the Temporal dev server. Agent containers keep running and are supervised again at the next start...\n',
    );
    await worker.shutdown();
    await workerRun.catch(() => undefined);
    hostDb.close();
    await client.connection.close();
    await server.stop();
    process.stderr.write('berth stopped.\n');
  };
  process.once('SIGINT', () => void close());
  for await (const line of input) {
    const text = line.trim();
    if (text === '') {
      process.stdout.write('you> ');
      continue;
    }
    try {
      const queued = await sendMessage(settings, hostDb, client, { folder: 'main', text });
      unanswered.add(queued.messageId);
    } catch (error) {
      process.stderr.write(`berth: ${(error as Error).message}\n`);
      process.stdout.write('you> ');
    }
  }
  // stdin ended (Ctrl-D or a closed pipe): wait up to a minute for replies still owed, then shut down.
  const deadline = Date.now() + 60_000;
  while (unanswered.size > 0 && Date.now() < deadline && !closing) {
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
  process.stdout.write('\n');
  await close();
}

export function buildProgram(): Command {
  const program = new Command('berth')
    .description('A durable container runner for AI-agent sessions, on Temporal.')
    .showHelpAfterError('(add --help for usage)');

  program
    .command('send')
    .description('Write a message for an agent group and wake its session.')
    .argument('<group-folder>', 'the agent group folder, created when new')
    .argument('<text>', 'the message text')
    .option('--thread <id>', 'thread id within the group; each thread has its own session')
    .option('--wait <seconds>', 'wait this many seconds for replies and print them', positiveNumber)
    .action(async (folder: string, text: string, options: { thread?: string; wait?: number }) => {
      if (text.trim() === '')
        throw new InvalidArgumentError('the message text is empty; give the text to send.');
      const settings = loadSettings();
      await withClient(settings, async (client, hostDb) => {
        const queued = await sendMessage(settings, hostDb, client, {
          folder,
          text,
          threadId: options.thread,
        });
        process.stderr.write(`Queued message ${queued.messageId} for session ${queued.session.id}.\n`);
        if (options.wait === undefined) return;
        const count = await waitForReplies(queued, (reply) => process.stdout.write(`${reply}\n`), {
          timeoutMs: options.wait * 1000,
        });
        if (count === 0) {
          const [summary] = await collectStatus(settings, hostDb, client, queued.session.id);
          const cause = summary?.retrying?.lastFailure ?? summary?.lastError;
          throw new Error(
            `No reply from session ${queued.session.id} within ${options.wait} s${cause ? `; the session reports: ${cause}` : ''}. The message stays pending in its inbound.db; check "berth status ${queued.session.id}" and that a worker runs.`,
          );
        }
      });
    });

  program
    .command('status')
    .description('Show every session, or one, with its state, container, last activity and next deadline.')
    .argument('[session-id]', 'one session')
    .option('--json', 'print JSON')
    .action(async (sessionId: string | undefined, options: { json?: boolean }) => {
      const settings = loadSettings();
      await withClient(settings, async (client, hostDb) => {
        const summaries = await collectStatus(settings, hostDb, client, sessionId);
        process.stdout.write(
          options.json
            ? `${JSON.stringify(sessionId ? summaries[0] : summaries, null, 2)}\n`
            : `${formatStatusTable(summaries)}\n`,
        );
      });
    });

  program
    .command('stop')
    .description("Stop a session's container gracefully.")
    .argument('<session-id>')
    .action(async (sessionId: string) => {
      const settings = loadSettings();
      await withClient(settings, async (client, hostDb) => {
        hostDb.getSession(sessionId);
        await stopSession(client, sessionId, 'stop requested from the command line');
        process.stderr.write(`Stop requested for session ${sessionId}.\n`);
      });
    });

  program
    .command('build-image')
    .description("Build an agent group's image from the packages in its container.json, showing progress.")
    .argument('<group-folder>')
    .action(async (folder: string) => {
      // The build output is printed as it comes, so the same lines as info logs would only repeat it.
      if (process.env.BERTH_LOG_LEVEL === undefined) logger.level = 'warn';
      const tag = await buildGroupImageNow(loadSettings(), folder, (line) => process.stderr.write(line));
      process.stdout.write(`${tag}\n`);
    });

  program
    .command('worker')
    .description('Run the worker against the configured Temporal server.')
    .action(async () => {
      await runWorkerUntilSignal(loadSettings());
      exitAfterShutdown();
    });

  program
    .command('dev')
    .description('Run the Temporal dev server (state under the data directory) and the worker.')
    .action(async () => {
      const settings = loadSettings();
      const server = await startDevServer(settings);
      process.stderr.write(`Temporal Web UI: ${server.uiUrl}\n`);
      await runWorkerUntilSignal(settings, () => server.stop());
      exitAfterShutdown();
    });

  program
    .command('start')
    .description('Start the dev server and the worker, and chat with agent group "main" in this terminal.')
    .action(async () => {
      await startChat(loadSettings());
      exitAfterShutdown();
    });

  return program;
}

export async function main(argv: string[]): Promise<void> {
  try {
    await buildProgram().parseAsync(argv);
  } catch (error) {
    const message = error instanceof Error ? error.message : String(error);
    process.stderr.write(`berth: ${message}\n`);
    if (!(error instanceof BerthError)) logger.debug({ err: error }, 'command failed');
    process.exitCode = 1;
  }
}

await main(process.argv);
