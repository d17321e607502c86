import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { ApplicationFailure, type Logger } from '@temporalio/common';
import { MockActivityEnvironment } from '@temporalio/testing';
import { createActivities } from '../../src/activities/index.js';
import type { ActivityDeps, SessionSignals } from '../../src/activities/deps.js';
import { GROUP_IMAGE_LABEL } from '../../src/activities/images.js';
import { LABELS } from '../../src/activities/spawn.js';
import type {
  SessionObservation,
  SpawnRequest,
  SpawnResult,
  SuperviseRequest,
} from '../../src/activities/types.js';
import { HostDb, type AgentGroup, type SessionRecord } from '../../src/db/host-db.js';
import { CallbackSink, Deliverer, type DeliveredMessage } from '../../src/delivery/deliverer.js';
import { DockerCli, type RunSpec } from '../../src/docker/runtime.js';
import { createOneCli, type OneCli } from '../../src/onecli/onecli.js';
import { groupPaths, sessionDir, type GroupPaths, oneCliFilesDir } from '../../src/paths.js';
import { createDefaultRegistry, type ProviderRegistry } from '../../src/providers/registry.js';
import { loadSettings, type Settings } from '../../src/settings.js';
import { containerNameFor, type ActivityNotice } from '../../src/workflows/session.js';

/**
 * Real dependencies for calling berth's activities directly: a temp data
 * dir, a HostDb, the Docker CLI, OneCLI, the default provider registry, and
 * recording fakes for workflow signals and delivery. Every container it
 * starts carries `berth.install=<settings.installId>`; `cleanup()` removes
 * them, the images it tracked, and the data dir.
 */

/**
 * A DockerCli that records the tag of every `docker build` and, for every
 * `docker run`, the mount sources that did not exist when it was called.
 */
export class CountingDockerCli extends DockerCli {
  readonly builds: string[] = [];
  readonly runs: Array<{ spec: RunSpec; missingSources: string[] }> = [];

  override async run(spec: RunSpec): Promise<string> {
    const missingSources = spec.mounts
      .map((mount) => mount.source)
      .filter((source) => !fs.existsSync(source));
    this.runs.push({ spec, missingSources });
    return super.run(spec);
  }

  override async build(
    options: Parameters<DockerCli['build']>[0],
    onOutput: (chunk: string) => void,
  ): Promise<void> {
    this.builds.push(options.tag);
    return super.build(options, onOutput);
  }
}

export interface HarnessOptions {
  /** Extra settings variables (ONECLI_URL, BERTH_DEFAULT_IMAGE and the like). */
  env?: Record<string, string>;
  /** Content of the mount allowlist file, or a function of the data dir that returns it; omitted writes no file. */
  allowlist?: object | ((dataDir: string) => object);
  /** Replaces the OneCLI client built from the settings. */
  oneCli?: OneCli;
  /** Replaces the default provider registry. */
  providers?: ProviderRegistry;
  /** Replaces the Docker CLI built from the settings, for example with one that scripts a container. */
  docker?: CountingDockerCli;
  /**
   * Destination of the log entries of activities run through the harness:
   * `print` (Temporal's DefaultLogger, the default), `record` (kept in `logs`) or `discard`.
   */
  activityLogs?: 'print' | 'record' | 'discard';
}

/** One entry that an activity logged through its context logger. */
export interface LogEntry {
  level: string;
  message: string;
  meta?: Record<string, unknown>;
}

export interface SessionFixture {
  group: AgentGroup;
  session: SessionRecord;
  paths: GroupPaths;
  sessionDir: string;
}

export interface SessionOptions {
  name?: string;
  groupProvider?: string | null;
  sessionProvider?: string | null;
  channel?: { channelType: string; platformId: string };
  threadId?: string;
}

export interface SignalCall {
  kind: 'activity' | 'observation';
  sessionId: string;
  payload: unknown;
}

/** The parts of `docker container inspect` that the contract tests read. */
export interface InspectedContainer {
  Id: string;
  Name: string;
  Config: { Image: string; Env: string[]; Labels: Record<string, string>; User: string };
  HostConfig: {
    Mounts: Array<{ Type: string; Source: string; Target: string; ReadOnly?: boolean }> | null;
    Binds: string[] | null;
    ExtraHosts: string[] | null;
  };
  Mounts: Array<{ Type: string; Source: string; Destination: string; RW: boolean }>;
  State: { Status: string; Running: boolean };
}

export interface ActivityHarness {
  dataDir: string;
  settings: Settings;
  hostDb: HostDb;
  docker: CountingDockerCli;
  deps: ActivityDeps;
  activities: ReturnType<typeof createActivities>;
  signalCalls: SignalCall[];
  /** Payloads of the activity signals in `signalCalls`, in order. */
  activityNotices: ActivityNotice[];
  /** Payloads of the observation signals in `signalCalls`, in order. */
  observations: SessionObservation[];
  delivered: DeliveredMessage[];
  /** Activity log entries, filled only with `activityLogs: 'record'`. */
  logs: LogEntry[];
  /** Runs an activity inside a mock activity context, as a worker would. */
  run<A extends unknown[], R>(activity: (...args: A) => Promise<R>, ...args: A): Promise<R>;
  /** Creates a mock activity environment with the harness's logger, for tests that heartbeat or cancel. */
  environment(info?: ActivityInfoOverrides): MockActivityEnvironment;
  createSession(folder: string, options?: SessionOptions): SessionFixture;
  writeContainerJson(folder: string, config: unknown): string;
  /** A spawn request with the name the session workflow would give its first container. */
  spawnRequest(fixture: SessionFixture, overrides?: Partial<SpawnRequest>): SpawnRequest;
  /** Runs initFilesystem and spawnContainer, the last two steps of a wake. */
  spawn(fixture: SessionFixture, overrides?: Partial<SpawnRequest>): Promise<SpawnResult>;
  /** Runs the wake's steps in the workflow's order: routing, plan, image, files, spawn. */
  wake(fixture: SessionFixture, overrides?: Partial<SpawnRequest>): Promise<SpawnResult>;
  inspect(name: string): Promise<InspectedContainer>;
  /** Names of this install's containers, running or not. */
  containers(): Promise<string[]>;
  /** Removes the image at cleanup. */
  trackImage(tag: string): void;
  cleanup(): Promise<void>;
}

type ActivityInfoOverrides = ConstructorParameters<typeof MockActivityEnvironment>[0];

export async function createActivityHarness(options: HarnessOptions = {}): Promise<ActivityHarness> {
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'berth-activities-'));
  const allowlistPath = path.join(dataDir, 'config', 'mount-allowlist.json');
  if (options.allowlist !== undefined) {
    const allowlist =
      typeof options.allowlist === 'function' ? options.allowlist(dataDir) : options.allowlist;
    fs.mkdirSync(path.dirname(allowlistPath), { recursive: true });
    fs.writeFileSync(allowlistPath, JSON.stringify(allowlist, null, 2));
  }

  const settings = loadSettings({
    ...process.env,
    ONECLI_URL: undefined,
    BERTH_DATA_DIR: dataDir,
    BERTH_MOUNT_ALLOWLIST: allowlistPath,
    ...options.env,
  });
  const hostDb = new HostDb(settings.hostDbPath);
  const docker = options.docker ?? new CountingDockerCli(settings.dockerBinary);
  const signalCalls: SignalCall[] = [];
  const activityNotices: ActivityNotice[] = [];
  const observations: SessionObservation[] = [];
  const delivered: DeliveredMessage[] = [];
  const logs: LogEntry[] = [];
  const signals: SessionSignals = {
    async activity(sessionId, notice) {
      signalCalls.push({ kind: 'activity', sessionId, payload: notice });
      activityNotices.push(notice);
    },
    async observation(sessionId, observation) {
      signalCalls.push({ kind: 'observation', sessionId, payload: observation });
      observations.push(observation);
    },
  };
  const logger = activityLogger(options.activityLogs ?? 'print', logs);
  const trackedImages = new Set<string>();
  const groupIds = new Set<string>();

  const deps: ActivityDeps = {
    settings,
    hostDb,
    docker,
    oneCli:
      options.oneCli ?? createOneCli(settings.onecli, { baseDelayMs: 1, filesDir: oneCliFilesDir(settings) }),
    providers: options.providers ?? createDefaultRegistry(),
    signals,
    deliverer: new Deliverer(new CallbackSink((message) => void delivered.push(message))),
    // Builds in this process, as the image build workflow's activity would.
    buildGroupImage: (request) => run(activities.buildGroupImage, request),
    pollIntervalMs: 200,
  };
  const activities = createActivities(deps);

  function environment(info?: ActivityInfoOverrides): MockActivityEnvironment {
    return new MockActivityEnvironment(info, { logger });
  }

  function run<A extends unknown[], R>(activity: (...args: A) => Promise<R>, ...args: A): Promise<R> {
    return environment().run(activity, ...args);
  }

  function createSession(folder: string, sessionOptions: SessionOptions = {}): SessionFixture {
    const group = hostDb.ensureAgentGroup(folder, {
      name: sessionOptions.name,
      provider: sessionOptions.groupProvider ?? null,
    });
    groupIds.add(group.id);
    const messaging = sessionOptions.channel
      ? hostDb.ensureMessagingGroup(sessionOptions.channel.channelType, sessionOptions.channel.platformId)
      : null;
    let session = hostDb.ensureSession(group.id, messaging?.id ?? null, sessionOptions.threadId ?? '');
    if (sessionOptions.sessionProvider !== undefined) {
      hostDb.setSessionProvider(session.id, sessionOptions.sessionProvider);
      session = hostDb.getSession(session.id);
    }
    return {
      group,
      session,
      paths: groupPaths(settings, folder),
      sessionDir: sessionDir(settings, folder, session.id),
    };
  }

  function writeContainerJson(folder: string, config: unknown): string {
    const file = groupPaths(settings, folder).containerJson;
    fs.mkdirSync(path.dirname(file), { recursive: true });
    fs.writeFileSync(file, typeof config === 'string' ? config : JSON.stringify(config, null, 2));
    return file;
  }

  function spawnRequest(fixture: SessionFixture, overrides: Partial<SpawnRequest> = {}): SpawnRequest {
    return {
      sessionId: fixture.session.id,
      containerName: containerNameFor(fixture.group.folder, fixture.session.id, 1),
      image: settings.defaultImage,
      provider: settings.defaultProvider,
      adminUserIds: [],
      workflowRunId: `run-${fixture.session.id}`,
      ...overrides,
    };
  }

  async function spawn(fixture: SessionFixture, overrides: Partial<SpawnRequest> = {}): Promise<SpawnResult> {
    await run(activities.initFilesystem, { sessionId: fixture.session.id });
    return run(activities.spawnContainer, spawnRequest(fixture, overrides));
  }

  async function wake(fixture: SessionFixture, overrides: Partial<SpawnRequest> = {}): Promise<SpawnResult> {
    const sessionRef = { sessionId: fixture.session.id };
    const routing = await run(activities.syncSessionRouting, sessionRef);
    const plan = await run(activities.loadSessionPlan, sessionRef);
    await run(activities.ensureAgent, sessionRef);
    const { image } = await run(activities.ensureImage, sessionRef);
    return spawn(fixture, {
      image,
      provider: plan.provider,
      adminUserIds: routing.adminUserIds,
      ...overrides,
    });
  }

  async function inspect(name: string): Promise<InspectedContainer> {
    const result = await docker.exec(['container', 'inspect', name]);
    if (result.exitCode !== 0) throw new Error(`docker inspect ${name} failed: ${result.stderr.trim()}`);
    const [container] = JSON.parse(result.stdout) as InspectedContainer[];
    if (!container) throw new Error(`docker inspect ${name} returned nothing`);
    return container;
  }

  async function containers(): Promise<string[]> {
    return (await docker.list({ [LABELS.install]: settings.installId })).map((info) => info.name);
  }

  async function cleanup(): Promise<void> {
    await removeInstallContainers(docker, settings.installId);
    for (const groupId of groupIds) {
      const listed = await docker.exec([
        'image',
        'ls',
        '--quiet',
        '--filter',
        `label=${GROUP_IMAGE_LABEL}=${groupId}`,
      ]);
      for (const id of new Set(listed.stdout.split('\n').filter(Boolean))) await removeImage(docker, id);
    }
    for (const tag of trackedImages) await removeImage(docker, tag);
    hostDb.close();
    fs.rmSync(dataDir, { recursive: true, force: true });
  }

  return {
    dataDir,
    settings,
    hostDb,
    docker,
    deps,
    activities,
    signalCalls,
    activityNotices,
    observations,
    delivered,
    logs,
    run,
    environment,
    createSession,
    writeContainerJson,
    spawnRequest,
    spawn,
    wake,
    inspect,
    containers,
    trackImage: (tag) => void trackedImages.add(tag),
    cleanup,
  };
}

/** Returns the logger for `activityLogs`, or undefined so that MockActivityEnvironment uses Temporal's DefaultLogger. */
function activityLogger(mode: 'print' | 'record' | 'discard', logs: LogEntry[]): Logger | undefined {
  if (mode === 'print') return undefined;
  const write =
    mode === 'record'
      ? (level: string, message: string, meta?: Record<string, unknown>) =>
          void logs.push({ level, message, meta })
      : () => undefined;
  return {
    log: write,
    trace: (message, meta) => write('TRACE', message, meta),
    debug: (message, meta) => write('DEBUG', message, meta),
    info: (message, meta) => write('INFO', message, meta),
    warn: (message, meta) => write('WARN', message, meta),
    error: (message, meta) => write('ERROR', message, meta),
  };
}

/** Supervision request for a container started by `SessionHarness.startAgent`, plus the container's image. */
export interface StartedAgent extends SuperviseRequest {
  image: string;
}

/** An activity harness with one agent group and one session in it, as single-container tests need. */
export interface SessionHarness extends ActivityHarness {
  fixture: SessionFixture;
  folder: string;
  sessionId: string;
  sessionDir: string;
  /** Spawns `image` for the session under a new container name, after initFilesystem, as a wake does. */
  startAgent(image: string): Promise<StartedAgent>;
}

/**
 * Creates an activity harness and one session in the group folder
 * `<label>-<random>`. Its containers are named `berth-test-<label>-<random>`
 * and run the `claude` provider. OneCLI is not required unless `options.env`
 * sets BERTH_ONECLI_REQUIRED.
 */
export async function createSessionHarness(
  label: string,
  options: HarnessOptions = {},
): Promise<SessionHarness> {
  const harness = await createActivityHarness({
    ...options,
    env: { BERTH_ONECLI_REQUIRED: 'false', ...options.env },
  });
  const folder = `${label}-${randomUUID().slice(0, 8)}`;
  const fixture = harness.createSession(folder);
  const sessionId = fixture.session.id;

  async function startAgent(image: string): Promise<StartedAgent> {
    const containerName = `berth-test-${label}-${randomUUID().slice(0, 12)}`;
    const { startedAt } = await harness.spawn(fixture, {
      containerName,
      image,
      provider: 'claude',
      workflowRunId: 'test-run',
    });
    return { sessionId, containerName, image, startedAt };
  }

  return { ...harness, fixture, folder, sessionId, sessionDir: fixture.sessionDir, startAgent };
}

/** Removes every container labelled with the install id, running or not. */
export async function removeInstallContainers(docker: DockerCli, installId: string): Promise<void> {
  for (const container of await docker.list({ [LABELS.install]: installId })) {
    await docker.remove(container.name);
  }
}

/** Builds `FROM <base>` plus the given ENV lines, with no build context. */
export async function buildDerivedImage(
  docker: DockerCli,
  tag: string,
  env: Record<string, string>,
  base = 'berth-agent:latest',
): Promise<void> {
  const lines = [
    `FROM ${base}`,
    ...Object.entries(env).map(([key, value]) => `ENV ${key}=${JSON.stringify(value)}`),
  ];
  const result = await docker.exec(['build', '--tag', tag, '-'], { input: `${lines.join('\n')}\n` });
  if (result.exitCode !== 0) throw new Error(`docker build of ${tag} failed: ${result.stderr.trim()}`);
}

/** Removes an image by tag or id; a missing image counts as removed. */
export async function removeImage(docker: DockerCli, image: string): Promise<void> {
  const result = await docker.exec(['image', 'rm', '--force', image]);
  if (result.exitCode !== 0 && !/no such image/i.test(result.stderr)) {
    throw new Error(`docker image rm ${image} failed: ${result.stderr.trim()}`);
  }
}

export interface PollOptions {
  /** Maximum wait before the error, in ms (default 60 000). */
  timeoutMs?: number;
  /** Pause between two probes, in ms (default 200). */
  intervalMs?: number;
}

/** Polls `probe` until it returns a value other than undefined, and throws an error naming `description` after the timeout. */
export async function waitFor<T>(
  description: string,
  probe: () => T | undefined | Promise<T | undefined>,
  { timeoutMs = 60_000, intervalMs = 200 }: PollOptions = {},
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`Timed out after ${timeoutMs} ms waiting for ${description}`);
    await sleep(intervalMs);
  }
}

/** Polls `condition` until it returns true, and throws an error naming `description` after the timeout. */
export async function waitUntil(
  description: string,
  condition: () => boolean | Promise<boolean>,
  options: PollOptions = {},
): Promise<void> {
  await waitFor(description, async () => ((await condition()) ? true : undefined), options);
}

/** Returns the container's env as a map. */
export function envOf(container: InspectedContainer): Record<string, string> {
  const env: Record<string, string> = {};
  for (const entry of container.Config.Env) {
    const separator = entry.indexOf('=');
    env[entry.slice(0, separator)] = entry.slice(separator + 1);
  }
  return env;
}

/** Returns the container's mounts keyed by their target path. */
export function mountsOf(
  container: InspectedContainer,
): Map<string, { type: string; source: string; readonly: boolean }> {
  return new Map(
    container.Mounts.map((mount) => [
      mount.Destination,
      { type: mount.Type, source: mount.Source, readonly: !mount.RW },
    ]),
  );
}

/** Awaits an activity call that must fail and returns its ApplicationFailure; throws when it succeeds or fails otherwise. */
export async function activityFailure(call: Promise<unknown>): Promise<ApplicationFailure> {
  try {
    await call;
  } catch (error) {
    if (error instanceof ApplicationFailure) return error;
    throw new Error(`Expected an ApplicationFailure, got: ${String(error)}`, { cause: error });
  }
  throw new Error('Expected the activity to fail, but it succeeded');
}
