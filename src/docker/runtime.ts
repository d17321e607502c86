import { spawn } from 'node:child_process';
import { ContainerRuntimeError } from '../errors.js';
import { logger } from '../logger.js';

/** A bind mount passed to `docker run --mount`. */
export interface BindMount {
  source: string;
  target: string;
  readonly: boolean;
}

export interface RunSpec {
  name: string;
  image: string;
  labels: Record<string, string>;
  env: Record<string, string>;
  mounts: BindMount[];
  /** Extra arguments contributed by OneCLI, already in `--mount`/`-e` form. */
  extraArgs?: string[];
  user?: string;
  memory?: string;
  cpus?: number;
  pidsLimit?: number;
}

export type ContainerState = 'created' | 'running' | 'paused' | 'restarting' | 'removing' | 'exited' | 'dead';

export interface ContainerInfo {
  id: string;
  name: string;
  image: string;
  state: ContainerState;
  exitCode: number | null;
  oomKilled: boolean;
  startedAt: string | null;
  finishedAt: string | null;
  labels: Record<string, string>;
  /** The container's bind mounts, as the engine reports them. */
  mounts: BindMount[];
  /** The container's environment. May hold secrets: never log it. */
  env: Record<string, string>;
}

export interface CommandResult {
  stdout: string;
  stderr: string;
  exitCode: number;
}

/**
 * The only module that uses the Docker CLI's flags. Every command runs with
 * an argument array, never through a shell.
 */
export class DockerCli {
  constructor(private readonly binary = 'docker') {}

  /** Runs `docker ARGS`; returns its output whatever the exit code, throws only when docker cannot start. */
  exec(
    args: string[],
    options: { input?: string; onOutput?: (chunk: string) => void } = {},
  ): Promise<CommandResult> {
    return new Promise((resolve, reject) => {
      const stdin = options.input === undefined ? 'ignore' : 'pipe';
      const child = spawn(this.binary, args, { stdio: [stdin, 'pipe', 'pipe'] as const });
      let stdout = '';
      let stderr = '';
      child.stdout!.setEncoding('utf8').on('data', (chunk: string) => {
        stdout += chunk;
        options.onOutput?.(chunk);
      });
      child.stderr!.setEncoding('utf8').on('data', (chunk: string) => {
        stderr += chunk;
        options.onOutput?.(chunk);
      });
      child.on('error', (error) =>
        reject(
          new ContainerRuntimeError(
            `Could not run "${this.binary}": ${error.message}. Is Docker installed?`,
            { cause: error },
          ),
        ),
      );
      child.on('close', (code) => resolve({ stdout, stderr, exitCode: code ?? -1 }));
      if (child.stdin) {
        // A binary that exits without reading its input makes the write fail with EPIPE; its exit code reports the outcome.
        child.stdin.on('error', (error) =>
          logger.debug({ err: error, args: args[0] }, 'docker stdin write failed'),
        );
        child.stdin.end(options.input);
      }
    });
  }

  private async checked(args: string[], what: string): Promise<string> {
    const result = await this.exec(args);
    if (result.exitCode !== 0) {
      throw new ContainerRuntimeError(
        `${what} failed (docker ${args[0]} exited ${result.exitCode}): ${result.stderr.trim()}`,
      );
    }
    return result.stdout;
  }

  /** Checks that the engine responds; throws ContainerRuntimeError when it does not. */
  async ping(): Promise<void> {
    await this.checked(['version', '--format', '{{.Server.Version}}'], 'Reaching the Docker engine');
  }

  /** Builds the full `docker run` argument list; exported for tests and exit logs. */
  static runArgs(spec: RunSpec): string[] {
    const args = ['run', '--detach', '--init', '--name', spec.name];
    for (const [key, value] of Object.entries(spec.labels)) args.push('--label', `${key}=${value}`);
    for (const [key, value] of Object.entries(spec.env)) args.push('--env', `${key}=${value}`);
    for (const mount of spec.mounts) args.push('--mount', mountArg(mount));
    if (spec.user) args.push('--user', spec.user);
    if (spec.memory) args.push('--memory', spec.memory);
    if (spec.cpus) args.push('--cpus', String(spec.cpus));
    if (spec.pidsLimit) args.push('--pids-limit', String(spec.pidsLimit));
    args.push(...(spec.extraArgs ?? []));
    args.push(spec.image);
    return args;
  }

  /** Starts a detached container and returns its id. */
  async run(spec: RunSpec): Promise<string> {
    const log = logger.child({ container: spec.name, image: spec.image });
    log.info('docker run started');
    const result = await this.exec(DockerCli.runArgs(spec));
    if (result.exitCode !== 0) {
      log.error({ stderr: result.stderr.trim() }, 'docker run failed');
      throw new ContainerRuntimeError(`Starting container ${spec.name} failed: ${result.stderr.trim()}`);
    }
    const id = result.stdout.trim();
    log.info({ containerId: id }, 'docker run done');
    return id;
  }

  /** Returns the container's state, or null when no such container exists. */
  async inspect(name: string): Promise<ContainerInfo | null> {
    const result = await this.exec(['container', 'inspect', name]);
    if (result.exitCode !== 0) {
      if (/no such (container|object)/i.test(result.stderr)) return null;
      throw new ContainerRuntimeError(`Inspecting container ${name} failed: ${result.stderr.trim()}`);
    }
    const [raw] = JSON.parse(result.stdout) as RawInspect[];
    if (!raw) return null;
    return {
      id: raw.Id,
      name: raw.Name.replace(/^\//, ''),
      image: raw.Config.Image,
      state: raw.State.Status,
      exitCode: raw.State.Status === 'exited' || raw.State.Status === 'dead' ? raw.State.ExitCode : null,
      oomKilled: raw.State.OOMKilled,
      startedAt: zeroTimeToNull(raw.State.StartedAt),
      finishedAt: zeroTimeToNull(raw.State.FinishedAt),
      labels: raw.Config.Labels ?? {},
      mounts: (raw.Mounts ?? [])
        .filter((mount) => mount.Type === 'bind')
        .map((mount) => ({ source: mount.Source, target: mount.Destination, readonly: !mount.RW })),
      env: Object.fromEntries(
        (raw.Config.Env ?? []).map((entry) => {
          const at = entry.indexOf('=');
          return at < 0 ? [entry, ''] : [entry.slice(0, at), entry.slice(at + 1)];
        }),
      ),
    };
  }

  /** Lists containers, running or not, that carry every given label. */
  async list(labels: Record<string, string>): Promise<ContainerInfo[]> {
    const filters = Object.entries(labels).flatMap(([key, value]) => ['--filter', `label=${key}=${value}`]);
    const output = await this.checked(
      ['container', 'ls', '--all', '--quiet', ...filters],
      'Listing containers',
    );
    const ids = output.split('\n').filter(Boolean);
    const infos = await Promise.all(ids.map((id) => this.inspect(id)));
    return infos.filter((info): info is ContainerInfo => info !== null);
  }

  /** Sends SIGTERM, waits `graceSeconds`, then SIGKILL. A missing container counts as stopped. */
  async stop(name: string, graceSeconds: number): Promise<void> {
    logger.info({ container: name, graceSeconds }, 'docker stop started');
    const result = await this.exec(['container', 'stop', '--time', String(graceSeconds), name]);
    if (result.exitCode !== 0 && !/no such container/i.test(result.stderr)) {
      logger.error({ container: name, stderr: result.stderr.trim() }, 'docker stop failed');
      throw new ContainerRuntimeError(`Stopping container ${name} failed: ${result.stderr.trim()}`);
    }
    logger.info({ container: name }, 'docker stop done');
  }

  /** Removes the container, running or not. A missing container counts as removed. */
  async remove(name: string): Promise<void> {
    const result = await this.exec(['container', 'rm', '--force', name]);
    if (result.exitCode !== 0 && !/no such container/i.test(result.stderr)) {
      logger.error({ container: name, stderr: result.stderr.trim() }, 'docker rm failed');
      throw new ContainerRuntimeError(`Removing container ${name} failed: ${result.stderr.trim()}`);
    }
    logger.info({ container: name }, 'docker rm done');
  }

  async pause(name: string): Promise<void> {
    await this.checked(['container', 'pause', name], `Pausing container ${name}`);
    logger.info({ container: name }, 'docker pause done');
  }

  async unpause(name: string): Promise<void> {
    await this.checked(['container', 'unpause', name], `Unpausing container ${name}`);
    logger.info({ container: name }, 'docker unpause done');
  }

  /** Returns the container's stdout and stderr, the last `tail` lines of each when given. */
  async logs(name: string, tail?: number): Promise<{ stdout: string; stderr: string }> {
    const args = ['container', 'logs', ...(tail ? ['--tail', String(tail)] : []), name];
    const result = await this.exec(args);
    if (result.exitCode !== 0) {
      throw new ContainerRuntimeError(`Reading logs of container ${name} failed: ${result.stderr.trim()}`);
    }
    return { stdout: result.stdout, stderr: result.stderr };
  }

  /**
   * Follows the container's stdout from `since` (RFC 3339) until it exits or
   * `signal` aborts. Resolves when the stream ends.
   */
  followStdout(
    name: string,
    onChunk: (chunk: Buffer) => void,
    options: { since?: string; signal?: AbortSignal },
  ): Promise<void> {
    return new Promise((resolve, reject) => {
      const args = [
        'container',
        'logs',
        '--follow',
        ...(options.since ? ['--since', options.since] : []),
        name,
      ];
      const child = spawn(this.binary, args, { stdio: ['ignore', 'pipe', 'ignore'], signal: options.signal });
      child.stdout.on('data', onChunk);
      child.on('error', (error) => {
        if (error.name === 'AbortError') resolve();
        else
          reject(
            new ContainerRuntimeError(`Following logs of ${name} failed: ${error.message}`, { cause: error }),
          );
      });
      child.on('close', () => resolve());
    });
  }

  /** Returns whether the image exists; throws ContainerRuntimeError when the engine cannot be asked. */
  async imageExists(tag: string): Promise<boolean> {
    return (await this.imageId(tag)) !== null;
  }

  async imageLabel(tag: string, label: string): Promise<string | null> {
    const result = await this.exec([
      'image',
      'inspect',
      '--format',
      `{{ index .Config.Labels "${label}" }}`,
      tag,
    ]);
    if (result.exitCode !== 0) return null;
    const value = result.stdout.trim();
    return value === '' || value === '<no value>' ? null : value;
  }

  /** Returns the image's id, or null when no such image exists; throws when the engine cannot be asked. */
  async imageId(tag: string): Promise<string | null> {
    const result = await this.exec(['image', 'inspect', '--format', '{{.Id}}', tag]);
    if (result.exitCode === 0) return result.stdout.trim();
    if (/no such (image|object)/i.test(result.stderr)) return null;
    throw new ContainerRuntimeError(`Inspecting image ${tag} failed: ${result.stderr.trim()}`);
  }

  /**
   * Runs `docker build`; streams its output to `onOutput` and throws with the output's tail on failure.
   * Passes no `--progress`: the legacy builder, which a client without buildx falls back to, rejects
   * it, and BuildKit prints plain progress anyway when its output is not a terminal. `--force-rm`
   * makes the legacy builder remove the container of a failed step instead of leaving it behind.
   */
  async build(
    options: {
      contextDir: string;
      dockerfile: string;
      tag: string;
      buildArgs: Record<string, string>;
      labels: Record<string, string>;
    },
    onOutput: (chunk: string) => void,
  ): Promise<void> {
    const args = ['build', '--force-rm', '--file', options.dockerfile, '--tag', options.tag];
    for (const [key, value] of Object.entries(options.buildArgs)) args.push('--build-arg', `${key}=${value}`);
    for (const [key, value] of Object.entries(options.labels)) args.push('--label', `${key}=${value}`);
    args.push(options.contextDir);
    const result = await this.exec(args, { onOutput });
    if (result.exitCode !== 0) {
      const tail = (result.stdout + result.stderr).trim().split('\n').slice(-15).join('\n');
      throw new ContainerRuntimeError(`docker build of ${options.tag} failed:\n${tail}`);
    }
  }
}

function mountArg(mount: BindMount): string {
  for (const value of [mount.source, mount.target]) {
    if (/[,\n]/.test(value)) {
      throw new ContainerRuntimeError(
        `Mount path "${value}" contains a comma or newline, which --mount cannot express.`,
      );
    }
  }
  return `type=bind,source=${mount.source},target=${mount.target}${mount.readonly ? ',readonly' : ''}`;
}

function zeroTimeToNull(value: string): string | null {
  return value.startsWith('0001-01-01') ? null : value;
}

interface RawInspect {
  Id: string;
  Name: string;
  Config: { Image: string; Labels: Record<string, string> | null; Env: string[] | null };
  Mounts: Array<{ Type: string; Source: string; Destination: string; RW: boolean }> | null;
  State: {
    Status: ContainerState;
    ExitCode: number;
    OOMKilled: boolean;
    StartedAt: string;
    FinishedAt: string;
  };
}
