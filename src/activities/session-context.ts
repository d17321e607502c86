import type { AgentGroup, SessionRecord } from '../db/host-db.js';
import { loadContainerConfig, type ContainerConfig } from '../config/container-config.js';
import { groupPaths, sessionDir, type GroupPaths } from '../paths.js';
import type { ActivityDeps } from './deps.js';

/** A session with its group, folders and parsed container.json, as activities need them. */
export interface SessionContext {
  session: SessionRecord;
  group: AgentGroup;
  paths: GroupPaths;
  sessionDir: string;
  config: ContainerConfig;
  configWarnings: string[];
}

/** Loads the session's context; throws NotFoundError or InvalidContainerConfigError (both non-retryable). */
export function loadSessionContext(deps: ActivityDeps, sessionId: string): SessionContext {
  const session = deps.hostDb.getSession(sessionId);
  const group = deps.hostDb.getAgentGroup(session.agentGroupId);
  const paths = groupPaths(deps.settings, group.folder);
  const { config, warnings } = loadContainerConfig(paths.containerJson);
  return {
    session,
    group,
    paths,
    sessionDir: sessionDir(deps.settings, group.folder, session.id),
    config,
    configWarnings: warnings,
  };
}
