import { randomUUID } from 'node:crypto';
import { DockerCli } from '../../src/docker/runtime.js';
import { buildDerivedImage, removeImage } from './activity-harness.js';

/** The reference agent image that the variants derive from. */
export const AGENT_IMAGE = 'berth-agent:latest';

/**
 * Builds images `FROM berth-agent:latest` that differ only in ENV, so a test
 * gets an agent that misbehaves on purpose (the AGENT_* switches in
 * container/agent/agent.mjs), and removes them again.
 */
export class AgentVariants {
  private readonly tags: string[] = [];

  /** `label` goes into every tag: `berth-test-<label>-<name>:<random>`. */
  constructor(
    private readonly label: string,
    private readonly docker = new DockerCli(),
  ) {}

  /** Builds the variant `name` with the given ENV values and returns its tag. */
  async build(name: string, env: Record<string, string>): Promise<string> {
    const tag = `berth-test-${this.label}-${name}:${randomUUID().slice(0, 8)}`;
    await buildDerivedImage(this.docker, tag, env, AGENT_IMAGE);
    this.tags.push(tag);
    return tag;
  }

  /** Removes every variant built so far. */
  async removeAll(): Promise<void> {
    for (const tag of this.tags.splice(0)) await removeImage(this.docker, tag);
  }
}
