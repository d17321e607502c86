import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { Connection } from '@temporalio/client';
import { afterAll, describe, expect, it } from 'vitest';
import { sessionWorkflowId } from '../src/client/ids.js';
import { connectClient, sessionStatus } from '../src/client/session-client.js';
import { startDevServer, type DevServer } from '../src/dev-server.js';
import { sessionWorkflow } from '../src/workflows/session.js';
import { startTestInstall, type TestInstall } from './support/temporal.js';

let install: TestInstall | undefined;
let restarted: DevServer | undefined;

afterAll(async () => {
  await restarted?.stop();
  await install?.cleanup();
}, 60_000);

/** Returns the server's pid from a pid file, whose line also names the berth process that owns the server. */
function serverPidIn(pidFile: string): number {
  return Number(fs.readFileSync(pidFile, 'utf8').trim().split(/\s+/)[0]);
}

function isRunning(pid: number): boolean {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return false;
  }
}

describe('dev server', () => {
  it('replaces a leftover server only after it exited', async () => {
    install = await startTestInstall();
    const pidFile = path.join(install.dataDir, 'temporal-server.pid');
    const leftoverPid = serverPidIn(pidFile);
    expect(isRunning(leftoverPid)).toBe(true);

    // The first server is never stopped, as when the berth process that started it was killed.
    restarted = await startDevServer(install.settings);

    expect(isRunning(leftoverPid)).toBe(false);
    const newPid = serverPidIn(pidFile);
    expect(newPid).not.toBe(leftoverPid);
    expect(isRunning(newPid)).toBe(true);
    const connection = await Connection.connect({ address: install.settings.temporalAddress });
    try {
      const namespace = await connection.workflowService.describeNamespace({
        namespace: install.settings.namespace,
      });
      expect(namespace.namespaceInfo?.name).toBe(install.settings.namespace);
    } finally {
      await connection.close();
    }
    const log = fs.readFileSync(path.join(install.dataDir, 'temporal-server.log'), 'utf8');
    expect(log).not.toContain('database is locked');
  }, 120_000);

  it('status without a worker names the cause', async () => {
    // The server from the test above runs, but no worker polls its task queue.
    const client = await connectClient(install!.settings);
    try {
      const sessionId = 'sess-no-worker';
      await client.workflow.start(sessionWorkflow, {
        workflowId: sessionWorkflowId(sessionId),
        taskQueue: install!.settings.workflowTaskQueue,
        args: [{ sessionId, hostTaskQueue: install!.settings.hostTaskQueue, searchAttributes: false }],
      });

      const failure = sessionStatus(client, sessionId);

      await expect(failure).rejects.toThrow('got no response to its status query within 10 s');
      await expect(failure).rejects.toThrow('Start "berth worker" or "berth dev"');
    } finally {
      await client.connection.close();
    }
  }, 60_000);

  it('refuses to replace a server whose owner runs', async () => {
    // The server from the first test runs; a live Node.js process plays the berth process that owns it.
    const pidFile = path.join(install!.dataDir, 'temporal-server.pid');
    const saved = fs.readFileSync(pidFile, 'utf8');
    const serverPid = serverPidIn(pidFile);
    const owner = spawn(process.execPath, ['-e', 'setTimeout(() => {}, 60_000)'], { stdio: 'ignore' });
    try {
      fs.writeFileSync(pidFile, `${serverPid} ${owner.pid}\n`);

      const failure = startDevServer(install!.settings);

      await expect(failure).rejects.toThrow(
        `Another berth process (pid ${owner.pid}) runs the Temporal dev server`,
      );
      expect(isRunning(serverPid)).toBe(true);
    } finally {
      owner.kill('SIGKILL');
      fs.writeFileSync(pidFile, saved);
    }
  }, 60_000);
});
