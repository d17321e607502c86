import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { CredentialsRejectedError, CredentialsUnavailableError } from '../src/errors.js';
import { logger } from '../src/logger.js';
import { createOneCli, type AgentIdentity } from '../src/onecli/onecli.js';
import {
  DEFAULT_CONTAINER_CONFIG,
  FAKE_OAUTH_TOKEN,
  FAKE_PROXY_URL,
  start,
  type FakeGateway,
} from './support/onecli-gateway.js';

const identity: AgentIdentity = { agentGroupId: 'team-a', agentGroupName: 'Team A' };
const baseArgs = ['--name', 'berth-team-a', '-e', 'TZ=UTC'];
const fastRetry = { baseDelayMs: 1 };

let tempDir: string;
let gateway: FakeGateway;
const savedEnv = { TMPDIR: process.env.TMPDIR, ONECLI_URL: process.env.ONECLI_URL };

beforeEach(async () => {
  // The SDK writes the CA certificate under os.tmpdir(), which follows TMPDIR.
  tempDir = fs.mkdtempSync(path.join(os.tmpdir(), 'berth-onecli-'));
  process.env.TMPDIR = tempDir;
  gateway = await start();
});

afterEach(async () => {
  vi.restoreAllMocks();
  await gateway.close();
  restoreEnv('TMPDIR', savedEnv.TMPDIR);
  restoreEnv('ONECLI_URL', savedEnv.ONECLI_URL);
  fs.rmSync(tempDir, { recursive: true, force: true });
});

function restoreEnv(name: string, value: string | undefined): void {
  if (value === undefined) {
    delete process.env[name];
  } else {
    process.env[name] = value;
  }
}

/** Returns the URL of a gateway that has stopped, so every request is refused. */
async function stoppedGatewayUrl(): Promise<string> {
  const stopped = await start();
  await stopped.close();
  return stopped.url;
}

function valuesAfter(args: string[], flag: string): string[] {
  return args.flatMap((arg, index) =>
    arg === flag && index + 1 < args.length ? [args[index + 1] as string] : [],
  );
}

describe('ensureAgent', () => {
  it('sends name and identifier', async () => {
    const onecli = createOneCli({ url: gateway.url, requireCredentials: true });

    const result = await onecli.ensureAgent(identity);

    expect(result).toEqual({ ensured: true });
    expect(gateway.calls).toHaveLength(1);
    expect(gateway.calls[0]).toMatchObject({
      method: 'POST',
      path: '/v1/agents',
      body: { name: 'Team A', identifier: 'team-a' },
    });
  });

  it('accepts an existing agent', async () => {
    const onecli = createOneCli({ url: gateway.url, requireCredentials: true });
    await onecli.ensureAgent(identity);

    const result = await onecli.ensureAgent(identity);

    expect(result).toEqual({ ensured: true });
    expect(gateway.calls).toHaveLength(2);
  });

  it('sends the API key as a bearer token', async () => {
    const onecli = createOneCli({ url: gateway.url, apiKey: 'oc_test_key', requireCredentials: true });

    await onecli.ensureAgent(identity);

    expect(gateway.calls[0]?.authorization).toBe('Bearer oc_test_key');
  });

  it('retries after two failed requests', async () => {
    const onecli = createOneCli({ url: gateway.url, requireCredentials: true }, fastRetry);
    gateway.failNext(2);

    const result = await onecli.ensureAgent(identity);

    expect(result).toEqual({ ensured: true });
    expect(gateway.calls.map((call) => call.path)).toEqual(['/v1/agents', '/v1/agents', '/v1/agents']);
  });

  it('reports not ensured when gateway down', async () => {
    const onecli = createOneCli({ url: await stoppedGatewayUrl(), requireCredentials: false }, fastRetry);

    expect(await onecli.ensureAgent(identity)).toEqual({ ensured: false });
  });

  it('throws if required and gateway down', async () => {
    const onecli = createOneCli({ url: await stoppedGatewayUrl(), requireCredentials: true }, fastRetry);

    await expect(onecli.ensureAgent(identity)).rejects.toThrow(CredentialsUnavailableError);
  });

  it('does not retry a rejected identifier', async () => {
    const onecli = createOneCli({ url: gateway.url, requireCredentials: false }, fastRetry);

    const result = await onecli.ensureAgent({ agentGroupId: 'Not Valid', agentGroupName: 'Team B' });

    expect(result).toEqual({ ensured: false });
    expect(gateway.calls).toHaveLength(1);
  });

  it('rejection is not retryable when required', async () => {
    const onecli = createOneCli({ url: gateway.url, requireCredentials: true }, fastRetry);

    const failure = onecli.ensureAgent({ agentGroupId: 'Not Valid', agentGroupName: 'Team B' });

    await expect(failure).rejects.toThrow(CredentialsRejectedError);
    await expect(failure).rejects.toThrow('"Team B" (Not Valid) with HTTP 400');
    await expect(failure).rejects.toThrow('Check ONECLI_API_KEY');
    await expect(failure).rejects.toMatchObject({ nonRetryable: true });
    expect(gateway.calls).toHaveLength(1);
  });

  it('retries a 429 status', async () => {
    const onecli = createOneCli({ url: gateway.url, requireCredentials: true }, fastRetry);
    gateway.failNext(2, 429);

    expect(await onecli.ensureAgent(identity)).toEqual({ ensured: true });
    expect(gateway.calls).toHaveLength(3);
  });
});

describe('applyContainerConfig', () => {
  it('adds the gateway env vars', async () => {
    const onecli = createOneCli({ url: gateway.url, requireCredentials: true });
    await onecli.ensureAgent(identity);

    const result = await onecli.applyContainerConfig(identity, baseArgs);

    expect(result.applied).toBe(true);
    expect(result.args.slice(0, baseArgs.length)).toEqual(baseArgs);
    const env = valuesAfter(result.args, '-e');
    for (const [name, value] of Object.entries(DEFAULT_CONTAINER_CONFIG.env)) {
      expect(env).toContain(`${name}=${value}`);
    }
    expect(gateway.calls[1]).toMatchObject({ method: 'GET', path: '/v1/container-config?agent=team-a' });
  });

  it('mounts the CA certificate with --mount', async () => {
    const onecli = createOneCli({ url: gateway.url, requireCredentials: true });
    await onecli.ensureAgent(identity);

    const { args } = await onecli.applyContainerConfig(identity, baseArgs);

    const caPath = path.join(tempDir, 'onecli-proxy-ca.pem');
    expect(args).not.toContain('-v');
    expect(valuesAfter(args, '--mount')).toContain(
      `type=bind,source=${caPath},target=/tmp/onecli-proxy-ca.pem,readonly`,
    );
    expect(fs.readFileSync(caPath, 'utf8')).toBe(DEFAULT_CONTAINER_CONFIG.caCertificate);
  });

  it('mounts credential stubs with --mount', async () => {
    await gateway.close();
    gateway = await start({
      ...DEFAULT_CONTAINER_CONFIG,
      credentialStubs: [{ containerPath: '/home/node/.claude/.credentials.json', content: '{"stub":true}' }],
    });
    const onecli = createOneCli({ url: gateway.url, requireCredentials: true });
    await onecli.ensureAgent(identity);

    const { args } = await onecli.applyContainerConfig(identity, baseArgs);

    const stubPath = path.join(tempDir, 'onecli-stubs', 'onecli-stub-.credentials.json');
    expect(valuesAfter(args, '--mount')).toContain(
      `type=bind,source=${stubPath},target=/home/node/.claude/.credentials.json,readonly`,
    );
  });

  it('mounts a copy per group', async () => {
    const filesDir = path.join(tempDir, 'berth-onecli-files');
    const otherGroup: AgentIdentity = { agentGroupId: 'team-b', agentGroupName: 'Team B' };
    const first = createOneCli({ url: gateway.url, requireCredentials: true }, { filesDir });
    await first.ensureAgent(identity);
    const firstMounts = valuesAfter((await first.applyContainerConfig(identity, baseArgs)).args, '--mount');

    // A second gateway with another CA writes the same shared file in os.tmpdir().
    const otherCa = '-----BEGIN CERTIFICATE-----\nb3RoZXIgQ0E=\n-----END CERTIFICATE-----\n';
    const otherGateway = await start({ ...DEFAULT_CONTAINER_CONFIG, caCertificate: otherCa });
    try {
      const second = createOneCli({ url: otherGateway.url, requireCredentials: true }, { filesDir });
      await second.ensureAgent(otherGroup);
      const secondMounts = valuesAfter(
        (await second.applyContainerConfig(otherGroup, baseArgs)).args,
        '--mount',
      );

      const sourceOf = (mounts: string[]): string =>
        /source=([^,]+),target=\/tmp\/onecli-proxy-ca\.pem/.exec(mounts.join(' '))![1]!;
      expect(path.dirname(sourceOf(firstMounts))).toBe(path.join(filesDir, 'team-a'));
      expect(path.dirname(sourceOf(secondMounts))).toBe(path.join(filesDir, 'team-b'));
      expect(fs.readFileSync(sourceOf(firstMounts), 'utf8')).toBe(DEFAULT_CONTAINER_CONFIG.caCertificate);
      expect(fs.readFileSync(sourceOf(secondMounts), 'utf8')).toBe(otherCa);
      expect(fs.readFileSync(path.join(tempDir, 'onecli-proxy-ca.pem'), 'utf8')).toBe(otherCa);
    } finally {
      await otherGateway.close();
    }
  });

  it('keeps the mode of a copied stub', async () => {
    await gateway.close();
    gateway = await start({
      ...DEFAULT_CONTAINER_CONFIG,
      credentialStubs: [{ containerPath: '/home/node/.claude/.credentials.json', content: '{"stub":true}' }],
    });
    const filesDir = path.join(tempDir, 'berth-onecli-files');
    const onecli = createOneCli({ url: gateway.url, requireCredentials: true }, { filesDir });
    await onecli.ensureAgent(identity);

    const { args } = await onecli.applyContainerConfig(identity, baseArgs);

    const stub = valuesAfter(args, '--mount').find((mount) => mount.includes('.credentials.json'))!;
    const source = /source=([^,]+)/.exec(stub)![1]!;
    expect(path.dirname(source)).toBe(path.join(filesDir, 'team-a'));
    expect(fs.statSync(source).mode & 0o777).toBe(0o600);
    expect(fs.readFileSync(source, 'utf8')).toBe('{"stub":true}');
  });

  it('quotes mount fields that contain commas', async () => {
    const commaDir = path.join(tempDir, 'a,b');
    fs.mkdirSync(commaDir);
    process.env.TMPDIR = commaDir;
    const onecli = createOneCli({ url: gateway.url, requireCredentials: true });
    await onecli.ensureAgent(identity);

    const { args } = await onecli.applyContainerConfig(identity, baseArgs);

    const caPath = path.join(commaDir, 'onecli-proxy-ca.pem');
    expect(valuesAfter(args, '--mount')).toContain(
      `type=bind,"source=${caPath}",target=/tmp/onecli-proxy-ca.pem,readonly`,
    );
  });

  it('leaves the input array unchanged', async () => {
    const onecli = createOneCli({ url: gateway.url, requireCredentials: true });
    await onecli.ensureAgent(identity);
    const input = [...baseArgs];

    await onecli.applyContainerConfig(identity, input);

    expect(input).toEqual(baseArgs);
  });

  it('lists token and proxy secrets', async () => {
    const onecli = createOneCli({ url: gateway.url, requireCredentials: true });
    await onecli.ensureAgent(identity);

    const { secretValues } = await onecli.applyContainerConfig(identity, baseArgs);

    expect(secretValues.sort()).toEqual([FAKE_PROXY_URL, FAKE_OAUTH_TOKEN].sort());
  });

  it('retries after two failed requests', async () => {
    const onecli = createOneCli({ url: gateway.url, requireCredentials: true }, fastRetry);
    await onecli.ensureAgent(identity);
    gateway.failNext(2);

    const result = await onecli.applyContainerConfig(identity, baseArgs);

    expect(result.applied).toBe(true);
    expect(gateway.calls).toHaveLength(4);
  });

  it('keeps args when gateway down', async () => {
    const onecli = createOneCli({ url: await stoppedGatewayUrl(), requireCredentials: false }, fastRetry);

    const result = await onecli.applyContainerConfig(identity, baseArgs);

    expect(result).toEqual({ args: baseArgs, applied: false, secretValues: [] });
  });

  it('logs a warning with the group id', async () => {
    const warn = vi.spyOn(logger, 'warn');
    const onecli = createOneCli({ url: await stoppedGatewayUrl(), requireCredentials: false }, fastRetry);

    await onecli.applyContainerConfig(identity, baseArgs);

    expect(warn).toHaveBeenLastCalledWith(
      expect.objectContaining({ agentGroupId: 'team-a' }),
      'OneCLI credentials unavailable; starting the container without them',
    );
  });

  it('throws if required and gateway down', async () => {
    const url = await stoppedGatewayUrl();
    const onecli = createOneCli({ url, requireCredentials: true }, fastRetry);

    const failure = onecli.applyContainerConfig(identity, baseArgs);

    await expect(failure).rejects.toThrow(CredentialsUnavailableError);
    await expect(failure).rejects.toThrow(
      `OneCLI gateway at ${url} provided no credentials for agent group "Team A" (team-a)`,
    );
    await expect(failure).rejects.toThrow('BERTH_ONECLI_REQUIRED=false');
  });

  it('tries four times by default', async () => {
    const onecli = createOneCli({ url: gateway.url, requireCredentials: false }, fastRetry);
    await onecli.ensureAgent(identity);
    gateway.withholdCredentials(true);

    const result = await onecli.applyContainerConfig(identity, baseArgs);

    expect(result.applied).toBe(false);
    expect(gateway.calls.filter((call) => call.path.startsWith('/v1/container-config'))).toHaveLength(4);
  });

  it('throws if required and withheld', async () => {
    const onecli = createOneCli(
      { url: gateway.url, requireCredentials: true },
      { retries: 1, baseDelayMs: 1 },
    );
    await onecli.ensureAgent(identity);
    gateway.withholdCredentials(true);

    await expect(onecli.applyContainerConfig(identity, baseArgs)).rejects.toThrow(
      CredentialsUnavailableError,
    );
  });

  it('unknown agent is rejected when required', async () => {
    const onecli = createOneCli({ url: gateway.url, requireCredentials: true }, fastRetry);

    const failure = onecli.applyContainerConfig(identity, baseArgs);

    await expect(failure).rejects.toThrow(CredentialsRejectedError);
    await expect(failure).rejects.toThrow(/HTTP 404/);
    expect(gateway.calls).toHaveLength(1);
  });

  it('does not retry an unknown agent', async () => {
    const onecli = createOneCli({ url: gateway.url, requireCredentials: false }, fastRetry);

    const result = await onecli.applyContainerConfig(identity, baseArgs);

    expect(result.applied).toBe(false);
    expect(gateway.calls).toHaveLength(1);
  });
});

describe('without a gateway URL', () => {
  it('makes no calls', async () => {
    // The SDK would fall back to ONECLI_URL, but berth must not.
    process.env.ONECLI_URL = gateway.url;
    const onecli = createOneCli({ url: undefined, requireCredentials: false });

    const ensured = await onecli.ensureAgent(identity);
    const applied = await onecli.applyContainerConfig(identity, baseArgs);

    expect(ensured).toEqual({ ensured: false });
    expect(applied).toEqual({ args: baseArgs, applied: false, secretValues: [] });
    expect(gateway.calls).toEqual([]);
  });

  it('throws when credentials are required', async () => {
    const onecli = createOneCli({ url: undefined, requireCredentials: true });

    await expect(onecli.applyContainerConfig(identity, baseArgs)).rejects.toThrow('ONECLI_URL is not set');
    expect(gateway.calls).toEqual([]);
  });
});
