import { execFile } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import type { Client } from '@temporalio/client';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { GROUP_IMAGE_LABEL, planGroupImage } from '../src/activities/images.js';
import { imageBuildWorkflowId } from '../src/client/ids.js';
import { connectClient } from '../src/client/session-client.js';
import { HostDb } from '../src/db/host-db.js';
import { CallbackSink } from '../src/delivery/deliverer.js';
import { DockerCli } from '../src/docker/runtime.js';
import { InvalidPackageNameError } from '../src/errors.js';
import { groupPaths } from '../src/paths.js';
import { createBerthWorker, type BerthWorker } from '../src/worker.js';
import {
  CountingDockerCli,
  activityFailure,
  createActivityHarness,
  removeImage,
  waitFor,
  type ActivityHarness,
  type SessionFixture,
} from './support/activity-harness.js';
import { startTestInstall, type TestInstall } from './support/temporal.js';

/**
 * Per-group image builds against the real Docker engine. `jq` is a small
 * Debian package that apt inside the base image fetches from the Debian
 * mirror. Every build starts from a tag of berth-agent:latest made for this
 * file, so a rebuild of the reference agent meanwhile does not change the
 * hashes. One harness serves the whole file, so that Docker's layer cache
 * keeps later builds of the same package set short.
 */

const execFileAsync = promisify(execFile);
const BASE_IMAGE = `berth-test-base-${randomUUID().slice(0, 8)}:latest`;
const BERTH_BIN = fileURLToPath(new URL('../bin/berth.js', import.meta.url));
const GROUP_TAG = /^berth-group-[a-z0-9_.-]+:[0-9a-f]{16}$/;

const docker = new DockerCli();
let harness: ActivityHarness;

beforeAll(async () => {
  const tagged = await docker.exec(['image', 'tag', 'berth-agent:latest', BASE_IMAGE]);
  if (tagged.exitCode !== 0) throw new Error(`docker image tag failed: ${tagged.stderr.trim()}`);
  harness = await createActivityHarness({ env: { BERTH_DEFAULT_IMAGE: BASE_IMAGE } });
});

afterAll(async () => {
  await harness?.cleanup();
  await removeImage(docker, BASE_IMAGE);
});

afterEach(() => {
  harness.docker.builds.length = 0;
});

/** Creates a session whose group's container.json lists these apt packages. */
function groupWithPackages(folder: string, apt: string[]): SessionFixture {
  const fixture = harness.createSession(folder);
  harness.writeContainerJson(folder, { packages: { apt } });
  return fixture;
}

function ensureImage(fixture: SessionFixture): Promise<{ image: string; warning: string | null }> {
  return harness.run(harness.activities.ensureImage, { sessionId: fixture.session.id });
}

async function imageId(tag: string): Promise<string | null> {
  return harness.docker.imageId(tag);
}

describe('group image builds', () => {
  it('builds a tagged image with the package', async () => {
    const fixture = groupWithPackages('apt-jq', ['jq']);

    const { image, warning } = await ensureImage(fixture);

    expect(image).toMatch(GROUP_TAG);
    expect(image.startsWith('berth-group-apt-jq:')).toBe(true);
    expect(warning).toBeNull();
    expect(harness.docker.builds).toEqual([image]);
    const jq = await docker.exec(['run', '--rm', '--entrypoint', 'jq', image, '--version']);
    expect(jq.exitCode).toBe(0);
    expect(jq.stdout).toMatch(/^jq-/);
    expect(await docker.imageLabel(image, GROUP_IMAGE_LABEL)).toBe(fixture.group.id);
  });

  it('builds one package set once', async () => {
    const fixture = groupWithPackages('same-set', ['jq']);
    const first = await ensureImage(fixture);
    const firstId = await imageId(first.image);

    const second = await ensureImage(fixture);

    expect(second.image).toBe(first.image);
    expect(await imageId(second.image)).toBe(firstId);
    expect(harness.docker.builds).toEqual([first.image]);
  });

  it('tags a changed set anew', async () => {
    const fixture = groupWithPackages('changed-set', ['jq']);
    const first = await ensureImage(fixture);

    harness.writeContainerJson('changed-set', { packages: { apt: ['jq', 'tree'] } });
    const second = await ensureImage(fixture);

    expect(second.image).toMatch(GROUP_TAG);
    expect(second.image).not.toBe(first.image);
    expect(harness.docker.builds).toEqual([first.image, second.image]);
    expect(await imageId(first.image)).not.toBeNull();
  });

  it('rejects a bad package name before building', async () => {
    const fixture = groupWithPackages('bad-name', ['jq;rm -rf /']);

    const failure = await activityFailure(ensureImage(fixture));

    // container.json's schema runs the package validator, so the failure names the file and the field.
    expect(failure.type).toBe('InvalidContainerConfigError');
    expect(failure.nonRetryable).toBe(true);
    expect(failure.message).toContain('packages.apt[0]');
    expect(failure.message).toContain('jq;rm -rf /');
    expect(harness.docker.builds).toEqual([]);
  });

  it('plans no image for a bad package name', async () => {
    const fixture = harness.createSession('bad-plan');

    const planning = planGroupImage(
      harness.deps,
      fixture.group.id,
      'bad-plan',
      BASE_IMAGE,
      ['jq;rm -rf /'],
      [],
    );

    await expect(planning).rejects.toThrow(InvalidPackageNameError);
    expect(harness.docker.builds).toEqual([]);
  });

  it('keeps the previous image when a build fails', async () => {
    const fixture = groupWithPackages('failed-rebuild', ['jq']);
    const previous = await ensureImage(fixture);

    harness.writeContainerJson('failed-rebuild', { packages: { apt: ['jq', 'berth-no-such-package'] } });
    const fallback = await ensureImage(fixture);

    expect(fallback.image).toBe(previous.image);
    expect(fallback.warning).toContain(previous.image);
    expect(fallback.warning).toContain('berth-no-such-package');
    expect(harness.docker.builds).toHaveLength(2);
    expect(await leftoverBuildContainers('berth-no-such-package')).toEqual([]);
  });

  it('does not rebuild a known failure on the next wake', async () => {
    const fixture = groupWithPackages('failed-twice', ['jq']);
    const previous = await ensureImage(fixture);
    harness.writeContainerJson('failed-twice', { packages: { apt: ['jq', 'berth-no-such-package'] } });
    await ensureImage(fixture);
    const buildsAfterFailure = harness.docker.builds.length;

    const again = await ensureImage(fixture);

    expect(again.image).toBe(previous.image);
    expect(again.warning).toContain('berth build-image failed-twice');
    expect(harness.docker.builds).toHaveLength(buildsAfterFailure);
  });

  it('fails clearly with no previous image', async () => {
    const fixture = groupWithPackages('failed-first', ['berth-no-such-package']);

    const failure = await activityFailure(ensureImage(fixture));

    expect(failure.type).toBe('ImageBuildError');
    expect(failure.nonRetryable).toBe(true);
    expect(failure.message).toContain('failed-first');
    expect(failure.message).toContain('berth-no-such-package');
  });
});

/** Lists containers, any state, whose command mentions `text`: what a failed build step leaves behind. */
async function leftoverBuildContainers(text: string): Promise<string[]> {
  const listed = await docker.exec([
    'container',
    'ls',
    '--all',
    '--no-trunc',
    '--format',
    '{{.ID}} {{.Command}}',
  ]);
  return listed.stdout.split('\n').filter((line) => line.includes(text));
}

describe('build workflow and CLI', () => {
  let install: TestInstall;
  let client: Client;
  let worker: BerthWorker;
  let workerRun: Promise<void>;
  let hostDb: HostDb;
  const counting = new CountingDockerCli();

  beforeAll(async () => {
    install = await startTestInstall({ BERTH_DEFAULT_IMAGE: BASE_IMAGE });
    client = await connectClient(install.settings);
    worker = await createBerthWorker({
      settings: install.settings,
      client,
      sink: new CallbackSink(() => undefined),
      delivery: false,
      deps: { docker: counting },
    });
    workerRun = worker.run();
    hostDb = new HostDb(install.settings.hostDbPath);
  });

  afterAll(async () => {
    await worker?.shutdown();
    await workerRun;
    await client?.connection.close();
    for (const group of hostDb?.listAgentGroups() ?? []) {
      const listed = await docker.exec([
        'image',
        'ls',
        '--quiet',
        '--filter',
        `label=${GROUP_IMAGE_LABEL}=${group.id}`,
      ]);
      for (const id of new Set(listed.stdout.split('\n').filter(Boolean))) await removeImage(docker, id);
    }
    hostDb?.close();
    await install?.cleanup();
  });

  /** Creates a group in the install's host database with a container.json that lists `apt`. */
  function createGroup(folder: string, apt: string[]): string {
    const group = hostDb.ensureAgentGroup(folder);
    const { containerJson } = groupPaths(install.settings, folder);
    fs.mkdirSync(path.dirname(containerJson), { recursive: true });
    fs.writeFileSync(containerJson, JSON.stringify({ packages: { apt } }));
    return group.id;
  }

  it('joins concurrent builds of one group', async () => {
    const agentGroupId = createGroup('joined', ['jq']);
    const { tag } = await planGroupImage(worker.deps, agentGroupId, 'joined', BASE_IMAGE, ['jq'], []);
    const build = worker.deps.buildGroupImage!;

    const results = await Promise.all([build({ agentGroupId, tag }), build({ agentGroupId, tag })]);

    expect(results).toEqual([tag, tag]);
    expect(counting.builds).toEqual([tag]);
    const workflowId = imageBuildWorkflowId(agentGroupId, tag);
    const runs = await waitFor('the build workflow in visibility', async () => {
      const listed = [];
      for await (const execution of client.workflow.list({ query: `WorkflowId = '${workflowId}'` })) {
        listed.push(execution);
      }
      return listed.length > 0 ? listed : undefined;
    });
    expect(runs).toHaveLength(1);
    expect(runs[0]?.type).toBe('imageBuildWorkflow');
  });

  it('berth build-image prints progress and the tag', async () => {
    createGroup('from-cli', ['jq']);

    const { stdout, stderr } = await execFileAsync(process.execPath, [BERTH_BIN, 'build-image', 'from-cli'], {
      env: { ...process.env, ...install.env },
      timeout: 600_000,
      maxBuffer: 64 * 1024 * 1024,
    });

    const tag = stdout.trim();
    expect(tag).toMatch(GROUP_TAG);
    expect(tag.startsWith('berth-group-from-cli:')).toBe(true);
    expect(stderr).toContain('apt-get');
    // Each build line is printed once, not repeated as an info log line.
    expect(stderr).not.toMatch(/^\{"level":30,/m);
    expect(await docker.imageExists(tag)).toBe(true);
  });
});
