import { Context, log } from '@temporalio/activity';
import { OutputMarkerParser, type OutputBlock } from '../lifecycle/output-markers.js';
import { sessionDir } from '../paths.js';
import {
  countPendingMessages,
  readDeclaredToolTimeoutMs,
  readHeartbeatMtime,
  readProcessingClaims,
} from '../session/session-files.js';
import type { ActivityDeps } from './deps.js';
import { asActivity } from './failures.js';
import type { ContainerExit, SessionObservation, SuperviseRequest } from './types.js';

/** Sends an unchanged observation at least this often, so the workflow can judge staleness. */
const OBSERVATION_INTERVAL_MS = 15_000;
/** A changed heartbeat is reported at most this often, so a busy agent does not flood the history. */
const HEARTBEAT_REPORT_MIN_INTERVAL_MS = 5_000;

export function createSuperviseActivities(deps: ActivityDeps) {
  const pollIntervalMs = deps.pollIntervalMs ?? 1000;

  return {
    /**
     * Watches a running container until it exits: follows stdout for output
     * blocks (delivered at once), reports heartbeat-file touches and stuck
     * observations to the workflow, and heartbeats to Temporal. A retry after
     * a worker crash picks the same container up again and reads its stdout
     * from the start, and the delivered table skips the blocks delivered before.
     * The same holds when the workflow cancels it to hand the container to its
     * next run. Returns the exit; never stops or removes the container, even
     * when cancelled.
     */
    async superviseContainer(request: SuperviseRequest): Promise<ContainerExit> {
      return asActivity(() => supervise(deps, request, pollIntervalMs));
    },
  };
}

async function supervise(
  deps: ActivityDeps,
  request: SuperviseRequest,
  pollIntervalMs: number,
): Promise<ContainerExit> {
  const context = Context.current();
  const { sessionId, containerName } = request;
  const session = deps.hostDb.getSession(sessionId);
  const group = deps.hostDb.getAgentGroup(session.agentGroupId);
  const dir = sessionDir(deps.settings, group.folder, sessionId);

  // Stdout is always read from the container's start, so a block's position in
  // it is stable across retries and can name a block that carries no id.
  // NOTE: a retry re-reads all of a long-running container's stdout.
  const abort = new AbortController();
  const deliveries: Array<Promise<void>> = [];
  let blockCount = 0;
  const parser = new OutputMarkerParser({
    onBlock: (block) => {
      blockCount += 1;
      const id = block.id ?? `stream-${containerName}-${blockCount}`;
      deliveries.push(deliverBlock(deps, dir, sessionId, containerName, { ...block, id }));
    },
    onMalformed: (error) =>
      log.warn('malformed output block skipped', { sessionId, containerName, error: error.message }),
  });
  const following = deps.docker
    .followStdout(containerName, (chunk) => parser.push(chunk), { signal: abort.signal })
    .catch((error: unknown) =>
      log.warn('following container output failed', { sessionId, containerName, error: String(error) }),
    );

  let lastSent: SessionObservation | null = null;
  try {
    for (;;) {
      const info = await deps.docker.inspect(containerName);
      if (info === null) {
        return { exitCode: null, oomKilled: false, finishedAt: Date.now(), inspected: false };
      }
      if (info.state === 'exited' || info.state === 'dead') {
        await Promise.race([following, context.sleep(2000)]);
        parser.end();
        await Promise.all(deliveries);
        return {
          exitCode: info.exitCode,
          oomKilled: info.oomKilled,
          finishedAt: info.finishedAt ? Date.parse(info.finishedAt) : Date.now(),
          inspected: true,
        };
      }

      lastSent = await reportObservation(deps, dir, request, lastSent);
      context.heartbeat();
      await context.sleep(pollIntervalMs);
    }
  } finally {
    abort.abort();
    // When cancelled for a handover, finish the deliveries under way before the next run's supervision starts.
    await Promise.allSettled(deliveries);
  }
}

/**
 * Sends an observation when it is due and returns the last one sent. A
 * failure to read the session files or to signal is logged and tried again
 * at the next poll, so it never ends the supervision.
 */
async function reportObservation(
  deps: ActivityDeps,
  dir: string,
  { sessionId, containerName }: SuperviseRequest,
  lastSent: SessionObservation | null,
): Promise<SessionObservation | null> {
  try {
    const observation = observe(dir);
    if (!shouldReport(lastSent, observation)) return lastSent;
    await deps.signals.observation(sessionId, observation);
    return observation;
  } catch (error) {
    log.warn('session observation failed, will retry', { sessionId, containerName, error: String(error) });
    return lastSent;
  }
}

function observe(dir: string): SessionObservation {
  return {
    observedAt: Date.now(),
    heartbeatMtime: readHeartbeatMtime(dir),
    claims: readProcessingClaims(dir).map((claim) => ({
      messageId: claim.messageId,
      claimedAt: claim.statusChanged,
      status: claim.status,
    })),
    declaredToolTimeoutMs: readDeclaredToolTimeoutMs(dir),
    pendingMessages: countPendingMessages(dir),
  };
}

function shouldReport(last: SessionObservation | null, next: SessionObservation): boolean {
  if (last === null) return true;
  const age = next.observedAt - last.observedAt;
  if (age >= OBSERVATION_INTERVAL_MS) return true;
  const changed =
    next.heartbeatMtime !== last.heartbeatMtime ||
    next.claims.length !== last.claims.length ||
    next.pendingMessages !== last.pendingMessages;
  return changed && age >= HEARTBEAT_REPORT_MIN_INTERVAL_MS;
}

async function deliverBlock(
  deps: ActivityDeps,
  dir: string,
  sessionId: string,
  containerName: string,
  block: OutputBlock & { id: string },
): Promise<void> {
  const { id } = block;
  try {
    const delivered = await deps.deliverer.deliver(
      dir,
      sessionId,
      {
        id,
        seq: null,
        inReplyTo: block.inReplyTo,
        timestamp: new Date().toISOString(),
        kind: block.kind,
        platformId: null,
        channelType: null,
        threadId: null,
        content: JSON.stringify(block.content),
      },
      'stream',
    );
    if (delivered) await deps.signals.activity(sessionId, { source: 'output', at: Date.now() });
  } catch (error) {
    log.warn('streamed block delivery failed', {
      sessionId,
      containerName,
      messageId: id,
      error: String(error),
    });
  }
}
