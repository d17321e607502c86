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
