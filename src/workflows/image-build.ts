import { proxyActivities } from '@temporalio/workflow';
import type { createActivities } from '../activities/index.js';

type Activities = ReturnType<typeof createActivities>;

export interface ImageBuildInput {
  agentGroupId: string;
  tag: string;
  hostTaskQueue: string;
}

/**
 * Builds one group image. Its workflow ID is derived from the group and the
 * tag, and callers start it with the use-existing conflict policy, so
 * concurrent wakes of one group wait on a single build.
 */
export async function imageBuildWorkflow(input: ImageBuildInput): Promise<string> {
  const { buildGroupImage } = proxyActivities<Activities>({
    taskQueue: input.hostTaskQueue,
    startToCloseTimeout: '30m',
    heartbeatTimeout: '5m',
    retry: { maximumAttempts: 2 },
  });
  return buildGroupImage({ agentGroupId: input.agentGroupId, tag: input.tag });
}
