import { fileURLToPath } from 'node:url';
import type { Client } from '@temporalio/client';
import { NativeConnection, Runtime, Worker, type WorkflowBundleWithSourceMap } from '@temporalio/worker';
import { createActivities } from './activities/index.js';
import type { ActivityDeps, SessionSignals } from './activities/deps.js';
import { imageBuildWorkflowId, sessionWorkflowId } from './client/ids.js';
import { HostDb } from './db/host-db.js';
import { Deliverer, type DeliverySink } from './delivery/deliverer.js';
import { DeliveryLoop } from './delivery/delivery-loop.js';
import { DockerCli } from './docker/runtime.js';
import { logger } from './logger.js';
import { createOneCli } from './onecli/onecli.js';
import { oneCliFilesDir } from './paths.js';
import { createDefaultRegistry } from './providers/registry.js';
import type { Settings } from './settings.js';
import { activitySignal, observationSignal } from './workflows/session.js';
import { imageBuildWorkflow } from './workflows/image-build.js';

export const WORKFLOWS_PATH = fileURLToPath(new URL('./workflows/index.ts', import.meta.url));

let runtimeInstalled = false;

/**
 * Matches the SDK's warnings that a worker has nothing of one kind to poll for.
 * berth runs one worker for workflows and one for activities on purpose, so
 * these are expected and logged at debug level.
 */
const EXPECTED_SDK_WARNING = /^No (workflows|activities|Nexus services) registered/;

/** Routes Temporal's own worker logs into berth's structured logger, once per process. */
function installRuntimeLogger(): void {
  if (runtimeInstalled) return;
  runtimeInstalled = true;
  Runtime.install({
    logger: {
      log: (level, message, meta) => {
        const pinoLevel =
          level === 'WARN' && EXPECTED_SDK_WARNING.test(message) ? 'debug' : level.toLowerCase();
        logger[pinoLevel as 'info']({ ...meta }, message);
      },
      trace: (message, meta) => logger.trace({ ...meta }, message),
      debug: (message, meta) => logger.debug({ ...meta }, message),
      info: (message, meta) => logger.info({ ...meta }, message),
      warn: (message, meta) =>
        EXPECTED_SDK_WARNING.test(message)
          ? logger.debug({ ...meta }, message)
          : logger.warn({ ...meta }, message),
      error: (message, meta) => logger.error({ ...meta }, message),
    },
  });
}

/** Sends workflow signals from host code through a Temporal client. */
export function clientSignals(client: Client): SessionSignals {
  return {
    async activity(sessionId, notice) {
      await client.workflow.getHandle(sessionWorkflowId(sessionId)).signal(activitySignal, notice);
    },
    async observation(sessionId, observation) {
      await client.workflow.getHandle(sessionWorkflowId(sessionId)).signal(observationSignal, observation);
    },
  };
}

export interface BerthWorkerOptions {
  settings: Settings;
  client: Client;
  sink: DeliverySink;
  /** A pre-built workflow bundle (tests build it once per file). */
  workflowBundle?: WorkflowBundleWithSourceMap;
  connection?: NativeConnection;
  /** Overrides of activity dependencies, for tests. */
  deps?: Partial<ActivityDeps>;
  /** Runs the delivery loop in this process (default true). */
  delivery?: boolean;
}

export interface BerthWorker {
  run(): Promise<void>;
  shutdown(): Promise<void>;
  deps: ActivityDeps;
}

/**
 * Creates the worker: one Temporal worker for the workflows on the shared
 * task queue, one for this host's activities on its own queue, and the
 * delivery loop.
 */
export async function createBerthWorker(options: BerthWorkerOptions): Promise<BerthWorker> {
  installRuntimeLogger();
  const { settings, client } = options;
  const connection =
    options.connection ?? (await NativeConnection.connect({ address: settings.temporalAddress }));
  const hostDb = new HostDb(settings.hostDbPath);
  const signals = clientSignals(client);
  const deliverer = new Deliverer(options.sink);

  const deps: ActivityDeps = {
    settings,
    hostDb,
    docker: new DockerCli(settings.dockerBinary),
    oneCli: createOneCli(settings.onecli, { filesDir: oneCliFilesDir(settings) }),
    providers: createDefaultRegistry(),
    signals,
    deliverer,
    buildGroupImage: async ({ agentGroupId, tag }) =>
      client.workflow.execute(imageBuildWorkflow, {
        workflowId: imageBuildWorkflowId(agentGroupId, tag),
        taskQueue: settings.workflowTaskQueue,
        args: [{ agentGroupId, tag, hostTaskQueue: settings.hostTaskQueue }],
        workflowIdConflictPolicy: 'USE_EXISTING',
      }),
    ...options.deps,
  };

  const workflowWorker = await Worker.create({
    connection,
    namespace: settings.namespace,
    taskQueue: settings.workflowTaskQueue,
    ...(options.workflowBundle
      ? { workflowBundle: options.workflowBundle }
      : { workflowsPath: WORKFLOWS_PATH }),
  });
  const activityWorker = await Worker.create({
    connection,
    namespace: settings.namespace,
    taskQueue: settings.hostTaskQueue,
    activities: createActivities(deps),
    // A cancellation reaches supervision only with a heartbeat's reply, so this bounds how long a handover waits.
    maxHeartbeatThrottleInterval: '5s',
  });
  const delivery = new DeliveryLoop(settings, hostDb, deliverer, signals);

  let running: Promise<void> | null = null;
  return {
    deps,
    run() {
      if (options.delivery !== false) delivery.start();
      logger.info(
        { workflowTaskQueue: settings.workflowTaskQueue, hostTaskQueue: settings.hostTaskQueue },
        'worker started',
      );
      running = Promise.all([workflowWorker.run(), activityWorker.run()]).then(() => undefined);
      return running;
    },
    async shutdown() {
      await delivery.stop();
      for (const worker of [workflowWorker, activityWorker]) {
        if (worker.getState() === 'RUNNING') worker.shutdown();
      }
      await running;
      hostDb.close();
      if (!options.connection) await connection.close();
      logger.info('worker stopped');
    },
  };
}
