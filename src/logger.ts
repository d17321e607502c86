import { pino, type Logger } from 'pino';

/**
 * The process-wide structured logger. Messages are fixed strings and every
 * variable part (session, group, container, workflow) goes in the attributes.
 * Level comes from BERTH_LOG_LEVEL (default `info`); output is JSON on stderr
 * so that CLI output on stdout stays clean.
 */
export const logger: Logger = pino(
  {
    name: 'berth',
    level: process.env.BERTH_LOG_LEVEL ?? 'info',
    redact: { paths: ['*.token', '*.apiKey', '*.secret', '*.password', 'env'], censor: '[redacted]' },
  },
  pino.destination(2),
);

export type { Logger };
