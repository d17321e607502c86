import { describe, expect, it } from 'vitest';
import { formatStatusTable, type SessionSummary } from '../src/cli/commands.js';

function summary(overrides: Partial<SessionSummary>): SessionSummary {
  return {
    sessionId: 'sess-1',
    group: 'main',
    threadId: null,
    state: 'running',
    containerName: 'berth-main-1-1',
    image: 'berth-agent:latest',
    lastActivity: '2026-12-04T10:00:00.000Z',
    lastActivitySource: 'output',
    nextDeadline: null,
    lastError: null,
    lastExit: null,
    failedMessages: 0,
    retrying: null,
    ...overrides,
  };
}

describe('status table', () => {
  it.each([
    ['idle', 'idle stop at 2026-12-04T10:30:00.000Z'],
    ['pause', 'stop after pause at 2026-12-04T10:30:00.000Z'],
    ['restart-backoff', 'restart backoff ends at 2026-12-04T10:30:00.000Z'],
  ])('names what happens at a %s deadline', (kind, label) => {
    const table = formatStatusTable([
      summary({ state: 'paused', nextDeadline: { kind, at: '2026-12-04T10:30:00.000Z' } }),
    ]);

    expect(table).toContain(label);
  });

  it('shows a dash without a deadline', () => {
    const [, row] = formatStatusTable([summary({})]).split('\n');

    expect(row).toMatch(/\(output\)\s+-\s/);
  });
});
