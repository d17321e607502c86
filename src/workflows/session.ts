import {
  ActivityCancellationType,
  ApplicationFailure,
  CancellationScope,
  condition,
  continueAsNew,
  defineQuery,
  defineSignal,
  isCancellation,
  log,
  proxyActivities,
  setHandler,
  upsertSearchAttributes,
  workflowInfo,
  allHandlersFinished,
} from '@temporalio/workflow';
import type { createActivities } from '../activities/index.js';
import type {
  ContainerExit,
  SessionObservation,
  SessionPlan,
  StopReason,
  StopStep,
} from '../activities/types.js';
import { decideStuck } from '../lifecycle/stuck.js';
import { ACTIVITY_SOURCES, type ActivitySource, type SessionState, type SessionStatus } from './status.js';

type Activities = ReturnType<typeof createActivities>;

export interface WakeRequest {
  reason: string;
}

export interface ActivityNotice {
  source: ActivitySource;
  at: number;
}

export interface StopSignalRequest {
  reason: string;
}

export const wakeSignal = defineSignal<[WakeRequest]>('wake');
export const activitySignal = defineSignal<[ActivityNotice]>('activity');
export const stopSignal = defineSignal<[StopSignalRequest]>('stop');
export const observationSignal = defineSignal<[SessionObservation]>('observation');
export const statusQuery = defineQuery<SessionStatus>('status');

/** State carried across continue-as-new. */
export interface CarriedState {
  pendingWake: boolean;
  spawnCount: number;
  wakeCount: number;
  activityCount: number;
  lastActivityAt: number | null;
  lastActivitySource: ActivitySource | null;
  failedStarts: number[];
  /** Failed starts since the last successful one; sets the retry delay. */
  consecutiveStartFailures: number;
  /** When the session wakes by itself to retry a failed start or a message waiting out its backoff. */
  retryWakeAt: number | null;
  lastError: string | null;
  lastExit: SessionStatus['lastExit'];
  /** The container that was still running when the previous run continued as new. */
  running?: RunningContainer | null;
}

/** State of a running container that one run hands to the next across continue-as-new. */
export interface RunningContainer {
  containerName: string;
  image: string | null;
  startedAt: number;
  /** The plan the container started with. Edits to container.json apply from its next start. */
  plan: SessionPlan;
  pausedSince: number | null;
  nextStuckCheck: number;
  lastHeartbeatSeen: number | null;
  observation: SessionObservation | null;
  stopRequest: string | null;
}

export interface SessionWorkflowInput {
  sessionId: string;
  hostTaskQueue: string;
  carried?: CarriedState;
  /** Continue-as-new once the history passes this many events (the server's own suggestion also counts). */
  maxHistoryEvents?: number;
  /** Off where the server has no berth search attributes registered (the time-skipping test server). */
  searchAttributes?: boolean;
  /** After this many failed starts inside the window, the session waits instead of retrying at once. */
  restartBudget?: { maxFailures: number; windowMs: number };
  /**
   * Heartbeat timeout of the supervising activity, 30 s by default. The
   * time-skipping test server fires it whenever it skips further ahead than
   * this, so tests that skip time while a container runs pass a longer one.
   */
  superviseHeartbeatTimeoutMs?: number;
}

const DEFAULT_MAX_HISTORY_EVENTS = 5000;
const DEFAULT_SUPERVISE_HEARTBEAT_TIMEOUT_MS = 30_000;

/**
 * One session's container life: waits for a wake, starts the container,
 * keeps it while the agent is active, stops it gracefully when it goes idle,
 * outlives its maximum lifetime or looks stuck, then waits for the next wake.
 * Runs for as long as the session exists. It continues as new whenever its
 * history grows large, between containers or while one runs.
 */
export async function sessionWorkflow(input: SessionWorkflowInput): Promise<void> {
  const { sessionId } = input;
  const { running: handedOver = null, ...counters } = input.carried ?? freshState();
  const acts = activitiesFor(
    input.hostTaskQueue,
    input.superviseHeartbeatTimeoutMs ?? DEFAULT_SUPERVISE_HEARTBEAT_TIMEOUT_MS,
  );

  let state: SessionState = 'idle';
  let pendingWake = counters.pendingWake;
  let stopRequest: string | null = handedOver?.stopRequest ?? null;
  let observation: SessionObservation | null = handedOver?.observation ?? null;
  let lastHeartbeatSeen: number | null = handedOver?.lastHeartbeatSeen ?? null;
  let containerName: string | null = handedOver?.containerName ?? null;
  let image: string | null = handedOver?.image ?? null;
  let startedAt: number | null = handedOver?.startedAt ?? null;
  let nextDeadline: SessionStatus['nextDeadline'] = null;

  const noteActivity = (source: ActivitySource, at: number): void => {
    counters.activityCount += 1;
    if (counters.lastActivityAt === null || at >= counters.lastActivityAt) {
      counters.lastActivityAt = at;
      counters.lastActivitySource = source;
    }
  };

  setHandler(wakeSignal, () => {
    counters.wakeCount += 1;
    if (state === 'running' || state === 'paused') {
      // A new inbound message counts as activity, and a paused container is woken.
      noteActivity('inbound', Date.now());
      if (state === 'paused') pendingWake = true;
      return;
    }
    pendingWake = true;
  });
  setHandler(activitySignal, ({ source, at }) => {
    if (!ACTIVITY_SOURCES.includes(source)) return;
    noteActivity(source, Math.min(at, Date.now()));
  });
  setHandler(stopSignal, ({ reason }) => {
    stopRequest = reason || 'stop requested';
    pendingWake = false;
  });
  setHandler(observationSignal, (next) => {
    observation = next;
    if (
      next.heartbeatMtime !== null &&
      (lastHeartbeatSeen === null || next.heartbeatMtime > lastHeartbeatSeen)
    ) {
      if (lastHeartbeatSeen !== null || (startedAt !== null && next.heartbeatMtime > startedAt)) {
        noteActivity('heartbeat', Math.min(next.heartbeatMtime, Date.now()));
      }
      lastHeartbeatSeen = next.heartbeatMtime;
    }
  });
  setHandler(statusQuery, () => ({
    sessionId,
    state,
    containerName,
    image,
    startedAt,
    lastActivityAt: counters.lastActivityAt,
    lastActivitySource: counters.lastActivitySource,
    nextDeadline,
    wakeCount: counters.wakeCount,
    activityCount: counters.activityCount,
    spawnCount: counters.spawnCount,
    lastError: counters.lastError,
    lastExit: counters.lastExit,
    pendingWake,
  }));

  const setState = (next: SessionState): void => {
    state = next;
    if (input.searchAttributes !== false) upsertSearchAttributes({ ContainerState: [next] });
    log.info('session state changed', { sessionId, state: next, containerName });
  };

  if (input.searchAttributes !== false)
    upsertSearchAttributes({ SessionId: [sessionId], ContainerState: [state] });

  const maxHistory = input.maxHistoryEvents ?? DEFAULT_MAX_HISTORY_EVENTS;
  const historyFull = (): boolean =>
    workflowInfo().continueAsNewSuggested || workflowInfo().historyLength >= maxHistory;

  /** Rolls over to a new run once every signal handler has finished, carrying what they changed. */
  const rollOver = async (running: RunningContainer | null): Promise<never> => {
    await condition(allHandlersFinished);
    return continueAsNew<typeof sessionWorkflow>({
      ...input,
      carried: { ...counters, pendingWake, running },
    });
  };

  let resume = handedOver;
  for (;;) {
    let plan: SessionPlan;
    let name: string;
    if (resume !== null) {
      // The previous run handed over a container that still runs: supervise it again, never respawn.
      ({ plan, containerName: name } = resume);
      setState(resume.pausedSince !== null ? 'paused' : 'running');
    } else {
      const started = await waitAndStart();
      if (started === null) continue;
      ({ plan, containerName: name } = started);
    }

    const outcome = await runContainer(plan, name, resume);
    resume = null;
    if (outcome.kind === 'handover') return rollOver(outcome.running);

    setState('stopping');
    nextDeadline = null;
    const recorded = await acts.record.recordExit({
      sessionId,
      containerName: name,
      image: image ?? '',
      startedAt: startedAt!,
      exit: outcome.exit,
      stopReason: outcome.reason,
      stopSteps: outcome.steps,
      failedClaims: outcome.reason === 'stuck' || outcome.reason === 'crash',
      messageRetry: plan.messageRetry,
    });
    counters.lastExit = {
      reason: outcome.reason,
      exitKind: recorded.exitKind,
      exitCode: outcome.exit.exitCode,
      at: outcome.exit.finishedAt,
      logPath: recorded.logPath,
      failedMessages: recorded.failedMessages,
    };
    // Messages retried after a stuck or crashed container wait out their backoff; wake when the first is due.
    counters.retryWakeAt = recorded.nextRetryAt;
    // A message the container never took (it came while the container was dying, and its wake counted
    // as activity) starts the next container now. After a stop request the session waits for a wake.
    if (recorded.dueMessages > 0 && outcome.reason !== 'stop-request') pendingWake = true;
    if (outcome.reason === 'crash') counters.failedStarts = [...counters.failedStarts, Date.now()].slice(-20);
    containerName = null;
    startedAt = null;
    setState('idle');
  }

  /**
   * Waits for a wake (continuing as new while none comes), then starts a
   * container. Returns null when the start failed or the restart backoff was
   * cut short by a stop, so the caller waits again.
   */
  async function waitAndStart(): Promise<{ plan: SessionPlan; containerName: string } | null> {
    if (counters.retryWakeAt !== null) {
      nextDeadline = { kind: 'retry', at: counters.retryWakeAt };
      const woken = await condition(
        () => pendingWake || historyFull(),
        Math.max(0, counters.retryWakeAt - Date.now()),
      );
      // The retry time came with no other wake: messages are still pending, so wake for them.
      if (!woken) pendingWake = true;
    } else {
      await condition(() => pendingWake || historyFull());
    }
    // Only history pressure woke us: roll over with everything a signal changed so far.
    if (!pendingWake) return rollOver(null);
    pendingWake = false;
    counters.retryWakeAt = null;
    nextDeadline = null;
    // A stop that arrived while no container ran has nothing left to stop.
    stopRequest = null;

    const backoffUntil = restartBackoffUntil(
      counters.failedStarts,
      Date.now(),
      input.restartBudget ?? DEFAULT_RESTART_BUDGET,
    );
    if (backoffUntil !== null) {
      setState('backoff');
      nextDeadline = { kind: 'restart-backoff', at: backoffUntil };
      await condition(() => stopRequest !== null, backoffUntil - Date.now());
      if (stopRequest !== null) {
        stopRequest = null;
        setState('idle');
        nextDeadline = null;
        return null;
      }
    }

    setState('starting');
    let plan: SessionPlan;
    let spawned: { containerName: string; startedAt: number };
    try {
      counters.lastError = null;
      const routing = await acts.prepare.syncSessionRouting({ sessionId });
      plan = await acts.prepare.loadSessionPlan({ sessionId });
      if (plan.warnings.length > 0) counters.lastError = plan.warnings.join('; ');
      if (input.searchAttributes !== false) upsertSearchAttributes({ AgentGroupId: [plan.agentGroupId] });
      await acts.prepare.ensureAgent({ sessionId });
      const ensured = await acts.build.ensureImage({ sessionId });
      image = ensured.image;
      if (ensured.warning !== null) counters.lastError = ensured.warning;
      await acts.prepare.initFilesystem({ sessionId });
      counters.spawnCount += 1;
      containerName = containerNameFor(plan.folder, sessionId, counters.spawnCount);
      spawned = await acts.spawn.spawnContainer({
        sessionId,
        containerName,
        image,
        provider: plan.provider,
        adminUserIds: routing.adminUserIds,
        workflowRunId: workflowInfo().runId,
      });
    } catch (error) {
      counters.lastError = describeFailure(error);
      counters.consecutiveStartFailures += 1;
      if (!isNonRetryable(error)) {
        // A cause that may pass (Docker down, an engine error) counts toward the restart budget, and the
        // session tries again by itself, backing off, so the pending messages are not left waiting for
        // the next message. Bad input (an invalid container.json, a rejected mount) starts nothing and
        // uses no budget: it waits for the next wake, which starts at once when the input was fixed.
        counters.failedStarts = [...counters.failedStarts, Date.now()].slice(-20);
        const delay = Math.min(
          MAX_START_RETRY_MS,
          FIRST_START_RETRY_MS * 2 ** (counters.consecutiveStartFailures - 1),
        );
        counters.retryWakeAt = Date.now() + delay;
      }
      containerName = null;
      setState('idle');
      log.warn('session start failed', {
        sessionId,
        error: counters.lastError,
        retryAt: counters.retryWakeAt,
      });
      return null;
    }
    counters.consecutiveStartFailures = 0;
    // Every wake so far is served by this container: it reads all of inbound.db, including
    // messages written while it was starting. A wake from now on counts as activity instead.
    pendingWake = false;
    startedAt = spawned.startedAt;
    observation = null;
    lastHeartbeatSeen = null;
    noteActivity('start', Date.now());
    setState('running');
    return { plan, containerName: spawned.containerName };
  }

  /**
   * Supervises one container until it exits, a deadline stops it, or the
   * history grows full while it runs. In that last case supervision is
   * cancelled (the container keeps running) and the container is handed to
   * the next run, which supervises it again.
   */
  async function runContainer(
    plan: SessionPlan,
    name: string,
    resumed: RunningContainer | null,
  ): Promise<ContainerOutcome> {
    let exit: ContainerExit | null = null;
    let supervisionError: unknown = null;
    const supervisionScope = new CancellationScope();
    const supervision = supervisionScope
      .run(() => acts.supervise.superviseContainer({ sessionId, containerName: name, startedAt: startedAt! }))
      .then(
        (result) => {
          exit = result;
        },
        (error: unknown) => {
          supervisionError = error;
        },
      );

    const lifetimeDeadline = startedAt! + plan.maxLifetimeMs;
    let nextStuckCheck = resumed?.nextStuckCheck ?? Date.now() + plan.stuck.checkIntervalMs;
    let reason: StopReason | null = null;
    let pausedSince: number | null = resumed?.pausedSince ?? null;
    let handover = false;

    while (exit === null && supervisionError === null && reason === null) {
      const now = Date.now();
      const idleDeadline = (counters.lastActivityAt ?? now) + plan.idleTimeoutMs;
      const pauseDeadline = pausedSince !== null ? pausedSince + (plan.warmIdlePauseMs ?? 0) : null;
      const deadlines: Array<NonNullable<SessionStatus['nextDeadline']>> = [
        pauseDeadline !== null ? { kind: 'pause', at: pauseDeadline } : { kind: 'idle', at: idleDeadline },
        { kind: 'lifetime', at: lifetimeDeadline },
      ];
      nextDeadline = deadlines.reduce((a, b) => (b.at < a.at ? b : a));
      const activityBefore = counters.activityCount;

      const wokeEarly = await condition(
        () =>
          exit !== null ||
          supervisionError !== null ||
          stopRequest !== null ||
          counters.activityCount !== activityBefore ||
          // A wake for a paused container, also one that came with a handover from the previous run.
          (pausedSince !== null && pendingWake) ||
          historyFull(),
        Math.max(0, Math.min(nextDeadline.at, nextStuckCheck) - Date.now()),
      );
      if (exit !== null || supervisionError !== null) break;
      if (stopRequest !== null) {
        reason = 'stop-request';
        stopRequest = null;
        break;
      }

      if (pausedSince !== null && (pendingWake || counters.activityCount !== activityBefore)) {
        await acts.control.unpauseContainer({ sessionId, containerName: name });
        pausedSince = null;
        pendingWake = false;
        setState('running');
        continue;
      }
      if (historyFull()) {
        handover = true;
        break;
      }
      if (wokeEarly) continue;

      const at = Date.now();
      if (at >= lifetimeDeadline) reason = 'lifetime';
      else if (pauseDeadline !== null && at >= pauseDeadline) reason = 'warm-idle-expired';
      else if (pausedSince === null && at >= (counters.lastActivityAt ?? at) + plan.idleTimeoutMs) {
        if (plan.warmIdlePauseMs !== null) {
          await acts.control.pauseContainer({ sessionId, containerName: name });
          pausedSince = Date.now();
          setState('paused');
        } else {
          reason = 'idle';
        }
      } else if (at >= nextStuckCheck) {
        nextStuckCheck = at + plan.stuck.checkIntervalMs;
        if (pausedSince === null && observation !== null && isStuck(plan, observation, at)) reason = 'stuck';
      }
    }

    if (handover) {
      log.info('history is full: ending supervision to hand the container to a new run', {
        sessionId,
        containerName: name,
        historyLength: workflowInfo().historyLength,
      });
      supervisionScope.cancel();
      await supervision;
      if (exit === null && isCancellation(supervisionError)) {
        log.info('supervision ended: continuing as new with the running container', {
          sessionId,
          containerName: name,
        });
        return {
          kind: 'handover',
          running: {
            containerName: name,
            image,
            startedAt: startedAt!,
            plan,
            pausedSince,
            nextStuckCheck,
            lastHeartbeatSeen,
            observation,
            stopRequest,
          },
        };
      }
      // The container exited, or supervision failed, while the handover waited: finish it here.
    }

    let steps: StopStep[] = [];
    if (exit === null && supervisionError === null) {
      setState('stopping');
      steps = (
        await acts.control.stopContainer({
          sessionId,
          containerName: name,
          graceMs: plan.stopGraceMs,
          // A stuck agent would not act on a close request, so it goes straight to SIGTERM.
          closeRequest: reason !== 'stuck',
          reason: reason ?? 'stop-request',
        })
      ).steps;
      await supervision;
    }
    if (exit === null) {
      // Supervision gave up (its retries ran out): make sure nothing keeps running unwatched.
      counters.lastError = describeFailure(supervisionError);
      await acts.control.stopContainer({
        sessionId,
        containerName: name,
        graceMs: plan.stopGraceMs,
        closeRequest: false,
        reason: 'supervision failed',
      });
      exit = { exitCode: null, oomKilled: false, finishedAt: Date.now(), inspected: false };
    }
    const finalExit: ContainerExit = exit;
    const finalReason: StopReason = reason ?? (finalExit.exitCode === 0 ? 'exited' : 'crash');
    return { kind: 'ended', reason: finalReason, exit: finalExit, steps };
  }

  function isStuck(plan: SessionPlan, seen: SessionObservation, now: number): boolean {
    const { decision } = decideStuck(
      {
        now,
        containerStartedAt: startedAt!,
        heartbeatMtime: seen.heartbeatMtime,
        claims: seen.claims,
        declaredToolTimeoutMs: seen.declaredToolTimeoutMs,
        pendingMessages: seen.pendingMessages,
      },
      plan.stuck,
    );
    if (decision.action === 'stop') {
      log.warn('session container looks stuck', {
        sessionId,
        reason: decision.reason,
        detail: decision.detail,
      });
      counters.lastError = `stopped as stuck: ${decision.detail}`;
      return true;
    }
    return false;
  }
}

type ContainerOutcome =
  | { kind: 'ended'; reason: StopReason; exit: ContainerExit; steps: StopStep[] }
  | { kind: 'handover'; running: RunningContainer };

function freshState(): CarriedState {
  return {
    pendingWake: false,
    spawnCount: 0,
    wakeCount: 0,
    activityCount: 0,
    lastActivityAt: null,
    lastActivitySource: null,
    failedStarts: [],
    consecutiveStartFailures: 0,
    retryWakeAt: null,
    lastError: null,
    lastExit: null,
    running: null,
  };
}

const FIRST_START_RETRY_MS = 10_000;
const MAX_START_RETRY_MS = 5 * 60_000;

const DEFAULT_RESTART_BUDGET = { maxFailures: 5, windowMs: 10 * 60_000 };

/** Returns when a start may be tried again, or null when the restart budget allows it now. */
export function restartBackoffUntil(
  failedStarts: number[],
  now: number,
  budget: { maxFailures: number; windowMs: number },
): number | null {
  const recent = failedStarts.filter((at) => now - at < budget.windowMs);
  if (recent.length < budget.maxFailures) return null;
  // Wait until enough old failures leave the window to bring the count under the budget.
  return recent[recent.length - budget.maxFailures]! + budget.windowMs;
}

/** Builds a Docker-valid container name that is the same for every retry of one spawn. */
export function containerNameFor(folder: string, sessionId: string, spawnCount: number): string {
  const safeFolder = folder
    .toLowerCase()
    .replace(/[^a-z0-9_.-]/g, '-')
    .slice(0, 40);
  const shortSession = sessionId
    .replace(/^sess-/, '')
    .replace(/[^a-zA-Z0-9]/g, '')
    .slice(0, 12);
  return `berth-${safeFolder}-${shortSession}-${spawnCount}`;
}

/** Returns true when the failure, or the activity failure's cause, is marked non-retryable. */
function isNonRetryable(error: unknown): boolean {
  if (error instanceof ApplicationFailure) return error.nonRetryable === true;
  if (error instanceof Error) {
    const cause = (error as Error & { cause?: unknown }).cause;
    return cause !== undefined && isNonRetryable(cause);
  }
  return false;
}

function describeFailure(error: unknown): string {
  if (error instanceof ApplicationFailure) return `${error.type ?? 'Error'}: ${error.message}`;
  if (error instanceof Error) {
    const cause = (error as Error & { cause?: unknown }).cause;
    if (cause instanceof Error) return describeFailure(cause);
    return error.message;
  }
  return String(error);
}

function activitiesFor(taskQueue: string, superviseHeartbeatTimeoutMs: number) {
  const retry = { initialInterval: '1s', backoffCoefficient: 2, maximumInterval: '30s' };
  return {
    prepare: proxyActivities<Activities>({
      taskQueue,
      startToCloseTimeout: '1m',
      retry: { ...retry, maximumAttempts: 5 },
    }),
    build: proxyActivities<Activities>({
      taskQueue,
      startToCloseTimeout: '30m',
      heartbeatTimeout: '2m',
      retry: { ...retry, maximumAttempts: 3 },
    }),
    spawn: proxyActivities<Activities>({
      taskQueue,
      startToCloseTimeout: '2m',
      retry: { ...retry, maximumAttempts: 8 },
    }),
    supervise: proxyActivities<Activities>({
      taskQueue,
      startToCloseTimeout: '30d',
      heartbeatTimeout: superviseHeartbeatTimeoutMs,
      // A handover to the next run waits until this supervision has really stopped, so two never overlap.
      cancellationType: ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
      retry: { ...retry, maximumAttempts: 20 },
    }),
    control: proxyActivities<Activities>({
      taskQueue,
      startToCloseTimeout: '10m',
      retry: { ...retry, maximumAttempts: 10 },
    }),
    record: proxyActivities<Activities>({
      taskQueue,
      startToCloseTimeout: '2m',
      retry: { ...retry, maximumAttempts: 10 },
    }),
  };
}
