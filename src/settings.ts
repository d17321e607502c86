import { createHash } from 'node:crypto';
import os from 'node:os';
import path from 'node:path';
import { z } from 'zod';

/**
 * Process settings, read from environment variables once at start-up.
 * Every variable is listed in the README with its default.
 */
const positiveSeconds = z.coerce.number().int().positive();

const settingsSchema = z.object({
  BERTH_DATA_DIR: z.string().default(path.join(os.homedir(), '.local', 'share', 'berth')),
  BERTH_TEMPORAL_ADDRESS: z.string().default('127.0.0.1:7233'),
  BERTH_TEMPORAL_NAMESPACE: z.string().default('default'),
  BERTH_TASK_QUEUE: z.string().default('berth'),
  BERTH_HOST_ID: z
    .string()
    .regex(/^[A-Za-z0-9._-]+$/)
    .default(os.hostname().replace(/[^A-Za-z0-9._-]/g, '-')),
  BERTH_DEFAULT_IMAGE: z.string().default('berth-agent:latest'),
  BERTH_DEFAULT_PROVIDER: z.string().default('claude'),
  BERTH_ASSISTANT_NAME: z.string().default('Berth'),
  BERTH_IDLE_TIMEOUT_SECONDS: positiveSeconds.default(1800),
  BERTH_MAX_LIFETIME_SECONDS: positiveSeconds.default(4 * 3600),
  BERTH_STOP_GRACE_SECONDS: z.coerce.number().int().min(0).default(10),
  BERTH_HEARTBEAT_CEILING_SECONDS: positiveSeconds.default(600),
  BERTH_CLAIM_TOLERANCE_SECONDS: positiveSeconds.default(300),
  BERTH_SPAWN_GRACE_SECONDS: z.coerce.number().int().min(0).default(60),
  BERTH_STUCK_CHECK_SECONDS: positiveSeconds.default(30),
  BERTH_MESSAGE_MAX_ATTEMPTS: positiveSeconds.default(3),
  BERTH_RESTART_BUDGET: positiveSeconds.default(5),
  BERTH_RESTART_WINDOW_SECONDS: positiveSeconds.default(600),
  BERTH_EXIT_LOGS_KEPT: positiveSeconds.default(20),
  // A run that has just taken a container over already has several events, and a limit near that would roll over again at once.
  BERTH_HISTORY_EVENT_LIMIT: z.coerce.number().int().min(50).default(5000),
  BERTH_LOG_LEVEL: z.string().default('info'),
  BERTH_DELIVERY_POLL_MS: positiveSeconds.default(500),
  BERTH_MOUNT_ALLOWLIST: z
    .string()
    .default(path.join(os.homedir(), '.config', 'berth', 'mount-allowlist.json')),
  BERTH_DOCKER_BINARY: z.string().default('docker'),
  BERTH_UI_PORT: z.coerce.number().int().positive().default(8233),
  ONECLI_URL: z.string().url().optional(),
  ONECLI_API_KEY: z.string().optional(),
  BERTH_ONECLI_REQUIRED: z
    .enum(['true', 'false', '1', '0'])
    .default('false')
    .transform((value) => value === 'true' || value === '1'),
});

export interface Settings {
  dataDir: string;
  groupsDir: string;
  sessionsDir: string;
  hostDbPath: string;
  temporalAddress: string;
  namespace: string;
  /** Task queue of the workflows, shared by every host. */
  workflowTaskQueue: string;
  /** Task queue of the host-bound activities (files, Docker) of this host. */
  hostTaskQueue: string;
  hostId: string;
  /** Label value that marks every container of this install, so orphans can be found. */
  installId: string;
  defaultImage: string;
  defaultProvider: string;
  assistantName: string;
  idleTimeoutSeconds: number;
  maxLifetimeSeconds: number;
  stopGraceSeconds: number;
  heartbeatCeilingSeconds: number;
  claimToleranceSeconds: number;
  spawnGraceSeconds: number;
  stuckCheckSeconds: number;
  messageMaxAttempts: number;
  restartBudget: number;
  restartWindowSeconds: number;
  exitLogsKept: number;
  /** A session's workflow continues as new once its history has this many events. */
  historyEventLimit: number;
  /** Exit logs carry full output even after a clean exit (BERTH_LOG_LEVEL=debug). */
  debugExitLogs: boolean;
  deliveryPollMs: number;
  mountAllowlistPath: string;
  dockerBinary: string;
  uiPort: number;
  onecli: { url: string | undefined; apiKey: string | undefined; requireCredentials: boolean };
}

/** Reads settings from `env`; throws with every invalid variable named. */
export function loadSettings(env: NodeJS.ProcessEnv = process.env): Settings {
  // An empty variable counts as unset, as `BERTH_X= berth …` usually means "use the default".
  const present = Object.fromEntries(Object.entries(env).filter(([, value]) => value !== ''));
  const parsed = settingsSchema.safeParse(present);
  if (!parsed.success) {
    const problems = parsed.error.issues.map((issue) => {
      const name = issue.path.join('.');
      return `${name}: ${issue.message} (got ${JSON.stringify(present[name])})`;
    });
    throw new Error(`Invalid berth settings in the environment:\n  ${problems.join('\n  ')}`);
  }
  const values = parsed.data;
  const dataDir = path.resolve(values.BERTH_DATA_DIR);

  return {
    dataDir,
    groupsDir: path.join(dataDir, 'groups'),
    sessionsDir: path.join(dataDir, 'sessions'),
    hostDbPath: path.join(dataDir, 'berth.db'),
    temporalAddress: values.BERTH_TEMPORAL_ADDRESS,
    namespace: values.BERTH_TEMPORAL_NAMESPACE,
    workflowTaskQueue: values.BERTH_TASK_QUEUE,
    hostTaskQueue: `${values.BERTH_TASK_QUEUE}-host-${values.BERTH_HOST_ID}`,
    hostId: values.BERTH_HOST_ID,
    installId: createHash('sha256').update(dataDir).digest('hex').slice(0, 12),
    defaultImage: values.BERTH_DEFAULT_IMAGE,
    defaultProvider: values.BERTH_DEFAULT_PROVIDER,
    assistantName: values.BERTH_ASSISTANT_NAME,
    idleTimeoutSeconds: values.BERTH_IDLE_TIMEOUT_SECONDS,
    maxLifetimeSeconds: values.BERTH_MAX_LIFETIME_SECONDS,
    stopGraceSeconds: values.BERTH_STOP_GRACE_SECONDS,
    heartbeatCeilingSeconds: values.BERTH_HEARTBEAT_CEILING_SECONDS,
    claimToleranceSeconds: values.BERTH_CLAIM_TOLERANCE_SECONDS,
    spawnGraceSeconds: values.BERTH_SPAWN_GRACE_SECONDS,
    stuckCheckSeconds: values.BERTH_STUCK_CHECK_SECONDS,
    messageMaxAttempts: values.BERTH_MESSAGE_MAX_ATTEMPTS,
    restartBudget: values.BERTH_RESTART_BUDGET,
    restartWindowSeconds: values.BERTH_RESTART_WINDOW_SECONDS,
    exitLogsKept: values.BERTH_EXIT_LOGS_KEPT,
    historyEventLimit: values.BERTH_HISTORY_EVENT_LIMIT,
    debugExitLogs: values.BERTH_LOG_LEVEL === 'debug' || values.BERTH_LOG_LEVEL === 'trace',
    deliveryPollMs: values.BERTH_DELIVERY_POLL_MS,
    mountAllowlistPath: values.BERTH_MOUNT_ALLOWLIST,
    dockerBinary: values.BERTH_DOCKER_BINARY,
    uiPort: values.BERTH_UI_PORT,
    onecli: {
      url: values.ONECLI_URL,
      apiKey: values.ONECLI_API_KEY,
      requireCredentials: values.BERTH_ONECLI_REQUIRED,
    },
  };
}
