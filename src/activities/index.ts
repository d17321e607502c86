import { createControlActivities } from './control.js';
import type { ActivityDeps } from './deps.js';
import { createImageActivities } from './images.js';
import { createPrepareActivities } from './prepare.js';
import { createSpawnActivities } from './spawn.js';
import { createSuperviseActivities } from './supervise.js';

/** Builds every activity of the session and image workflows around the given host dependencies. */
export function createActivities(deps: ActivityDeps) {
  return {
    ...createPrepareActivities(deps),
    ...createImageActivities(deps),
    ...createSpawnActivities(deps),
    ...createSuperviseActivities(deps),
    ...createControlActivities(deps),
  };
}

export type { ActivityDeps } from './deps.js';
