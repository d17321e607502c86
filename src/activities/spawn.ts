import fs from 'node:fs';
import path from 'node:path';
import { log } from '@temporalio/activity';
import { validateMount, validateMounts, loadMountAllowlist } from '../config/mount-allowlist.js';
import type { BindMount, RunSpec } from '../docker/runtime.js';
import { MountRejectedError } from '../errors.js';
import { logger } from '../logger.js';
import { globalDir, oneCliFilesDir } from '../paths.js';
import { clearCloseRequest, clearProcessingClaims, readProcessingClaims } from '../session/session-files.js';
import type { ActivityDeps } from './deps.js';
import { asActivity } from './failures.js';
import { CONTAINER_GID, CONTAINER_UID } from './prepare.js';
import { loadSessionContext, type SessionContext } from './session-context.js';
import type { SpawnRequest, SpawnResult } from './types.js';

/** Labels on every berth container; `berth.install` finds this install's orphans. */
export const LABELS = {
  install: 'berth.install',
  session: 'berth.session',
  group: 'berth.group',
  workflowRun: 'berth.workflow-run',
} as const;

export function createSpawnActivities(deps: ActivityDeps) {
  const { docker } = deps;

  return {
    /**
     * Starts the session's container. Idempotent: when a container with this
     * name exists (a previous attempt started it), it is adopted instead of
     * starting a second one. Every mount is validated again right before
     * `docker run`.
     */
    async spawnContainer(request: SpawnRequest): Promise<SpawnResult> {
      return asActivity(async () => {
        const existing = await docker.inspect(request.containerName);
        if (existing) {
          log.info('adopting container from an earlier spawn attempt', {
            sessionId: request.sessionId,
            container: request.containerName,
          });
          return {
            containerName: request.containerName,
            containerId: existing.id,
            startedAt: existing.startedAt ? Date.parse(existing.startedAt) : Date.now(),
            adopted: true,
          };
        }

        const context = loadSessionContext(deps, request.sessionId);
        const spec = buildRunSpec(deps, context, request);
        const identity = { agentGroupId: context.group.id, agentGroupName: context.group.name };
        const credentials = await deps.oneCli.applyContainerConfig(identity, spec.extraArgs ?? []);
        spec.extraArgs = credentials.args;

        // Claims still open now were left by a previous container: no container runs, so the host may clear them.
        const stale = readProcessingClaims(context.sessionDir).map((claim) => claim.messageId);
        if (stale.length > 0) {
          clearProcessingClaims(context.sessionDir, stale);
          log.info('cleared claims left by a previous container', {
            sessionId: request.sessionId,
            count: stale.length,
          });
        }
        clearCloseRequest(context.sessionDir);
        prepareSessionMounts(context.sessionDir, spec.mounts);

        const containerId = await docker.run(spec);
        deps.hostDb.updateSessionContainerStatus(request.sessionId, 'running', new Date().toISOString());
        const info = await docker.inspect(request.containerName);
        return {
          containerName: request.containerName,
          containerId,
          startedAt: info?.startedAt ? Date.parse(info.startedAt) : Date.now(),
          adopted: false,
        };
      });
    },
  };
}

/** Builds the `docker run` spec of the container contract: env, mounts, labels, limits and user. */
export function buildRunSpec(deps: ActivityDeps, context: SessionContext, request: SpawnRequest): RunSpec {
  const { settings } = deps;
  const { group, paths, config, session } = context;

  const provider = deps.providers.get(request.provider);
  const contribution = provider.contribute({
    sessionDir: context.sessionDir,
    agentGroup: { id: group.id, name: group.name, folder: group.folder },
    groupDir: paths.groupDir,
    hostEnv: process.env,
  });

  const env: Record<string, string> = {
    TZ: process.env.TZ ?? Intl.DateTimeFormat().resolvedOptions().timeZone ?? 'UTC',
    AGENT_PROVIDER: request.provider,
    SESSION_INBOUND_DB_PATH: '/workspace/inbound.db',
    SESSION_OUTBOUND_DB_PATH: '/workspace/outbound.db',
    SESSION_HEARTBEAT_PATH: '/workspace/.heartbeat',
    SESSION_CLOSE_REQUEST_PATH: '/workspace/.close-request',
    NANOCLAW_ASSISTANT_NAME: settings.assistantName,
    NANOCLAW_AGENT_GROUP_ID: group.id,
    NANOCLAW_AGENT_GROUP_NAME: group.name,
    NANOCLAW_ADMIN_USER_IDS: request.adminUserIds.join(','),
    NANOCLAW_MCP_SERVERS: JSON.stringify(config.mcpServers ?? {}),
    ...contribution.env,
  };

  const mounts: BindMount[] = [
    { source: context.sessionDir, target: '/workspace', readonly: false },
    { source: paths.groupDir, target: '/workspace/agent', readonly: false },
    { source: paths.claudeStateDir, target: '/home/node/.claude', readonly: false },
    { source: paths.agentRunnerSrcDir, target: '/app/src', readonly: false },
  ];
  if (fs.existsSync(globalDir(settings))) {
    mounts.push({ source: globalDir(settings), target: '/workspace/global', readonly: true });
  }
  for (const mount of mounts) {
    // Docker would create a missing source as a root-owned folder: create it ourselves first.
    fs.mkdirSync(mount.source, { recursive: true });
  }

  const allowlist = loadMountAllowlist(settings.mountAllowlistPath);
  const extra = config.additionalMounts ?? [];
  if (extra.length > 0 && allowlist === null) {
    // One warning per spawn, however many mounts: validateMounts below rejects them all in one error.
    logger.warn(
      { sessionId: session.id, allowlist: settings.mountAllowlistPath, mounts: extra.length },
      'no mount allowlist: every additional mount is blocked',
    );
  }
  const options = { allowlistPath: settings.mountAllowlistPath };
  for (const mount of validateMounts(extra, allowlist, options)) {
    rejectDataDirOverlap(mount.hostPath, settings);
    mounts.push({ source: mount.hostPath, target: mount.containerPath, readonly: mount.readonly });
  }
  for (const mount of contribution.mounts) {
    mounts.push(validateProviderMount(mount, context.sessionDir, allowlist, options));
  }

  const uid = process.getuid?.();
  const gid = process.getgid?.();
  const mapUser = uid !== undefined && gid !== undefined && uid !== 0 && uid !== 1000;
  if (mapUser) env.HOME = '/home/node';

  return {
    name: request.containerName,
    image: request.image,
    labels: {
      [LABELS.install]: settings.installId,
      [LABELS.session]: session.id,
      [LABELS.group]: group.id,
      [LABELS.workflowRun]: request.workflowRunId,
    },
    env,
    mounts,
    extraArgs: [],
    user: mapUser ? `${uid}:${gid}` : undefined,
    memory: config.resources?.memory,
    cpus: config.resources?.cpus,
    pidsLimit: config.resources?.pidsLimit,
  };
}

/**
 * Provider mounts whose real path lies inside the session folder are trusted; any other source goes
 * through the allowlist. The real path counts because the agent can plant symlinks in its session folder.
 */
function validateProviderMount(
  mount: BindMount,
  sessionDirPath: string,
  allowlist: ReturnType<typeof loadMountAllowlist>,
  options: { allowlistPath: string },
): BindMount {
  const source = realPathOrSelf(path.resolve(mount.source));
  if (isInside(source, realPathOrSelf(sessionDirPath))) return { ...mount, source };
  const checked = validateMount({ hostPath: source, readonly: mount.readonly }, allowlist, options);
  return { source: checked.hostPath, target: mount.target, readonly: checked.readonly };
}

/**
 * Creates the mount points of the mounts that land inside /workspace, which Docker would otherwise
 * create as root-owned folders in the session folder. When berth runs as root, it also hands
 * writable sources inside the session folder, such as a provider's state folder, to the container's
 * user. Runs while no container of the session exists. Never follows a symlink, because the agent
 * can plant symlinks in its session folder. A mount point behind one is left to Docker, which
 * resolves it inside the container.
 */
export function prepareSessionMounts(sessionDirPath: string, mounts: BindMount[]): void {
  const owner = process.getuid?.() === 0 ? { uid: CONTAINER_UID, gid: CONTAINER_GID } : null;
  const realSessionDir = realPathOrSelf(sessionDirPath);
  for (const mount of mounts) {
    if (owner && !mount.readonly && isInside(realPathOrSelf(mount.source), realSessionDir)) {
      fs.lchownSync(mount.source, owner.uid, owner.gid);
    }
    if (!mount.target.startsWith(`${WORKSPACE}/`) || !isDirectory(mount.source)) continue;
    createMountPoint(sessionDirPath, path.posix.relative(WORKSPACE, mount.target).split('/'), owner);
  }
}

const WORKSPACE = '/workspace';

function createMountPoint(
  base: string,
  segments: string[],
  owner: { uid: number; gid: number } | null,
): void {
  let current = base;
  for (const segment of segments) {
    current = path.join(current, segment);
    const stat = fs.lstatSync(current, { throwIfNoEntry: false });
    if (stat === undefined) {
      fs.mkdirSync(current);
      if (owner) fs.lchownSync(current, owner.uid, owner.gid);
      continue;
    }
    if (!stat.isDirectory()) return;
  }
}

function isDirectory(file: string): boolean {
  return fs.statSync(file, { throwIfNoEntry: false })?.isDirectory() ?? false;
}

function isInside(candidate: string, dir: string): boolean {
  return candidate === dir || candidate.startsWith(dir + path.sep);
}

function realPathOrSelf(file: string): string {
  try {
    return fs.realpathSync(file);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return file;
    throw error;
  }
}

/**
 * Rejects an additional mount that exposes berth's own state: the session, group, group-state and
 * OneCLI folders and the databases under the data directory, or any folder above the data directory.
 */
function rejectDataDirOverlap(hostPath: string, settings: ActivityDeps['settings']): void {
  const dataDir = realPathOrSelf(settings.dataDir);
  const protectedPaths = [
    settings.sessionsDir,
    settings.groupsDir,
    path.join(settings.dataDir, 'group-state'),
    oneCliFilesDir(settings),
    settings.hostDbPath,
    path.join(settings.dataDir, 'temporal.db'),
  ].map(realPathOrSelf);
  const within = (child: string, parent: string): boolean =>
    child === parent || child.startsWith(parent + path.sep);
  if (within(dataDir, hostPath) || protectedPaths.some((protectedPath) => within(hostPath, protectedPath))) {
    throw new MountRejectedError(
      `Additional mount "${hostPath}" exposes berth's own state under ${dataDir} (sessions, groups, OneCLI files or databases). Mount a folder outside it.`,
    );
  }
}
