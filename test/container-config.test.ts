import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';

import { loadContainerConfig, writeDefaultContainerConfig } from '../src/config/container-config.js';
import { InvalidContainerConfigError } from '../src/errors.js';

let folder: string;
let configPath: string;

beforeEach(() => {
  folder = fs.mkdtempSync(path.join(os.tmpdir(), 'berth-container-config-'));
  configPath = path.join(folder, 'container.json');
});

afterEach(() => {
  fs.rmSync(folder, { recursive: true, force: true });
});

function writeConfig(content: unknown): void {
  fs.writeFileSync(configPath, typeof content === 'string' ? content : JSON.stringify(content, null, 2));
}

/** Returns the message of the InvalidContainerConfigError that loading the file throws. */
function loadError(): string {
  try {
    loadContainerConfig(configPath);
  } catch (error) {
    expect(error).toBeInstanceOf(InvalidContainerConfigError);
    return (error as Error).message;
  }
  throw new Error(`expected ${configPath} to be rejected`);
}

const fullConfig = {
  imageTag: 'ghcr.io/example/agent:1.2.3',
  provider: 'claude',
  mcpServers: {
    files: { command: 'npx', args: ['-y', 'files-mcp'], env: { LOG_LEVEL: 'info' } },
    search: { type: 'http', url: 'https://mcp.example.com/mcp', headers: { 'X-Team': 'infra' } },
    events: { type: 'sse', url: 'http://127.0.0.1:8080/sse' },
  },
  packages: { apt: ['curl', 'libssl3=3.0.11-1~deb12u2'], npm: ['typescript@^5.4.0', '@scope/pkg@1.2.3'] },
  additionalMounts: [{ hostPath: '~/projects/site', containerPath: 'site', readonly: false }],
  idleTimeoutSeconds: 600,
  maxLifetimeSeconds: 14400,
  stopGraceSeconds: 0,
  resources: { memory: '2g', cpus: 1.5, pidsLimit: 512 },
  warmIdle: { pauseSeconds: 1800 },
  stuck: { heartbeatCeilingSeconds: 300, claimToleranceSeconds: 120, spawnGraceSeconds: 0 },
  messageRetry: { maxAttempts: 5, backoffSeconds: 30 },
};

describe('loadContainerConfig', () => {
  it('parses a full file', () => {
    writeConfig(fullConfig);

    const { config, warnings } = loadContainerConfig(configPath);

    expect(config).toEqual(fullConfig);
    expect(warnings).toEqual([]);
  });

  it('returns defaults for a missing file', () => {
    const { config, warnings } = loadContainerConfig(configPath);

    expect(config).toEqual({ mcpServers: {}, packages: { apt: [], npm: [] }, additionalMounts: [] });
    expect(config.idleTimeoutSeconds).toBeUndefined();
    expect(warnings).toEqual([]);
    expect(fs.existsSync(configPath)).toBe(false);
  });

  it('fills missing package lists', () => {
    writeConfig({ packages: { apt: ['curl'] } });

    expect(loadContainerConfig(configPath).config.packages).toEqual({ apt: ['curl'], npm: [] });
  });

  it('names file, field and fix', () => {
    writeConfig({ idleTimeoutSeconds: 'ten' });

    const message = loadError();

    expect(message).toContain(configPath);
    expect(message).toContain(
      'idleTimeoutSeconds: expected a positive whole number of seconds, got "ten"; ' +
        'set idleTimeoutSeconds to a value such as 600',
    );
  });

  it('names the index of a bad package', () => {
    writeConfig({ packages: { apt: ['curl', 'git', 'pkg;rm'] } });

    expect(loadError()).toContain(
      'packages.apt[2]: Invalid apt package "pkg;rm": contains the shell metacharacter ";"',
    );
  });

  it('reports every violation', () => {
    writeConfig({
      imageTag: '-evil',
      idleTimeoutSeconds: 0,
      stopGraceSeconds: 1.5,
      resources: { memory: 'lots', cpus: -1 },
      packages: { npm: ['file:../x'] },
      additionalMounts: [{ containerPath: 'x' }],
      warmIdle: {},
    });

    const message = loadError();

    expect(message).toContain('(8 problems)');
    expect(message).toContain('imageTag: expected a Docker image reference');
    expect(message).toContain('idleTimeoutSeconds: expected a positive whole number of seconds, got 0');
    expect(message).toContain('stopGraceSeconds: expected a whole number of seconds, 0 or more, got 1.5');
    expect(message).toContain('resources.memory: expected a Docker memory size');
    expect(message).toContain('resources.cpus: expected a positive number of CPUs, got -1');
    expect(message).toContain('packages.npm[0]: Invalid npm package "file:../x"');
    expect(message).toContain('additionalMounts[0].hostPath: missing, expected a non-empty host path');
    expect(message).toContain('warmIdle.pauseSeconds: missing');
  });

  it('explains a bad local server', () => {
    writeConfig({ mcpServers: { files: { command: 42 } } });

    expect(loadError()).toContain('mcpServers.files.command: expected a non-empty command, got 42');
  });

  it('explains a bad remote server', () => {
    writeConfig({ mcpServers: { 'my search': { url: 'ftp://example.com' } } });

    expect(loadError()).toContain(
      'mcpServers["my search"].url: expected an http or https URL, got "ftp://example.com"',
    );
  });

  it('explains a server with neither kind', () => {
    writeConfig({ mcpServers: { files: { args: [] } } });

    expect(loadError()).toContain(
      'mcpServers.files: expected a server definition with "command" for a local server or "url" for a remote one',
    );
  });

  it('rejects a non-object file', () => {
    writeConfig([]);

    expect(loadError()).toContain('top level: expected a JSON object, got []');
  });

  it('warns about unknown fields', () => {
    writeConfig({
      idleTimeoutSecond: 600,
      resources: { memory: '512m', swap: '1g' },
      mcpServers: { files: { command: 'npx', cwd: '/tmp' } },
      additionalMounts: [{ hostPath: '~/a', mode: 'rw' }],
    });

    const { config, warnings } = loadContainerConfig(configPath);

    expect(warnings).toEqual([
      `${configPath}: unknown field idleTimeoutSecond is ignored; remove it or check its spelling`,
      `${configPath}: unknown field resources.swap is ignored; remove it or check its spelling`,
      `${configPath}: unknown field mcpServers.files.cwd is ignored; remove it or check its spelling`,
      `${configPath}: unknown field additionalMounts[0].mode is ignored; remove it or check its spelling`,
    ]);
    expect(config.resources).toEqual({ memory: '512m' });
  });

  it('keeps user-named map keys', () => {
    writeConfig({ mcpServers: { toString: { command: 'npx', env: { constructor: 'x' } } } });

    const { config, warnings } = loadContainerConfig(configPath);

    expect(warnings).toEqual([]);
    expect(Object.keys(config.mcpServers)).toEqual(['toString']);
  });

  it('names the file on bad JSON', () => {
    writeConfig('{"idleTimeoutSeconds": 600,');

    expect(loadError()).toMatch(new RegExp(`^Invalid JSON in ${configPath}: .*; fix the syntax`));
  });

  it('leaves a bad file unchanged', () => {
    const content = '{"idleTimeoutSeconds": 600,';
    writeConfig(content);
    const before = fs.readFileSync(configPath);

    expect(() => loadContainerConfig(configPath)).toThrow(InvalidContainerConfigError);
    expect(writeDefaultContainerConfig(configPath)).toBe(false);
    expect(fs.readFileSync(configPath).equals(before)).toBe(true);
  });

  it('leaves a file with unknown fields unchanged', () => {
    writeConfig({ extra: true });
    const before = fs.readFileSync(configPath);

    loadContainerConfig(configPath);

    expect(fs.readFileSync(configPath).equals(before)).toBe(true);
  });
});

describe('writeDefaultContainerConfig', () => {
  it('writes a default file', () => {
    expect(writeDefaultContainerConfig(configPath)).toBe(true);

    expect(JSON.parse(fs.readFileSync(configPath, 'utf8'))).toEqual({
      mcpServers: {},
      packages: { apt: [], npm: [] },
      additionalMounts: [],
    });
    expect(loadContainerConfig(configPath).warnings).toEqual([]);
  });

  it('does not overwrite a file', () => {
    writeConfig({ idleTimeoutSeconds: 600 });
    const before = fs.readFileSync(configPath);

    expect(writeDefaultContainerConfig(configPath)).toBe(false);
    expect(fs.readFileSync(configPath).equals(before)).toBe(true);
  });

  it('throws for a missing folder', () => {
    expect(() => writeDefaultContainerConfig(path.join(folder, 'absent', 'container.json'))).toThrow(
      /ENOENT/,
    );
  });
});
