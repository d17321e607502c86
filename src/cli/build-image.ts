import { createActivities } from '../activities/index.js';
import { planGroupImage } from '../activities/images.js';
import { loadContainerConfig } from '../config/container-config.js';
import { HostDb } from '../db/host-db.js';
import { Deliverer, ConsoleSink } from '../delivery/deliverer.js';
import { DockerCli } from '../docker/runtime.js';
import { NotFoundError } from '../errors.js';
import { createOneCli } from '../onecli/onecli.js';
import { groupPaths, oneCliFilesDir } from '../paths.js';
import { createDefaultRegistry } from '../providers/registry.js';
import type { Settings } from '../settings.js';

/**
 * Builds a group's image in this process, without Temporal, and returns its
 * tag. Prints build progress through `onOutput`.
 */
export async function buildGroupImageNow(
  settings: Settings,
  folder: string,
  onOutput: (line: string) => void,
): Promise<string> {
  const hostDb = new HostDb(settings.hostDbPath);
  try {
    const group = hostDb.getAgentGroupByFolder(folder);
    if (!group)
      throw new NotFoundError(`Agent group "${folder}" not found. Send it a message first to create it.`);
    const { config } = loadContainerConfig(groupPaths(settings, folder).containerJson);
    const docker = new DockerCli(settings.dockerBinary);
    const deps = {
      settings,
      hostDb,
      docker: new ProgressDocker(settings.dockerBinary, onOutput),
      oneCli: createOneCli(settings.onecli, { filesDir: oneCliFilesDir(settings) }),
      providers: createDefaultRegistry(),
      signals: { activity: async () => undefined, observation: async () => undefined },
      deliverer: new Deliverer(new ConsoleSink()),
    };
    const plan = await planGroupImage(
      { ...deps, docker },
      group.id,
      folder,
      settings.defaultImage,
      config.packages?.apt ?? [],
      config.packages?.npm ?? [],
    );
    if (plan.apt.length === 0 && plan.npm.length === 0) {
      throw new NotFoundError(
        `Group "${folder}" lists no packages in container.json, so it runs ${settings.defaultImage}.`,
      );
    }
    return await createActivities(deps).buildGroupImage({ agentGroupId: group.id, tag: plan.tag });
  } finally {
    hostDb.close();
  }
}

/** A Docker client that also prints build output as it arrives. */
class ProgressDocker extends DockerCli {
  constructor(
    binary: string,
    private readonly onOutput: (line: string) => void,
  ) {
    super(binary);
  }

  override build(
    options: Parameters<DockerCli['build']>[0],
    onOutput: (chunk: string) => void,
  ): Promise<void> {
    return super.build(options, (chunk) => {
      this.onOutput(chunk);
      onOutput(chunk);
    });
  }
}
