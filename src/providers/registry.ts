import { NotFoundError } from '../errors.js';
import { claudeProvider, mockProvider } from './builtin.js';

/** Host-side inputs that a provider reads when it builds its contribution. */
export interface ProviderContext {
  sessionDir: string;
  agentGroup: { id: string; name: string; folder: string };
  groupDir: string;
  hostEnv: Record<string, string | undefined>;
}

/**
 * Env vars and mounts a provider adds to the agent container. The caller sets
 * AGENT_PROVIDER and validates every mount before it reaches Docker.
 */
export interface ProviderContribution {
  env: Record<string, string>;
  mounts: Array<{ source: string; target: string; readonly: boolean }>;
}

/** A model backend for the agent, such as `claude`, `codex` or `opencode`. */
export interface Provider {
  name: string;
  contribute(context: ProviderContext): ProviderContribution;
}

export class ProviderRegistry {
  private readonly providers = new Map<string, Provider>();

  /** Adds a provider. A provider registered under a taken name replaces the earlier one. */
  register(provider: Provider): void {
    this.providers.set(provider.name, provider);
  }

  /** Returns the provider called `name`. Throws NotFoundError, listing the known names, when none is registered. */
  get(name: string): Provider {
    const provider = this.providers.get(name);
    if (provider === undefined) {
      throw new NotFoundError(
        `Provider "${name}" is not registered. Known providers: ${this.names().join(', ')}. ` +
          "Set the session's or agent group's provider to one of these.",
      );
    }
    return provider;
  }

  /** Returns the registered names in alphabetical order. */
  names(): string[] {
    return [...this.providers.keys()].sort();
  }
}

/**
 * Returns the session's own provider, else the agent group's, else
 * `defaultProvider`. A null or blank name counts as unset.
 */
export function resolveProviderName(
  sessionProvider: string | null,
  groupProvider: string | null,
  defaultProvider: string,
): string {
  for (const name of [sessionProvider, groupProvider]) {
    if (name !== null && name.trim() !== '') {
      return name;
    }
  }
  return defaultProvider;
}

/** Creates a registry holding the built-in providers, `claude` and `mock`. */
export function createDefaultRegistry(): ProviderRegistry {
  const registry = new ProviderRegistry();
  registry.register(claudeProvider);
  registry.register(mockProvider);
  return registry;
}
