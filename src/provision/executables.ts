/**
 * Paths of the host executables berth starts, as `scripts/provision.sh`
 * records them in `<cache dir>/executables.json`. Environment variables
 * override each entry, so a developer can point berth at their own builds.
 */

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { z } from 'zod';
import { BerthError } from '../errors.js';

const PROVISION_COMMAND = 'bash scripts/provision.sh';

const executablesFileSchema = z.object({
  temporalCli: z.string().min(1),
  testServer: z.string().min(1).nullable(),
});

type ExecutablesFile = z.infer<typeof executablesFileSchema>;

/** A host executable is missing or was never provisioned. Running the provision script fixes it. */
export class ExecutableNotProvisionedError extends BerthError {
  readonly nonRetryable = true;
}

/**
 * Returns berth's cache directory: `BERTH_CACHE_DIR` when set and non-empty,
 * else `~/.cache/berth`. The directory may not exist yet.
 */
export function cacheDir(): string {
  const fromEnv = process.env.BERTH_CACHE_DIR;
  return fromEnv ? path.resolve(fromEnv) : path.join(os.homedir(), '.cache', 'berth');
}

/**
 * Returns the Temporal CLI to run: `BERTH_TEMPORAL_CLI` when set, else the
 * path in executables.json. Throws ExecutableNotProvisionedError when neither
 * names an existing file.
 */
export function temporalCliPath(): string {
  return resolveExecutable(
    'BERTH_TEMPORAL_CLI',
    'Temporal CLI',
    (file) => file.temporalCli,
    PROVISION_COMMAND,
  );
}

/**
 * Returns the Temporal Java test server wrapper (its first argument is the
 * port): `BERTH_TEMPORAL_TEST_SERVER` when set, else the path in
 * executables.json. Throws ExecutableNotProvisionedError when neither names an
 * existing file, which includes a cache provisioned with `--runtime` only.
 */
export function testServerPath(): string {
  return resolveExecutable(
    'BERTH_TEMPORAL_TEST_SERVER',
    'Temporal test server',
    (file) => file.testServer,
    `${PROVISION_COMMAND} (without --runtime)`,
  );
}

function resolveExecutable(
  envName: string,
  description: string,
  select: (file: ExecutablesFile) => string | null,
  fix: string,
): string {
  const fromEnv = process.env[envName];
  if (fromEnv) {
    requireFile(fromEnv, `${description} at ${envName}=${fromEnv}`, `fix ${envName} or unset it`);
    return fromEnv;
  }

  const recordsPath = path.join(cacheDir(), 'executables.json');
  const recorded = select(readExecutablesFile(recordsPath));
  if (recorded === null) {
    throw new ExecutableNotProvisionedError(
      `${description} is not provisioned: ${recordsPath} records none. Run \`${fix}\` or set ${envName}.`,
    );
  }
  requireFile(recorded, `${description} at ${recorded} (from ${recordsPath})`, `run \`${fix}\` again`);
  return recorded;
}

function readExecutablesFile(recordsPath: string): ExecutablesFile {
  let text: string;
  try {
    text = fs.readFileSync(recordsPath, 'utf8');
  } catch (error) {
    throw new ExecutableNotProvisionedError(
      `Host executables are not provisioned: cannot read ${recordsPath}. Run \`${PROVISION_COMMAND}\`.`,
      { cause: error },
    );
  }

  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (error) {
    throw new ExecutableNotProvisionedError(
      `Invalid JSON in ${recordsPath}. Delete it and run \`${PROVISION_COMMAND}\`.`,
      { cause: error },
    );
  }

  const result = executablesFileSchema.safeParse(parsed);
  if (!result.success) {
    throw new ExecutableNotProvisionedError(
      `Invalid ${recordsPath}: ${z.prettifyError(result.error)}. Delete it and run \`${PROVISION_COMMAND}\`.`,
    );
  }
  return result.data;
}

function requireFile(filePath: string, location: string, fix: string): void {
  if (!fs.existsSync(filePath)) {
    throw new ExecutableNotProvisionedError(`${location} not found: ${fix}.`);
  }
}
