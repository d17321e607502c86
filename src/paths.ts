import path from 'node:path';
import type { Settings } from './settings.js';

/** The host folders of one agent group. */
export interface GroupPaths {
  /** The group folder, mounted read-write at /workspace/agent. */
  groupDir: string;
  containerJson: string;
  logsDir: string;
  /** The group's shared Claude state, mounted at /home/node/.claude. */
  claudeStateDir: string;
  /** The group's agent-runner source, mounted at /app/src. */
  agentRunnerSrcDir: string;
  /** Image tags whose build failed, with the reason, so a wake does not rebuild a known failure. */
  imageBuildFailures: string;
}

export function groupPaths(settings: Settings, folder: string): GroupPaths {
  const groupDir = path.join(settings.groupsDir, folder);
  const stateDir = path.join(settings.dataDir, 'group-state', folder);
  return {
    groupDir,
    containerJson: path.join(groupDir, 'container.json'),
    logsDir: path.join(groupDir, 'logs'),
    claudeStateDir: path.join(stateDir, 'claude'),
    agentRunnerSrcDir: path.join(stateDir, 'agent-runner-src'),
    imageBuildFailures: path.join(stateDir, 'image-build-failures.json'),
  };
}

/** Returns the global folder, mounted read-only at /workspace/global when it exists. */
export function globalDir(settings: Settings): string {
  return path.join(settings.groupsDir, 'global');
}

/** Returns the folder of each group's copies of the OneCLI files that containers mount (CA certificate, credential stubs). */
export function oneCliFilesDir(settings: Settings): string {
  return path.join(settings.dataDir, 'onecli');
}

export function sessionDir(settings: Settings, folder: string, sessionId: string): string {
  return path.join(settings.sessionsDir, folder, sessionId);
}
