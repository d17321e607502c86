import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import type { Client } from '@temporalio/client';
import type { WorkflowBundleWithSourceMap } from '@temporalio/worker';
import { connectClient } from '../../src/client/session-client.js';
import { HostDb } from '../../src/db/host-db.js';
import { CallbackSink, type DeliveredMessage } from '../../src/delivery/deliverer.js';
import type { Settings } from '../../src/settings.js';
import { createBerthWorker, type BerthWorker } from '../../src/worker.js';
import { startTestInstall, type TestInstall } from './temporal.js';

const execFileAsync = promisify(execFile);

export const REPO_ROOT = fileURLToPath(new URL('../../', import.meta.url));

/** A test install with an in-process worker whose delivery sink records every message. */
export interface InstallWithWorker {
  install: TestInstall;
  settings: Settings;
  client: Client;
  hostDb: HostDb;
  worker: BerthWorker;
  /** Every message the worker's sink received, in order. */
  deliveries: DeliveredMessage[];
  /** Stops the worker, removes this install's containers, stops the dev server and deletes the data dir. */
  stop(): Promise<void>;
}

/**
 * Starts a dev server with a fresh data dir (`overrides` are BERTH_* variables)
 * and a worker in this process. `workerSettings` changes the worker's settings
 * only, so CLI subprocesses keep the install's environment.
 */
export async function startInstallWithWorker(
  overrides: Record<string, string>,
  options: { workflowBundle?: WorkflowBundleWithSourceMap; workerSettings?: Partial<Settings> } = {},
): Promise<InstallWithWorker> {
  const install = await startTestInstall(overrides);
  let client: Client | undefined;
  const deliveries: DeliveredMessage[] = [];
  let worker: BerthWorker;
  try {
    client = await connectClient(install.settings);
    worker = await createBerthWorker({
      settings: { ...install.settings, ...options.workerSettings },
      client,
      sink: new CallbackSink((message) => {
        deliveries.push(message);
      }),
      workflowBundle: options.workflowBundle,
    });
  } catch (error) {
    await client?.connection.close();
    await install.cleanup();
    throw error;
  }
  const running = worker.run();
  const hostDb = new HostDb(install.settings.hostDbPath);

  return {
    install,
    settings: install.settings,
    client,
    hostDb,
    worker,
    deliveries,
    async stop() {
      await worker.shutdown();
      await running;
      hostDb.close();
      await client.connection.close();
      await removeInstallContainers(install.settings.installId);
      await install.cleanup();
    },
  };
}

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs `node bin/berth.js ARGS` against the install. Resolves with the exit code and output, also when the code is non-zero. */
export async function runCli(install: TestInstall, args: string[], timeoutMs = 120_000): Promise<CliResult> {
  try {
    const { stdout, stderr } = await execFileAsync(
      process.execPath,
      [path.join(REPO_ROOT, 'bin/berth.js'), ...args],
      {
        cwd: REPO_ROOT,
        env: { ...process.env, ...install.env },
        timeout: timeoutMs,
      },
    );
    return { code: 0, stdout, stderr };
  } catch (error) {
    const failed = error as { code?: unknown; stdout?: string; stderr?: string };
    if (typeof failed.code !== 'number') throw error;
    return { code: failed.code, stdout: failed.stdout ?? '', stderr: failed.stderr ?? '' };
  }
}

/** Returns the ids of containers that match a `docker ps` label filter, running ones only unless `all`. */
export async function dockerPs(label: string, options: { all?: boolean } = {}): Promise<string[]> {
  const args = [
    'ps',
    '--quiet',
    '--no-trunc',
    '--filter',
    `label=${label}`,
    ...(options.all ? ['--all'] : []),
  ];
  const { stdout } = await execFileAsync('docker', args);
  return stdout.split('\n').filter((line) => line.trim() !== '');
}

/** Force-removes the containers of one install, found by its `berth.install` label, and no others. */
export async function removeInstallContainers(installId: string): Promise<void> {
  const ids = await dockerPs(`berth.install=${installId}`, { all: true });
  if (ids.length > 0) await execFileAsync('docker', ['rm', '--force', ...ids]);
}

/** Polls `probe` until it returns a value other than undefined. Throws naming `description` after `timeoutMs`. */
export async function waitFor<T>(
  description: string,
  probe: () => Promise<T | undefined> | T | undefined,
  timeoutMs: number,
  intervalMs = 250,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`Timed out after ${timeoutMs} ms waiting for ${description}.`);
    await sleep(intervalMs);
  }
}

/** Returns the exit logs in a group's logs folder with their text, oldest name first. */
export function readExitLogs(settings: Settings, folder: string): Array<{ file: string; text: string }> {
  const dir = path.join(settings.groupsDir, folder, 'logs');
  if (!fs.existsSync(dir)) return [];
  return fs
    .readdirSync(dir)
    .filter((name) => /^container-.*\.log$/.test(name))
    .sort()
    .map((name) => ({ file: path.join(dir, name), text: fs.readFileSync(path.join(dir, name), 'utf8') }));
}
