import { InvalidPackageNameError } from '../errors.js';

/**
 * Validation of the apt and npm package specs in container.json. The specs end up on
 * the command line of an image build, so anything that a shell or the package manager
 * could read as more than one package name is rejected.
 */

/** Characters that a shell treats specially; none of them is valid in an apt or npm spec. */
const SHELL_METACHARACTERS = new Set([...';&|$`\'"<>(){}[]\\!#']);

/** `name[:arch][=version]`, where version is `[epoch:]upstream[-revision]` in Debian's character set. */
const APT_SPEC = /^[a-z0-9][a-z0-9+.-]+(?::[a-z0-9-]+)?(?:=(?:[0-9]+:)?[0-9][A-Za-z0-9.+~-]*)?$/;

const NPM_NAME = /^(?:@[a-z0-9-~][a-z0-9-._~]*\/)?[a-z0-9-~][a-z0-9-._~]*$/;

/**
 * A version, range or dist-tag without comparison operators or spaces: `1.2.3`, `^5.4.0`,
 * `~1.2`, `1.x`, `*`, `latest`.
 * NOTE: `*` is also a shell glob, so an image build that writes specs into a shell command
 * must quote them.
 */
const NPM_VERSION = /^[0-9A-Za-z^~*][0-9A-Za-z.^~*+-]*$/;

const NPM_NAME_MAX_LENGTH = 214;

/** npm installs a spec ending in one of these from a local tarball, not from the registry. */
const TARBALL_SUFFIX = /\.(?:tgz|tar\.gz|tar)$/;

/**
 * Returns `spec` when it is a Debian package name with an optional `:arch` qualifier and
 * `=version` pin, such as `curl`, `libssl3=3.0.11-1~deb12u2` or `gcc:arm64`.
 * Throws InvalidPackageNameError naming the value and the rule it broke.
 */
export function validateAptPackage(spec: string): string {
  const example = 'use a Debian package name such as "curl" or "curl=7.88.1-10+deb12u5"';
  rejectUnsafeCharacters('apt', spec, example);

  if (!APT_SPEC.test(spec)) {
    throw packageError(
      'apt',
      spec,
      'is not a Debian package name (lowercase letters, digits, "+", "." and "-", at least two characters, ' +
        'then optionally ":arch" and "=version")',
      example,
    );
  }
  return spec;
}

/**
 * Returns `spec` when it is a registry package name with an optional scope and an optional
 * `@version`, such as `lodash`, `@scope/pkg@1.2.3` or `typescript@^5.4.0`.
 * URLs, git specs, `file:` specs, local paths and tarballs are rejected, and so are version
 * ranges that need spaces or `<`, `>`, `=` or `|`.
 * Throws InvalidPackageNameError naming the value and the rule it broke.
 */
export function validateNpmPackage(spec: string): string {
  const example = 'use a registry package name such as "lodash", "@scope/pkg@1.2.3" or "typescript@^5.4.0"';
  rejectUnsafeCharacters('npm', spec, example);

  const { name, version } = splitNpmSpec(spec);
  if (name.length > NPM_NAME_MAX_LENGTH) {
    throw packageError('npm', spec, `has a name longer than ${NPM_NAME_MAX_LENGTH} characters`, example);
  }
  if (!NPM_NAME.test(name)) {
    throw packageError(
      'npm',
      spec,
      'is not a registry package name (optional "@scope/", then lowercase letters, digits, "-", ".", "_" ' +
        'and "~", not starting with "." or "_"); URLs, git specs, "file:" specs and paths are not allowed',
      example,
    );
  }
  if (TARBALL_SUFFIX.test(name)) {
    throw packageError('npm', spec, 'names a tarball, which npm would install from a local file', example);
  }
  if (version !== undefined && !NPM_VERSION.test(version)) {
    throw packageError(
      'npm',
      spec,
      `has the version "${version}", but a version must be a semver version, a range made of digits, ` +
        'letters, ".", "^", "~", "*", "+" and "-", or a dist-tag',
      example,
    );
  }
  return spec;
}

/**
 * Validates every apt and npm entry and throws one InvalidPackageNameError that lists
 * each bad entry by its position, such as `packages.apt[2]`.
 */
export function validatePackages(packages: { apt: string[]; npm: string[] }): void {
  const problems = [
    ...collectProblems('apt', packages.apt, validateAptPackage),
    ...collectProblems('npm', packages.npm, validateNpmPackage),
  ];
  if (problems.length === 0) return;

  const count =
    problems.length === 1 ? '1 invalid package entry' : `${problems.length} invalid package entries`;
  throw new InvalidPackageNameError(`${count}:\n${problems.map((line) => `  - ${line}`).join('\n')}`);
}

function collectProblems(
  manager: 'apt' | 'npm',
  specs: string[],
  validate: (spec: string) => string,
): string[] {
  const problems: string[] = [];
  specs.forEach((spec, index) => {
    try {
      validate(spec);
    } catch (error) {
      if (!(error instanceof InvalidPackageNameError)) throw error;
      problems.push(`packages.${manager}[${index}]: ${error.message}`);
    }
  });
  return problems;
}

/** Splits `name@version`, keeping the `@` that starts a scoped name as part of the name. */
function splitNpmSpec(spec: string): { name: string; version?: string } {
  const versionAt = spec.indexOf('@', 1);
  if (versionAt === -1) return { name: spec };
  return { name: spec.slice(0, versionAt), version: spec.slice(versionAt + 1) };
}

/** Rejects the specs that are unsafe for either package manager, whatever its own rules. */
function rejectUnsafeCharacters(manager: 'apt' | 'npm', spec: string, example: string): void {
  if (spec.length === 0) {
    throw packageError(manager, spec, 'is empty', example);
  }
  if (spec.startsWith('-')) {
    throw packageError(manager, spec, `starts with "-", so ${manager} would read it as an option`, example);
  }
  if (/\s/.test(spec)) {
    throw packageError(manager, spec, 'contains whitespace', example);
  }
  const metacharacter = [...spec].find((character) => SHELL_METACHARACTERS.has(character));
  if (metacharacter !== undefined) {
    throw packageError(manager, spec, `contains the shell metacharacter "${metacharacter}"`, example);
  }
  if (/\p{Cc}/u.test(spec)) {
    throw packageError(manager, spec, 'contains a control character', example);
  }
}

function packageError(
  manager: 'apt' | 'npm',
  spec: string,
  problem: string,
  fix: string,
): InvalidPackageNameError {
  return new InvalidPackageNameError(
    `Invalid ${manager} package ${JSON.stringify(spec)}: ${problem}; ${fix}`,
  );
}
