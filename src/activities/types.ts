/**
 * Inputs and results of the session activities. Workflow code imports these
 * as types, so this file must stay free of runtime imports.
 */

export interface SessionRef {
  sessionId: string;
}

export interface StuckPolicy {
  heartbeatCeilingMs: number;
  claimToleranceMs: number;
  spawnGraceMs: number;
  checkIntervalMs: number;
}

/** The per-session lifecycle policy, from container.json over the global defaults. */
export interface SessionPlan {
  sessionId: string;
  agentGroupId: string;
  agentGroupName: string;
  folder: string;
  provider: string;
  idleTimeoutMs: number;
  maxLifetimeMs: number;
  stopGraceMs: number;
  /** Pause instead of stop at the idle timeout, and stop after this long paused. Null disables it. */
  warmIdlePauseMs: number | null;
  stuck: StuckPolicy;
  messageRetry: { maxAttempts: number; backoffMs: number };
  restartBudget: { maxFailures: number; windowMs: number };
  warnings: string[];
}

export interface SpawnRequest {
  sessionId: string;
  containerName: string;
  image: string;
  provider: string;
  adminUserIds: string[];
  workflowRunId: string;
}

export interface SpawnResult {
  containerName: string;
  containerId: string;
  startedAt: number;
  adopted: boolean;
}

export interface SuperviseRequest {
  sessionId: string;
  containerName: string;
  startedAt: number;
}

/** The container's exit, as the supervising activity observed it. */
export interface ContainerExit {
  exitCode: number | null;
  oomKilled: boolean;
  finishedAt: number;
  /** False when the container vanished before it could be inspected. */
  inspected: boolean;
}

export interface StopRequest {
  sessionId: string;
  containerName: string;
  /** How long each graceful step waits: the close request, then SIGTERM before SIGKILL. */
  graceMs: number;
  /** False skips the close request, for a container that is stuck and would not see it. */
  closeRequest: boolean;
  reason: string;
}

export interface StopStep {
  step: string;
  atMs: number;
  outcome: string;
}

export interface RecordExitRequest {
  sessionId: string;
  containerName: string;
  image: string;
  startedAt: number;
  exit: ContainerExit;
  stopReason: StopReason;
  stopSteps: StopStep[];
  /** Claims to count as failed attempts, for a stuck or crashed container. */
  failedClaims: boolean;
  messageRetry: { maxAttempts: number; backoffMs: number };
}

export type StopReason =
  'idle' | 'lifetime' | 'stuck' | 'stop-request' | 'crash' | 'warm-idle-expired' | 'exited';

export interface RecordExitResult {
  exitKind: string;
  logPath: string;
  retriedMessages: string[];
  failedMessages: string[];
  /** When the earliest message waiting for a retry becomes due (epoch ms), so the workflow can wake for it. */
  nextRetryAt: number | null;
  /**
   * Pending messages that the container left unprocessed and that are due now,
   * such as one that arrived while the container was dying unnoticed.
   */
  dueMessages: number;
}

/** The supervising activity's periodic report, sent to the workflow as a signal. */
export interface SessionObservation {
  observedAt: number;
  heartbeatMtime: number | null;
  claims: Array<{ messageId: string; claimedAt: string; status: string }>;
  declaredToolTimeoutMs: number | null;
  pendingMessages: number;
}
