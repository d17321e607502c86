/**
 * One class per cause. Activities turn these into ApplicationFailures whose
 * `type` is the class name, and the `nonRetryable` flag decides whether Temporal
 * retries. Bad input never fixes itself, but an unreachable engine may come back.
 */
export abstract class BerthError extends Error {
  abstract readonly nonRetryable: boolean;

  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = new.target.name;
  }
}

/** container.json is missing a field, has the wrong type, or cannot be parsed. */
export class InvalidContainerConfigError extends BerthError {
  readonly nonRetryable = true;
}

/** An additional or provider mount failed validation against the allowlist. */
export class MountRejectedError extends BerthError {
  readonly nonRetryable = true;
}

/** A package name or version in container.json is not safe to pass to apt or npm. */
export class InvalidPackageNameError extends BerthError {
  readonly nonRetryable = true;
}

/** A session, agent group or other record that the caller named does not exist. */
export class NotFoundError extends BerthError {
  readonly nonRetryable = true;
}

/** The Docker engine could not be reached or a Docker command failed. */
export class ContainerRuntimeError extends BerthError {
  readonly nonRetryable = false;
}

/** An image build failed; the group's previous image stays in place. */
export class ImageBuildError extends BerthError {
  readonly nonRetryable = true;
}

/** OneCLI could not provide credentials and the settings require them. */
export class CredentialsUnavailableError extends BerthError {
  readonly nonRetryable = false;
}

/** The OneCLI gateway rejected a request with a 4xx status, such as an invalid API key, and the settings require credentials. */
export class CredentialsRejectedError extends BerthError {
  readonly nonRetryable = true;
}

/** A timestamp read from a session database or another input is not in a recognised format. */
export class InvalidTimestampError extends BerthError {
  readonly nonRetryable = true;
}
