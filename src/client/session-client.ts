import { Client, Connection, ServiceError, WorkflowNotFoundError } from '@temporalio/client';
import { NotFoundError } from '../errors.js';
import type { Settings } from '../settings.js';
import { sessionWorkflow, statusQuery, stopSignal, wakeSignal } from '../workflows/session.js';
import type { SessionStatus } from '../workflows/status.js';
import { sessionWorkflowId } from './ids.js';

/** Connects to the Temporal server named in the settings. */
export async function connectClient(settings: Settings): Promise<Client> {
  const connection = await Connection.connect({ address: settings.temporalAddress });
  return new Client({ connection, namespace: settings.namespace });
}

export interface WakeOptions {
  reason?: string;
  /** Off for the time-skipping test server, which has no berth search attributes. */
  searchAttributes?: boolean;
}

/**
 * Wakes a session: signals its workflow, starting it first when it does not
 * run. Any number of concurrent wakes reach one workflow, because its ID is
 * derived from the session ID alone.
 */
export async function wakeSession(
  client: Client,
  settings: Settings,
  sessionId: string,
  options: WakeOptions = {},
): Promise<void> {
  const searchAttributes = options.searchAttributes ?? true;
  await client.workflow.signalWithStart(sessionWorkflow, {
    workflowId: sessionWorkflowId(sessionId),
    taskQueue: settings.workflowTaskQueue,
    args: [
      {
        sessionId,
        hostTaskQueue: settings.hostTaskQueue,
        searchAttributes,
        maxHistoryEvents: settings.historyEventLimit,
        restartBudget: {
          maxFailures: settings.restartBudget,
          windowMs: settings.restartWindowSeconds * 1000,
        },
      },
    ],
    signal: wakeSignal,
    signalArgs: [{ reason: options.reason ?? 'message' }],
    ...(searchAttributes ? { searchAttributes: { SessionId: [sessionId] } } : {}),
  });
}

/** Maximum wait for a worker to respond to a status query. A running worker responds in milliseconds. */
const STATUS_QUERY_TIMEOUT_MS = 10_000;

/**
 * Returns the session workflow's status. Throws NotFoundError when no workflow
 * exists for the session, and an error that names the likely cause (no worker)
 * when the query gets no response in time.
 */
export async function sessionStatus(client: Client, sessionId: string): Promise<SessionStatus> {
  const handle = client.workflow.getHandle(sessionWorkflowId(sessionId));
  try {
    return await client.withDeadline(Date.now() + STATUS_QUERY_TIMEOUT_MS, () => handle.query(statusQuery));
  } catch (error) {
    if (isUnansweredQuery(error)) {
      throw new Error(
        `Session "${sessionId}" got no response to its status query within ${STATUS_QUERY_TIMEOUT_MS / 1000} s, ` +
          'so no berth worker seems to be running against this Temporal server. Start "berth worker" or "berth dev", then try again.',
        { cause: error },
      );
    }
    if (error instanceof ServiceError) {
      // Another failure of the query call itself; its gRPC cause is the useful part.
      const cause = error.cause instanceof Error ? error.cause.message : String(error.cause);
      throw new Error(
        `The status query of session "${sessionId}" failed: ${error.message} (${cause}). ` +
          'Check that a berth worker runs ("berth worker" or "berth dev") and that the Temporal server is up.',
        { cause: error },
      );
    }
    throw notFoundOr(error, sessionId);
  }
}

/** Returns true for a query that timed out or was cancelled at its deadline, which is what a missing worker causes. */
function isUnansweredQuery(error: unknown): boolean {
  if (!(error instanceof ServiceError)) return false;
  const code = (error.cause as { code?: number } | undefined)?.code;
  // gRPC status codes: 1 is CANCELLED (the client's own deadline), 4 is DEADLINE_EXCEEDED.
  return code === 1 || code === 4;
}

/** Asks the session's workflow to stop its container gracefully. */
export async function stopSession(
  client: Client,
  sessionId: string,
  reason = 'stop requested',
): Promise<void> {
  try {
    await client.workflow.getHandle(sessionWorkflowId(sessionId)).signal(stopSignal, { reason });
  } catch (error) {
    throw notFoundOr(error, sessionId);
  }
}

function notFoundOr(error: unknown, sessionId: string): unknown {
  if (error instanceof WorkflowNotFoundError) {
    return new NotFoundError(
      `Session "${sessionId}" has no workflow: it was never woken. Send it a message with "berth send" first.`,
      { cause: error },
    );
  }
  return error;
}
