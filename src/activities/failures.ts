import { ApplicationFailure } from '@temporalio/common';
import { BerthError } from '../errors.js';

/**
 * Runs an activity body and turns a BerthError into an ApplicationFailure
 * whose type is the error's class name, non-retryable where retrying cannot help.
 */
export async function asActivity<T>(body: () => Promise<T> | T): Promise<T> {
  try {
    return await body();
  } catch (error) {
    if (error instanceof BerthError) {
      throw ApplicationFailure.create({
        type: error.name,
        message: error.message,
        nonRetryable: error.nonRetryable,
        cause: error,
      });
    }
    throw error;
  }
}
