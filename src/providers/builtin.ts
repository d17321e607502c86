import fs from 'node:fs';
import path from 'node:path';
import type { Provider } from './registry.js';

/**
 * The default provider. It adds nothing unless the host sets
 * BERTH_CLAUDE_CONFIG_DIR, whose directory it mounts read-only at
 * /home/node/.claude-host. The path is passed as given, because the caller's
 * mount validation expands `~` and resolves symlinks.
 */
export const claudeProvider: Provider = {
  name: 'claude',
  contribute({ hostEnv }) {
    const configDir = hostEnv.BERTH_CLAUDE_CONFIG_DIR;
    if (configDir === undefined || configDir === '') {
      return { env: {}, mounts: [] };
    }
    return { env: {}, mounts: [{ source: configDir, target: '/home/node/.claude-host', readonly: true }] };
  },
};

/**
 * A provider for tests. It sets MOCK_PROVIDER=1 and mounts
 * `<sessionDir>/mock-state` read-write at /workspace/mock-state, creating the
 * folder. The folder is already visible through the session's /workspace
 * mount. The explicit mount exists so that tests exercise the contribution path.
 */
export const mockProvider: Provider = {
  name: 'mock',
  contribute({ sessionDir }) {
    const stateDir = path.join(sessionDir, 'mock-state');
    fs.mkdirSync(stateDir, { recursive: true });
    return {
      env: { MOCK_PROVIDER: '1' },
      mounts: [{ source: stateDir, target: '/workspace/mock-state', readonly: false }],
    };
  },
};
