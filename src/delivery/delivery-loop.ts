import fs from 'node:fs';
import type { SessionSignals } from '../activities/deps.js';
import type { HostDb } from '../db/host-db.js';
import { logger } from '../logger.js';
import { sessionDir } from '../paths.js';
import { outboundPath, readUndeliveredMessages, syncProcessingAcks } from '../session/session-files.js';
import type { Settings } from '../settings.js';
import type { Deliverer } from './deliverer.js';

/**
 * Polls the outbound.db of every session whose file changed since the last
 * pass, delivers new messages, mirrors the agent's processing acks into
 * inbound.db, and signals the activity to the session's workflow.
 */
export class DeliveryLoop {
  private readonly seen = new Map<string, number>();
  private timer: NodeJS.Timeout | null = null;
  private running: Promise<void> | null = null;

  constructor(
    private readonly settings: Settings,
    private readonly hostDb: HostDb,
    private readonly deliverer: Deliverer,
    private readonly signals: SessionSignals,
  ) {}

  start(): void {
    const tick = (): void => {
      this.running = this.pass()
        .then(() => undefined)
        .catch((error: unknown) => logger.error({ err: error }, 'delivery pass failed'))
        .finally(() => {
          if (this.timer !== null) this.timer = setTimeout(tick, this.settings.deliveryPollMs);
        });
    };
    this.timer = setTimeout(tick, 0);
  }

  async stop(): Promise<void> {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    await this.running;
  }

  /** Runs one pass over all sessions; returns how many messages it delivered. */
  async pass(): Promise<number> {
    let delivered = 0;
    const groups = new Map(this.hostDb.listAgentGroups().map((group) => [group.id, group]));
    for (const session of this.hostDb.listSessions()) {
      const group = groups.get(session.agentGroupId);
      if (!group) continue;
      const dir = sessionDir(this.settings, group.folder, session.id);
      let mtime: number;
      try {
        mtime = fs.statSync(outboundPath(dir)).mtimeMs;
      } catch {
        continue;
      }
      if (this.seen.get(session.id) === mtime) continue;

      try {
        delivered += await this.deliverSession(dir, session.id);
        this.seen.set(session.id, mtime);
      } catch (error) {
        // Left unmarked so the next pass tries this session again.
        logger.warn({ sessionId: session.id, err: error }, 'delivery of session failed, will retry');
      }
    }
    return delivered;
  }

  private async deliverSession(dir: string, sessionId: string): Promise<number> {
    syncProcessingAcks(dir);
    let count = 0;
    for (const message of readUndeliveredMessages(dir)) {
      if (await this.deliverer.deliver(dir, sessionId, message, 'outbound')) count += 1;
    }
    if (count > 0) {
      await this.signals
        .activity(sessionId, { source: 'delivery', at: Date.now() })
        .catch((error: unknown) => {
          logger.warn({ sessionId, err: error }, 'activity signal after delivery failed');
        });
    }
    return count;
  }
}
