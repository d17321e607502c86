import { logger } from '../logger.js';
import { markDelivered, type OutboundMessage } from '../session/session-files.js';

/** A reply on its way out of a session, as a delivery sink receives it. */
export interface DeliveredMessage {
  sessionId: string;
  messageId: string;
  inReplyTo: string | null;
  kind: string;
  /** The parsed `content` JSON; the raw string when it is not JSON. */
  content: unknown;
  /** `content.text` when it is a string. */
  text: string | null;
  channelType: string | null;
  platformId: string | null;
  threadId: string | null;
  /** The path that delivered the message first: the outbound.db poll or a streamed stdout block. */
  via: 'outbound' | 'stream';
}

/** The destination of delivered messages: a channel adapter, the console, a test. */
export interface DeliverySink {
  deliver(message: DeliveredMessage): Promise<void> | void;
}

/** Prints each message's text on stdout. */
export class ConsoleSink implements DeliverySink {
  deliver(message: DeliveredMessage): void {
    process.stdout.write(`${message.text ?? JSON.stringify(message.content)}\n`);
  }
}

/** Hands each message to a function; serves the terminal chat and tests. */
export class CallbackSink implements DeliverySink {
  constructor(private readonly callback: (message: DeliveredMessage) => void | Promise<void>) {}

  deliver(message: DeliveredMessage): void | Promise<void> {
    return this.callback(message);
  }
}

/**
 * Delivers each outbound message once, whichever path reads it first. The
 * message is recorded in inbound.db's `delivered` table before the sink gets
 * it: the insert succeeds for one caller only, so two paths never both deliver.
 */
export class Deliverer {
  constructor(private readonly sink: DeliverySink) {}

  /** Returns false when the message had already been delivered. */
  async deliver(
    sessionDir: string,
    sessionId: string,
    message: OutboundMessage,
    via: DeliveredMessage['via'],
  ): Promise<boolean> {
    if (!markDelivered(sessionDir, message.id)) return false;

    const content = parseContent(message.content);
    const text =
      typeof content === 'object' &&
      content !== null &&
      typeof (content as { text?: unknown }).text === 'string'
        ? (content as { text: string }).text
        : null;
    try {
      await this.sink.deliver({
        sessionId,
        messageId: message.id,
        inReplyTo: message.inReplyTo,
        kind: message.kind,
        content,
        text,
        channelType: message.channelType,
        platformId: message.platformId,
        threadId: message.threadId,
        via,
      });
    } catch (error) {
      // The message is recorded as delivered already, so it is not retried: log loudly instead.
      logger.error({ sessionId, messageId: message.id, err: error }, 'delivery sink failed');
    }
    logger.debug({ sessionId, messageId: message.id, via }, 'message delivered');
    return true;
  }
}

function parseContent(raw: string): unknown {
  try {
    return JSON.parse(raw);
  } catch {
    return raw;
  }
}
