import { randomUUID } from 'node:crypto';
import { WorkflowExecutionAlreadyStartedError, type WorkflowHandle } from '@temporalio/client';
import { ApplicationFailure } from '@temporalio/common';
import type { TestWorkflowEnvironment } from '@temporalio/testing';
import { DefaultLogger, Runtime, Worker, type WorkflowBundleWithSourceMap } from '@temporalio/worker';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import type { SessionObservation, SessionPlan } from '../src/activities/types.js';
import { formatTimestamp } from '../src/lifecycle/timestamps.js';
import {
  activitySignal,
  observationSignal,
  sessionWorkflow,
  statusQuery,
  stopSignal,
  wakeSignal,
  type CarriedState,
  type SessionWorkflowInput,
} from '../src/workflows/session.js';
import type { ActivitySource, SessionStatus } from '../src/workflows/status.js';
import { FakeEngine, createFakeActivities, type TimeSkippingLock } from './support/fake-activities.js';
import { bundleWorkflows, createTimeSkippingEnv } from './support/temporal.js';

const MINUTE = 60_000;
/** Real time a status poll waits for the workflow to reach a state. */
const WAIT_LIMIT_MS = 15_000;

let env: TestWorkflowEnvironment;
let workflowBundle: WorkflowBundleWithSourceMap;

beforeAll(async () => {
  Runtime.install({ logger: new DefaultLogger('WARN') });
  [env, workflowBundle] = await Promise.all([createTimeSkippingEnv(), bundleWorkflows()]);
});

// A test that leaves a time-skipping lock behind would make every later test wait in real time.
afterEach(async () => {
  let timer: NodeJS.Timeout | undefined;
  const stalled = new Promise<boolean>((resolve) => {
    timer = setTimeout(() => resolve(false), 2_000);
  });
  const skipped = await Promise.race([env.sleep(60 * MINUTE).then(() => true), stalled]);
  clearTimeout(timer);
  if (!skipped)
    throw new Error('The test server no longer skips time: this test left a time-skipping lock held.');
});

afterAll(async () => {
  await env?.teardown();
});

interface SessionOptions {
  plan?: Partial<SessionPlan>;
  input?: Partial<SessionWorkflowInput>;
}

/** One session workflow, its fake engine and a worker on a task queue of its own. */
class TestSession {
  readonly sessionId = `sess-${randomUUID()}`;
  readonly workflowId = `berth-session-${this.sessionId}`;
  readonly taskQueue = `session-test-${randomUUID()}`;
  readonly engine: FakeEngine;
  firstRunId: string | null = null;

  constructor(private readonly options: SessionOptions) {
    this.engine = new FakeEngine(this.sessionId, {
      now: () => env.currentTimeMs(),
      timeSkipping: timeSkippingLock(),
      plan: options.plan,
    });
  }

  /**
   * Wakes the session with signal-with-start, as the router does. The
   * time-skipping test server can reject one of two concurrent first wakes as
   * already started, which a real server never does for signal-with-start,
   * so that rejection is retried once.
   */
  async wake(): Promise<void> {
    try {
      await this.signalWithStart();
    } catch (error) {
      if (!(error instanceof WorkflowExecutionAlreadyStartedError)) throw error;
      await this.signalWithStart();
    }
  }

  /** Returns the workflow input of this session's runs, with the test's overrides. */
  private workflowInput(): SessionWorkflowInput {
    return {
      sessionId: this.sessionId,
      hostTaskQueue: this.taskQueue,
      searchAttributes: false,
      // Time skipping jumps past any heartbeat timeout shorter than the skip.
      superviseHeartbeatTimeoutMs: 24 * 60 * MINUTE,
      ...this.options.input,
    };
  }

  private async signalWithStart(): Promise<void> {
    const handle = await env.client.workflow.signalWithStart(sessionWorkflow, {
      workflowId: this.workflowId,
      taskQueue: this.taskQueue,
      args: [this.workflowInput()],
      signal: wakeSignal,
      signalArgs: [{ reason: 'test' }],
    });
    this.firstRunId ??= handle.signaledRunId;
  }

  /**
   * Starts the workflow as a run that continued as new with `carried`, the
   * way a previous run hands its state over, with no wake signal.
   */
  async startCarrying(carried: CarriedState): Promise<void> {
    const handle = await env.client.workflow.start(sessionWorkflow, {
      workflowId: this.workflowId,
      taskQueue: this.taskQueue,
      args: [{ ...this.workflowInput(), carried }],
    });
    this.firstRunId = handle.firstExecutionRunId;
  }

  /** Returns the handle of the latest run, which follows continue-as-new. */
  handle(): WorkflowHandle<typeof sessionWorkflow> {
    return env.client.workflow.getHandle(this.workflowId);
  }

  /**
   * Queries the status of the latest run. Where a run may continue as new,
   * call waitForQuiet first (see there).
   */
  status(): Promise<SessionStatus> {
    return this.handle().query(statusQuery);
  }

  async currentRunId(): Promise<string> {
    return (await this.handle().describe()).runId;
  }

  /** Polls the status query until `done` holds; throws with the last status when it never does. */
  async waitFor(what: string, done: (status: SessionStatus) => boolean): Promise<SessionStatus> {
    const deadline = Date.now() + WAIT_LIMIT_MS;
    let last = await this.status();
    while (!done(last)) {
      if (Date.now() > deadline) {
        throw new Error(`Session never reached "${what}"; last status: ${JSON.stringify(last)}`);
      }
      await new Promise((resolve) => setTimeout(resolve, 25));
      last = await this.status();
    }
    return last;
  }

  async wakeAndRun(): Promise<SessionStatus> {
    await this.wake();
    return this.waitFor('running', (s) => s.state === 'running');
  }

  async activity(source: ActivitySource, at: number): Promise<void> {
    await this.handle().signal(activitySignal, { source, at });
  }

  async observe(observation: Partial<SessionObservation>): Promise<void> {
    await this.handle().signal(observationSignal, {
      observedAt: await env.currentTimeMs(),
      heartbeatMtime: null,
      claims: [],
      declaredToolTimeoutMs: null,
      pendingMessages: 0,
      ...observation,
    });
  }

  /**
   * Stops the container and ends the workflow. A run terminated while an
   * activity is outstanding keeps that activity's time-skipping lock, which
   * would stop time skipping for every later test, so this waits for quiet first.
   */
  async close(): Promise<void> {
    this.engine.releaseStops();
    if (this.firstRunId === null) return;
    try {
      await this.handle().signal(stopSignal, { reason: 'test cleanup' });
      await this.waitForQuiet();
    } finally {
      await this.handle().terminate('test finished');
    }
  }

  /**
   * Waits until the latest run has handled every event and has no activity
   * pending, reading only its history. A query is no use here: the test
   * server drops a query that reaches a run while that run continues as new,
   * and keeps that query's time-skipping lock for good.
   */
  async waitForQuiet(): Promise<void> {
    const deadline = Date.now() + WAIT_LIMIT_MS;
    while (!(await this.isQuiet())) {
      if (Date.now() > deadline) throw new Error(`Session ${this.sessionId} never went quiet`);
      await new Promise((resolve) => setTimeout(resolve, 25));
    }
  }

  /**
   * Waits until the latest run has handled every event and supervises its
   * container alone: its only open activity is a supervision, and only one
   * supervision runs in the worker. Reads no query, as waitForQuiet.
   */
  async waitForSupervision(): Promise<void> {
    const deadline = Date.now() + WAIT_LIMIT_MS;
    while (!(await this.isSupervising())) {
      if (Date.now() > deadline) throw new Error(`Session ${this.sessionId} never settled into supervision`);
      await new Promise((resolve) => setTimeout(resolve, 25));
    }
  }

  /** Waits until run `runId` has completed its last workflow task, or has closed. */
  async waitForTasks(runId: string): Promise<void> {
    const run = env.client.workflow.getHandle(this.workflowId, runId);
    const deadline = Date.now() + WAIT_LIMIT_MS;
    for (;;) {
      if ((await run.describe()).status.name !== 'RUNNING') return;
      if (lastTaskCompleted((await run.fetchHistory()).events ?? [])) return;
      if (Date.now() > deadline) throw new Error(`Run ${runId} never finished its workflow task`);
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
  }

  private async isSupervising(): Promise<boolean> {
    const description = await this.handle().describe();
    if (description.status.name !== 'RUNNING') return false;
    const pending = description.raw.pendingActivities ?? [];
    if (pending.length !== 1 || pending[0]?.activityType?.name !== 'superviseContainer') return false;
    if (this.engine.supervising !== 1) return false;

    const history = await env.client.workflow.getHandle(this.workflowId, description.runId).fetchHistory();
    return lastTaskCompleted(history.events ?? []);
  }

  private async isQuiet(): Promise<boolean> {
    const description = await this.handle().describe();
    if (description.status.name !== 'RUNNING') return false;

    const history = await env.client.workflow.getHandle(this.workflowId, description.runId).fetchHistory();
    const events = history.events ?? [];
    return openActivityCount(events) === 0 && lastTaskCompleted(events);
  }
}

type HistoryEvent = NonNullable<Awaited<ReturnType<WorkflowHandle['fetchHistory']>>['events']>[number];

/** Counts the activities scheduled in `events` that have not closed yet. */
function openActivityCount(events: HistoryEvent[]): number {
  const open = new Set<string>();
  for (const event of events) {
    if (event.activityTaskScheduledEventAttributes) open.add(String(event.eventId));
    const closed =
      event.activityTaskCompletedEventAttributes ??
      event.activityTaskFailedEventAttributes ??
      event.activityTaskTimedOutEventAttributes ??
      event.activityTaskCanceledEventAttributes;
    if (closed) open.delete(String(closed.scheduledEventId));
  }
  return open.size;
}

/** True when the last workflow task in `events` has completed, so that none is scheduled or running. */
function lastTaskCompleted(events: HistoryEvent[]): boolean {
  // Events that a completed task's commands add (a canceled timer, say) may follow it.
  const taskEvents = events.filter(
    (event) =>
      event.workflowTaskScheduledEventAttributes ||
      event.workflowTaskStartedEventAttributes ||
      event.workflowTaskCompletedEventAttributes ||
      event.workflowTaskFailedEventAttributes ||
      event.workflowTaskTimedOutEventAttributes,
  );
  return Boolean(taskEvents.at(-1)?.workflowTaskCompletedEventAttributes);
}

function timeSkippingLock(): TimeSkippingLock {
  const service = env.connection.testService;
  if (!service) throw new Error('The test environment has no test service: time skipping is unavailable.');
  return {
    lock: async () => {
      await service.lockTimeSkipping({});
    },
    unlock: async () => {
      await service.unlockTimeSkipping({});
    },
  };
}

/** Runs `body` with a fresh worker for one session, then stops and ends that session. */
async function withSession(
  options: SessionOptions,
  body: (session: TestSession) => Promise<void>,
): Promise<void> {
  const session = new TestSession(options);
  const worker = await Worker.create({
    connection: env.nativeConnection,
    taskQueue: session.taskQueue,
    workflowBundle,
    activities: createFakeActivities(session.engine),
    // Cancellation reaches an activity with a heartbeat's reply, and a handover waits for it.
    maxHeartbeatThrottleInterval: 100,
  });
  await worker.runUntil(async () => {
    try {
      await body(session);
    } finally {
      await session.close();
    }
  });
}

/** Waits until the session's workflow has continued as new from `runId`. */
async function waitForRunChange(session: TestSession, runId: string): Promise<void> {
  const deadline = Date.now() + WAIT_LIMIT_MS;
  while ((await session.currentRunId()) === runId) {
    if (Date.now() > deadline) throw new Error(`Run ${runId} never continued as new`);
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
}

/**
 * Sends activity signals one at a time, each after the run has handled the
 * last, until the workflow continues as new,
 * then `after` more, which reach the run that took over or the handover in
 * between. Returns how many it sent.
 */
async function signalUntilRollover(session: TestSession, source: ActivitySource, after = 5): Promise<number> {
  const runId = await session.currentRunId();
  const at = await env.currentTimeMs();
  let sent = 0;
  while ((await session.currentRunId()) === runId) {
    if (sent >= 500) throw new Error(`Run ${runId} did not continue as new after ${sent} signals`);
    await session.activity(source, at);
    sent += 1;
    // A run cannot complete while new signals keep arriving, so each signal waits until the last is handled.
    await session.waitForTasks(runId);
  }
  for (let i = 0; i < after; i += 1) await session.activity(source, at);
  return sent + after;
}

/** Moves the test server's clock forward, firing every timer on the way. */
function advance(ms: number): Promise<void> {
  return env.sleep(ms);
}

describe('session workflow', { timeout: 60_000 }, () => {
  it('concurrent wakes start one container', async () => {
    await withSession({}, async (session) => {
      await Promise.all(Array.from({ length: 10 }, () => session.wake()));
      await session.waitFor('running', (s) => s.state === 'running');
      expect(session.engine.spawns).toHaveLength(1);

      await advance(11 * MINUTE);
      const after = await session.waitFor(
        'idle after the idle stop',
        (s) => s.state === 'idle' && s.lastExit !== null,
      );

      expect(session.engine.spawns).toHaveLength(1);
      expect(after.wakeCount).toBe(10);
    });
  });

  it('idle timer stops the container', async () => {
    await withSession({ plan: { idleTimeoutMs: 10 * MINUTE } }, async (session) => {
      await session.wakeAndRun();

      await advance(9 * MINUTE);
      expect(session.engine.stops).toEqual([]);

      await advance(2 * MINUTE);
      await session.waitFor('idle', (s) => s.state === 'idle' && s.lastExit !== null);
      expect(session.engine.stops).toEqual([
        { containerName: session.engine.spawns[0], reason: 'idle', closeRequest: true },
      ]);
      expect(session.engine.exits.map((exit) => exit.stopReason)).toEqual(['idle']);
    });
  });

  it('activity signal pushes idle deadline back', async () => {
    await withSession({ plan: { idleTimeoutMs: 10 * MINUTE } }, async (session) => {
      const running = await session.wakeAndRun();
      const originalDeadline = running.nextDeadline!.at;

      await advance(6 * MINUTE);
      const at = await env.currentTimeMs();
      await session.activity('delivery', at);
      const noted = await session.waitFor(
        'activity noted',
        (s) => s.activityCount === running.activityCount + 1,
      );
      expect(noted.nextDeadline).toEqual({ kind: 'idle', at: at + 10 * MINUTE });

      await advance(originalDeadline + MINUTE - (await env.currentTimeMs()));
      expect(session.engine.stops).toEqual([]);
      expect((await session.status()).state).toBe('running');
    });
  });

  it('wake during stop restarts after it', async () => {
    await withSession({}, async (session) => {
      await session.wakeAndRun();
      const release = session.engine.holdStops();

      await session.handle().signal(stopSignal, { reason: 'test' });
      await session.waitFor('stopping', (s) => s.state === 'stopping' && session.engine.stops.length === 1);
      await session.wake();
      release();

      await session.waitFor('second container running', (s) => s.state === 'running' && s.spawnCount === 2);
      expect(session.engine.spawns).toHaveLength(2);
      expect(session.engine.stops).toHaveLength(1);
    });
  });

  it('wake after idle stop starts new container', async () => {
    await withSession({ plan: { idleTimeoutMs: 10 * MINUTE } }, async (session) => {
      await session.wakeAndRun();
      await advance(11 * MINUTE);
      await session.waitFor('idle', (s) => s.state === 'idle' && s.lastExit !== null);

      await session.wakeAndRun();

      expect(session.engine.spawns).toHaveLength(2);
      expect(session.engine.spawns[1]).not.toBe(session.engine.spawns[0]);
      expect(session.engine.live()).toEqual([session.engine.spawns[1]]);
    });
  });

  it('maximum lifetime stops busy container', async () => {
    const plan = { idleTimeoutMs: 10 * MINUTE, maxLifetimeMs: 30 * MINUTE };
    await withSession({ plan }, async (session) => {
      await session.wakeAndRun();

      for (let round = 0; round < 8 && session.engine.stops.length === 0; round += 1) {
        await advance(5 * MINUTE);
        await session.activity('output', await env.currentTimeMs());
      }
      await session.waitFor('idle', (s) => s.state === 'idle' && s.lastExit !== null);

      expect(session.engine.stops.map((stop) => stop.reason)).toEqual(['lifetime']);
      expect(session.engine.exits.map((exit) => exit.stopReason)).toEqual(['lifetime']);
    });
  });

  describe('stuck detection', () => {
    const stuck = {
      heartbeatCeilingMs: 24 * 60 * MINUTE,
      claimToleranceMs: 2 * MINUTE,
      checkIntervalMs: 30_000,
    };

    /** Builds a claim made in the container's first second, which counts as the current container's. */
    function claimAtStart(startedAt: number): SessionObservation['claims'] {
      const claimedAt = formatTimestamp(Math.ceil(startedAt / 1000) * 1000);
      return [{ messageId: 'msg-1', claimedAt, status: 'processing' }];
    }

    it('stale claim stops container without close request', async () => {
      const plan = { idleTimeoutMs: 60 * MINUTE, stuck: { ...stuck, spawnGraceMs: MINUTE } };
      await withSession({ plan }, async (session) => {
        const running = await session.wakeAndRun();
        await session.observe({ claims: claimAtStart(running.startedAt!), pendingMessages: 1 });

        await advance(5 * MINUTE);
        await session.waitFor('idle', (s) => s.state === 'idle' && s.lastExit !== null);

        expect(session.engine.stops).toEqual([
          { containerName: session.engine.spawns[0], reason: 'stuck', closeRequest: false },
        ]);
        expect(session.engine.exits).toMatchObject([{ stopReason: 'stuck', failedClaims: true }]);
      });
    });

    it('container within spawn grace is not stuck', async () => {
      const plan = { idleTimeoutMs: 60 * MINUTE, stuck: { ...stuck, spawnGraceMs: 30 * MINUTE } };
      await withSession({ plan }, async (session) => {
        const running = await session.wakeAndRun();
        await session.observe({ claims: claimAtStart(running.startedAt!), pendingMessages: 1 });

        await advance(10 * MINUTE);

        expect(session.engine.stops).toEqual([]);
        expect((await session.status()).state).toBe('running');
      });
    });
  });

  describe('crash', () => {
    const budget = { restartBudget: { maxFailures: 2, windowMs: 10 * MINUTE } };

    /** Crashes the container `count` times, waking the session again after each crash but the last. */
    async function crashRepeatedly(session: TestSession, count: number): Promise<void> {
      for (let crash = 1; crash <= count; crash += 1) {
        if (crash > 1) await session.wakeAndRun();
        await session.engine.crash(session.engine.spawns.at(-1)!, 1);
        await session.waitFor(
          `idle after crash ${crash}`,
          (s) => s.state === 'idle' && s.spawnCount === crash,
        );
      }
    }

    it('crash is recorded with failed claims', async () => {
      await withSession({ input: budget }, async (session) => {
        await session.wakeAndRun();
        await crashRepeatedly(session, 1);

        expect(session.engine.exits).toEqual([
          { containerName: session.engine.spawns[0], stopReason: 'crash', failedClaims: true, exitCode: 1 },
        ]);
        expect(session.engine.stops).toEqual([]);
      });
    });

    it('wake after crash starts new container', async () => {
      await withSession({ input: budget }, async (session) => {
        await session.wakeAndRun();
        await crashRepeatedly(session, 1);

        await session.wakeAndRun();

        expect(session.engine.spawns).toHaveLength(2);
      });
    });

    it('crashes over budget back off', async () => {
      await withSession({ input: budget }, async (session) => {
        await session.wakeAndRun();
        await crashRepeatedly(session, 2);

        await session.wake();
        const backoff = await session.waitFor('backoff', (s) => s.state === 'backoff');

        expect(backoff.nextDeadline?.kind).toBe('restart-backoff');
        expect(session.engine.spawns).toHaveLength(2);
      });
    });

    it('backoff ends after the window', async () => {
      await withSession({ input: budget }, async (session) => {
        await session.wakeAndRun();
        await crashRepeatedly(session, 2);
        await session.wake();
        await session.waitFor('backoff', (s) => s.state === 'backoff');

        await advance(10 * MINUTE);
        await session.waitFor('running', (s) => s.state === 'running');

        expect(session.engine.spawns).toHaveLength(3);
      });
    });
  });

  describe('warm idle', () => {
    const plan = { idleTimeoutMs: 5 * MINUTE, warmIdlePauseMs: 10 * MINUTE };

    it('idle timeout pauses instead of stopping', async () => {
      await withSession({ plan }, async (session) => {
        await session.wakeAndRun();

        await advance(6 * MINUTE);
        await session.waitFor('paused', (s) => s.state === 'paused');

        expect(session.engine.pauses).toEqual(session.engine.spawns);
        expect(session.engine.stops).toEqual([]);
      });
    });

    it('wake unpauses paused container', async () => {
      await withSession({ plan }, async (session) => {
        await session.wakeAndRun();
        await advance(6 * MINUTE);
        await session.waitFor('paused', (s) => s.state === 'paused');

        await session.wake();
        await session.waitFor('running', (s) => s.state === 'running');

        expect(session.engine.unpauses).toEqual(session.engine.spawns);
        expect(session.engine.spawns).toHaveLength(1);
        expect(session.engine.stateOf(session.engine.spawns[0]!)).toBe('running');
      });
    });

    it('pause window expiry stops container', async () => {
      await withSession({ plan }, async (session) => {
        await session.wakeAndRun();
        await advance(6 * MINUTE);
        await session.waitFor('paused', (s) => s.state === 'paused');

        await advance(11 * MINUTE);
        await session.waitFor('idle', (s) => s.state === 'idle' && s.lastExit !== null);

        expect(session.engine.stops.map((stop) => stop.reason)).toEqual(['warm-idle-expired']);
        expect(session.engine.exits.map((exit) => exit.stopReason)).toEqual(['warm-idle-expired']);
      });
    });
  });

  it('continue-as-new keeps every activity signal', async () => {
    const plan = { idleTimeoutMs: 10 * MINUTE };
    await withSession({ plan, input: { maxHistoryEvents: 80 } }, async (session) => {
      let sent = 0;
      const burst = async (source: ActivitySource): Promise<void> => {
        const at = await env.currentTimeMs();
        for (let i = 0; i < 10; i += 1) await session.activity(source, at);
        sent += 10;
      };

      await session.wakeAndRun();
      await burst('delivery');
      await advance(11 * MINUTE);
      await session.waitForQuiet();
      // Rolls over while idle.
      sent += await signalUntilRollover(session, 'output');
      await session.waitForQuiet();
      await session.wakeAndRun();
      // Rolls over while the second container runs.
      sent += await signalUntilRollover(session, 'delivery');
      await session.waitForSupervision();
      await session.handle().signal(stopSignal, { reason: 'test' });
      await burst('delivery');
      await session.waitForQuiet();

      const settled = await session.status();
      expect(settled.state).toBe('idle');
      // Each of the two starts counts as activity too.
      expect(settled.activityCount).toBe(sent + 2);
      expect(session.engine.spawns).toHaveLength(2);
      expect(session.engine.exits.map((exit) => exit.stopReason)).toEqual(['idle', 'stop-request']);
    });
  });

  describe('continue-as-new while a container runs', () => {
    const input = { maxHistoryEvents: 80 };

    it('next run takes the running container over', async () => {
      const plan = { idleTimeoutMs: 10 * MINUTE };
      await withSession({ plan, input }, async (session) => {
        await session.wakeAndRun();
        const firstRunId = await session.currentRunId();
        const at = await env.currentTimeMs();
        const sent = 50;
        for (let i = 0; i < sent; i += 1) await session.activity('output', at);

        await waitForRunChange(session, firstRunId);
        await session.waitForSupervision();
        const handedOver = await session.status();
        expect(handedOver.state).toBe('running');
        expect(handedOver.containerName).toBe(session.engine.spawns[0]);
        // The start counts as activity too.
        expect(handedOver.activityCount).toBe(sent + 1);
        expect(handedOver.nextDeadline).toEqual({ kind: 'idle', at: at + 10 * MINUTE });
        expect(session.engine.spawns).toHaveLength(1);
        expect(session.engine.live()).toEqual(session.engine.spawns);

        await advance(11 * MINUTE);
        await session.waitFor('idle', (s) => s.state === 'idle' && s.lastExit !== null);
        expect(session.engine.stops).toEqual([
          { containerName: session.engine.spawns[0], reason: 'idle', closeRequest: true },
        ]);
        expect(session.engine.exits.map((exit) => exit.stopReason)).toEqual(['idle']);
      });
    });

    it('paused container stays paused and keeps its pause deadline', async () => {
      const plan = { idleTimeoutMs: 5 * MINUTE, warmIdlePauseMs: 10 * MINUTE };
      await withSession({ plan, input }, async (session) => {
        await session.wakeAndRun();
        await advance(6 * MINUTE);
        const paused = await session.waitFor('paused', (s) => s.state === 'paused');
        expect(paused.nextDeadline?.kind).toBe('pause');
        const pausedRunId = await session.currentRunId();

        // Observations with no heartbeat are no activity, so they fill the history and leave the pause alone.
        for (let i = 0; i < 30; i += 1) await session.observe({});
        await waitForRunChange(session, pausedRunId);
        await session.waitForSupervision();

        const handedOver = await session.status();
        expect(handedOver.state).toBe('paused');
        expect(handedOver.nextDeadline).toEqual(paused.nextDeadline);
        expect(session.engine.unpauses).toEqual([]);

        await advance(11 * MINUTE);
        await session.waitFor('idle', (s) => s.state === 'idle' && s.lastExit !== null);
        expect(session.engine.spawns).toHaveLength(1);
        expect(session.engine.stops.map((stop) => stop.reason)).toEqual(['warm-idle-expired']);
      });
    });

    it('wake carried with paused container unpauses it', async () => {
      const plan = { idleTimeoutMs: 5 * MINUTE, warmIdlePauseMs: 10 * MINUTE };
      await withSession({ plan }, async (session) => {
        const containerName = 'berth-group-one-carried-1';
        const container = await session.engine.spawn(containerName);
        session.engine.setState(containerName, 'paused');
        const now = await env.currentTimeMs();

        // The wake reached the previous run while it was handing the paused container over.
        await session.startCarrying({
          pendingWake: true,
          spawnCount: 1,
          wakeCount: 2,
          activityCount: 3,
          lastActivityAt: now,
          lastActivitySource: 'inbound',
          failedStarts: [],
          consecutiveStartFailures: 0,
          retryWakeAt: null,
          lastError: null,
          lastExit: null,
          running: {
            containerName,
            image: 'berth-agent:latest',
            startedAt: container.startedAt,
            plan: session.engine.plan,
            pausedSince: now,
            nextStuckCheck: now + 60 * MINUTE,
            lastHeartbeatSeen: null,
            observation: null,
            stopRequest: null,
          },
        });

        const running = await session.waitFor('running', (s) => s.state === 'running');
        expect(running.containerName).toBe(containerName);
        expect(running.pendingWake).toBe(false);
        expect(session.engine.unpauses).toEqual([containerName]);
        expect(session.engine.spawns).toEqual([containerName]);
      });
    });

    it('container that exits between two runs is recorded once', async () => {
      await withSession({ input }, async (session) => {
        await session.wakeAndRun();
        // The old run has ended its supervision by now; the new run's may not have started yet.
        await signalUntilRollover(session, 'output', 0);
        await session.engine.crash(session.engine.spawns[0]!, 1);
        await session.waitForQuiet();

        const settled = await session.status();
        expect(settled.state).toBe('idle');
        expect(settled.lastExit?.reason).toBe('crash');
        expect(session.engine.exits).toEqual([
          { containerName: session.engine.spawns[0], stopReason: 'crash', failedClaims: true, exitCode: 1 },
        ]);
        expect(session.engine.spawns).toHaveLength(1);
      });
    });
  });

  it('stop signal stops container and waits for wake', async () => {
    await withSession({}, async (session) => {
      await session.wakeAndRun();

      await session.handle().signal(stopSignal, { reason: 'operator' });
      await session.waitFor('idle', (s) => s.state === 'idle' && s.lastExit !== null);
      await advance(30 * MINUTE);

      expect(session.engine.stops).toEqual([
        { containerName: session.engine.spawns[0], reason: 'stop-request', closeRequest: true },
      ]);
      expect(session.engine.exits.map((exit) => exit.stopReason)).toEqual(['stop-request']);
      expect(session.engine.spawns).toHaveLength(1);
      const status = await session.status();
      expect(status.state).toBe('idle');
      expect(status.pendingWake).toBe(false);
      expect(await session.currentRunId()).toBe(session.firstRunId);
    });
  });

  describe('spawn failure', () => {
    const failure = (): Error =>
      ApplicationFailure.nonRetryable('image berth-missing:latest not found', 'ContainerRuntimeError');

    it('non-retryable spawn failure leaves session idle', async () => {
      await withSession({}, async (session) => {
        session.engine.failNextSpawn(failure());

        await session.wake();
        const failed = await session.waitFor(
          'idle with an error',
          (s) => s.state === 'idle' && s.lastError !== null,
        );

        expect(failed.lastError).toContain('image berth-missing:latest not found');
        expect(session.engine.spawns).toEqual([]);
      });
    });

    it('next wake after spawn failure tries again', async () => {
      await withSession({}, async (session) => {
        session.engine.failNextSpawn(failure());
        await session.wake();
        await session.waitFor('idle with an error', (s) => s.state === 'idle' && s.lastError !== null);

        const running = await session.wakeAndRun();

        expect(session.engine.spawns).toHaveLength(1);
        expect(running.lastError).toBeNull();
      });
    });
  });

  describe('message left unprocessed', () => {
    it('starts the next container after a crash', async () => {
      await withSession({}, async (session) => {
        await session.wakeAndRun();
        // The message's wake arrived while the container was dying, so it counted as activity only.
        session.engine.dueMessages = 1;
        await session.engine.crash(session.engine.spawns[0]!, 137);

        await session.waitFor('second container', (s) => s.spawnCount === 2);
        session.engine.dueMessages = 0;

        expect(session.engine.spawns).toHaveLength(2);
        expect(session.engine.exits.map((exit) => exit.stopReason)).toEqual(['crash']);
      });
    });

    it('waits for a wake after a stop request', async () => {
      await withSession({}, async (session) => {
        await session.wakeAndRun();
        session.engine.dueMessages = 1;

        await session.handle().signal(stopSignal, { reason: 'operator' });
        const stopped = await session.waitFor('idle', (s) => s.state === 'idle' && s.lastExit !== null);
        await advance(30 * MINUTE);

        expect(stopped.pendingWake).toBe(false);
        expect(session.engine.spawns).toHaveLength(1);
        expect((await session.status()).state).toBe('idle');
      });
    });
  });

  it('bad input uses no restart budget', async () => {
    const input = { restartBudget: { maxFailures: 2, windowMs: 10 * MINUTE } };
    await withSession({ input }, async (session) => {
      for (let attempt = 1; attempt <= 3; attempt += 1) {
        session.engine.failNextSpawn(
          ApplicationFailure.nonRetryable(
            `container.json is invalid (${attempt})`,
            'InvalidContainerConfigError',
          ),
        );
        await session.wake();
        await session.waitFor(
          `failed start ${attempt}`,
          (s) => s.lastError?.includes(`(${attempt})`) === true,
        );
      }

      const running = await session.wakeAndRun();

      expect(running.lastError).toBeNull();
      expect(session.engine.spawns).toHaveLength(1);
    });
  });

  describe('self-retry', () => {
    it('retryable start failure retries by itself', async () => {
      await withSession({}, async (session) => {
        // As many failures as the image activity's own attempts, so the workflow receives the failure.
        session.engine.failImageChecks(
          3,
          ApplicationFailure.retryable('Cannot connect to the Docker daemon', 'ContainerRuntimeError'),
        );

        await session.wake();
        const failed = await session.waitFor(
          'idle with a retry planned',
          (s) => s.nextDeadline?.kind === 'retry',
        );
        expect(failed.state).toBe('idle');
        expect(failed.lastError).toContain('Cannot connect to the Docker daemon');

        await advance(failed.nextDeadline!.at - (await env.currentTimeMs()) + 1_000);
        const running = await session.waitFor('running', (s) => s.state === 'running');
        expect(session.engine.spawns).toHaveLength(1);
        expect(running.lastError).toBeNull();
      });
    });

    it('wakes when a retried message is due', async () => {
      await withSession({ plan: { idleTimeoutMs: MINUTE } }, async (session) => {
        // Time may skip as soon as the container runs, so the retry time is set before the wake.
        session.engine.nextRetryAt = (await env.currentTimeMs()) + 2 * 60 * MINUTE;
        await session.wakeAndRun();
        await advance(2 * MINUTE);
        const idle = await session.waitFor('idle', (s) => s.state === 'idle' && s.lastExit !== null);
        expect(idle.nextDeadline?.kind).toBe('retry');
        session.engine.nextRetryAt = null;

        await advance(2 * 60 * MINUTE);
        // The idle timer may stop the second container again before a query observes it running.
        await session.waitFor('started again', (s) => s.spawnCount === 2);
        expect(session.engine.spawns).toHaveLength(2);
      });
    });
  });

  describe('last activity source', () => {
    const triggers: Record<
      Exclude<ActivitySource, 'start'>,
      (session: TestSession, at: number) => Promise<void>
    > = {
      inbound: (session) => session.wake(),
      delivery: (session, at) => session.activity('delivery', at),
      output: (session, at) => session.activity('output', at),
      heartbeat: (session, at) => session.observe({ observedAt: at, heartbeatMtime: at }),
    };

    it.each(Object.entries(triggers))('status shows %s activity', async (source, trigger) => {
      await withSession({}, async (session) => {
        const running = await session.wakeAndRun();
        expect(running.lastActivitySource).toBe('start');

        await advance(MINUTE);
        const at = await env.currentTimeMs();
        await trigger(session, at);
        const noted = await session.waitFor(`${source} noted`, (s) => s.lastActivitySource === source);

        // A wake carries no time, so the workflow stamps it with its own clock, at or after `at`.
        expect(noted.lastActivityAt).toBeGreaterThanOrEqual(at);
        expect(noted.lastActivityAt).toBeLessThan(at + MINUTE);
        if (source !== 'inbound') expect(noted.lastActivityAt).toBe(at);
      });
    });
  });
});
