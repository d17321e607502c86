import { Context, log } from '@temporalio/activity';
import type { BindMount, ContainerInfo } from '../docker/runtime.js';
import { BerthError } from '../errors.js';
import {
  classifyExit,
  findExitLog,
  writeExitLog,
  type StopReason as ExitLogStopReason,
} from '../lifecycle/exit-log.js';
import { groupPaths, sessionDir } from '../paths.js';
import { resolveProviderName } from '../providers/registry.js';
import {
  clearCloseRequest,
  clearProcessingClaims,
  readInboundTexts,
  readPendingSchedule,
  readProcessingClaims,
  recordFailedAttempts,
  syncProcessingAcks,
  writeCloseRequest,
} from '../session/session-files.js';
import type { ActivityDeps } from './deps.js';
import { asActivity } from './failures.js';
import { buildRunSpec } from './spawn.js';
import { loadSessionContext } from './session-context.js';
import type { RecordExitRequest, RecordExitResult, StopRequest, StopStep } from './types.js';

const EXIT_POLL_MS = 250;
const TAIL_LINES = 200;

export function createControlActivities(deps: ActivityDeps) {
  const { docker } = deps;

  const isRunning = async (name: string): Promise<boolean> => {
    const info = await docker.inspect(name);
    return (
      info !== null && (info.state === 'running' || info.state === 'paused' || info.state === 'restarting')
    );
  };

  const waitForExit = async (name: string, timeoutMs: number): Promise<boolean> => {
    const deadline = Date.now() + timeoutMs;
    while (Date.now() < deadline) {
      if (!(await isRunning(name))) return true;
      Context.current().heartbeat();
      await Context.current().sleep(EXIT_POLL_MS);
    }
    return !(await isRunning(name));
  };

  return {
    /**
     * Stops a container gracefully: a close request the agent can see, then
     * SIGTERM, then SIGKILL, each after `graceMs`. A container that is gone
     * or already exited counts as stopped. Returns each step with its timing.
     * The container itself is removed later, by recordExit, once its output is saved.
     */
    async stopContainer(request: StopRequest): Promise<{ steps: StopStep[] }> {
      return asActivity(async () => {
        const { containerName, graceMs } = request;
        const steps: StopStep[] = [];
        const step = (name: string, outcome: string): void => {
          steps.push({ step: name, atMs: Date.now(), outcome });
          log.info('container stop step', {
            sessionId: request.sessionId,
            containerName,
            step: name,
            outcome,
          });
        };

        const info = await docker.inspect(containerName);
        if (
          info === null ||
          !(info.state === 'running' || info.state === 'paused' || info.state === 'restarting')
        ) {
          step('check', 'already stopped');
          return { steps };
        }
        if (info.state === 'paused') {
          await docker.unpause(containerName);
          step('unpause', 'unpaused to deliver the stop');
        }

        if (request.closeRequest && graceMs > 0) {
          const dir = locateSession(deps, request.sessionId).sessionDir;
          writeCloseRequest(dir, request.reason);
          step('close-request', 'written');
          if (await waitForExit(containerName, graceMs)) {
            step('close-request', 'exited by itself');
            return { steps };
          }
          step('close-request', `still running after ${graceMs} ms`);
        }

        // docker stop sends SIGTERM and, after the grace, SIGKILL.
        const graceSeconds = Math.max(1, Math.ceil(graceMs / 1000));
        step('sigterm', `sent, SIGKILL follows after ${graceSeconds} s`);
        await docker.stop(containerName, graceSeconds);
        if (await waitForExit(containerName, 5_000)) {
          step('docker-stop', describeStopExit(await docker.inspect(containerName)));
        } else {
          await docker.remove(containerName);
          step('force-remove', 'removed');
        }
        return { steps };
      });
    },

    async pauseContainer({
      sessionId,
      containerName,
    }: {
      sessionId: string;
      containerName: string;
    }): Promise<void> {
      return asActivity(async () => {
        await docker.pause(containerName);
        deps.hostDb.updateSessionContainerStatus(sessionId, 'paused');
      });
    },

    async unpauseContainer({
      sessionId,
      containerName,
    }: {
      sessionId: string;
      containerName: string;
    }): Promise<void> {
      return asActivity(async () => {
        const info = await docker.inspect(containerName);
        if (info?.state === 'paused') await docker.unpause(containerName);
        deps.hostDb.updateSessionContainerStatus(sessionId, 'running', new Date().toISOString());
      });
    },

    /**
     * Writes the per-exit log, removes the container, and, after a stuck or
     * crashed container, counts its open claims as failed attempts so the
     * messages are retried with backoff or marked failed. Idempotent: a retry
     * that finds the container gone reuses the log the first attempt wrote.
     * It does not parse container.json for its own work, so a file broken
     * after the spawn only leaves the mounts out of the log.
     */
    async recordExit(request: RecordExitRequest): Promise<RecordExitResult> {
      return asActivity(async () => {
        const { sessionId, containerName } = request;
        const located = locateSession(deps, sessionId);
        const dir = located.sessionDir;

        const { kind } = classifyExit(request.exit.exitCode, request.exit.oomKilled);
        const info = await docker.inspect(containerName);
        const earlierLog = info ? null : findExitLog(located.logsDir, containerName);
        const logPath = earlierLog ?? (await writeLog(request, located, info));
        await docker.remove(containerName);
        clearCloseRequest(dir);
        deps.hostDb.updateSessionContainerStatus(sessionId, 'idle');

        let retried: string[] = [];
        let failed: string[] = [];
        if (request.failedClaims) {
          const claimed = readProcessingClaims(dir).map((claim) => claim.messageId);
          clearProcessingClaims(dir, claimed);
          ({ retried, failed } = recordFailedAttempts(dir, claimed, {
            ...request.messageRetry,
            reason: `container ${containerName} ended (${request.stopReason}) while processing it`,
          }));
        }
        // The agent's completed acks must reach messages_in before due messages are counted.
        syncProcessingAcks(dir);
        log.info('container exit recorded', {
          sessionId,
          containerName,
          exitKind: kind,
          stopReason: request.stopReason,
          logPath,
          retriedMessages: retried.length,
          failedMessages: failed.length,
        });
        return {
          exitKind: kind,
          logPath,
          retriedMessages: retried,
          failedMessages: failed,
          ...readPendingSchedule(dir, Date.now()),
        };
      });
    },
  };

  /** Writes the exit log of a container; `info` is null when the container is gone and its output lost. */
  async function writeLog(
    request: RecordExitRequest,
    located: LocatedSession,
    info: ContainerInfo | null,
  ): Promise<string> {
    const output = info ? await docker.logs(request.containerName) : { stdout: '', stderr: '' };
    const notes = info ? [] : ['The container was gone before its output could be read.'];
    const mounts = info ? info.mounts : rebuildMounts(deps, request, notes);

    return writeExitLog(
      located.logsDir,
      {
        sessionId: request.sessionId,
        agentGroupId: located.agentGroupId,
        containerName: request.containerName,
        image: request.image,
        startedAt: request.startedAt,
        endedAt: request.exit.finishedAt,
        exitCode: request.exit.exitCode,
        oomKilled: request.exit.oomKilled,
        stopReason: request.stopReason as ExitLogStopReason,
        mounts,
        notes,
        stdoutTail: lastLines(output.stdout, TAIL_LINES),
        stderrTail: lastLines(output.stderr, TAIL_LINES),
        stdoutFull: output.stdout,
        stderrFull: output.stderr,
        stopSteps: request.stopSteps,
      },
      {
        secrets: [...secretValues(deps), ...containerSecrets(info)],
        messageTexts: readInboundTexts(located.sessionDir),
        debug: deps.settings.debugExitLogs,
        keep: deps.settings.exitLogsKept,
      },
    );
  }
}

/**
 * Rebuilds the mounts of a container that is already gone from the session's
 * current configuration. Returns null, and adds a note, when that
 * configuration no longer yields them (container.json broken, a mount or
 * provider now rejected).
 */
function rebuildMounts(deps: ActivityDeps, request: RecordExitRequest, notes: string[]): BindMount[] | null {
  try {
    const context = loadSessionContext(deps, request.sessionId);
    const provider = resolveProviderName(
      context.session.provider,
      context.group.provider,
      deps.settings.defaultProvider,
    );
    const spec = buildRunSpec(deps, context, {
      sessionId: request.sessionId,
      containerName: request.containerName,
      image: request.image,
      provider,
      adminUserIds: [],
      workflowRunId: '',
    });
    return spec.mounts;
  } catch (error) {
    if (!(error instanceof BerthError)) throw error;
    log.warn('exit log written without mounts', {
      sessionId: request.sessionId,
      containerName: request.containerName,
      error: error.message,
    });
    notes.push(`Mounts unknown: ${error.message}`);
    return null;
  }
}

/** Describes how a container ended after `docker stop`, for the stop steps. */
function describeStopExit(info: ContainerInfo | null): string {
  if (info === null) return 'removed before its exit code could be read';
  return classifyExit(info.exitCode, info.oomKilled).meaning;
}

interface LocatedSession {
  agentGroupId: string;
  sessionDir: string;
  logsDir: string;
}

/** Finds a session's folders from the host database alone, without parsing container.json. */
function locateSession(deps: ActivityDeps, sessionId: string): LocatedSession {
  const session = deps.hostDb.getSession(sessionId);
  const group = deps.hostDb.getAgentGroup(session.agentGroupId);
  return {
    agentGroupId: group.id,
    sessionDir: sessionDir(deps.settings, group.folder, sessionId),
    logsDir: groupPaths(deps.settings, group.folder).logsDir,
  };
}

function lastLines(text: string, count: number): string {
  const lines = text.split('\n');
  return lines.slice(Math.max(0, lines.length - count - 1)).join('\n');
}

/** Names of container variables whose values may be secret: tokens and keys, and proxy URLs that carry credentials. */
const SECRET_ENV_NAME = /TOKEN|SECRET|PASSW|KEY|AUTH|CREDENTIAL|PROXY/i;

/** Returns the container's environment values that may be secret (OneCLI adds some), for redaction. */
function containerSecrets(info: ContainerInfo | null): string[] {
  if (!info) return [];
  return Object.entries(info.env)
    .filter(([name, value]) => SECRET_ENV_NAME.test(name) && value.length >= 4)
    .map(([, value]) => value);
}

/** Values that must never reach an exit log: OneCLI's key and secret-looking host variables. */
function secretValues(deps: ActivityDeps): string[] {
  const values = [deps.settings.onecli.apiKey ?? ''];
  for (const [name, value] of Object.entries(process.env)) {
    if (value && value.length >= 8 && /TOKEN|SECRET|PASSWORD|API_KEY|CREDENTIAL/i.test(name))
      values.push(value);
  }
  return values.filter((value) => value.length >= 4);
}
