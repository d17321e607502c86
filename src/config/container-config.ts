import fs from 'node:fs';
import { z } from 'zod';

import { InvalidContainerConfigError, InvalidPackageNameError } from '../errors.js';
import { validateAptPackage, validateNpmPackage } from './package-names.js';

/**
 * Schema and loader of `groups/<folder>/container.json`, a group's container settings.
 * Every field is optional. Absent scalars stay undefined so that the global settings
 * supply them, and absent lists and maps become empty.
 */

const positiveInt = () => z.int().positive();

/** Docker reference characters only, starting with a letter or digit so it is never read as an option. */
const IMAGE_REFERENCE = /^[A-Za-z0-9][A-Za-z0-9._/:@-]*$/;

/** A positive size in Docker's syntax with the unit b, k, m or g, or none for bytes: `512m`, `1.5g`. */
const MEMORY_SIZE = /^(?:[1-9][0-9]*(?:\.[0-9]+)?|0\.[0-9]*[1-9][0-9]*)[bkmg]?$/i;

const stdioServerSchema = z.object({
  type: z.literal('stdio').optional(),
  command: z.string().min(1),
  args: z.array(z.string()).optional(),
  env: z.record(z.string(), z.string()).optional(),
});

const remoteServerSchema = z.object({
  type: z.enum(['http', 'sse']).optional(),
  url: z.url({ protocol: /^https?$/ }),
  headers: z.record(z.string(), z.string()).optional(),
});

const packageSpecs = (validate: (spec: string) => string) =>
  z
    .array(z.string().superRefine((spec, context) => addPackageIssue(spec, context, validate)))
    .default(() => []);

const mountRequestSchema = z.object({
  hostPath: z.string().min(1),
  containerPath: z.string().optional(),
  readonly: z.boolean().optional(),
});

export const containerConfigSchema = z.object({
  imageTag: z.string().regex(IMAGE_REFERENCE).optional(),
  provider: z
    .string()
    .regex(/^[a-z0-9_-]+$/)
    .optional(),
  mcpServers: z.record(z.string(), z.union([stdioServerSchema, remoteServerSchema])).default(() => ({})),
  packages: z
    .object({ apt: packageSpecs(validateAptPackage), npm: packageSpecs(validateNpmPackage) })
    .default(() => ({ apt: [], npm: [] })),
  additionalMounts: z.array(mountRequestSchema).default(() => []),
  idleTimeoutSeconds: positiveInt().optional(),
  maxLifetimeSeconds: positiveInt().optional(),
  stopGraceSeconds: z.int().nonnegative().optional(),
  resources: z
    .object({
      memory: z.string().regex(MEMORY_SIZE).optional(),
      cpus: z.number().positive().optional(),
      pidsLimit: positiveInt().optional(),
    })
    .optional(),
  warmIdle: z.object({ pauseSeconds: positiveInt() }).optional(),
  stuck: z
    .object({
      heartbeatCeilingSeconds: positiveInt().optional(),
      claimToleranceSeconds: positiveInt().optional(),
      spawnGraceSeconds: z.int().nonnegative().optional(),
    })
    .optional(),
  messageRetry: z
    .object({
      maxAttempts: positiveInt().optional(),
      backoffSeconds: positiveInt().optional(),
    })
    .optional(),
});

/** A parsed container.json with its defaults applied. */
export type ContainerConfig = z.infer<typeof containerConfigSchema>;

export type McpServerConfig = ContainerConfig['mcpServers'][string];

/** Description of a field's valid values and an example value, used in error messages. */
interface FieldHint {
  expected: string;
  example: string;
}

const SECONDS = 'a positive whole number of seconds';
const SECONDS_OR_ZERO = 'a whole number of seconds, 0 or more';

/** Hints keyed by path pattern, where `*` is a map key and `[]` an array index. */
const FIELD_HINTS: Record<string, FieldHint> = {
  '': { expected: 'a JSON object', example: '{}' },
  imageTag: {
    expected: 'a Docker image reference (letters, digits and "._/:@-", starting with a letter or digit)',
    example: '"berth-agent:latest"',
  },
  provider: { expected: 'a provider name of lowercase letters, digits, "-" and "_"', example: '"claude"' },
  mcpServers: { expected: 'an object that maps server names to server definitions', example: '{}' },
  'mcpServers.*': {
    expected: 'a server definition with "command" for a local server or "url" for a remote one',
    example: '{"command": "npx", "args": ["-y", "some-mcp-server"]}',
  },
  'mcpServers.*.type': {
    expected: '"stdio" for a local server, "http" or "sse" for a remote one',
    example: '"http"',
  },
  'mcpServers.*.command': { expected: 'a non-empty command', example: '"npx"' },
  'mcpServers.*.args': { expected: 'an array of strings', example: '["-y", "some-mcp-server"]' },
  'mcpServers.*.args[]': { expected: 'a string', example: '"--verbose"' },
  'mcpServers.*.env': { expected: 'an object of string values', example: '{"LOG_LEVEL": "info"}' },
  'mcpServers.*.env.*': { expected: 'a string', example: '"info"' },
  'mcpServers.*.url': { expected: 'an http or https URL', example: '"https://mcp.example.com/mcp"' },
  'mcpServers.*.headers': { expected: 'an object of string values', example: '{"X-Team": "infra"}' },
  'mcpServers.*.headers.*': { expected: 'a string', example: '"infra"' },
  packages: { expected: 'an object with "apt" and "npm" lists', example: '{"apt": [], "npm": []}' },
  'packages.apt': { expected: 'an array of Debian package names', example: '["curl"]' },
  'packages.apt[]': { expected: 'a Debian package name', example: '"curl"' },
  'packages.npm': { expected: 'an array of npm package names', example: '["typescript@^5.4.0"]' },
  'packages.npm[]': { expected: 'an npm package name', example: '"lodash"' },
  additionalMounts: { expected: 'an array of mounts', example: '[{"hostPath": "~/projects/site"}]' },
  'additionalMounts[]': {
    expected: 'a mount object with "hostPath"',
    example: '{"hostPath": "~/projects/site"}',
  },
  'additionalMounts[].hostPath': { expected: 'a non-empty host path', example: '"~/projects/site"' },
  'additionalMounts[].containerPath': {
    expected: 'a relative path under /workspace/extra/',
    example: '"site"',
  },
  'additionalMounts[].readonly': { expected: 'true or false', example: 'true' },
  idleTimeoutSeconds: { expected: SECONDS, example: '600' },
  maxLifetimeSeconds: { expected: SECONDS, example: '14400' },
  stopGraceSeconds: { expected: SECONDS_OR_ZERO, example: '30' },
  resources: { expected: 'an object with "memory", "cpus" and "pidsLimit"', example: '{"memory": "2g"}' },
  'resources.memory': { expected: 'a Docker memory size such as "512m" or "2g"', example: '"2g"' },
  'resources.cpus': { expected: 'a positive number of CPUs', example: '1.5' },
  'resources.pidsLimit': { expected: 'a positive whole number of processes', example: '512' },
  warmIdle: { expected: 'an object with "pauseSeconds"', example: '{"pauseSeconds": 1800}' },
  'warmIdle.pauseSeconds': { expected: SECONDS, example: '1800' },
  stuck: { expected: 'an object of stuck-detection limits', example: '{"heartbeatCeilingSeconds": 300}' },
  'stuck.heartbeatCeilingSeconds': { expected: SECONDS, example: '300' },
  'stuck.claimToleranceSeconds': { expected: SECONDS, example: '120' },
  'stuck.spawnGraceSeconds': { expected: SECONDS_OR_ZERO, example: '60' },
  messageRetry: {
    expected: 'an object with "maxAttempts" and "backoffSeconds"',
    example: '{"maxAttempts": 5}',
  },
  'messageRetry.maxAttempts': { expected: 'a positive whole number of attempts', example: '5' },
  'messageRetry.backoffSeconds': { expected: SECONDS, example: '30' },
};

/** Fields whose keys are names chosen by the user, so a key is never an unknown field. */
const MAP_FIELDS = new Set(['mcpServers', 'mcpServers.*.env', 'mcpServers.*.headers']);

const DEFAULT_FILE_TEXT =
  JSON.stringify({ mcpServers: {}, packages: { apt: [], npm: [] }, additionalMounts: [] }, null, 2) + '\n';

/**
 * Reads and validates a container.json. A missing file yields the defaults. Unknown fields
 * are ignored, and each one adds a warning that names the file and the field.
 * Throws InvalidContainerConfigError when the file cannot be read, is not JSON, or breaks
 * the schema. The message names the file and lists every invalid field with its fix.
 * Never writes the file.
 */
export function loadContainerConfig(configPath: string): { config: ContainerConfig; warnings: string[] } {
  const raw = readConfigJson(configPath);
  const result = containerConfigSchema.safeParse(raw);
  if (!result.success) {
    throw new InvalidContainerConfigError(formatProblems(configPath, raw, result.error.issues));
  }

  const warnings = findUnknownFields(raw, result.data, []).map(
    (field) => `${configPath}: unknown field ${field} is ignored; remove it or check its spelling`,
  );
  return { config: result.data, warnings };
}

/**
 * Writes a minimal container.json when none exists and returns whether it wrote one.
 * Opens with the `wx` flag, so an existing file, even one created concurrently, is left
 * alone. Throws when the folder does not exist or is not writable.
 */
export function writeDefaultContainerConfig(configPath: string): boolean {
  try {
    fs.writeFileSync(configPath, DEFAULT_FILE_TEXT, { flag: 'wx' });
    return true;
  } catch (error) {
    if (error instanceof Error && (error as NodeJS.ErrnoException).code === 'EEXIST') return false;
    throw error;
  }
}

function readConfigJson(configPath: string): unknown {
  let text: string;
  try {
    text = fs.readFileSync(configPath, 'utf8');
  } catch (error) {
    if (error instanceof Error && (error as NodeJS.ErrnoException).code === 'ENOENT') return {};
    throw new InvalidContainerConfigError(
      `Cannot read ${configPath}: ${String(error)}; check its permissions`,
      {
        cause: error,
      },
    );
  }

  try {
    return JSON.parse(text);
  } catch (error) {
    throw new InvalidContainerConfigError(
      `Invalid JSON in ${configPath}: ${(error as Error).message}; fix the syntax, the file was left unchanged`,
      { cause: error },
    );
  }
}

function addPackageIssue(spec: string, context: z.RefinementCtx, validate: (spec: string) => string): void {
  try {
    validate(spec);
  } catch (error) {
    if (!(error instanceof InvalidPackageNameError)) throw error;
    context.addIssue({ code: 'custom', message: error.message });
  }
}

function formatProblems(configPath: string, raw: unknown, issues: z.core.$ZodIssue[]): string {
  const lines = new Map<string, string>();
  for (const issue of issues) {
    for (const [field, line] of describeIssue(raw, issue, [])) {
      if (!lines.has(field)) lines.set(field, line);
    }
  }

  const count = lines.size === 1 ? '1 problem' : `${lines.size} problems`;
  const list = [...lines.values()].map((line) => `  - ${line}`).join('\n');
  return `Invalid container config ${configPath} (${count}):\n${list}`;
}

/**
 * Returns [field path, message line] pairs. A union issue is replaced by the issues of the
 * variant that the value's keys point to, so the message names the field that is wrong.
 */
function describeIssue(
  raw: unknown,
  issue: z.core.$ZodIssue,
  prefix: PropertyKey[],
): Array<[string, string]> {
  const issuePath = [...prefix, ...issue.path];
  if (issue.code === 'invalid_union') {
    const variant = chooseServerVariant(valueAt(raw, issuePath));
    const variantIssues = variant === undefined ? undefined : issue.errors[variant];
    if (variantIssues !== undefined) {
      return variantIssues.flatMap((nested) => describeIssue(raw, nested, issuePath));
    }
  }

  const field = formatPath(issuePath);
  if (issue.code === 'custom') return [[field, `${field}: ${issue.message}`]];

  const hint = FIELD_HINTS[toHintPattern(issuePath)];
  if (hint === undefined) return [[field, `${field}: ${issue.message}`]];

  const value = valueAt(raw, issuePath);
  const problem =
    value === undefined
      ? `missing, expected ${hint.expected}`
      : `expected ${hint.expected}, got ${preview(value)}`;
  const fix =
    field === ''
      ? `replace the file content with ${hint.example}`
      : `set ${field} to a value such as ${hint.example}`;
  return [[field, `${field || 'top level'}: ${problem}; ${fix}`]];
}

/** Index into the mcpServers union: 0 for a local server (has "command"), 1 for a remote one (has "url"). */
function chooseServerVariant(value: unknown): number | undefined {
  if (!isPlainObject(value)) return undefined;
  if ('command' in value) return 0;
  if ('url' in value) return 1;
  return undefined;
}

/** Lists the dotted paths of keys in `raw` that the schema stripped from `parsed`. */
function findUnknownFields(raw: unknown, parsed: unknown, at: PropertyKey[]): string[] {
  if (Array.isArray(raw) && Array.isArray(parsed)) {
    return raw.flatMap((item, index) => findUnknownFields(item, parsed[index], [...at, index]));
  }
  if (!isPlainObject(raw) || !isPlainObject(parsed)) return [];

  return Object.keys(raw).flatMap((key) => {
    const keyPath = [...at, key];
    if (!Object.hasOwn(parsed, key)) return [formatPath(keyPath)];
    return findUnknownFields(raw[key], parsed[key], keyPath);
  });
}

function toHintPattern(issuePath: PropertyKey[]): string {
  let pattern = '';
  for (const key of issuePath) {
    if (typeof key === 'number') pattern += '[]';
    else if (MAP_FIELDS.has(pattern)) pattern += '.*';
    else pattern += pattern === '' ? String(key) : `.${String(key)}`;
  }
  return pattern;
}

/** Formats a path as `packages.apt[2]`, quoting keys that are not plain identifiers: `mcpServers["my server"]`. */
function formatPath(issuePath: PropertyKey[]): string {
  let text = '';
  for (const key of issuePath) {
    if (typeof key === 'number') text += `[${key}]`;
    else if (/^[A-Za-z_$][\w$-]*$/.test(String(key))) text += text === '' ? String(key) : `.${String(key)}`;
    else text += `[${JSON.stringify(String(key))}]`;
  }
  return text;
}

function valueAt(raw: unknown, issuePath: PropertyKey[]): unknown {
  let value = raw;
  for (const key of issuePath) {
    if (value === null || typeof value !== 'object' || !Object.hasOwn(value, key)) return undefined;
    value = (value as Record<PropertyKey, unknown>)[key];
  }
  return value;
}

function preview(value: unknown): string {
  const text = JSON.stringify(value);
  return text.length > 60 ? `${text.slice(0, 57)}...` : text;
}

function isPlainObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}
