import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import {
  cacheDir,
  ExecutableNotProvisionedError,
  temporalCliPath,
  testServerPath,
} from '../src/provision/executables.js';

const ENV_NAMES = ['BERTH_CACHE_DIR', 'BERTH_TEMPORAL_CLI', 'BERTH_TEMPORAL_TEST_SERVER'] as const;

let tempDir: string;
let savedEnv: Partial<Record<(typeof ENV_NAMES)[number], string>>;

function makeExecutable(name: string): string {
  const file = path.join(tempDir, name);
  fs.writeFileSync(file, '#!/bin/sh\n', { mode: 0o755 });
  return file;
}

function writeExecutablesJson(content: unknown): void {
  const text = typeof content === 'string' ? content : JSON.stringify(content);
  fs.writeFileSync(path.join(tempDir, 'executables.json'), text);
}

beforeEach(() => {
  tempDir = fs.mkdtempSync(path.join(os.tmpdir(), 'berth-executables-'));
  savedEnv = {};
  for (const name of ENV_NAMES) {
    savedEnv[name] = process.env[name];
    delete process.env[name];
  }
  process.env.BERTH_CACHE_DIR = tempDir;
});

afterEach(() => {
  for (const name of ENV_NAMES) {
    const value = savedEnv[name];
    if (value === undefined) delete process.env[name];
    else process.env[name] = value;
  }
  fs.rmSync(tempDir, { recursive: true, force: true });
});

describe('cacheDir', () => {
  it('uses BERTH_CACHE_DIR', () => {
    expect(cacheDir()).toBe(tempDir);
  });

  it('defaults to ~/.cache/berth', () => {
    delete process.env.BERTH_CACHE_DIR;
    expect(cacheDir()).toBe(path.join(os.homedir(), '.cache', 'berth'));
  });

  it('ignores an empty BERTH_CACHE_DIR', () => {
    process.env.BERTH_CACHE_DIR = '';
    expect(cacheDir()).toBe(path.join(os.homedir(), '.cache', 'berth'));
  });
});

describe('temporalCliPath', () => {
  it('reads executables.json', () => {
    const cli = makeExecutable('temporal');
    writeExecutablesJson({ temporalCli: cli, testServer: null });
    expect(temporalCliPath()).toBe(cli);
  });

  it('prefers BERTH_TEMPORAL_CLI', () => {
    writeExecutablesJson({ temporalCli: makeExecutable('temporal'), testServer: null });
    const override = makeExecutable('my-temporal');
    process.env.BERTH_TEMPORAL_CLI = override;
    expect(temporalCliPath()).toBe(override);
  });

  it('rejects a missing BERTH_TEMPORAL_CLI file', () => {
    process.env.BERTH_TEMPORAL_CLI = path.join(tempDir, 'absent');
    expect(() => temporalCliPath()).toThrow(/BERTH_TEMPORAL_CLI=.*absent/);
  });

  it('rejects a missing executables.json', () => {
    expect(() => temporalCliPath()).toThrow(ExecutableNotProvisionedError);
    expect(() => temporalCliPath()).toThrow(/bash scripts\/provision\.sh/);
  });

  it('rejects invalid JSON', () => {
    writeExecutablesJson('{not json');
    expect(() => temporalCliPath()).toThrow(/Invalid JSON in .*executables\.json/);
  });

  it('rejects a file without temporalCli', () => {
    writeExecutablesJson({ testServer: null });
    expect(() => temporalCliPath()).toThrow(/temporalCli/);
  });

  it('rejects a recorded path that is gone', () => {
    writeExecutablesJson({ temporalCli: path.join(tempDir, 'deleted'), testServer: null });
    expect(() => temporalCliPath()).toThrow(/deleted.*not found.*provision\.sh/);
  });
});

describe('testServerPath', () => {
  it('reads executables.json', () => {
    const server = makeExecutable('temporal-test-server');
    writeExecutablesJson({ temporalCli: makeExecutable('temporal'), testServer: server });
    expect(testServerPath()).toBe(server);
  });

  it('prefers BERTH_TEMPORAL_TEST_SERVER', () => {
    const override = makeExecutable('my-test-server');
    process.env.BERTH_TEMPORAL_TEST_SERVER = override;
    expect(testServerPath()).toBe(override);
  });

  it('rejects a runtime-only provision', () => {
    writeExecutablesJson({ temporalCli: makeExecutable('temporal'), testServer: null });
    expect(() => testServerPath()).toThrow(ExecutableNotProvisionedError);
    expect(() => testServerPath()).toThrow(/without --runtime/);
  });
});
