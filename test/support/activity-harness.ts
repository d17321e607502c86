import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { ApplicationFailure } from '@temporalio/common';
import { MockActivityEnvironment } from '@temporalio/testing';
import { createActivities } from '../../src/activities/index.js';
import type { ActivityDeps, SessionSignals } from '../../src/activities/deps.js';
import { GROUP_IMAGE_LABEL } from '../../src/activities/images.js';
import { LABELS } from '../../src/activities/spawn.js';
import type { SpawnRequest, SpawnResult } from '../../src/activities/types.js';
import { HostDb, type AgentGroup, type SessionRecord } from '../../src/db/host-db.js';
import { CallbackSink, Deliverer, type DeliveredMessage } from '../../src/delivery/deliverer.js';
import { DockerCli, type RunSpec } from '../../src/docker/runtime.js';
import { createOneCli, type OneCli } from '../../src/onecli/onecli.js';
import { groupPaths, sessionDir, type GroupPaths } from '../../src/paths.js';
import { createDefaultRegistry, type ProviderRegistry } from '../../src/providers/registry.js';
import { loadSettings, type Settings } from '../../src/settings.js';
import { containerNameFor } from '../../src/workflows/session.js';

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
  delivered: DeliveredMessage[];
  /** Runs an activity inside a mock activity context, as a worker would. */
  run<A extends unknown[], R>(activity: (...args: A) => Promise<R>, ...args: A): Promise<R>;
  createSession(folder: string, options?: SessionOptions): SessionFixture;
  writeContainerJson(folder: string, config: unknown): string;
  /** A spawn request with the name the session workflow would give its first container. */
  spawnRequest(fixture: SessionFixture, overrides?: Partial<SpawnRequest>): SpawnRequest;
  /** Runs the wake's steps in the workflow's order: routing, plan, image, files, spawn. */
  wake(fixture: SessionFixture, overrides?: Partial<SpawnRequest>): Promise<SpawnResult>;
  inspect(name: string): Promise<InspectedContainer>;
  /** Names of this install's containers, running or not. */
  containers(): Promise<string[]>;
  /** Removes the image at cleanup. */
  trackImage(tag: string): void;
  cleanup(): Promise<void>;
}

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
  const docker = new CountingDockerCli(settings.dockerBinary);
  const signalCalls: SignalCall[] = [];
  const delivered: DeliveredMessage[] = [];
  const signals: SessionSignals = {
    async activity(sessionId, notice) {
      signalCalls.push({ kind: 'activity', sessionId, payload: notice });
    },
    async observation(sessionId, observation) {
      signalCalls.push({ kind: 'observation', sessionId, payload: observation });
    },
  };
  const trackedImages = new Set<string>();
  const groupIds = new Set<string>();

  const deps: ActivityDeps = {
    settings,
    hostDb,
    docker,
    oneCli: options.oneCli ?? createOneCli(settings.onecli, { baseDelayMs: 1 }),
    providers: options.providers ?? createDefaultRegistry(),
    signals,
    deliverer: new Deliverer(new CallbackSink((message) => void delivered.push(message))),
    // Builds in this process, as the image build workflow's activity would.
    buildGroupImage: (request) => run(activities.buildGroupImage, request),
    pollIntervalMs: 200,
  };
  const activities = createActivities(deps);

  function run<A extends unknown[], R>(activity: (...args: A) => Promise<R>, ...args: A): Promise<R> {
    return new MockActivityEnvironment().run(activity, ...args);
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

  async function wake(fixture: SessionFixture, overrides: Partial<SpawnRequest> = {}): Promise<SpawnResult> {
    const sessionRef = { sessionId: fixture.session.id };
    const routing = await run(activities.syncSessionRouting, sessionRef);
    const plan = await run(activities.loadSessionPlan, sessionRef);
    await run(activities.ensureAgent, sessionRef);
    const { image } = await run(activities.ensureImage, sessionRef);
    await run(activities.initFilesystem, sessionRef);
    const request = spawnRequest(fixture, {
      image,
      provider: plan.provider,
      adminUserIds: routing.adminUserIds,
      ...overrides,
    });
    return run(activities.spawnContainer, request);
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
    for (const name of await containers()) await docker.remove(name);
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
    delivered,
    run,
    createSession,
    writeContainerJson,
    spawnRequest,
    wake,
    inspect,
    containers,
    trackImage: (tag) => void trackedImages.add(tag),
    cleanup,
  };
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

/** Polls `probe` until it returns a value other than undefined; throws naming `description` after `timeoutMs`. */
export async function waitFor<T>(
  description: string,
  probe: () => T | undefined | Promise<T | undefined>,
  timeoutMs = 60_000,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`Timed out after ${timeoutMs} ms waiting for ${description}`);
    await sleep(200);
  }
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
