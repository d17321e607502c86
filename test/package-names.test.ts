import { describe, expect, it } from 'vitest';

import { validateAptPackage, validateNpmPackage, validatePackages } from '../src/config/package-names.js';
import { InvalidPackageNameError } from '../src/errors.js';

const validApt = [
  'curl',
  'python3.11',
  'libssl3=3.0.11-1~deb12u2',
  'g++',
  'libc6:amd64',
  'gcc-12:arm64=12.2.0-14',
  'tzdata=2024a-0+deb12u1',
  'vim=2:9.0.1378-2',
];

const validNpm = [
  'lodash',
  '@scope/pkg@1.2.3',
  'typescript@^5.4.0',
  'left-pad@latest',
  'react@~18.2',
  'node-fetch@2.x',
  'pkg@*',
  'pkg@1.0.0-beta.1+build.5',
  '@types/node',
  'lodash.merge',
];

/** Specs that neither apt nor npm may accept, with a fragment of the expected message. */
const invalidForBoth: Array<[string, string]> = [
  ['pkg;cmd', 'shell metacharacter ";"'],
  ['$(cmd)', 'shell metacharacter "$"'],
  ['`id`', 'shell metacharacter "`"'],
  ['-oAPT::Foo=1', 'starts with "-"'],
  ['--force', 'starts with "-"'],
  ['a b', 'whitespace'],
  ['pkg\nrm', 'whitespace'],
  ['a|b', 'shell metacharacter "|"'],
  ['a&&b', 'shell metacharacter "&"'],
  ['pkg>out', 'shell metacharacter ">"'],
  ["it's", 'shell metacharacter "\'"'],
  ['pkg\u0000', 'control character'],
  ['', 'is empty'],
];

const invalidApt = [
  'UPPER',
  'a',
  '../evil',
  'curl=',
  'curl=abc',
  'curl:AMD64',
  'curl/bookworm-backports',
  'https://x/y.deb',
  '.hidden',
];

const invalidNpm = [
  'file:../x',
  'git+ssh://git@github.com/user/repo.git',
  'https://x/y.tgz',
  'github:user/repo',
  'user/repo',
  '../evil',
  './local',
  '/abs/path',
  'UPPER',
  '.hidden',
  '_private',
  'pkg.tgz',
  'pkg.tar.gz',
  'npm:alias@1.0.0',
  'pkg@',
  'pkg@>=1.0.0',
  'pkg@1.0.0||2.0.0',
  '@scope',
  '@scope/',
  `${'a'.repeat(215)}`,
];

describe('validateAptPackage', () => {
  it.each(validApt)('accepts %j', (spec) => {
    expect(validateAptPackage(spec)).toBe(spec);
  });

  it.each(invalidForBoth)('rejects unsafe %j', (spec, reason) => {
    expect(() => validateAptPackage(spec)).toThrow(InvalidPackageNameError);
    expect(() => validateAptPackage(spec)).toThrow(reason);
  });

  it.each(invalidApt)('rejects non-Debian name %j', (spec) => {
    expect(() => validateAptPackage(spec)).toThrow(InvalidPackageNameError);
  });

  it('names the value and the fix', () => {
    expect(() => validateAptPackage('UPPER')).toThrow(
      /Invalid apt package "UPPER".*; use a Debian package name/,
    );
  });
});

describe('validateNpmPackage', () => {
  it.each(validNpm)('accepts %j', (spec) => {
    expect(validateNpmPackage(spec)).toBe(spec);
  });

  it('accepts a 214-character name', () => {
    const spec = 'a'.repeat(214);

    expect(validateNpmPackage(spec)).toBe(spec);
  });

  it.each(invalidForBoth)('rejects unsafe %j', (spec, reason) => {
    expect(() => validateNpmPackage(spec)).toThrow(InvalidPackageNameError);
    expect(() => validateNpmPackage(spec)).toThrow(reason);
  });

  it.each(invalidNpm)('rejects non-registry spec %j', (spec) => {
    expect(() => validateNpmPackage(spec)).toThrow(InvalidPackageNameError);
  });

  it('names the bad version', () => {
    expect(() => validateNpmPackage('pkg@>=1')).toThrow(/Invalid npm package "pkg@>=1"/);
  });

  it('rejects a tarball name', () => {
    expect(() => validateNpmPackage('pkg.tgz')).toThrow(/tarball/);
  });
});

describe('validatePackages', () => {
  it('accepts valid lists', () => {
    expect(() => validatePackages({ apt: ['curl', 'g++'], npm: ['lodash'] })).not.toThrow();
  });

  it('lists every bad entry', () => {
    let message = '';
    try {
      validatePackages({ apt: ['curl', 'a;b', 'UPPER'], npm: ['lodash', '$(id)'] });
    } catch (error) {
      expect(error).toBeInstanceOf(InvalidPackageNameError);
      message = (error as Error).message;
    }

    expect(message).toContain('3 invalid package entries');
    expect(message).toContain('packages.apt[1]: Invalid apt package "a;b"');
    expect(message).toContain('packages.apt[2]: Invalid apt package "UPPER"');
    expect(message).toContain('packages.npm[1]: Invalid npm package "$(id)"');
    expect(message).not.toContain('packages.apt[0]');
  });
});
