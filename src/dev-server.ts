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
  const leftover = (await portOpen(host, port)) ? findLeftoverServer(settings, pidFile, dbFile) : null;
  if (leftover !== null) {
    // A berth process killed without a chance to clean up left its dev server running. It must have
    // exited, not only closed its port, before a new server opens the same SQLite database.
    await stopProcess(leftover, 10_000);
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
  // A process group of its own keeps a Ctrl-C at the terminal from reaching the server: berth stops
  // it after the worker, so the worker never talks to a server that is already gone.
  const child: ChildProcess = spawn(temporalCliPath(), args, {
    stdio: ['ignore', logFile, logFile],
    detached: true,
  });
  fs.closeSync(logFile);
  // The server's pid, then the pid of this berth process, which owns it.
  if (child.pid !== undefined) fs.writeFileSync(pidFile, `${child.pid} ${process.pid}\n`);
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
 * Returns the pid of a dev server that an earlier berth process started for
 * this data directory and left behind: the pid file names a live `temporal
 * server start-dev` that uses this directory's database. Returns null otherwise.
 *
 * @throws Error when the berth process that started that server still runs,
 *   because stopping the server would cut that process off.
 */
function findLeftoverServer(settings: Settings, pidFile: string, dbFile: string): number | null {
  let pid: number;
  let ownerPid: number;
  try {
    [pid = NaN, ownerPid = NaN] = fs.readFileSync(pidFile, 'utf8').trim().split(/\s+/).map(Number);
  } catch {
    return null;
  }
  let commandLine: string;
  try {
    commandLine = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').join(' ');
  } catch {
    return null;
  }
  if (!commandLine.includes('start-dev') || !commandLine.includes(dbFile)) return null;
  if (Number.isInteger(ownerPid) && ownerPid !== process.pid && isNodeProcess(ownerPid)) {
    throw new Error(
      `Another berth process (pid ${ownerPid}) runs the Temporal dev server for ${settings.dataDir} on ${settings.temporalAddress}. ` +
        'Stop it first, or use "berth send" and "berth status" against that server; "berth worker" adds a worker to it.',
    );
  }
  return pid;
}

/** Returns true when `pid` is a live Node.js process, as a berth process that owns a dev server is. */
function isNodeProcess(pid: number): boolean {
  if (!processAlive(pid)) return false;
  try {
    return fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes('node');
  } catch {
    return false;
  }
}

/** Sends SIGTERM, waits up to `graceMs` for the process to exit, then sends SIGKILL and waits again. */
async function stopProcess(pid: number, graceMs: number): Promise<void> {
  logger.warn({ serverPid: pid }, 'stopping a temporal dev server left by an earlier berth process');
  process.kill(pid, 'SIGTERM');
  const termBy = Date.now() + graceMs;
  while (processAlive(pid) && Date.now() < termBy) await sleep(100);
  if (processAlive(pid)) {
    logger.warn({ serverPid: pid, graceMs }, 'leftover temporal dev server ignored SIGTERM; sending SIGKILL');
    process.kill(pid, 'SIGKILL');
    const killBy = Date.now() + 5_000;
    while (processAlive(pid) && Date.now() < killBy) await sleep(100);
  }
  if (processAlive(pid)) {
    throw new Error(
      `The temporal dev server left by an earlier berth process (pid ${pid}) did not exit after SIGKILL. Stop it, then start berth again.`,
    );
  }
}

/** Returns false once `pid` has exited, also while it is a zombie that its new parent has not reaped yet. */
function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch (error) {
    // EPERM: the process exists but belongs to another user.
    if ((error as NodeJS.ErrnoException).code !== 'EPERM') return false;
  }
  try {
    // The state is the field after the parenthesised command name.
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return false;
  }
}
