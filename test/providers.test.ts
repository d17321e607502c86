import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { NotFoundError } from '../src/errors.js';
import {
  ProviderRegistry,
  createDefaultRegistry,
  resolveProviderName,
  type ProviderContext,
} from '../src/providers/registry.js';

let tempDir: string;

beforeEach(() => {
  tempDir = fs.mkdtempSync(path.join(os.tmpdir(), 'berth-providers-'));
});

afterEach(() => {
  fs.rmSync(tempDir, { recursive: true, force: true });
});

function context(hostEnv: Record<string, string | undefined> = {}): ProviderContext {
  return {
    sessionDir: path.join(tempDir, 'sessions', 'sess-1'),
    agentGroup: { id: 'ag-1', name: 'Team A', folder: 'team-a' },
    groupDir: path.join(tempDir, 'groups', 'team-a'),
    hostEnv,
  };
}

describe('resolveProviderName', () => {
  it('prefers the session provider', () => {
    expect(resolveProviderName('codex', 'opencode', 'claude')).toBe('codex');
  });

  it('falls back to the group provider', () => {
    expect(resolveProviderName(null, 'opencode', 'claude')).toBe('opencode');
  });

  it('falls back to the default', () => {
    expect(resolveProviderName(null, null, 'claude')).toBe('claude');
  });

  it('treats blank names as unset', () => {
    expect(resolveProviderName('', '  ', 'claude')).toBe('claude');
  });
});

describe('ProviderRegistry', () => {
  it('lists the built-in providers', () => {
    expect(createDefaultRegistry().names()).toEqual(['claude', 'mock']);
  });

  it('rejects an unknown provider with the known names', () => {
    const registry = createDefaultRegistry();

    expect(() => registry.get('codex')).toThrow(NotFoundError);
    expect(() => registry.get('codex')).toThrow(
      'Provider "codex" is not registered. Known providers: claude, mock.',
    );
  });

  it('replaces a provider registered again', () => {
    const registry = new ProviderRegistry();
    registry.register({ name: 'codex', contribute: () => ({ env: { VERSION: '1' }, mounts: [] }) });
    registry.register({ name: 'codex', contribute: () => ({ env: { VERSION: '2' }, mounts: [] }) });

    expect(registry.get('codex').contribute(context()).env).toEqual({ VERSION: '2' });
  });
});

describe('claude provider', () => {
  it('contributes nothing by default', () => {
    const contribution = createDefaultRegistry().get('claude').contribute(context());

    expect(contribution).toEqual({ env: {}, mounts: [] });
  });

  it('mounts the host config dir read-only', () => {
    const configDir = path.join(tempDir, 'claude-config');
    const contribution = createDefaultRegistry()
      .get('claude')
      .contribute(context({ BERTH_CLAUDE_CONFIG_DIR: configDir }));

    expect(contribution.env).toEqual({});
    expect(contribution.mounts).toEqual([
      { source: configDir, target: '/home/node/.claude-host', readonly: true },
    ]);
  });
});

describe('mock provider', () => {
  it('creates and mounts its state folder', () => {
    const ctx = context();
    const stateDir = path.join(ctx.sessionDir, 'mock-state');

    const contribution = createDefaultRegistry().get('mock').contribute(ctx);

    expect(fs.statSync(stateDir).isDirectory()).toBe(true);
    expect(contribution.env).toEqual({ MOCK_PROVIDER: '1' });
    expect(contribution.mounts).toEqual([
      { source: stateDir, target: '/workspace/mock-state', readonly: false },
    ]);
  });

  it('keeps an existing state folder', () => {
    const ctx = context();
    const marker = path.join(ctx.sessionDir, 'mock-state', 'marker');
    fs.mkdirSync(path.dirname(marker), { recursive: true });
    fs.writeFileSync(marker, 'kept');

    createDefaultRegistry().get('mock').contribute(ctx);

    expect(fs.readFileSync(marker, 'utf8')).toBe('kept');
  });
});
