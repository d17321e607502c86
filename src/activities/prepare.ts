import fs from 'node:fs';
import { log } from '@temporalio/activity';
import { writeDefaultContainerConfig } from '../config/container-config.js';
import { sessionDir } from '../paths.js';
import { resolveProviderName } from '../providers/registry.js';
import { initSessionFiles, writeDestinations, writeSessionRouting } from '../session/session-files.js';
import type { ActivityDeps } from './deps.js';
import { asActivity } from './failures.js';
import { loadSessionContext } from './session-context.js';
import type { SessionPlan, SessionRef } from './types.js';

const SECOND = 1000;

export function createPrepareActivities(deps: ActivityDeps) {
  const { settings, hostDb } = deps;

  return {
    /**
     * Rewrites destinations and session routing into inbound.db from the host
     * database, and returns the admin user ids, read fresh at every wake.
     */
    async syncSessionRouting({ sessionId }: SessionRef): Promise<{ adminUserIds: string[] }> {
      return asActivity(() => {
        const session = hostDb.getSession(sessionId);
        const group = hostDb.getAgentGroup(session.agentGroupId);
        // container.json is not parsed here, so routing still syncs when that file is broken.
        const dir = sessionDir(settings, group.folder, session.id);
        initSessionFiles(dir);

        writeDestinations(dir, hostDb.destinationsOf(group.id));
        const messaging = session.messagingGroupId
          ? hostDb.getMessagingGroup(session.messagingGroupId)
          : undefined;
        writeSessionRouting(dir, {
          channelType: messaging?.channelType ?? null,
          platformId: messaging?.platformId ?? null,
          threadId: session.threadId === '' ? null : session.threadId,
        });
        return { adminUserIds: hostDb.adminUserIds(group.id) };
      });
    },

    /** Reads container.json over the global defaults; a rejected file fails the wake without retries. */
    async loadSessionPlan({ sessionId }: SessionRef): Promise<SessionPlan> {
      return asActivity(() => {
        const context = loadSessionContext(deps, sessionId);
        for (const warning of context.configWarnings)
          log.warn('container.json warning', { sessionId, warning });
        const { config, group, session } = context;
        // container.json's provider is the group's file-level default, below the group's own setting.
        const provider = resolveProviderName(
          session.provider,
          group.provider,
          config.provider ?? settings.defaultProvider,
        );
        deps.providers.get(provider);

        return {
          sessionId,
          agentGroupId: group.id,
          agentGroupName: group.name,
          folder: group.folder,
          provider,
          idleTimeoutMs: (config.idleTimeoutSeconds ?? settings.idleTimeoutSeconds) * SECOND,
          maxLifetimeMs: (config.maxLifetimeSeconds ?? settings.maxLifetimeSeconds) * SECOND,
          stopGraceMs: (config.stopGraceSeconds ?? settings.stopGraceSeconds) * SECOND,
          warmIdlePauseMs: config.warmIdle ? config.warmIdle.pauseSeconds * SECOND : null,
          stuck: {
            heartbeatCeilingMs:
              (config.stuck?.heartbeatCeilingSeconds ?? settings.heartbeatCeilingSeconds) * SECOND,
            claimToleranceMs:
              (config.stuck?.claimToleranceSeconds ?? settings.claimToleranceSeconds) * SECOND,
            spawnGraceMs: (config.stuck?.spawnGraceSeconds ?? settings.spawnGraceSeconds) * SECOND,
            checkIntervalMs: settings.stuckCheckSeconds * SECOND,
          },
          messageRetry: {
            maxAttempts: config.messageRetry?.maxAttempts ?? settings.messageMaxAttempts,
            backoffMs: (config.messageRetry?.backoffSeconds ?? 5) * SECOND,
          },
          restartBudget: {
            maxFailures: settings.restartBudget,
            windowMs: settings.restartWindowSeconds * SECOND,
          },
          warnings: context.configWarnings,
        };
      });
    },

    /** Registers the group with OneCLI when it is configured; a no-op otherwise. */
    async ensureAgent({ sessionId }: SessionRef): Promise<{ ensured: boolean }> {
      return asActivity(async () => {
        const group = hostDb.getAgentGroup(hostDb.getSession(sessionId).agentGroupId);
        return deps.oneCli.ensureAgent({ agentGroupId: group.id, agentGroupName: group.name });
      });
    },

    /**
     * Creates the group folder, its shared Claude state and agent-runner
     * source folders, a default container.json, the logs folder and the
     * session files. Never overwrites what exists.
     */
    async initFilesystem({ sessionId }: SessionRef): Promise<void> {
      return asActivity(() => {
        const context = loadSessionContext(deps, sessionId);
        const { paths } = context;
        for (const dir of [paths.groupDir, paths.logsDir, paths.claudeStateDir, paths.agentRunnerSrcDir]) {
          fs.mkdirSync(dir, { recursive: true });
        }
        writeDefaultContainerConfig(paths.containerJson);
        initSessionFiles(context.sessionDir);
        if (process.getuid?.() === 0) {
          // The agent runs as uid 1000; as root, hand it the folders it writes.
          for (const dir of [
            context.sessionDir,
            paths.groupDir,
            paths.claudeStateDir,
            paths.agentRunnerSrcDir,
          ]) {
            chownTree(dir, CONTAINER_UID, CONTAINER_GID);
          }
        }
      });
    },
  };
}

export const CONTAINER_UID = 1000;
export const CONTAINER_GID = 1000;

/**
 * Hands a folder tree to uid:gid without following symlinks. Another session of the group may
 * have a running container that writes the shared group folders. Each folder is opened with
 * O_NOFOLLOW and its entries are reached through /proc/self/fd, so that agent cannot swap a folder
 * for a symlink between the check and the chown and make root chown a host path outside the tree.
 * An entry that vanishes or turns into a symlink while the walk runs is skipped.
 * NOTE: /proc/self/fd exists on Linux only; this runs only when berth runs as root.
 */
function chownTree(dir: string, uid: number, gid: number): void {
  let fd: number;
  try {
    fd = fs.openSync(dir, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY | fs.constants.O_NOFOLLOW);
  } catch (error) {
    if (isReplacedEntry(error)) return;
    throw error;
  }

  try {
    fs.fchownSync(fd, uid, gid);
    const opened = `/proc/self/fd/${fd}`;
    for (const entry of fs.readdirSync(opened, { withFileTypes: true })) {
      const child = `${opened}/${entry.name}`;
      if (entry.isDirectory()) chownTree(child, uid, gid);
      else if (entry.isFile()) chownEntry(child, uid, gid);
    }
  } finally {
    fs.closeSync(fd);
  }
}

/** lchown changes a symlink itself, so a file swapped for a symlink leaves its target alone. */
function chownEntry(file: string, uid: number, gid: number): void {
  try {
    fs.lchownSync(file, uid, gid);
  } catch (error) {
    if (!isReplacedEntry(error)) throw error;
  }
}

function isReplacedEntry(error: unknown): boolean {
  const code = (error as NodeJS.ErrnoException).code;
  return code === 'ENOENT' || code === 'ELOOP' || code === 'ENOTDIR';
}
