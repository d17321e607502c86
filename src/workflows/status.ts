/** Session workflow states, shown by `berth status` and the ContainerState search attribute. */
export type SessionState = 'idle' | 'starting' | 'running' | 'paused' | 'stopping' | 'backoff';

export const ACTIVITY_SOURCES = ['start', 'inbound', 'delivery', 'heartbeat', 'output'] as const;

/** The source that reset the idle timer last: a start, a new inbound message, a delivered reply, a heartbeat touch or a streamed block. */
export type ActivitySource = (typeof ACTIVITY_SOURCES)[number];

/** The result of the session workflow's `status` query. */
export interface SessionStatus {
  sessionId: string;
  state: SessionState;
  containerName: string | null;
  image: string | null;
  startedAt: number | null;
  lastActivityAt: number | null;
  lastActivitySource: ActivitySource | null;
  nextDeadline: { kind: 'idle' | 'lifetime' | 'pause' | 'restart-backoff' | 'retry'; at: number } | null;
  wakeCount: number;
  activityCount: number;
  spawnCount: number;
  lastError: string | null;
  lastExit: {
    reason: string;
    exitKind: string;
    exitCode: number | null;
    at: number;
    logPath: string;
    failedMessages: string[];
  } | null;
  pendingWake: boolean;
}
