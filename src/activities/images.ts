import { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Context, log } from '@temporalio/activity';
import { loadContainerConfig } from '../config/container-config.js';
import { validatePackages } from '../config/package-names.js';
import { ContainerRuntimeError, ImageBuildError, NotFoundError } from '../errors.js';
import { logger } from '../logger.js';
import { groupPaths } from '../paths.js';
import type { ActivityDeps } from './deps.js';
import { asActivity } from './failures.js';
import { loadSessionContext } from './session-context.js';

export const GROUP_IMAGE_LABEL = 'berth.group-image';

export interface GroupImagePlan {
  agentGroupId: string;
  folder: string;
  baseImage: string;
  apt: string[];
  npm: string[];
  tag: string;
}

export function createImageActivities(deps: ActivityDeps) {
  const { docker, settings } = deps;

  return {
    /**
     * Returns the image the session's container runs: the group's `imageTag`,
     * else a per-group image built from its package lists, else the default
     * image. A package set is built once, and concurrent builds of a group
     * join one build workflow. A failed build falls back to the group's
     * previous image when it has one.
     */
    async ensureImage({
      sessionId,
    }: {
      sessionId: string;
    }): Promise<{ image: string; warning: string | null }> {
      return asActivity(async () => {
        const { config, group } = loadSessionContext(deps, sessionId);
        if (config.imageTag) {
          if (!(await docker.imageExists(config.imageTag))) {
            throw new NotFoundError(
              `Image "${config.imageTag}" (imageTag in the container.json of group ${group.folder}) was not found. Build or pull it, or remove imageTag.`,
            );
          }
          return { image: config.imageTag, warning: null };
        }

        const base = settings.defaultImage;
        if (!(await docker.imageExists(base))) {
          throw new ContainerRuntimeError(
            `Default image "${base}" was not found. Build it with "bash container/build.sh" or set BERTH_DEFAULT_IMAGE.`,
          );
        }
        const apt = config.packages?.apt ?? [];
        const npm = config.packages?.npm ?? [];
        if (apt.length === 0 && npm.length === 0) return { image: base, warning: null };

        const plan = await planGroupImage(deps, group.id, group.folder, base, apt, npm);
        if (await docker.imageExists(plan.tag)) return { image: plan.tag, warning: null };
        if (!deps.buildGroupImage)
          throw new ImageBuildError('No image builder is configured in this worker.');

        const failures = new BuildFailures(groupPaths(settings, group.folder).imageBuildFailures);
        let reason = failures.reasonFor(plan.tag);
        if (reason === null) {
          try {
            return {
              image: await deps.buildGroupImage({ agentGroupId: group.id, tag: plan.tag }),
              warning: null,
            };
          } catch (error) {
            reason = error instanceof Error ? error.message : String(error);
          }
        }
        const previous = await previousGroupImage(deps, group.id);
        const retryHint = `Fix the packages in container.json, or run "berth build-image ${group.folder}" to try again.`;
        if (previous === null) {
          throw new ImageBuildError(`Image build for group ${group.folder} failed: ${reason} ${retryHint}`);
        }
        log.warn('group image build failed, using the previous image', { sessionId, previous, reason });
        return {
          image: previous,
          warning: `Image build failed, running the previous image ${previous}: ${reason} ${retryHint}`,
        };
      });
    },

    /**
     * Builds the group's image from its package lists on top of the default
     * image. Package names are validated before anything runs and reach
     * apt-get and npm as separate arguments of exec-form RUN lines, never
     * through a shell. Does nothing when the tag exists already.
     */
    async buildGroupImage({ agentGroupId, tag }: { agentGroupId: string; tag: string }): Promise<string> {
      return asActivity(async () => {
        const group = deps.hostDb.getAgentGroup(agentGroupId);
        const context = loadSessionContextForGroup(deps, group.folder);
        const apt = context.packages.apt;
        const npm = context.packages.npm;
        const plan = await planGroupImage(deps, group.id, group.folder, settings.defaultImage, apt, npm);
        if (plan.tag !== tag) {
          throw new ImageBuildError(
            `container.json of group ${group.folder} changed during the build; wake the session again.`,
          );
        }
        if (await docker.imageExists(tag)) return tag;
        const failures = new BuildFailures(groupPaths(settings, group.folder).imageBuildFailures);
        try {
          await buildImage(deps, plan);
        } catch (error) {
          failures.record(tag, error instanceof Error ? error.message : String(error));
          throw error;
        }
        failures.clear(tag);
        return tag;
      });
    },
  };
}

/** Validates the package lists and derives the tag from the base image id and the package set. */
export async function planGroupImage(
  deps: ActivityDeps,
  agentGroupId: string,
  folder: string,
  baseImage: string,
  apt: string[],
  npm: string[],
): Promise<GroupImagePlan> {
  validatePackages({ apt, npm });
  const baseId = await deps.docker.imageId(baseImage);
  if (baseId === null) throw new ContainerRuntimeError(`Base image "${baseImage}" was not found.`);
  const hash = createHash('sha256')
    .update(JSON.stringify({ baseId, apt: [...apt].sort(), npm: [...npm].sort() }))
    .digest('hex')
    .slice(0, 16);
  return { agentGroupId, folder, baseImage, apt, npm, tag: `berth-group-${folder.toLowerCase()}:${hash}` };
}

/** Writes a Dockerfile whose RUN lines are JSON arrays, so no package name passes through a shell. */
export function groupDockerfile(plan: GroupImagePlan): string {
  const lines = ['ARG BASE_IMAGE', 'FROM ${BASE_IMAGE}', 'USER root'];
  if (plan.apt.length > 0) {
    lines.push(`RUN ${JSON.stringify(['apt-get', 'update'])}`);
    lines.push(
      `RUN ${JSON.stringify(['apt-get', 'install', '--yes', '--no-install-recommends', '--', ...plan.apt])}`,
    );
  }
  if (plan.npm.length > 0) {
    lines.push(`RUN ${JSON.stringify(['npm', 'install', '--global', '--', ...plan.npm])}`);
  }
  lines.push('USER node');
  return `${lines.join('\n')}\n`;
}

async function buildImage(deps: ActivityDeps, plan: GroupImagePlan): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'berth-image-'));
  const buildLog = logger.child({ agentGroupId: plan.agentGroupId, tag: plan.tag });
  try {
    fs.writeFileSync(path.join(dir, 'Dockerfile'), groupDockerfile(plan));
    buildLog.info('image build started');
    await deps.docker.build(
      {
        contextDir: dir,
        dockerfile: path.join(dir, 'Dockerfile'),
        tag: plan.tag,
        buildArgs: { BASE_IMAGE: plan.baseImage },
        labels: { [GROUP_IMAGE_LABEL]: plan.agentGroupId },
      },
      (chunk) => {
        for (const line of chunk.split('\n')) if (line.trim()) buildLog.info({ line }, 'image build output');
        heartbeatIfActivity();
      },
    );
    buildLog.info('image build done');
  } catch (error) {
    buildLog.error({ err: error }, 'image build failed');
    throw new ImageBuildError(error instanceof Error ? error.message : String(error));
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

function heartbeatIfActivity(): void {
  try {
    Context.current().heartbeat();
  } catch {
    // Outside an activity (the CLI's build-image command) there is nothing to heartbeat.
  }
}

async function previousGroupImage(deps: ActivityDeps, agentGroupId: string): Promise<string | null> {
  const result = await deps.docker.exec([
    'image',
    'ls',
    '--filter',
    `label=${GROUP_IMAGE_LABEL}=${agentGroupId}`,
    '--format',
    '{{.Repository}}:{{.Tag}}',
  ]);
  const first = result.stdout.split('\n').find((line) => line.trim() !== '' && !line.includes('<none>'));
  return first ?? null;
}

function loadSessionContextForGroup(
  deps: ActivityDeps,
  folder: string,
): { packages: { apt: string[]; npm: string[] } } {
  const { config } = loadContainerConfig(groupPaths(deps.settings, folder).containerJson);
  return { packages: { apt: config.packages?.apt ?? [], npm: config.packages?.npm ?? [] } };
}

/**
 * Tags whose build failed, kept in a small JSON file per group. A wake uses
 * the previous image for such a tag instead of running the same failing
 * build again. `berth build-image` and a changed package set build anew.
 */
class BuildFailures {
  constructor(private readonly file: string) {}

  reasonFor(tag: string): string | null {
    return this.read()[tag] ?? null;
  }

  record(tag: string, reason: string): void {
    this.write({ ...this.read(), [tag]: reason });
  }

  clear(tag: string): void {
    const entries = this.read();
    if (!(tag in entries)) return;
    delete entries[tag];
    this.write(entries);
  }

  private read(): Record<string, string> {
    try {
      return JSON.parse(fs.readFileSync(this.file, 'utf8')) as Record<string, string>;
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'ENOENT') return {};
      logger.warn({ file: this.file, err: error }, 'unreadable image build failure record ignored');
      return {};
    }
  }

  private write(entries: Record<string, string>): void {
    fs.mkdirSync(path.dirname(this.file), { recursive: true });
    fs.writeFileSync(this.file, `${JSON.stringify(entries, null, 2)}\n`);
  }
}
