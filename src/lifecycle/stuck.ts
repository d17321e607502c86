import { InvalidTimestampError } from '../errors.js';
import { parseTimestamp } from './timestamps.js';

// No Node built-ins here: the workflow sandbox imports this module too.

/** Thresholds of the stuck check, all in milliseconds. */
export interface StuckSettings {
  /** Maximum age of the last sign of life (heartbeat, or container start) while no tool timeout is declared. */
  heartbeatCeilingMs: number;
  /** Minimum age of a claim before it counts as stuck, and the margin added to a declared tool timeout. */
  claimToleranceMs: number;
  /** Period after the container start during which it is never stopped. */
  spawnGraceMs: number;
}

/** One row of outbound.db `processing_ack`. */
export interface ProcessingClaim {
  messageId: string;
  /** SQLite timestamp of the claim (`status_changed`), UTC when it carries no zone. */
  claimedAt: string;
  status: string;
}

/** Observations the supervisor gathered at `now`. All times are epoch milliseconds. */
export interface StuckObservation {
  now: number;
  containerStartedAt: number;
  /** mtime of /workspace/.heartbeat, or null when the file does not exist. */
  heartbeatMtime: number | null;
  /** processing_ack rows. Rows whose status is not `processing` are ignored. */
  claims: ProcessingClaim[];
  /** container_state.tool_declared_timeout_ms while a tool is in flight, else null. */
  declaredToolTimeoutMs: number | null;
  /**
   * messages_in rows still pending. With none pending and no current claim the
   * agent is idle, not stuck, and the heartbeat rule does not apply (the idle
   * timer stops such a container). Undefined means unknown: the rule applies.
   */
  pendingMessages?: number;
}

export type StuckDecision =
  | { action: 'ok' }
  | {
      action: 'stop';
      reason: 'heartbeat-stale' | 'claim-without-heartbeat';
      detail: string;
      /** Claims of the current container whose messages should be retried. */
      messageIds: string[];
    };

export interface StuckResult {
  decision: StuckDecision;
  /** Claims left by a previous container, which the caller should clear. */
  staleClaims: string[];
  /** Claims whose `claimedAt` could not be parsed. They never cause a stop, and the caller should log them. */
  invalidClaims: Array<{ messageId: string; error: string }>;
}

interface CurrentClaim {
  messageId: string;
  claimedAtMs: number;
}

const PROCESSING = 'processing';

/**
 * Decides whether a running container is stuck. Pure and deterministic: the
 * same observation and settings always give the same result. It does not throw:
 * a claim with an unparsable timestamp is returned in `invalidClaims` instead.
 *
 * - A claim made before the whole second of `containerStartedAt` belongs to a
 *   previous container. It is returned in `staleClaims` and never causes a stop.
 * - Within `spawnGraceMs` of the container start the decision is always `ok`.
 * - `heartbeat-stale`: the agent has work (a current claim or a pending message)
 *   and its last sign of life (the later of the heartbeat mtime and the
 *   container start) is older than the ceiling. The ceiling is
 *   `heartbeatCeilingMs`, raised to `declaredToolTimeoutMs + claimToleranceMs`
 *   when a tool declared a longer timeout. `messageIds` lists the current claims.
 * - `claim-without-heartbeat`: a current claim is older than the tolerance,
 *   `max(claimToleranceMs, declaredToolTimeoutMs ?? 0)`, and no heartbeat came
 *   after it. `messageIds` lists the claims that triggered the stop.
 *
 * When both apply, `heartbeat-stale` wins. Ages and thresholds compare with `>`,
 * so an age equal to its limit is still `ok`.
 */
export function decideStuck(obs: StuckObservation, settings: StuckSettings): StuckResult {
  const { current, staleClaims, invalidClaims } = sortClaims(obs);
  const result = (decision: StuckDecision): StuckResult => ({ decision, staleClaims, invalidClaims });

  if (obs.now - obs.containerStartedAt < settings.spawnGraceMs) {
    return result({ action: 'ok' });
  }

  const hasWork = current.length > 0 || obs.pendingMessages === undefined || obs.pendingMessages > 0;
  const heartbeatStop = hasWork ? checkHeartbeat(obs, settings, current) : null;
  if (heartbeatStop) {
    return result(heartbeatStop);
  }

  const claimStop = checkClaims(obs, settings, current);
  return result(claimStop ?? { action: 'ok' });
}

/** Splits the processing claims into those of this container, stale ones and unreadable ones. */
function sortClaims(obs: StuckObservation): {
  current: CurrentClaim[];
  staleClaims: string[];
  invalidClaims: StuckResult['invalidClaims'];
} {
  const current: CurrentClaim[] = [];
  const staleClaims: string[] = [];
  const invalidClaims: StuckResult['invalidClaims'] = [];

  // SQLite's datetime('now') keeps whole seconds, so a claim made in the start
  // second can read as slightly before the start. Compare against the start
  // rounded down to its second so such a claim still counts as current.
  // NOTE: a previous container's claim from that same second counts as current.
  const startSecond = Math.floor(obs.containerStartedAt / 1000) * 1000;

  for (const claim of obs.claims) {
    if (claim.status !== PROCESSING) {
      continue;
    }
    const claimedAtMs = tryParse(claim.claimedAt);
    if (typeof claimedAtMs === 'string') {
      invalidClaims.push({ messageId: claim.messageId, error: claimedAtMs });
    } else if (claimedAtMs < startSecond) {
      staleClaims.push(claim.messageId);
    } else {
      current.push({ messageId: claim.messageId, claimedAtMs });
    }
  }
  return { current, staleClaims, invalidClaims };
}

function checkHeartbeat(
  obs: StuckObservation,
  settings: StuckSettings,
  current: CurrentClaim[],
): StuckDecision | null {
  const ceilingMs =
    obs.declaredToolTimeoutMs === null
      ? settings.heartbeatCeilingMs
      : Math.max(settings.heartbeatCeilingMs, obs.declaredToolTimeoutMs + settings.claimToleranceMs);

  // A heartbeat file older than the container was left by a previous one.
  const ownHeartbeat =
    obs.heartbeatMtime !== null && obs.heartbeatMtime > obs.containerStartedAt ? obs.heartbeatMtime : null;
  const ageMs = obs.now - (ownHeartbeat ?? obs.containerStartedAt);
  if (ageMs <= ceilingMs) {
    return null;
  }

  const since = ownHeartbeat === null ? 'No heartbeat since the container started' : 'Last heartbeat was';
  return {
    action: 'stop',
    reason: 'heartbeat-stale',
    detail: `${since} ${seconds(ageMs)} s ago, over the ${seconds(ceilingMs)} s ceiling.`,
    messageIds: current.map((claim) => claim.messageId),
  };
}

function checkClaims(
  obs: StuckObservation,
  settings: StuckSettings,
  current: CurrentClaim[],
): StuckDecision | null {
  const toleranceMs = Math.max(settings.claimToleranceMs, obs.declaredToolTimeoutMs ?? 0);
  const stuck = current.filter(
    (claim) =>
      obs.now - claim.claimedAtMs > toleranceMs &&
      (obs.heartbeatMtime === null || obs.heartbeatMtime <= claim.claimedAtMs),
  );
  if (stuck.length === 0) {
    return null;
  }

  const oldestAgeMs = Math.max(...stuck.map((claim) => obs.now - claim.claimedAtMs));
  const messageIds = stuck.map((claim) => claim.messageId);
  const subject = stuck.length === 1 ? `Message ${messageIds[0]} was` : `${stuck.length} messages were`;
  const age = stuck.length === 1 ? `${seconds(oldestAgeMs)} s` : `up to ${seconds(oldestAgeMs)} s`;
  return {
    action: 'stop',
    reason: 'claim-without-heartbeat',
    detail: `${subject} claimed ${age} ago with no heartbeat since, over the ${seconds(toleranceMs)} s tolerance.`,
    messageIds,
  };
}

/** Returns epoch ms, or the error message when the timestamp is invalid. */
function tryParse(value: string): number | string {
  try {
    return parseTimestamp(value);
  } catch (error) {
    if (error instanceof InvalidTimestampError) {
      return error.message;
    }
    throw error;
  }
}

function seconds(ms: number): number {
  return Math.round(ms / 1000);
}
