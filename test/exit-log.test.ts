import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { afterEach, beforeEach, describe, expect, it } from 'vitest';

import {
  classifyExit,
  renderExitLog,
  TailBuffer,
  writeExitLog,
  type ExitKind,
  type ExitRecord,
} from '../src/lifecycle/exit-log.js';

const STARTED = Date.UTC(2026, 0, 2, 3, 4, 5, 0);
const ENDED = STARTED + 83_500;

function record(overrides: Partial<ExitRecord> = {}): ExitRecord {
  return {
    sessionId: 'sess-1',
    agentGroupId: 'ag-main',
    containerName: 'berth-sess-1-abc',
    image: 'berth-agent:latest',
    startedAt: STARTED,
    endedAt: ENDED,
    exitCode: 0,
    oomKilled: false,
    stopReason: 'idle',
    mounts: [
      { source: '/data/sessions/sess-1', target: '/workspace', readonly: false },
      { source: '/data/global', target: '/workspace/global', readonly: true },
    ],
    stdoutTail: 'stdout tail line\n',
    stderrTail: 'stderr tail line\n',
    stdoutFull: 'stdout full text\nstdout tail line\n',
    stderrFull: 'stderr full text\nstderr tail line\n',
    ...overrides,
  };
}

const NO_REDACTION = { secrets: [], messageTexts: [], debug: false };

describe('classifyExit', () => {
  it.each<[number | null, boolean, ExitKind]>([
    [0, false, 'clean'],
    [143, false, 'sigterm'],
    [137, false, 'killed'],
    [137, true, 'oom'],
    [1, false, 'error'],
    [null, false, 'error'],
  ])('code %s with oomKilled %s is %s', (exitCode, oomKilled, kind) => {
    expect(classifyExit(exitCode, oomKilled).kind).toBe(kind);
  });

  it('names the code of an error exit', () => {
    expect(classifyExit(2, false).meaning).toBe('exited with code 2');
  });

  it('calls a null code unknown', () => {
    expect(classifyExit(null, false).meaning).toMatch(/unknown/);
  });

  it('names SIGTERM and SIGKILL', () => {
    expect(classifyExit(143, false).meaning).toMatch(/SIGTERM/);
    expect(classifyExit(137, false).meaning).toMatch(/SIGKILL/);
    expect(classifyExit(137, true).meaning).toMatch(/out-of-memory/);
  });
});

describe('renderExitLog', () => {
  it('contains every required field', () => {
    const steps = [
      { step: 'close-request', atMs: ENDED - 12_000, outcome: 'sent' },
      { step: 'sigterm', atMs: ENDED - 2_000, outcome: 'exited' },
    ];
    const text = renderExitLog(
      record({ exitCode: 143, stopReason: 'stuck', stopSteps: steps }),
      NO_REDACTION,
    );

    expect(text).toContain('sess-1');
    expect(text).toContain('ag-main');
    expect(text).toContain('berth-sess-1-abc');
    expect(text).toContain('berth-agent:latest');
    expect(text).toContain('2026-01-02T03:04:05.000Z');
    expect(text).toContain('2026-01-02T03:05:28.500Z');
    expect(text).toContain('83.500 s');
    expect(text).toContain('143');
    expect(text).toContain('stopped by SIGTERM');
    expect(text).toContain('stuck');
    expect(text).toContain('/data/sessions/sess-1 -> /workspace (rw)');
    expect(text).toContain('/data/global -> /workspace/global (ro)');
    expect(text).toContain('(+0.000 s) close-request: sent');
    expect(text).toContain('(+10.000 s) sigterm: exited');
    expect(text).toContain('stderr tail line');
    expect(text).toContain('stdout tail line');
  });

  it('omits stop steps when none were given', () => {
    expect(renderExitLog(record(), NO_REDACTION)).not.toContain('stop steps');
  });

  it('omits full output on a clean exit', () => {
    const text = renderExitLog(record({ exitCode: 0 }), NO_REDACTION);

    expect(text).not.toContain('stdout full text');
    expect(text).not.toContain('stderr full text');
  });

  it('writes full output on a non-zero exit', () => {
    const text = renderExitLog(record({ exitCode: 1 }), NO_REDACTION);

    expect(text).toContain('stdout full text');
    expect(text).toContain('stderr full text');
  });

  it('writes full output in debug mode', () => {
    const text = renderExitLog(record({ exitCode: 0 }), { ...NO_REDACTION, debug: true });

    expect(text).toContain('stdout full text');
    expect(text).toContain('stderr full text');
  });

  it('notes full output that was not kept', () => {
    const text = renderExitLog(record({ exitCode: 1, stdoutFull: undefined }), NO_REDACTION);

    expect(text).toContain('not kept');
  });

  it('redacts secrets everywhere', () => {
    const secret = 'sk-live-12345';
    const text = renderExitLog(
      record({
        exitCode: 1,
        image: `registry/agent:${secret}`,
        mounts: [{ source: `/home/${secret}`, target: '/workspace', readonly: false }],
        stdoutTail: `token=${secret}\n`,
        stderrTail: `auth ${secret} failed\n`,
        stdoutFull: `full ${secret}\n`,
        stderrFull: `full ${secret}\n`,
      }),
      { secrets: [secret], messageTexts: [], debug: false },
    );

    expect(text).not.toContain(secret);
    expect(text.split('[redacted]').length - 1).toBe(6);
  });

  it('redacts message texts in output', () => {
    const message = 'please book my flight to Lisbon';
    const text = renderExitLog(
      record({
        stdoutTail: `received: ${message}\n`,
        stderrTail: `{"text":"line one\\nline two"}\n`,
      }),
      { secrets: [], messageTexts: [message, 'line one\nline two'], debug: false },
    );

    expect(text).not.toContain('Lisbon');
    expect(text).not.toContain('line one');
    expect(text).toContain('received: [redacted]');
  });

  it('short message leaves other words intact', () => {
    const text = renderExitLog(record({ stdoutTail: 'received e from the test\n' }), {
      secrets: [],
      messageTexts: ['e', '1'],
      debug: false,
    });

    expect(text).toContain('session:     sess-1\n');
    expect(text).toContain('image:       berth-agent:latest\n');
    expect(text).toContain('/data/sessions/sess-1 -> /workspace (rw)');
    expect(text).toContain('received [redacted] from the test');
  });

  it('redacts a message longer than the tail', () => {
    const message = `TOPSECRET ${'Z'.repeat(80_000)}`;
    const text = renderExitLog(record({ stdoutTail: `{"text":"echo: ${message}"}\n` }), {
      secrets: [],
      messageTexts: [message],
      debug: false,
    });

    expect(text).not.toContain('ZZZZ');
    expect(text).toContain('{"text":"echo: [redacted]"}');
  });

  it('redacts lines of a message cut by the tail', () => {
    const message = 'first line of the request\nsecond line with the address';
    const text = renderExitLog(record({ stdoutTail: 'second line with the address\n' }), {
      secrets: [],
      messageTexts: [message],
      debug: false,
    });

    expect(text).not.toContain('address');
    expect(text).toContain('=== stdout (tail) ===\n[redacted]');
  });

  it('ignores secrets shorter than four characters', () => {
    const text = renderExitLog(record(), { secrets: ['abc', ''], messageTexts: [''], debug: false });

    expect(text).not.toContain('[redacted]');
    expect(text).toContain('berth-sess-1-abc');
  });

  it('redacts a longer secret whole when it contains a shorter one', () => {
    const text = renderExitLog(record({ stdoutTail: 'key=abcd-efgh\n' }), {
      secrets: ['abcd', 'abcd-efgh'],
      messageTexts: [],
      debug: false,
    });

    expect(text).toContain('key=[redacted]\n');
    expect(text).not.toContain('efgh');
  });
});

describe('writeExitLog', () => {
  let dir: string;

  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'berth-exit-log-'));
  });

  afterEach(() => {
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('creates the logs directory and a sortable file', () => {
    const logsDir = path.join(dir, 'groups', 'main', 'logs');

    const filePath = writeExitLog(logsDir, record(), { ...NO_REDACTION, keep: 5 });

    expect(filePath).toBe(path.join(logsDir, 'container-2026-01-02T03-05-28-500Z.log'));
    expect(fs.readFileSync(filePath, 'utf8')).toBe(renderExitLog(record(), NO_REDACTION));
  });

  it('writes redacted content', () => {
    const filePath = writeExitLog(dir, record({ stderrTail: 'secret-value-9\n' }), {
      secrets: ['secret-value-9'],
      messageTexts: [],
      debug: false,
      keep: 5,
    });

    expect(fs.readFileSync(filePath, 'utf8')).not.toContain('secret-value-9');
  });

  it('returns the same file on a retry', () => {
    const first = writeExitLog(dir, record(), { ...NO_REDACTION, keep: 5 });
    const second = writeExitLog(dir, record(), { ...NO_REDACTION, keep: 5 });

    expect(second).toBe(first);
    expect(fs.readdirSync(dir)).toHaveLength(1);
  });

  it('adds the container name when the time is taken', () => {
    writeExitLog(dir, record(), { ...NO_REDACTION, keep: 5 });

    const other = writeExitLog(dir, record({ containerName: 'berth-sess-2-def' }), {
      ...NO_REDACTION,
      keep: 5,
    });

    expect(path.basename(other)).toBe('container-2026-01-02T03-05-28-500Z-berth-sess-2-def.log');
    expect(fs.readdirSync(dir)).toHaveLength(2);
  });

  it('keeps the newest files', () => {
    fs.writeFileSync(path.join(dir, 'unrelated.txt'), 'keep me');
    for (let minute = 0; minute < 6; minute++) {
      writeExitLog(dir, record({ endedAt: ENDED + minute * 60_000 }), { ...NO_REDACTION, keep: 3 });
    }

    expect(fs.readdirSync(dir).sort()).toEqual([
      'container-2026-01-02T03-08-28-500Z.log',
      'container-2026-01-02T03-09-28-500Z.log',
      'container-2026-01-02T03-10-28-500Z.log',
      'unrelated.txt',
    ]);
  });

  it('keeps the file it just wrote', () => {
    for (let minute = 1; minute <= 3; minute++) {
      writeExitLog(dir, record({ endedAt: ENDED + minute * 60_000 }), { ...NO_REDACTION, keep: 2 });
    }

    const older = writeExitLog(dir, record(), { ...NO_REDACTION, keep: 2 });

    expect(fs.existsSync(older)).toBe(true);
    expect(fs.readdirSync(dir)).toHaveLength(3);
  });

  it('rejects a keep count below one', () => {
    expect(() => writeExitLog(dir, record(), { ...NO_REDACTION, keep: 0 })).toThrow(RangeError);
  });
});

describe('TailBuffer', () => {
  it('keeps the last bytes', () => {
    const buffer = new TailBuffer(10);

    buffer.push('0123456789');
    buffer.push(Buffer.from('abcdef'));

    expect(buffer.toString()).toBe('6789abcdef');
  });

  it('keeps the end of one large chunk', () => {
    const buffer = new TailBuffer(4);

    buffer.push('abcdefgh');

    expect(buffer.toString()).toBe('efgh');
  });

  it('starts the tail at a whole character', () => {
    const buffer = new TailBuffer(5);

    buffer.push('ab€€');

    expect(buffer.toString()).toBe('€');
  });

  it('returns full text under the cap', () => {
    const buffer = new TailBuffer(4, 100);

    buffer.push('hello ');
    buffer.push('world');

    expect(buffer.full()).toBe('hello world');
    expect(buffer.toString()).toBe('orld');
  });

  it('returns null full text over the cap', () => {
    const buffer = new TailBuffer(4, 8);

    buffer.push('hello ');
    buffer.push('world');

    expect(buffer.full()).toBeNull();
    expect(buffer.toString()).toBe('orld');
  });

  it('joins a character split across chunks', () => {
    const bytes = Buffer.from('x€y');
    const buffer = new TailBuffer(16);

    buffer.push(bytes.subarray(0, 2));
    buffer.push(bytes.subarray(2));

    expect(buffer.toString()).toBe('x€y');
    expect(buffer.full()).toBe('x€y');
  });

  it('rejects a size below one byte', () => {
    expect(() => new TailBuffer(0)).toThrow(RangeError);
  });
});
