import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { TestWorkflowEnvironment } from '@temporalio/testing';
import { bundleWorkflowCode, type WorkflowBundleWithSourceMap } from '@temporalio/worker';
import { startDevServer, type DevServer } from '../../src/dev-server.js';
import { testServerPath } from '../../src/provision/executables.js';
import { loadSettings, type Settings } from '../../src/settings.js';
import { WORKFLOWS_PATH } from '../../src/worker.js';

/** Starts the time-skipping test server from the provisioned executable. */
export function createTimeSkippingEnv(): Promise<TestWorkflowEnvironment> {
  return TestWorkflowEnvironment.createTimeSkipping({
    server: { executable: { type: 'existing-path', path: testServerPath() } },
  });
}

/** Bundles berth's workflow code once, for a test file's workers. */
export function bundleWorkflows(): Promise<WorkflowBundleWithSourceMap> {
  return bundleWorkflowCode({ workflowsPath: WORKFLOWS_PATH, logger: quietBundlerLogger });
}

const quietBundlerLogger = {
  log: () => undefined,
  trace: () => undefined,
  debug: () => undefined,
  info: () => undefined,
  warn: () => undefined,
  error: (message: string) => console.error(message),
};

/** Returns a TCP port that was free a moment ago on 127.0.0.1. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolve(port));
    });
  });
}

export interface TestInstall {
  settings: Settings;
  /** The environment variables that select this install, for CLI subprocesses. */
  env: Record<string, string>;
  dataDir: string;
  server: DevServer;
  cleanup(): Promise<void>;
}

/**
 * Starts a real Temporal dev server on free ports with a fresh data
 * directory, and returns settings pointing at both. `overrides` are extra
 * BERTH_* variables (short idle timeouts and the like).
 */
export async function startTestInstall(overrides: Record<string, string> = {}): Promise<TestInstall> {
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'berth-test-'));
  const env: Record<string, string> = {
    BERTH_DATA_DIR: dataDir,
    BERTH_TEMPORAL_ADDRESS: `127.0.0.1:${await freePort()}`,
    BERTH_UI_PORT: String(await freePort()),
    BERTH_TASK_QUEUE: `berth-test-${path.basename(dataDir)}`,
    BERTH_MOUNT_ALLOWLIST: path.join(dataDir, 'no-allowlist.json'),
    BERTH_DELIVERY_POLL_MS: '200',
    ...overrides,
  };
  const settings = loadSettings({ ...process.env, ...env });
  const server = await startDevServer(settings);
  return {
    settings,
    env,
    dataDir,
    server,
    async cleanup() {
      await server.stop();
      fs.rmSync(dataDir, { recursive: true, force: true });
    },
  };
}
