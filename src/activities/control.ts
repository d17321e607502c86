import { Context, log } from '@temporalio/activity';
import { classifyExit, writeExitLog, type StopReason as ExitLogStopReason } from '../lifecycle/exit-log.js';
import { sessionDir } from '../paths.js';
import {
  clearCloseRequest,
  clearProcessingClaims,
  readInboundTexts,
  readProcessingClaims,
  recordFailedAttempts,
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
    return info !== null && (info.state === 'running' || info.state === 'paused' || info.state === 'restarting');
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
          log.info('container stop step', { sessionId: request.sessionId, containerName, step: name, outcome });
        };

        const info = await docker.inspect(containerName);
        if (info === null || !(info.state === 'running' || info.state === 'paused' || info.state === 'restarting')) {
          step('check', 'already stopped');
          return { steps };
        }
        if (info.state === 'paused') {
          await docker.unpause(containerName);
          step('unpause', 'unpaused to deliver the stop');
        }

        if (request.closeRequest && graceMs > 0) {
          const dir = sessionDirOf(deps, request.sessionId);
          writeCloseRequest(dir, request.reason);
          step('close-request', 'written');
          if (await waitForExit(containerName, graceMs)) {
            step('close-request', 'exited by itself');
            return { steps };
          }
          step('close-request', `still running after ${graceMs} ms`);
        }

        // docker stop sends SIGTERM and, after the grace, SIGKILL.
        await docker.stop(containerName, Math.max(1, Math.ceil(graceMs / 1000)));
        if (await waitForExit(containerName, 5_000)) {
          step('docker-stop', 'exited');
        } else {
          await docker.remove(containerName);
          step('force-remove', 'removed');
        }
        return { steps };
      });
    },

    async pauseContainer({ sessionId, containerName }: { sessionId: string; containerName: string }): Promise<void> {
      return asActivity(async () => {
        await docker.pause(containerName);
        deps.hostDb.updateSessionContainerStatus(sessionId, 'paused');
      });
    },

    async unpauseContainer({ sessionId, containerName }: { sessionId: string; containerName: string }): Promise<void> {
      return asActivity(async () => {
        const info = await docker.inspect(containerName);
        if (info?.state === 'paused') await docker.unpause(containerName);
        deps.hostDb.updateSessionContainerStatus(sessionId, 'running', new Date().toISOString());
      });
    },

    /**
     * Writes the per-exit log, removes the container, and, after a stuck or
     * crashed container, counts its open claims as failed attempts so the
     * messages are retried with backoff or marked failed. Idempotent.
     */
    async recordExit(request: RecordExitRequest): Promise<RecordExitResult> {
      return asActivity(async () => {
        const context = loadSessionContext(deps, request.sessionId);
        const info = await docker.inspect(request.containerName);
        const output = info ? await docker.logs(request.containerName) : { stdout: '', stderr: '' };
        const spec = buildRunSpec(deps, context, {
          sessionId: request.sessionId,
          containerName: request.containerName,
          image: request.image,
          provider: context.session.provider ?? deps.settings.defaultProvider,
          adminUserIds: [],
          workflowRunId: '',
        });

        const { kind } = classifyExit(request.exit.exitCode, request.exit.oomKilled);
        const logPath = writeExitLog(
          context.paths.logsDir,
          {
            sessionId: request.sessionId,
            agentGroupId: context.group.id,
            containerName: request.containerName,
            image: request.image,
            startedAt: request.startedAt,
            endedAt: request.exit.finishedAt,
            exitCode: request.exit.exitCode,
            oomKilled: request.exit.oomKilled,
            stopReason: request.stopReason as ExitLogStopReason,
            mounts: spec.mounts,
            stdoutTail: lastLines(output.stdout, TAIL_LINES),
            stderrTail: lastLines(output.stderr, TAIL_LINES),
            stdoutFull: output.stdout,
            stderrFull: output.stderr,
            stopSteps: request.stopSteps,
          },
          {
            secrets: secretValues(deps),
            messageTexts: readInboundTexts(context.sessionDir),
            debug: deps.settings.debugExitLogs,
            keep: deps.settings.exitLogsKept,
          },
        );
        await docker.remove(request.containerName);
        clearCloseRequest(context.sessionDir);
        deps.hostDb.updateSessionContainerStatus(request.sessionId, 'idle');

        let retried: string[] = [];
        let failed: string[] = [];
        if (request.failedClaims) {
          const claimed = readProcessingClaims(context.sessionDir).map((claim) => claim.messageId);
          clearProcessingClaims(context.sessionDir, claimed);
          ({ retried, failed } = recordFailedAttempts(context.sessionDir, claimed, {
            ...request.messageRetry,
            reason: `container ${request.containerName} ended (${request.stopReason}) while processing it`,
          }));
        }
        log.info('container exit recorded', {
          sessionId: request.sessionId,
          containerName: request.containerName,
          exitKind: kind,
          stopReason: request.stopReason,
          logPath,
        });
        return { exitKind: kind, logPath, retriedMessages: retried, failedMessages: failed };
      });
    },
  };
}

function sessionDirOf(deps: ActivityDeps, sessionId: string): string {
  const session = deps.hostDb.getSession(sessionId);
  const group = deps.hostDb.getAgentGroup(session.agentGroupId);
  return sessionDir(deps.settings, group.folder, sessionId);
}

function lastLines(text: string, count: number): string {
  const lines = text.split('\n');
  return lines.slice(Math.max(0, lines.length - count - 1)).join('\n');
}

/** Values that must never reach an exit log: OneCLI's key and secret-looking host variables. */
function secretValues(deps: ActivityDeps): string[] {
  const values = [deps.settings.onecli.apiKey ?? ''];
  for (const [name, value] of Object.entries(process.env)) {
    if (value && value.length >= 8 && /TOKEN|SECRET|PASSWORD|API_KEY|CREDENTIAL/i.test(name)) values.push(value);
  }
  return values.filter((value) => value.length >= 4);
}
