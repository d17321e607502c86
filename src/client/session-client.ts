import { Client, Connection, WorkflowNotFoundError } from '@temporalio/client';
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

/** Returns the session workflow's status; throws NotFoundError when no workflow exists for it. */
export async function sessionStatus(client: Client, sessionId: string): Promise<SessionStatus> {
  try {
    return await client.workflow.getHandle(sessionWorkflowId(sessionId)).query(statusQuery);
  } catch (error) {
    throw notFoundOr(error, sessionId);
  }
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
