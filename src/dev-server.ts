import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { logger } from './logger.js';
import { temporalCliPath } from './provision/executables.js';
import type { Settings } from './settings.js';

/** The search attributes berth writes, registered when berth starts the dev server. */
export const SEARCH_ATTRIBUTES = ['AgentGroupId', 'SessionId', 'ContainerState'] as const;

export interface DevServer {
  address: string;
  uiUrl: string;
  stop(): Promise<void>;
}

/**
 * Starts `temporal server start-dev` with its state in a SQLite file under the
 * data directory, so workflows and timers survive a restart, and its Web UI on
 * localhost. Resolves once the frontend port accepts connections.
 */
export async function startDevServer(
  settings: Settings,
  options: { timeoutMs?: number } = {},
): Promise<DevServer> {
  const [host = '127.0.0.1', portText = '7233'] = settings.temporalAddress.split(':');
  const port = Number(portText);
  const pidFile = path.join(settings.dataDir, 'temporal-server.pid');
  const dbFile = path.join(settings.dataDir, 'temporal.db');
  if ((await portOpen(host, port)) && stopLeftoverServer(pidFile, dbFile)) {
    // A berth process killed without a chance to clean up left its dev server running.
    const freeBy = Date.now() + 10_000;
    while ((await portOpen(host, port)) && Date.now() < freeBy) await sleep(200);
  }
  if (await portOpen(host, port)) {
    throw new Error(
      `Port ${settings.temporalAddress} is already in use. Stop the other Temporal server, or run "berth worker" against it.`,
    );
  }

  fs.mkdirSync(settings.dataDir, { recursive: true });
  const args = [
    'server',
    'start-dev',
    '--ip',
    host,
    '--port',
    String(port),
    '--ui-port',
    String(settings.uiPort),
    '--db-filename',
    path.join(settings.dataDir, 'temporal.db'),
    '--namespace',
    settings.namespace,
    '--log-level',
    'warn',
    ...SEARCH_ATTRIBUTES.flatMap((name) => ['--search-attribute', `${name}=Keyword`]),
  ];
  const logFile = fs.openSync(path.join(settings.dataDir, 'temporal-server.log'), 'a');
  const child: ChildProcess = spawn(temporalCliPath(), args, { stdio: ['ignore', logFile, logFile] });
  fs.closeSync(logFile);
  if (child.pid !== undefined) fs.writeFileSync(pidFile, `${child.pid}\n`);
  let exited = false;
  child.on('exit', (code) => {
    exited = true;
    logger.info({ code }, 'temporal dev server exited');
  });

  const deadline = Date.now() + (options.timeoutMs ?? 60_000);
  while (!(await portOpen(host, port))) {
    if (exited || Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(
        `Temporal dev server did not start on ${settings.temporalAddress}; see ${path.join(settings.dataDir, 'temporal-server.log')}.`,
      );
    }
    await sleep(200);
  }
  logger.info(
    { address: settings.temporalAddress, ui: `http://${host}:${settings.uiPort}` },
    'temporal dev server started',
  );

  return {
    address: settings.temporalAddress,
    uiUrl: `http://${host}:${settings.uiPort}`,
    async stop() {
      if (exited) return;
      const done = new Promise((resolve) => child.once('exit', resolve));
      child.kill('SIGTERM');
      await Promise.race([done, sleep(10_000)]);
      if (!exited) child.kill('SIGKILL');
    },
  };
}

function portOpen(host: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect({ host, port });
    socket.once('connect', () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', () => resolve(false));
  });
}

/**
 * Stops a dev server that an earlier berth process started for this data
 * directory and left behind (its pid file names a live `temporal server
 * start-dev` using this directory's database). Returns whether it sent a stop.
 */
function stopLeftoverServer(pidFile: string, dbFile: string): boolean {
  let pid: number;
  try {
    pid = Number(fs.readFileSync(pidFile, 'utf8').trim());
  } catch {
    return false;
  }
  let commandLine: string;
  try {
    commandLine = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').join(' ');
  } catch {
    return false;
  }
  if (!commandLine.includes('start-dev') || !commandLine.includes(dbFile)) return false;
  logger.warn({ pid }, 'stopping a temporal dev server left by an earlier berth process');
  process.kill(pid, 'SIGTERM');
  return true;
}
