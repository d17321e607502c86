import { Context } from '@temporalio/activity';
import type { createActivities } from '../../src/activities/index.js';
import type { ContainerExit, SessionPlan, StopReason } from '../../src/activities/types.js';

type Activities = ReturnType<typeof createActivities>;

/** The activities the session workflow calls, with their real signatures. */
export type SessionActivities = Pick<
  Activities,
  | 'syncSessionRouting'
  | 'loadSessionPlan'
  | 'ensureAgent'
  | 'ensureImage'
  | 'initFilesystem'
  | 'spawnContainer'
  | 'superviseContainer'
  | 'stopContainer'
  | 'pauseContainer'
  | 'unpauseContainer'
  | 'recordExit'
>;

/**
 * The test server's time-skipping lock counter. Time skips only while the
 * counter is zero, and every activity that the server has scheduled holds one
 * lock until it completes.
 */
export interface TimeSkippingLock {
  lock(): Promise<void>;
  unlock(): Promise<void>;
}

export interface FakeEngineOptions {
  /** The server's clock, which time skipping moves ahead of `Date.now()`. */
  now: () => Promise<number>;
  /** When given, supervision releases its own lock so that time can skip while a container runs. */
  timeSkipping?: TimeSkippingLock;
  plan?: Partial<SessionPlan>;
}

export interface StopRecord {
  containerName: string;
  reason: string;
  closeRequest: boolean;
}

export interface ExitRecord {
  containerName: string;
  stopReason: StopReason;
  failedClaims: boolean;
  exitCode: number | null;
}

type ContainerState = 'running' | 'paused' | 'exited';

interface FakeContainer {
  name: string;
  startedAt: number;
  state: ContainerState;
  /** True while its supervision has given the time-skipping lock up. */
  lockReleased: boolean;
  exit: Promise<ContainerExit>;
  finish(exit: ContainerExit): void;
}

/** Real supervision polls every second; the fake heartbeats on a shorter real-time cadence. */
const HEARTBEAT_EVERY_MS = 100;

/** Returns a plan with long timers, so a test only meets the timers it shortens. */
export function defaultPlan(sessionId: string): SessionPlan {
  return {
    sessionId,
    agentGroupId: 'group-1',
    agentGroupName: 'Group One',
    folder: 'group-one',
    provider: 'claude',
    idleTimeoutMs: 10 * 60_000,
    maxLifetimeMs: 24 * 60 * 60_000,
    stopGraceMs: 5_000,
    warmIdlePauseMs: null,
    stuck: {
      heartbeatCeilingMs: 24 * 60 * 60_000,
      claimToleranceMs: 24 * 60 * 60_000,
      spawnGraceMs: 60_000,
      checkIntervalMs: 60 * 60_000,
    },
    messageRetry: { maxAttempts: 3, backoffMs: 5_000 },
    restartBudget: { maxFailures: 5, windowMs: 10 * 60_000 },
    warnings: [],
  };
}

/**
 * An in-memory stand-in for Docker and the session files: it records every
 * spawn, stop, pause and exit, and lets a test crash a container, fail a
 * spawn or hold stops until it releases them.
 */
export class FakeEngine {
  readonly spawns: string[] = [];
  readonly stops: StopRecord[] = [];
  readonly exits: ExitRecord[] = [];
  readonly pauses: string[] = [];
  readonly unpauses: string[] = [];
  plan: SessionPlan;

  private readonly containers = new Map<string, FakeContainer>();
  private readonly heldStops: Array<() => void> = [];
  private stopGate: Promise<void> | null = null;
  private spawnFailure: Error | null = null;
  imageFailure: Error | null = null;
  imageFailuresLeft = 0;
  /** How many supervisions are waiting on a container right now. */
  supervising = 0;
  /** What recordExit reports as the earliest message retry time. */
  nextRetryAt: number | null = null;
  /** What recordExit reports as the count of pending messages due now. */
  dueMessages = 0;

  constructor(
    sessionId: string,
    private readonly options: FakeEngineOptions,
  ) {
    this.plan = { ...defaultPlan(sessionId), ...options.plan };
  }

  now(): Promise<number> {
    return this.options.now();
  }

  /** Names of the containers that run or are paused. */
  live(): string[] {
    return [...this.containers.values()].filter((c) => c.state !== 'exited').map((c) => c.name);
  }

  stateOf(name: string): ContainerState | undefined {
    return this.containers.get(name)?.state;
  }

  /** Makes the container exit by itself with `exitCode`, as a crash does. */
  async crash(name: string, exitCode: number): Promise<void> {
    await this.end(this.mustGet(name), exitCode);
  }

  /** Makes the next spawn throw `error` instead of starting a container. */
  failNextSpawn(error: Error): void {
    this.spawnFailure = error;
  }

  /** Makes the next `count` image checks throw `error`; three outlast the activity's own retries. */
  failImageChecks(count: number, error: Error): void {
    this.imageFailure = error;
    this.imageFailuresLeft = count;
  }

  /** Makes every stop wait until the returned function is called. */
  holdStops(): () => void {
    let release!: () => void;
    this.stopGate = new Promise<void>((resolve) => {
      release = resolve;
    });
    const releaseOnce = (): void => {
      this.stopGate = null;
      release();
    };
    this.heldStops.push(releaseOnce);
    return releaseOnce;
  }

  /** Releases every held stop, for cleanup after a test that failed midway. */
  releaseStops(): void {
    for (const release of this.heldStops.splice(0)) release();
  }

  async spawn(name: string): Promise<FakeContainer> {
    const existing = this.containers.get(name);
    if (existing && existing.state !== 'exited') return existing;

    if (this.spawnFailure) {
      const error = this.spawnFailure;
      this.spawnFailure = null;
      throw error;
    }
    let finish!: (exit: ContainerExit) => void;
    const exit = new Promise<ContainerExit>((resolve) => {
      finish = resolve;
    });
    const container: FakeContainer = {
      name,
      startedAt: await this.now(),
      state: 'running',
      lockReleased: false,
      exit,
      finish: (result) => {
        container.state = 'exited';
        finish(result);
      },
    };
    this.containers.set(name, container);
    this.spawns.push(name);
    return container;
  }

  async stop(record: StopRecord): Promise<void> {
    this.stops.push(record);
    if (this.stopGate) await this.stopGate;
    const container = this.containers.get(record.containerName);
    if (!container || container.state === 'exited') return;
    await this.end(container, 0);
  }

  setState(name: string, state: 'running' | 'paused'): void {
    this.mustGet(name).state = state;
  }

  /**
   * Waits for the container's exit while heartbeating. The server holds a
   * time-skipping lock for every scheduled activity, so this one gives its
   * lock up while it waits, and the call that ends the container takes it back
   * first. The lock counter thus never drops below what the rest holds.
   */
  async supervise(name: string): Promise<ContainerExit> {
    const container = this.containers.get(name);
    if (!container)
      return { exitCode: null, oomKilled: false, finishedAt: await this.now(), inspected: false };

    const context = Context.current();
    const lock = this.options.timeSkipping;
    if (lock && container.state !== 'exited') {
      container.lockReleased = true;
      await lock.unlock();
    }
    this.supervising += 1;
    try {
      while (container.state !== 'exited') {
        context.heartbeat();
        // Throws once the activity is cancelled: at a handover, or when the worker shuts down.
        await context.sleep(HEARTBEAT_EVERY_MS);
      }
    } finally {
      this.supervising -= 1;
      await this.retakeLock(container);
    }
    return container.exit;
  }

  private async end(container: FakeContainer, exitCode: number): Promise<void> {
    await this.retakeLock(container);
    container.finish({ exitCode, oomKilled: false, finishedAt: await this.now(), inspected: true });
  }

  private async retakeLock(container: FakeContainer): Promise<void> {
    if (!container.lockReleased) return;
    container.lockReleased = false;
    await this.options.timeSkipping?.lock();
  }

  private mustGet(name: string): FakeContainer {
    const container = this.containers.get(name);
    if (!container)
      throw new Error(`No fake container named ${name}; started: ${this.spawns.join(', ') || 'none'}`);
    return container;
  }
}

/** Builds the session workflow's activities around `engine`. */
export function createFakeActivities(engine: FakeEngine): SessionActivities {
  return {
    async syncSessionRouting() {
      return { adminUserIds: [] };
    },
    async loadSessionPlan() {
      return engine.plan;
    },
    async ensureAgent() {
      return { ensured: false };
    },
    async ensureImage() {
      if (engine.imageFailuresLeft > 0) {
        engine.imageFailuresLeft -= 1;
        throw engine.imageFailure;
      }
      return { image: 'berth-agent:latest', warning: null };
    },
    async initFilesystem() {},
    async spawnContainer(request) {
      const container = await engine.spawn(request.containerName);
      return {
        containerName: container.name,
        containerId: `id-${container.name}`,
        startedAt: container.startedAt,
        adopted: false,
      };
    },
    async superviseContainer(request) {
      return engine.supervise(request.containerName);
    },
    async stopContainer(request) {
      await engine.stop({
        containerName: request.containerName,
        reason: request.reason,
        closeRequest: request.closeRequest,
      });
      return { steps: [{ step: 'fake-stop', atMs: await engine.now(), outcome: 'exited' }] };
    },
    async pauseContainer({ containerName }) {
      engine.pauses.push(containerName);
      engine.setState(containerName, 'paused');
    },
    async unpauseContainer({ containerName }) {
      engine.unpauses.push(containerName);
      engine.setState(containerName, 'running');
    },
    async recordExit(request) {
      engine.exits.push({
        containerName: request.containerName,
        stopReason: request.stopReason,
        failedClaims: request.failedClaims,
        exitCode: request.exit.exitCode,
      });
      return {
        exitKind: request.exit.exitCode === 0 ? 'clean' : 'error',
        logPath: `/fake/logs/${request.containerName}.log`,
        retriedMessages: [],
        failedMessages: [],
        nextRetryAt: engine.nextRetryAt,
        dueMessages: engine.dueMessages,
      };
    },
  };
}
