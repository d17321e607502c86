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
        const messaging = session.messagingGroupId ? hostDb.getMessagingGroup(session.messagingGroupId) : undefined;
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
        for (const warning of context.configWarnings) log.warn('container.json warning', { sessionId, warning });
        const { config, group, session } = context;
        const provider = resolveProviderName(session.provider, group.provider, settings.defaultProvider);
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
            heartbeatCeilingMs: (config.stuck?.heartbeatCeilingSeconds ?? settings.heartbeatCeilingSeconds) * SECOND,
            claimToleranceMs: (config.stuck?.claimToleranceSeconds ?? settings.claimToleranceSeconds) * SECOND,
            spawnGraceMs: (config.stuck?.spawnGraceSeconds ?? settings.spawnGraceSeconds) * SECOND,
            checkIntervalMs: settings.stuckCheckSeconds * SECOND,
          },
          messageRetry: {
            maxAttempts: config.messageRetry?.maxAttempts ?? settings.messageMaxAttempts,
            backoffMs: (config.messageRetry?.backoffSeconds ?? 5) * SECOND,
          },
          restartBudget: { maxFailures: settings.restartBudget, windowMs: settings.restartWindowSeconds * SECOND },
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
          for (const dir of [context.sessionDir, paths.groupDir, paths.claudeStateDir, paths.agentRunnerSrcDir]) {
            chownTree(dir, CONTAINER_UID, CONTAINER_GID);
          }
        }
      });
    },
  };
}

export const CONTAINER_UID = 1000;
export const CONTAINER_GID = 1000;

function chownTree(dir: string, uid: number, gid: number): void {
  fs.chownSync(dir, uid, gid);
  for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
    const full = `${dir}/${entry.name}`;
    if (entry.isDirectory()) chownTree(full, uid, gid);
    else if (entry.isFile()) fs.chownSync(full, uid, gid);
  }
}
