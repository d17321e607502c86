import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { OneCLI as OneCliSdk, OneCLIError, OneCLIRequestError } from '@onecli-sh/sdk';
import { CredentialsRejectedError, CredentialsUnavailableError } from '../errors.js';
import { logger } from '../logger.js';

export interface OneCliSettings {
  /** Base URL of the OneCLI gateway. When unset, berth makes no OneCLI calls. */
  url: string | undefined;
  apiKey?: string;
  /** Whether a container may start only with credentials from the gateway. */
  requireCredentials: boolean;
}

export interface AgentIdentity {
  agentGroupId: string;
  agentGroupName: string;
}

export interface OneCli {
  /**
   * Registers the agent group with the gateway (name: the group's name,
   * identifier: the group's id). An agent that already exists counts as
   * ensured. Returns `{ ensured: false }` without a request when no URL is set.
   */
  ensureAgent(identity: AgentIdentity): Promise<{ ensured: boolean }>;

  /**
   * Returns `dockerArgs` followed by the gateway's flags: `-e` env vars, a
   * `--mount` per file the SDK mounts (CA certificate, credential stubs) and,
   * on Linux, `--add-host host.docker.internal:host-gateway`. `dockerArgs` must
   * be `docker run` options without the image, because the flags are appended.
   * The input array is never modified. `secretValues` lists the added env
   * values that may be secrets, for the caller to redact from its logs.
   */
  applyContainerConfig(
    identity: AgentIdentity,
    dockerArgs: string[],
  ): Promise<{ args: string[]; applied: boolean; secretValues: string[] }>;
}

interface RetryPolicy {
  retries: number;
  baseDelayMs: number;
}

/**
 * Creates the OneCLI client. Both calls are retried with exponential backoff
 * (`baseDelayMs`, then twice that, and so on) after a network error, a timeout
 * or a 5xx, 408 or 429 status. `retries` counts the tries after the first: the
 * default of 3 makes 4 tries with 250, 500 and 1000 ms between them. Any other
 * 4xx status is not retried.
 *
 * When the gateway cannot provide credentials after those tries, or no URL is
 * set, a client with `requireCredentials` throws CredentialsUnavailableError,
 * which Temporal retries. A request the gateway rejected with a 4xx status
 * throws the non-retryable CredentialsRejectedError instead, because retrying
 * cannot fix an invalid API key. Without `requireCredentials` the client logs
 * a warning and the container starts without credentials.
 */
export function createOneCli(
  settings: OneCliSettings,
  options: {
    retries?: number;
    baseDelayMs?: number;
    /**
     * Directory that receives each group's copy of the files the SDK writes
     * for mounting, in `<filesDir>/<group id>/`. Unset mounts the SDK's own
     * files, which every group on the host shares.
     */
    filesDir?: string;
  } = {},
): OneCli {
  const retry: RetryPolicy = { retries: options.retries ?? 3, baseDelayMs: options.baseDelayMs ?? 250 };
  const gatewayUrl = settings.url;
  if (gatewayUrl === undefined) {
    return createDisconnectedOneCli(settings.requireCredentials);
  }

  // Both values are passed explicitly so that the SDK never falls back to
  // ONECLI_URL or ONECLI_API_KEY from the environment behind berth's settings.
  const sdk = new OneCliSdk({ url: gatewayUrl, apiKey: settings.apiKey ?? '' });

  const handleUnavailable = (identity: AgentIdentity, operation: string, error: unknown): void => {
    if (settings.requireCredentials) {
      throw isRejection(error)
        ? rejectedError(identity, gatewayUrl, error)
        : unavailableError(identity, gatewayUrl, error);
    }
    logger.warn(
      { agentGroupId: identity.agentGroupId, gatewayUrl, operation, err: error },
      'OneCLI credentials unavailable; starting the container without them',
    );
  };

  return {
    async ensureAgent(identity) {
      try {
        const result = await withRetry(identity, 'ensureAgent', retry, () =>
          sdk.ensureAgent({ name: identity.agentGroupName, identifier: identity.agentGroupId }),
        );
        logger.info({ agentGroupId: identity.agentGroupId, created: result.created }, 'OneCLI agent ensured');
        return { ensured: true };
      } catch (error) {
        handleUnavailable(identity, 'ensureAgent', error);
        return { ensured: false };
      }
    },

    async applyContainerConfig(identity, dockerArgs) {
      let added: string[];
      try {
        added = await withRetry(identity, 'applyContainerConfig', retry, () =>
          fetchAddedArgs(sdk, identity, options.filesDir),
        );
      } catch (error) {
        handleUnavailable(identity, 'applyContainerConfig', error);
        return { args: [...dockerArgs], applied: false, secretValues: [] };
      }

      logger.info(
        { agentGroupId: identity.agentGroupId, addedArgs: added.length },
        'OneCLI container config applied',
      );
      return { args: [...dockerArgs, ...added], applied: true, secretValues: findSecretValues(added) };
    },
  };
}

/** Creates the client for a host without a gateway URL, which never makes a request. */
function createDisconnectedOneCli(requireCredentials: boolean): OneCli {
  return {
    async ensureAgent() {
      return { ensured: false };
    },
    async applyContainerConfig(identity, dockerArgs) {
      if (requireCredentials) {
        throw unavailableError(identity, undefined, undefined);
      }
      return { args: [...dockerArgs], applied: false, secretValues: [] };
    },
  };
}

/**
 * Runs the SDK's applyContainerConfig on an empty array and returns the flags
 * it added, with each `-v` turned into `--mount`. The SDK resolves false on a
 * network error or a 5xx status, which is thrown here as a OneCLIError so that
 * withRetry tries again.
 *
 * The SDK writes the CA certificate and credential stubs to fixed names in
 * os.tmpdir(), shared by every agent group on the host, so one group's next
 * call would overwrite the files another group's container mounts. With
 * `filesDir` set, each file is copied into the group's own directory and the
 * mount names the copy.
 */
async function fetchAddedArgs(
  sdk: OneCliSdk,
  identity: AgentIdentity,
  filesDir: string | undefined,
): Promise<string[]> {
  const added: string[] = [];
  const applied = await sdk.applyContainerConfig(added, { agent: identity.agentGroupId });
  if (!applied) {
    throw new OneCLIError('the gateway is unreachable or returned a 5xx status');
  }
  if (filesDir === undefined) return convertVolumeFlags(added, (source) => source);

  // NOTE: two groups whose calls overlap can still race between the SDK's write of a shared file
  // and this copy. The window runs from that write to the end of the SDK's applyContainerConfig call.
  const groupDir = path.join(filesDir, toPathSegment(identity.agentGroupId));
  return convertVolumeFlags(added, (source) => copyIntoDir(source, groupDir));
}

/** Returns `id` with every character outside `[A-Za-z0-9_-]` replaced, so it is one safe path segment. */
function toPathSegment(id: string): string {
  return id.replace(/[^A-Za-z0-9_-]/g, '_') || '_';
}

/**
 * Copies `source` into `dir` and returns the copy's path. The name keeps the
 * file's base name behind a short hash of its full path, so two sources with
 * the same base name get two copies. The copy keeps the source's mode (the
 * SDK writes credential stubs as 0600) and replaces an earlier copy by rename,
 * so a container that mounts the earlier copy keeps reading a whole file.
 */
function copyIntoDir(source: string, dir: string): string {
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  const hash = createHash('sha256').update(source).digest('hex').slice(0, 8);
  const target = path.join(dir, `${hash}-${path.basename(source)}`);
  const partial = `${target}.${process.pid}.partial`;
  fs.copyFileSync(source, partial);
  fs.chmodSync(partial, fs.statSync(source).mode & 0o777);
  fs.renameSync(partial, target);
  return target;
}

async function withRetry<T>(
  identity: AgentIdentity,
  operation: string,
  retry: RetryPolicy,
  run: () => Promise<T>,
): Promise<T> {
  for (let attempt = 1; ; attempt += 1) {
    try {
      return await run();
    } catch (error) {
      if (!isTransient(error) || attempt > retry.retries) {
        throw error;
      }

      const delayMs = retry.baseDelayMs * 2 ** (attempt - 1);
      logger.warn(
        { agentGroupId: identity.agentGroupId, operation, attempt, delayMs, err: error },
        'OneCLI request failed; retrying',
      );
      await sleep(delayMs);
    }
  }
}

/** 4xx statuses that a later try may not get: request timeout and too many requests. */
const TRANSIENT_CLIENT_STATUSES = new Set([408, 429]);

/** The SDK wraps network errors, timeouts and unparseable bodies in plain OneCLIErrors. */
function isTransient(error: unknown): boolean {
  if (error instanceof OneCLIRequestError) {
    return error.statusCode >= 500 || TRANSIENT_CLIENT_STATUSES.has(error.statusCode);
  }
  return error instanceof OneCLIError;
}

/** Returns true for a 4xx status that the same request would get again. */
function isRejection(error: unknown): error is OneCLIRequestError {
  return (
    error instanceof OneCLIRequestError &&
    error.statusCode >= 400 &&
    error.statusCode < 500 &&
    !TRANSIENT_CLIENT_STATUSES.has(error.statusCode)
  );
}

function rejectedError(
  identity: AgentIdentity,
  gatewayUrl: string,
  cause: OneCLIRequestError,
): CredentialsRejectedError {
  return new CredentialsRejectedError(
    `OneCLI gateway at ${gatewayUrl} rejected the request for agent group "${identity.agentGroupName}" ` +
      `(${identity.agentGroupId}) with HTTP ${cause.statusCode}: ${cause.message}. ` +
      'Check ONECLI_API_KEY and that the gateway accepts the group id as an agent identifier, ' +
      'or set BERTH_ONECLI_REQUIRED=false to start containers without credentials.',
    { cause },
  );
}

function unavailableError(
  identity: AgentIdentity,
  gatewayUrl: string | undefined,
  cause: unknown,
): CredentialsUnavailableError {
  const group = `agent group "${identity.agentGroupName}" (${identity.agentGroupId})`;
  if (gatewayUrl === undefined) {
    return new CredentialsUnavailableError(
      `OneCLI credentials are required for ${group}, but ONECLI_URL is not set. ` +
        'Set ONECLI_URL to the gateway, or set BERTH_ONECLI_REQUIRED=false to start containers without credentials.',
    );
  }

  const reason = cause instanceof Error ? cause.message : String(cause);
  return new CredentialsUnavailableError(
    `OneCLI gateway at ${gatewayUrl} provided no credentials for ${group}: ${reason}. ` +
      'Start the gateway or correct ONECLI_URL and ONECLI_API_KEY, ' +
      'or set BERTH_ONECLI_REQUIRED=false to start containers without credentials.',
    { cause },
  );
}

/**
 * Rewrites `-v host:container[:ro|rw]` pairs as `--mount type=bind,...`, with
 * the host path passed through `relocate`, and keeps other flags unchanged.
 */
function convertVolumeFlags(flags: string[], relocate: (source: string) => string): string[] {
  const converted: string[] = [];
  for (let index = 0; index < flags.length; index += 1) {
    const flag = flags[index] as string;
    const value = flags[index + 1];
    if ((flag === '-v' || flag === '--volume') && value !== undefined) {
      converted.push('--mount', toMountSpec(value, relocate));
      index += 1;
      continue;
    }
    converted.push(flag);
  }
  return converted;
}

function toMountSpec(volume: string, relocate: (source: string) => string): string {
  const parts = volume.split(':');
  const mode = parts.length === 3 ? parts.pop() : undefined;
  const [source, target] = parts;
  const valid =
    parts.length === 2 &&
    source?.startsWith('/') === true &&
    target?.startsWith('/') === true &&
    (mode === undefined || mode === 'ro' || mode === 'rw');
  if (!valid) {
    throw new Error(
      `OneCLI added the volume "${volume}", which is not an absolute host:container[:ro|rw] pair`,
    );
  }

  const fields = ['type=bind', `source=${relocate(source as string)}`, `target=${target}`];
  if (mode === 'ro') {
    fields.push('readonly');
  }
  return fields.map(quoteCsvField).join(',');
}

// Docker reads the --mount value as one CSV record, so a field with a comma or
// a double quote must be quoted.
function quoteCsvField(field: string): string {
  return /[",\r\n]/.test(field) ? `"${field.replaceAll('"', '""')}"` : field;
}

const SECRET_NAME = /TOKEN|SECRET|PASSW|KEY|AUTH|CREDENTIAL/i;
const PROXY_NAME = /PROXY/i;

/**
 * Returns the values of `-e`/`--env NAME=VALUE` flags whose name suggests a
 * secret, plus proxy URLs that carry a user name or password.
 */
function findSecretValues(flags: string[]): string[] {
  const secrets: string[] = [];
  for (let index = 0; index < flags.length - 1; index += 1) {
    const flag = flags[index];
    if (flag !== '-e' && flag !== '--env') {
      continue;
    }

    const assignment = flags[index + 1] as string;
    const separator = assignment.indexOf('=');
    if (separator <= 0) {
      continue;
    }
    const name = assignment.slice(0, separator);
    const value = assignment.slice(separator + 1);
    if (value !== '' && (SECRET_NAME.test(name) || (PROXY_NAME.test(name) && hasUserInfo(value)))) {
      secrets.push(value);
    }
  }
  return [...new Set(secrets)];
}

function hasUserInfo(value: string): boolean {
  if (!URL.canParse(value)) {
    return false;
  }
  const url = new URL(value);
  return url.username !== '' || url.password !== '';
}
