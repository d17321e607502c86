import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { z } from 'zod';

import { MountRejectedError } from '../errors.js';
import { logger } from '../logger.js';

/**
 * The mount allowlist: which host folders a group's container.json may mount into its
 * container. The file lives outside the project so that an agent that can edit its own
 * group folder cannot widen its own access, and it is never mounted into a container.
 */

const allowedRootSchema = z.object({
  path: z.string().refine((value) => path.isAbsolute(value) || value === '~' || value.startsWith('~/'), {
    message: 'must be an absolute path or start with "~/"',
  }),
  allowReadWrite: z.boolean().default(false),
  description: z.string().optional(),
});

const mountAllowlistSchema = z.object({
  allowedRoots: z.array(allowedRootSchema),
  blockedPatterns: z.array(z.string().min(1)).default(() => []),
});

export type AllowedRoot = z.infer<typeof allowedRootSchema>;
export type MountAllowlist = z.infer<typeof mountAllowlistSchema>;

/** An additional mount as container.json requests it. */
export interface MountRequest {
  hostPath: string;
  containerPath?: string;
  readonly?: boolean;
}

/** A mount that passed validation and can be handed to the container runtime. */
export interface ValidatedMount {
  /** Real path on the host, with `~` expanded and every symlink resolved. */
  hostPath: string;
  /** Absolute path under `/workspace/extra/`. */
  containerPath: string;
  readonly: boolean;
  /** True when the request was for read-write but its root allows only read-only. */
  downgraded: boolean;
}

export interface MountValidationOptions {
  /** Path of the allowlist file. Its folder is never mountable. */
  allowlistPath: string;
  /** Folder that `~` expands to, os.homedir() by default. */
  homeDir?: string;
}

/** Folder inside the container under which every additional mount is placed. */
export const EXTRA_MOUNTS_ROOT = '/workspace/extra/';

/**
 * Names of credentials, keys and sockets that are never mounted. Each entry is matched
 * against the path segments of a mount, with `*` matching within one segment. An entry
 * with a `/` matches consecutive segments, and a leading `/` anchors it at the root.
 */
export const DEFAULT_BLOCKED_PATTERNS: readonly string[] = [
  '.ssh',
  '.gnupg',
  '.gpg',
  '.aws',
  '.azure',
  '.gcloud',
  '.config/gcloud',
  '.kube',
  '.docker',
  '.env',
  '.env.*',
  '.netrc',
  '.npmrc',
  '.pypirc',
  'credentials',
  'id_rsa',
  'id_ed25519',
  'id_ecdsa',
  '*.pem',
  '*.key',
  '*.p12',
  '*.pfx',
  'private_key',
  'docker.sock',
  '/var/run/docker.sock',
  '/run/docker.sock',
];

/**
 * Reads the allowlist file. Returns null when the file does not exist, so that the caller
 * can warn once and reject every additional mount.
 * Throws MountRejectedError naming the file when it cannot be read, is not JSON or does
 * not match the format.
 */
export function loadMountAllowlist(allowlistPath: string): MountAllowlist | null {
  let text: string;
  try {
    text = fs.readFileSync(allowlistPath, 'utf8');
  } catch (error) {
    if (isErrnoException(error) && error.code === 'ENOENT') return null;
    throw new MountRejectedError(`Cannot read the mount allowlist ${allowlistPath}: ${String(error)}`, {
      cause: error,
    });
  }

  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (error) {
    throw new MountRejectedError(
      `Invalid JSON in the mount allowlist ${allowlistPath}: ${(error as Error).message}; fix the syntax`,
      { cause: error },
    );
  }

  const result = mountAllowlistSchema.safeParse(raw);
  if (!result.success) {
    const problems = result.error.issues.map((issue) => `${formatIssuePath(issue.path)}: ${issue.message}`);
    throw new MountRejectedError(
      `Invalid mount allowlist ${allowlistPath}: ${problems.join('; ')}; the expected format is ` +
        '{"allowedRoots": [{"path": "~/projects", "allowReadWrite": false}], "blockedPatterns": []}',
    );
  }
  return result.data;
}

/**
 * Validates one additional mount and returns its real host path and its container path.
 * Throws MountRejectedError naming the host path, the rule it broke and the fix.
 *
 * The real path (after `~` expansion and symlink resolution) must lie under the real path
 * of an allowed root, and neither it nor the requested path may match a blocked pattern.
 * Blocked patterns apply to the mounted path itself, not to files inside a mounted folder.
 * The one exception is the allowlist's folder: a mount that contains it is rejected too.
 * A read-write request under a read-only root is downgraded to read-only, not rejected.
 */
export function validateMount(
  request: MountRequest,
  allowlist: MountAllowlist | null,
  options: MountValidationOptions,
): ValidatedMount {
  const homeDir = options.homeDir ?? os.homedir();
  const allowlistPath = path.resolve(expandHome(options.allowlistPath, homeDir));
  if (allowlist === null) {
    throw rejection(
      request.hostPath,
      `no mount allowlist at ${allowlistPath}`,
      'create it to allow additional mounts',
    );
  }

  const expandedPath = expandHostPath(request.hostPath, homeDir);
  const blockedPatterns = [...DEFAULT_BLOCKED_PATTERNS, ...allowlist.blockedPatterns];
  rejectBlockedPath(request.hostPath, expandedPath, blockedPatterns, allowlistPath);

  const requestedPath = path.resolve(expandedPath);
  const realPath = resolveRealPath(request.hostPath, requestedPath);
  rejectBlockedPath(request.hostPath, realPath, blockedPatterns, allowlistPath);
  rejectAllowlistFolder(request.hostPath, realPath, allowlistPath);
  rejectMountSyntax(request.hostPath, realPath);

  const root = findAllowedRoot(realPath, allowlist.allowedRoots, homeDir);
  if (root === undefined) {
    const roots = allowlist.allowedRoots.map((allowed) => allowed.path).join(', ') || 'none';
    throw rejection(
      request.hostPath,
      `its real path ${realPath} is not under any allowed root (allowed roots: ${roots})`,
      `add a root to ${allowlistPath} or mount a folder under one of the allowed roots`,
    );
  }

  const containerPath = validateContainerPath(request, request.containerPath ?? path.basename(requestedPath));
  const wantsReadWrite = request.readonly === false;
  const downgraded = wantsReadWrite && !root.allowReadWrite;
  if (downgraded) {
    logger.warn({ hostPath: realPath, root: root.path }, 'read-write mount downgraded to read-only');
  }

  return {
    hostPath: realPath,
    containerPath: EXTRA_MOUNTS_ROOT + containerPath,
    readonly: !wantsReadWrite || downgraded,
    downgraded,
  };
}

/**
 * Validates every request and returns the validated mounts in request order.
 * Throws one MountRejectedError that lists every rejected mount, including mounts whose
 * container path repeats an earlier one. With no requests, a missing allowlist is no error.
 */
export function validateMounts(
  requests: MountRequest[],
  allowlist: MountAllowlist | null,
  options: MountValidationOptions,
): ValidatedMount[] {
  const mounts: ValidatedMount[] = [];
  const problems: string[] = [];
  const hostPathByContainerPath = new Map<string, string>();

  for (const request of requests) {
    let mount: ValidatedMount;
    try {
      mount = validateMount(request, allowlist, options);
    } catch (error) {
      if (!(error instanceof MountRejectedError)) throw error;
      problems.push(error.message);
      continue;
    }

    const earlierHostPath = hostPathByContainerPath.get(mount.containerPath);
    if (earlierHostPath !== undefined) {
      problems.push(
        rejection(
          request.hostPath,
          `its container path ${mount.containerPath} is already used by the mount of ${earlierHostPath}`,
          'set a different containerPath for one of them',
        ).message,
      );
      continue;
    }
    hostPathByContainerPath.set(mount.containerPath, request.hostPath);
    mounts.push(mount);
  }

  if (problems.length > 0) {
    throw new MountRejectedError(
      `${problems.length} of ${requests.length} additional mounts rejected:\n` +
        problems.map((problem) => `  - ${problem}`).join('\n'),
    );
  }
  return mounts;
}

/** Expands `~` and rejects relative paths. The result keeps its `..` segments and symlinks. */
function expandHostPath(hostPath: string, homeDir: string): string {
  if (hostPath.length === 0 || hostPath.includes('\0')) {
    throw rejection(
      hostPath,
      'the host path is empty or contains a NUL byte',
      'set hostPath to an absolute path',
    );
  }

  const expanded = expandHome(hostPath, homeDir);
  if (!path.isAbsolute(expanded)) {
    throw rejection(
      hostPath,
      'the host path is relative (only "~" and "~/..." are expanded)',
      'set hostPath to an absolute path or one starting with "~/"',
    );
  }
  return expanded;
}

/** Expands a leading `~` without normalizing, so that blocked segments before a `..` stay visible. */
function expandHome(value: string, homeDir: string): string {
  if (value === '~') return homeDir;
  if (value.startsWith('~/')) return `${homeDir.replace(/\/+$/, '')}/${value.slice(2)}`;
  return value;
}

function resolveRealPath(hostPath: string, requestedPath: string): string {
  try {
    return fs.realpathSync(requestedPath);
  } catch (error) {
    if (isErrnoException(error) && error.code === 'ENOENT') {
      throw rejection(hostPath, `the host path ${requestedPath} does not exist`, 'create it or fix hostPath');
    }
    throw rejection(
      hostPath,
      `the host path ${requestedPath} cannot be resolved: ${String(error)}`,
      'fix hostPath',
    );
  }
}

function rejectBlockedPath(
  hostPath: string,
  candidate: string,
  patterns: string[],
  allowlistPath: string,
): void {
  const pattern = patterns.find((blocked) => matchesBlockedPattern(candidate, blocked));
  if (pattern === undefined) return;

  throw rejection(
    hostPath,
    `${candidate} matches the blocked pattern "${pattern}"`,
    `mount a folder that holds no credentials, keys or sockets, or change blockedPatterns in ${allowlistPath}`,
  );
}

/** True when the pattern's segments match consecutive segments of the absolute path. */
function matchesBlockedPattern(absolutePath: string, pattern: string): boolean {
  const pathSegments = absolutePath.split('/').filter((segment) => segment.length > 0);
  const patternSegments = pattern.split('/').filter((segment) => segment.length > 0);
  if (patternSegments.length === 0) return false;

  const segmentMatchers = patternSegments.map(globToRegExp);
  const lastStart = pattern.startsWith('/') ? 0 : pathSegments.length - patternSegments.length;
  for (let start = 0; start <= lastStart; start++) {
    const window = pathSegments.slice(start, start + patternSegments.length);
    if (
      window.length === segmentMatchers.length &&
      segmentMatchers.every((matcher, i) => matcher.test(window[i]!))
    ) {
      return true;
    }
  }
  return false;
}

/** Case-insensitive, so that `ID_RSA` or `.SSH` on a case-insensitive file system is blocked too. */
function globToRegExp(glob: string): RegExp {
  const escaped = glob.replace(/[.+?^${}()|[\]\\]/g, '\\$&').replace(/\*/g, '[^/]*');
  return new RegExp(`^${escaped}$`, 'i');
}

/** Rejects a mount of the allowlist's folder, anything inside it, or any folder that contains it. */
function rejectAllowlistFolder(hostPath: string, realPath: string, allowlistPath: string): void {
  const allowlistFolder = realPathOrSelf(path.dirname(allowlistPath));
  if (!isSameOrInside(realPath, allowlistFolder) && !isSameOrInside(allowlistFolder, realPath)) return;

  throw rejection(
    hostPath,
    `${realPath} overlaps the mount allowlist's folder ${allowlistFolder}, which a container must never see`,
    'mount a folder that neither contains nor lies inside the allowlist folder',
  );
}

/** Rejects host paths that `docker run --mount` or `-v` would split into several fields. */
function rejectMountSyntax(hostPath: string, realPath: string): void {
  if (!/[,:"]|\p{Cc}/u.test(realPath)) return;

  throw rejection(
    hostPath,
    `its real path ${JSON.stringify(realPath)} contains ",", ":", a double quote or a control character`,
    'rename the folder or mount a parent folder without those characters',
  );
}

/** Returns the most specific allowed root whose real path contains `realPath`. */
function findAllowedRoot(realPath: string, roots: AllowedRoot[], homeDir: string): AllowedRoot | undefined {
  let best: { root: AllowedRoot; realRoot: string } | undefined;
  for (const root of roots) {
    const realRoot = resolveRootPath(root, homeDir);
    if (realRoot === undefined || !isSameOrInside(realPath, realRoot)) continue;
    if (best === undefined || realRoot.length > best.realRoot.length) best = { root, realRoot };
  }
  return best?.root;
}

/** Roots already reported as unresolvable, so each is logged once per process, not on every mount. */
const unresolvableRootsLogged = new Set<string>();

function resolveRootPath(root: AllowedRoot, homeDir: string): string | undefined {
  const expanded = path.resolve(expandHome(root.path, homeDir));
  try {
    return fs.realpathSync(expanded);
  } catch (error) {
    if (!unresolvableRootsLogged.has(expanded)) {
      unresolvableRootsLogged.add(expanded);
      logger.warn({ root: root.path, err: error }, 'allowed mount root cannot be resolved and is skipped');
    }
    return undefined;
  }
}

/**
 * Returns the container path relative to EXTRA_MOUNTS_ROOT, or throws when it could
 * escape that folder or break the `--mount` syntax.
 */
function validateContainerPath(request: MountRequest, containerPath: string): string {
  const problem = findContainerPathProblem(containerPath);
  if (problem === undefined) return containerPath;

  throw rejection(
    request.hostPath,
    `the container path ${JSON.stringify(containerPath)} ${problem}`,
    `set containerPath to a relative path such as "data" or "projects/site", which is mounted under ${EXTRA_MOUNTS_ROOT}`,
  );
}

function findContainerPathProblem(containerPath: string): string | undefined {
  if (containerPath.length === 0) return 'is empty';
  if (/\p{Cc}/u.test(containerPath)) return 'contains a NUL, newline or other control character';
  if (containerPath.startsWith('/')) return 'is absolute';
  if (/[,:"]/.test(containerPath))
    return 'contains ",", ":" or a double quote, which break the --mount syntax';

  const segments = containerPath.split('/');
  if (segments.includes('..')) return 'contains a ".." segment';
  if (
    path.posix.normalize(containerPath) !== containerPath ||
    containerPath.endsWith('/') ||
    segments.includes('.')
  ) {
    return 'is not normalized (no ".", empty or trailing segments)';
  }
  return undefined;
}

function isSameOrInside(candidate: string, folder: string): boolean {
  const relative = path.relative(folder, candidate);
  if (relative === '') return true;
  return relative !== '..' && !relative.startsWith(`..${path.sep}`) && !path.isAbsolute(relative);
}

function realPathOrSelf(value: string): string {
  try {
    return fs.realpathSync(value);
  } catch (error) {
    if (isErrnoException(error) && error.code === 'ENOENT') return value;
    throw error;
  }
}

function rejection(hostPath: string, rule: string, fix: string): MountRejectedError {
  return new MountRejectedError(`Mount of host path ${JSON.stringify(hostPath)} rejected: ${rule}; ${fix}`);
}

function formatIssuePath(issuePath: PropertyKey[]): string {
  if (issuePath.length === 0) return 'top level';
  return issuePath
    .map((key, index) => (typeof key === 'number' ? `[${key}]` : `${index > 0 ? '.' : ''}${String(key)}`))
    .join('');
}

function isErrnoException(error: unknown): error is NodeJS.ErrnoException {
  return error instanceof Error && 'code' in error;
}
