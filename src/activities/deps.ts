import type { HostDb } from '../db/host-db.js';
import type { Deliverer } from '../delivery/deliverer.js';
import type { DockerCli } from '../docker/runtime.js';
import type { OneCli } from '../onecli/onecli.js';
import type { ProviderRegistry } from '../providers/registry.js';
import type { Settings } from '../settings.js';
import type { ActivityNotice } from '../workflows/session.js';
import type { SessionObservation } from './types.js';

/** Sends signals to a session's workflow from host-side code (supervision, delivery). */
export interface SessionSignals {
  activity(sessionId: string, notice: ActivityNotice): Promise<void>;
  observation(sessionId: string, observation: SessionObservation): Promise<void>;
}

/** Everything the session activities reach on the host, passed in so tests can choose real or fake parts. */
export interface ActivityDeps {
  settings: Settings;
  hostDb: HostDb;
  docker: DockerCli;
  oneCli: OneCli;
  providers: ProviderRegistry;
  signals: SessionSignals;
  deliverer: Deliverer;
  /** Starts or joins the image build workflow of a group; resolves with the built tag. */
  buildGroupImage?: (request: { agentGroupId: string; tag: string }) => Promise<string>;
  /** Supervision cadence; tests shorten it. */
  pollIntervalMs?: number;
}
