import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';

import {
  loadMountAllowlist,
  validateMount,
  validateMounts,
  type MountAllowlist,
  type MountRequest,
} from '../src/config/mount-allowlist.js';
import { MountRejectedError } from '../src/errors.js';

/**
 * The tree every test runs on, under a fresh temp folder `<base>`:
 *
 *   home/projects/          root, read-write
 *     site/  site/.env  site/.env.local  site/private/
 *     app/config/credentials/  keys/server.pem  ID_RSA/  with,comma/
 *     frozen/notes/         nested root, read-only
 *     link-inside -> site   link-out -> <base>/outside   link-ssh -> home/.ssh
 *   home/projects-evil/     sibling whose name extends a root's name
 *   home/docs/              root, read-only
 *     notes/  docker.sock  custom-secret/  old.bak/
 *   home/data-link -> <base>/data    root given through a symlink
 *   home/.ssh/id_rsa  home/.config/gcloud/  home/.config/berth/mount-allowlist.json
 *   outside/  data/reports/
 */
let base: string;
let home: string;
let allowlistPath: string;

const allowlist: MountAllowlist = {
  allowedRoots: [
    { path: '~/projects', allowReadWrite: true, description: 'source code' },
    { path: '~/projects/frozen', allowReadWrite: false },
    { path: '~/docs', allowReadWrite: false },
    { path: '~/.config', allowReadWrite: false },
    { path: '~/data-link', allowReadWrite: false },
    { path: '~/missing-root', allowReadWrite: true },
  ],
  blockedPatterns: ['custom-secret', '*.bak', 'site/private'],
};

function buildTree(): void {
  base = fs.realpathSync(fs.mkdtempSync(path.join(os.tmpdir(), 'berth-mounts-')));
  home = path.join(base, 'home');

  const folders = [
    'home/projects/site/private',
    'home/projects/app/config/credentials',
    'home/projects/keys',
    'home/projects/ID_RSA',
    'home/projects/with,comma',
    'home/projects/frozen/notes',
    'home/projects-evil',
    'home/docs/notes',
    'home/docs/custom-secret',
    'home/docs/old.bak',
    'home/.ssh',
    'home/.config/gcloud',
    'home/.config/berth',
    'outside',
    'data/reports',
  ];
  for (const folder of folders) fs.mkdirSync(path.join(base, folder), { recursive: true });

  const files = [
    'home/projects/site/.env',
    'home/projects/site/.env.local',
    'home/projects/keys/server.pem',
    'home/docs/docker.sock',
    'home/.ssh/id_rsa',
  ];
  for (const file of files) fs.writeFileSync(path.join(base, file), 'not a secret\n');

  fs.symlinkSync(path.join(home, 'projects/site'), path.join(home, 'projects/link-inside'));
  fs.symlinkSync(path.join(base, 'outside'), path.join(home, 'projects/link-out'));
  fs.symlinkSync(path.join(home, '.ssh'), path.join(home, 'projects/link-ssh'));
  fs.symlinkSync(path.join(base, 'data'), path.join(home, 'data-link'));

  allowlistPath = path.join(home, '.config/berth/mount-allowlist.json');
  fs.writeFileSync(allowlistPath, JSON.stringify(allowlist));
}

/** Replaces `<base>` with the temp folder of the current test. */
function atBase(value: string): string {
  return value.replaceAll('<base>', base);
}

function validate(request: MountRequest, list: MountAllowlist | null = allowlist) {
  const resolved = { ...request, hostPath: atBase(request.hostPath) };
  return validateMount(resolved, list, { allowlistPath, homeDir: home });
}

beforeEach(buildTree);

afterEach(() => {
  fs.rmSync(base, { recursive: true, force: true });
});

interface AcceptedCase {
  request: MountRequest;
  hostPath: string;
  containerPath: string;
  readonly: boolean;
  downgraded: boolean;
}

const accepted: Array<[string, AcceptedCase]> = [
  [
    'folder under a root',
    {
      request: { hostPath: '~/projects/site' },
      hostPath: '<base>/home/projects/site',
      containerPath: '/workspace/extra/site',
      readonly: true,
      downgraded: false,
    },
  ],
  [
    'read-write under a read-write root',
    {
      request: { hostPath: '~/projects/site', readonly: false },
      hostPath: '<base>/home/projects/site',
      containerPath: '/workspace/extra/site',
      readonly: false,
      downgraded: false,
    },
  ],
  [
    'read-write under a read-only root',
    {
      request: { hostPath: '~/docs/notes', readonly: false },
      hostPath: '<base>/home/docs/notes',
      containerPath: '/workspace/extra/notes',
      readonly: true,
      downgraded: true,
    },
  ],
  [
    'explicit read-only under a read-write root',
    {
      request: { hostPath: '~/projects/site', readonly: true },
      hostPath: '<base>/home/projects/site',
      containerPath: '/workspace/extra/site',
      readonly: true,
      downgraded: false,
    },
  ],
  [
    'read-write under a nested read-only root',
    {
      request: { hostPath: '~/projects/frozen/notes', readonly: false },
      hostPath: '<base>/home/projects/frozen/notes',
      containerPath: '/workspace/extra/notes',
      readonly: true,
      downgraded: true,
    },
  ],
  [
    'root itself',
    {
      request: { hostPath: '~/projects' },
      hostPath: '<base>/home/projects',
      containerPath: '/workspace/extra/projects',
      readonly: true,
      downgraded: false,
    },
  ],
  [
    'absolute host path',
    {
      request: { hostPath: '<base>/home/projects/site' },
      hostPath: '<base>/home/projects/site',
      containerPath: '/workspace/extra/site',
      readonly: true,
      downgraded: false,
    },
  ],
  [
    'nested container path',
    {
      request: { hostPath: '~/projects/site', containerPath: 'web/site' },
      hostPath: '<base>/home/projects/site',
      containerPath: '/workspace/extra/web/site',
      readonly: true,
      downgraded: false,
    },
  ],
  [
    'symlink inside the root',
    {
      request: { hostPath: '~/projects/link-inside' },
      hostPath: '<base>/home/projects/site',
      containerPath: '/workspace/extra/link-inside',
      readonly: true,
      downgraded: false,
    },
  ],
  [
    'root reached through a symlink',
    {
      request: { hostPath: '<base>/data/reports' },
      hostPath: '<base>/data/reports',
      containerPath: '/workspace/extra/reports',
      readonly: true,
      downgraded: false,
    },
  ],
  [
    '".." that stays inside the root',
    {
      request: { hostPath: '~/projects/keys/../site' },
      hostPath: '<base>/home/projects/site',
      containerPath: '/workspace/extra/site',
      readonly: true,
      downgraded: false,
    },
  ],
];

const rejected: Array<[string, MountRequest, string | RegExp]> = [
  ['symlink out of the root', { hostPath: '~/projects/link-out' }, 'is not under any allowed root'],
  ['symlink into .ssh', { hostPath: '~/projects/link-ssh' }, 'matches the blocked pattern ".ssh"'],
  ['.ssh folder', { hostPath: '~/.ssh' }, 'matches the blocked pattern ".ssh"'],
  ['private key file', { hostPath: '~/.ssh/id_rsa' }, 'matches the blocked pattern ".ssh"'],
  ['.env file', { hostPath: '~/projects/site/.env' }, 'matches the blocked pattern ".env"'],
  ['.env.local file', { hostPath: '~/projects/site/.env.local' }, 'matches the blocked pattern ".env.*"'],
  ['credentials folder', { hostPath: '~/projects/app/config/credentials' }, 'blocked pattern "credentials"'],
  ['pem file', { hostPath: '~/projects/keys/server.pem' }, 'matches the blocked pattern "*.pem"'],
  ['key name in upper case', { hostPath: '~/projects/ID_RSA' }, 'matches the blocked pattern "id_rsa"'],
  ['docker socket', { hostPath: '~/docs/docker.sock' }, 'matches the blocked pattern "docker.sock"'],
  ['pattern from the file', { hostPath: '~/docs/custom-secret' }, 'blocked pattern "custom-secret"'],
  ['glob pattern from the file', { hostPath: '~/docs/old.bak' }, 'matches the blocked pattern "*.bak"'],
  ['multi-segment pattern', { hostPath: '~/projects/site/private' }, 'blocked pattern "site/private"'],
  ['gcloud config', { hostPath: '~/.config/gcloud' }, 'matches the blocked pattern ".config/gcloud"'],
  ['allowlist folder', { hostPath: '~/.config/berth' }, "overlaps the mount allowlist's folder"],
  [
    'allowlist file',
    { hostPath: '~/.config/berth/mount-allowlist.json' },
    "overlaps the mount allowlist's folder",
  ],
  ['parent of allowlist folder', { hostPath: '~/.config' }, "overlaps the mount allowlist's folder"],
  ['home folder', { hostPath: '~' }, "overlaps the mount allowlist's folder"],
  ['sibling-prefix folder', { hostPath: '~/projects-evil' }, 'is not under any allowed root'],
  ['".." escaping the root', { hostPath: '~/projects/../../outside' }, 'is not under any allowed root'],
  ['".." over a blocked folder', { hostPath: '~/.ssh/../projects/site' }, 'blocked pattern ".ssh"'],
  ['relative host path', { hostPath: 'projects/site' }, 'the host path is relative'],
  ['other user home', { hostPath: '~other/projects' }, 'the host path is relative'],
  ['empty host path', { hostPath: '' }, 'the host path is empty'],
  ['missing host path', { hostPath: '~/projects/missing' }, 'does not exist'],
  ['comma in host path', { hostPath: '~/projects/with,comma' }, 'contains ",", ":"'],
  [
    'colon in container path',
    { hostPath: '~/projects/site', containerPath: 'a:b' },
    'break the --mount syntax',
  ],
  [
    'comma in container path',
    { hostPath: '~/projects/site', containerPath: 'a,b' },
    'break the --mount syntax',
  ],
  [
    '".." in container path',
    { hostPath: '~/projects/site', containerPath: '../etc' },
    'contains a ".." segment',
  ],
  ['inner ".." in container path', { hostPath: '~/projects/site', containerPath: 'a/../b' }, '".." segment'],
  ['absolute container path', { hostPath: '~/projects/site', containerPath: '/etc' }, 'is absolute'],
  ['empty container path', { hostPath: '~/projects/site', containerPath: '' }, 'is empty'],
  ['"." container path', { hostPath: '~/projects/site', containerPath: '.' }, 'is not normalized'],
  ['"./" container path', { hostPath: '~/projects/site', containerPath: './a' }, 'is not normalized'],
  [
    'double slash container path',
    { hostPath: '~/projects/site', containerPath: 'a//b' },
    'is not normalized',
  ],
  [
    'trailing slash container path',
    { hostPath: '~/projects/site', containerPath: 'a/' },
    'is not normalized',
  ],
  ['newline in container path', { hostPath: '~/projects/site', containerPath: 'a\nb' }, 'control character'],
  ['NUL in container path', { hostPath: '~/projects/site', containerPath: 'a\0b' }, 'control character'],
];

describe('validateMount', () => {
  it.each(accepted)('accepts %s', (_name, testCase) => {
    const mount = validate(testCase.request);

    expect(mount.hostPath).toBe(atBase(testCase.hostPath));
    expect(mount.containerPath).toBe(testCase.containerPath);
    expect(mount.readonly).toBe(testCase.readonly);
    expect(mount.downgraded).toBe(testCase.downgraded);
  });

  it.each(rejected)('rejects %s', (_name, request, reason) => {
    expect(() => validate(request)).toThrow(MountRejectedError);
    expect(() => validate(request)).toThrow(reason);
  });

  it('rejects everything without an allowlist', () => {
    expect(() => validate({ hostPath: '~/projects/site' }, null)).toThrow(
      `no mount allowlist at ${allowlistPath}; create it to allow additional mounts`,
    );
  });

  it('names host path, rule and fix', () => {
    expect(() => validate({ hostPath: '~/projects-evil' })).toThrow(
      /^Mount of host path "~\/projects-evil" rejected: .* is not under any allowed root .*; add a root to /,
    );
  });
});

describe('validateMounts', () => {
  it('returns mounts in request order', () => {
    const mounts = validateMounts(
      [{ hostPath: '~/projects/site' }, { hostPath: '~/docs/notes' }],
      allowlist,
      {
        allowlistPath,
        homeDir: home,
      },
    );

    expect(mounts.map((mount) => mount.containerPath)).toEqual([
      '/workspace/extra/site',
      '/workspace/extra/notes',
    ]);
  });

  it('rejects duplicate container paths', () => {
    const requests = [
      { hostPath: '~/projects/site', containerPath: 'shared' },
      { hostPath: '~/docs/notes', containerPath: 'shared' },
    ];

    expect(() => validateMounts(requests, allowlist, { allowlistPath, homeDir: home })).toThrow(
      /1 of 2 additional mounts rejected:\n.*"~\/docs\/notes".*\/workspace\/extra\/shared is already used/,
    );
  });

  it('rejects same default basename twice', () => {
    const requests = [{ hostPath: '~/docs/notes' }, { hostPath: '~/projects/frozen/notes' }];

    expect(() => validateMounts(requests, allowlist, { allowlistPath, homeDir: home })).toThrow(
      'already used',
    );
  });

  it('lists every rejected mount', () => {
    const requests = [
      { hostPath: '~/.ssh' },
      { hostPath: '~/projects/site' },
      { hostPath: '~/projects-evil' },
    ];
    let message = '';
    try {
      validateMounts(requests, allowlist, { allowlistPath, homeDir: home });
    } catch (error) {
      expect(error).toBeInstanceOf(MountRejectedError);
      message = (error as Error).message;
    }

    expect(message).toContain('2 of 3 additional mounts rejected');
    expect(message).toContain('"~/.ssh"');
    expect(message).toContain('"~/projects-evil"');
    expect(message).not.toContain('"~/projects/site"');
  });

  it('accepts no mounts without an allowlist', () => {
    expect(validateMounts([], null, { allowlistPath, homeDir: home })).toEqual([]);
  });
});

describe('loadMountAllowlist', () => {
  it('returns null for a missing file', () => {
    expect(loadMountAllowlist(path.join(base, 'absent.json'))).toBeNull();
  });

  it('applies defaults', () => {
    const file = path.join(base, 'minimal.json');
    fs.writeFileSync(file, JSON.stringify({ allowedRoots: [{ path: '~/projects' }] }));

    expect(loadMountAllowlist(file)).toEqual({
      allowedRoots: [{ path: '~/projects', allowReadWrite: false }],
      blockedPatterns: [],
    });
  });

  it('reads the test allowlist', () => {
    expect(loadMountAllowlist(allowlistPath)).toEqual(allowlist);
  });

  it('rejects invalid JSON', () => {
    const file = path.join(base, 'broken.json');
    fs.writeFileSync(file, '{"allowedRoots": [');

    expect(() => loadMountAllowlist(file)).toThrow(MountRejectedError);
    expect(() => loadMountAllowlist(file)).toThrow(`Invalid JSON in the mount allowlist ${file}`);
  });

  it('rejects a missing allowedRoots', () => {
    const file = path.join(base, 'no-roots.json');
    fs.writeFileSync(file, JSON.stringify({ blockedPatterns: [] }));

    expect(() => loadMountAllowlist(file)).toThrow(
      new RegExp(`^Invalid mount allowlist ${file}: allowedRoots: `),
    );
  });

  it('rejects a relative root', () => {
    const file = path.join(base, 'relative-root.json');
    fs.writeFileSync(file, JSON.stringify({ allowedRoots: [{ path: 'projects' }] }));

    expect(() => loadMountAllowlist(file)).toThrow(
      'allowedRoots[0].path: must be an absolute path or start with "~/"',
    );
  });
});
