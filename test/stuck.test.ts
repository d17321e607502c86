import { afterEach, describe, expect, it } from 'vitest';

import { InvalidTimestampError } from '../src/errors.js';
import {
  decideStuck,
  type ProcessingClaim,
  type StuckObservation,
  type StuckSettings,
} from '../src/lifecycle/stuck.js';
import { formatTimestamp, parseTimestamp } from '../src/lifecycle/timestamps.js';

const START = Date.UTC(2026, 2, 1, 10, 0, 0, 250);
const SETTINGS: StuckSettings = {
  heartbeatCeilingMs: 600_000,
  claimToleranceMs: 300_000,
  spawnGraceMs: 60_000,
};

/** Epoch ms `seconds` after the container start. */
function at(seconds: number): number {
  return START + seconds * 1000;
}

/** Builds a processing claim as SQLite's datetime('now') writes it: UTC, whole seconds, no zone. */
function claim(messageId: string, seconds: number, status = 'processing'): ProcessingClaim {
  const claimedAt = new Date(at(seconds)).toISOString().slice(0, 19).replace('T', ' ');
  return { messageId, claimedAt, status };
}

function observe(overrides: Partial<StuckObservation>): StuckObservation {
  return {
    now: at(120),
    containerStartedAt: START,
    heartbeatMtime: null,
    claims: [],
    declaredToolTimeoutMs: null,
    ...overrides,
  };
}

interface StuckCase {
  name: string;
  obs: Partial<StuckObservation>;
  action: 'ok' | 'stop';
  reason?: 'heartbeat-stale' | 'claim-without-heartbeat';
  messageIds?: string[];
  staleClaims?: string[];
}

const cases: StuckCase[] = [
  {
    name: 'fresh container within spawn grace',
    obs: { now: at(30) },
    action: 'ok',
  },
  {
    name: 'recent heartbeat',
    obs: { now: at(500), heartbeatMtime: at(480) },
    action: 'ok',
  },
  {
    name: 'no heartbeat file, container under the ceiling',
    obs: { now: at(500) },
    action: 'ok',
  },
  {
    name: 'no heartbeat file, container over the ceiling',
    obs: { now: at(700) },
    action: 'stop',
    reason: 'heartbeat-stale',
    messageIds: [],
  },
  {
    name: 'heartbeat older than the ceiling',
    obs: { now: at(1000), heartbeatMtime: at(399) },
    action: 'stop',
    reason: 'heartbeat-stale',
    messageIds: [],
  },
  {
    name: 'heartbeat exactly at the ceiling',
    obs: { now: at(1000), heartbeatMtime: at(400) },
    action: 'ok',
  },
  {
    name: 'heartbeat file left by a previous container',
    obs: { now: at(700), heartbeatMtime: START - 5_000 },
    action: 'stop',
    reason: 'heartbeat-stale',
    messageIds: [],
  },
  {
    name: 'claim over tolerance, heartbeat before it',
    obs: { now: at(450), heartbeatMtime: at(90), claims: [claim('m1', 100)] },
    action: 'stop',
    reason: 'claim-without-heartbeat',
    messageIds: ['m1'],
  },
  {
    name: 'claim over tolerance, no heartbeat file',
    obs: { now: at(450), claims: [claim('m1', 100)] },
    action: 'stop',
    reason: 'claim-without-heartbeat',
    messageIds: ['m1'],
  },
  {
    name: 'claim over tolerance, heartbeat after it',
    obs: { now: at(450), heartbeatMtime: at(120), claims: [claim('m1', 100)] },
    action: 'ok',
  },
  {
    name: 'claim under tolerance',
    obs: { now: at(399), claims: [claim('m1', 100)] },
    action: 'ok',
  },
  {
    name: 'claim from a previous container',
    obs: { now: at(450), heartbeatMtime: at(400), claims: [claim('old', -30)] },
    action: 'ok',
    staleClaims: ['old'],
  },
  {
    name: 'stale claim reported within spawn grace',
    obs: { now: at(10), claims: [claim('old', -3600)] },
    action: 'ok',
    staleClaims: ['old'],
  },
  {
    name: 'claim in the start second is current',
    obs: { now: at(450), claims: [claim('m1', 0)] },
    action: 'stop',
    reason: 'claim-without-heartbeat',
    messageIds: ['m1'],
  },
  {
    name: 'claim no longer processing',
    obs: { now: at(450), claims: [claim('m1', 100, 'completed')] },
    action: 'ok',
  },
  {
    name: 'fresh container, claim, long declared tool timeout',
    obs: { now: at(400), claims: [claim('m1', 70)], declaredToolTimeoutMs: 1_800_000 },
    action: 'ok',
  },
  {
    name: 'long tool run past the plain ceiling',
    obs: {
      now: at(1100),
      heartbeatMtime: at(80),
      claims: [claim('m1', 70)],
      declaredToolTimeoutMs: 1_800_000,
    },
    action: 'ok',
  },
  {
    name: 'claim past the declared tool timeout',
    obs: {
      now: at(1000),
      heartbeatMtime: at(60),
      claims: [claim('m1', 70)],
      declaredToolTimeoutMs: 900_000,
    },
    action: 'stop',
    reason: 'claim-without-heartbeat',
    messageIds: ['m1'],
  },
  {
    name: 'heartbeat past the declared tool timeout',
    obs: {
      now: at(1401),
      heartbeatMtime: at(200),
      claims: [claim('m1', 100)],
      declaredToolTimeoutMs: 900_000,
    },
    action: 'stop',
    reason: 'heartbeat-stale',
    messageIds: ['m1'],
  },
  {
    name: 'short declared tool timeout keeps the ceiling',
    obs: { now: at(1000), heartbeatMtime: at(399), declaredToolTimeoutMs: 60_000 },
    action: 'stop',
    reason: 'heartbeat-stale',
    messageIds: [],
  },
  {
    name: 'stale heartbeat lists current claims only',
    obs: { now: at(700), claims: [claim('old', -10), claim('m1', 650)] },
    action: 'stop',
    reason: 'heartbeat-stale',
    messageIds: ['m1'],
    staleClaims: ['old'],
  },
  {
    name: 'only the stuck claims are listed',
    obs: {
      now: at(450),
      heartbeatMtime: at(90),
      claims: [claim('m1', 100), claim('m2', 120), claim('m3', 300)],
    },
    action: 'stop',
    reason: 'claim-without-heartbeat',
    messageIds: ['m1', 'm2'],
  },
];

describe('decideStuck', () => {
  it.each(cases)('$name', (testCase) => {
    const { decision, staleClaims } = decideStuck(observe(testCase.obs), SETTINGS);

    expect(decision.action).toBe(testCase.action);
    if (decision.action === 'stop') {
      expect(decision.reason).toBe(testCase.reason);
      expect(decision.messageIds).toEqual(testCase.messageIds);
    }
    expect(staleClaims).toEqual(testCase.staleClaims ?? []);
  });

  it('heartbeat detail gives ages in seconds', () => {
    const { decision } = decideStuck(observe({ now: at(1000), heartbeatMtime: at(300) }), SETTINGS);

    expect(decision).toMatchObject({ action: 'stop' });
    const detail = decision.action === 'stop' ? decision.detail : '';
    expect(detail).toContain('700 s ago');
    expect(detail).toContain('600 s ceiling');
  });

  it('claim detail names the message', () => {
    const { decision } = decideStuck(observe({ now: at(450), claims: [claim('m1', 100)] }), SETTINGS);

    const detail = decision.action === 'stop' ? decision.detail : '';
    expect(detail).toContain('m1');
    expect(detail).toContain('350 s ago');
    expect(detail).toContain('300 s tolerance');
  });

  it('unparsable claim is reported, not acted on', () => {
    const claims = [{ messageId: 'bad', claimedAt: 'yesterday', status: 'processing' }];
    const result = decideStuck(observe({ now: at(450), heartbeatMtime: at(440), claims }), SETTINGS);

    expect(result.decision).toEqual({ action: 'ok' });
    expect(result.invalidClaims).toHaveLength(1);
    expect(result.invalidClaims[0]?.messageId).toBe('bad');
  });
});

describe('parseTimestamp', () => {
  const originalTz = process.env.TZ;

  afterEach(() => {
    if (originalTz === undefined) {
      delete process.env.TZ;
    } else {
      process.env.TZ = originalTz;
    }
  });

  it('reads the SQLite form as UTC', () => {
    expect(parseTimestamp('2026-01-02 03:04:05')).toBe(Date.UTC(2026, 0, 2, 3, 4, 5));
  });

  it('reads the ISO form as UTC', () => {
    expect(parseTimestamp('2026-01-02T03:04:05')).toBe(Date.UTC(2026, 0, 2, 3, 4, 5));
  });

  it('ignores TZ east of UTC', () => {
    process.env.TZ = 'Asia/Tokyo';

    expect(new Date(0).getTimezoneOffset()).toBe(-540);
    expect(parseTimestamp('2026-01-02 03:04:05')).toBe(Date.UTC(2026, 0, 2, 3, 4, 5));
    expect(parseTimestamp('2026-07-02T23:59:59')).toBe(Date.UTC(2026, 6, 2, 23, 59, 59));
  });

  it('ignores TZ west of UTC', () => {
    process.env.TZ = 'America/Los_Angeles';

    expect(new Date(0).getTimezoneOffset()).toBe(480);
    expect(parseTimestamp('2026-01-02 03:04:05')).toBe(Date.UTC(2026, 0, 2, 3, 4, 5));
    expect(parseTimestamp('2026-07-02T23:59:59')).toBe(Date.UTC(2026, 6, 2, 23, 59, 59));
  });

  it('applies explicit offsets', () => {
    const utc = Date.UTC(2026, 0, 2, 3, 4, 5);

    expect(parseTimestamp('2026-01-02T03:04:05Z')).toBe(utc);
    expect(parseTimestamp('2026-01-02t03:04:05z')).toBe(utc);
    expect(parseTimestamp('2026-01-02 05:04:05+02:00')).toBe(utc);
    expect(parseTimestamp('2026-01-02 05:04:05+02')).toBe(utc);
    expect(parseTimestamp('2026-01-01T21:34:05-0530')).toBe(utc);
  });

  it('reads fractional seconds', () => {
    expect(parseTimestamp('2026-01-02 03:04:05.5')).toBe(Date.UTC(2026, 0, 2, 3, 4, 5, 500));
    expect(parseTimestamp('2026-01-02T03:04:05.123456Z')).toBe(Date.UTC(2026, 0, 2, 3, 4, 5, 123));
  });

  it('accepts a time without seconds', () => {
    expect(parseTimestamp('2026-01-02 03:04')).toBe(Date.UTC(2026, 0, 2, 3, 4));
  });

  it.each([
    '',
    'yesterday',
    '2026-01-02',
    '1767323045',
    '2026-02-30 00:00:00',
    '2026-13-01 00:00:00',
    '2026-01-02 24:00:00',
    '2026-01-02 03:60:00',
    '2026-01-02 03:04:05+25:00',
    '2026-01-02 03:04:05 PST',
  ])('rejects %j', (value) => {
    expect(() => parseTimestamp(value)).toThrow(InvalidTimestampError);
  });

  it('names the value in the error', () => {
    expect(() => parseTimestamp('yesterday')).toThrow(/"yesterday"/);
  });
});

describe('formatTimestamp', () => {
  it('writes ISO UTC with Z', () => {
    expect(formatTimestamp(Date.UTC(2026, 0, 2, 3, 4, 5, 6))).toBe('2026-01-02T03:04:05.006Z');
  });

  it('round-trips through parseTimestamp', () => {
    const ms = Date.UTC(2026, 5, 30, 23, 59, 59, 999);

    expect(parseTimestamp(formatTimestamp(ms))).toBe(ms);
  });

  it('rejects a non-finite time', () => {
    expect(() => formatTimestamp(Number.NaN)).toThrow(InvalidTimestampError);
  });
});

describe('decideStuck with pending message counts', () => {
  const settings = { heartbeatCeilingMs: 60_000, claimToleranceMs: 30_000, spawnGraceMs: 10_000 };
  const start = Date.parse('2026-03-01T12:00:00Z');

  it('leaves an idle agent with a stale heartbeat running', () => {
    const { decision } = decideStuck(
      {
        now: start + 600_000,
        containerStartedAt: start,
        heartbeatMtime: start + 1_000,
        claims: [],
        declaredToolTimeoutMs: null,
        pendingMessages: 0,
      },
      settings,
    );
    expect(decision.action).toBe('ok');
  });

  it('stops an agent that ignores pending messages', () => {
    const { decision } = decideStuck(
      {
        now: start + 600_000,
        containerStartedAt: start,
        heartbeatMtime: start + 1_000,
        claims: [],
        declaredToolTimeoutMs: null,
        pendingMessages: 2,
      },
      settings,
    );
    expect(decision).toMatchObject({ action: 'stop', reason: 'heartbeat-stale' });
  });
});
