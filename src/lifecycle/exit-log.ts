import fs from 'node:fs';
import path from 'node:path';

import { logger } from '../logger.js';
import { formatTimestamp } from './timestamps.js';

export type ExitKind = 'clean' | 'sigterm' | 'killed' | 'oom' | 'error';

export type StopReason =
  'idle' | 'lifetime' | 'stuck' | 'stop-request' | 'crash' | 'warm-idle-expired' | 'exited';

/** Everything written to one exit log. Times are epoch milliseconds. It carries no environment values. */
export interface ExitRecord {
  sessionId: string;
  agentGroupId: string;
  containerName: string;
  image: string;
  startedAt: number;
  endedAt: number;
  exitCode: number | null;
  oomKilled: boolean;
  stopReason: StopReason;
  /** The container's bind mounts, or null when they could not be determined (a note gives the reason). */
  mounts: Array<{ source: string; target: string; readonly: boolean }> | null;
  /** Facts about how the record was gathered that a reader needs, such as output that was lost. */
  notes?: string[];
  stdoutTail: string;
  stderrTail: string;
  /** Whole stdout, or undefined when it was over the size cap and not kept. */
  stdoutFull?: string;
  /** Whole stderr, or undefined when it was over the size cap and not kept. */
  stderrFull?: string;
  /** Steps of a graceful stop, with `atMs` in epoch milliseconds. */
  stopSteps?: Array<{ step: string; atMs: number; outcome: string }>;
}

export interface ExitLogOptions {
  /** Values replaced by `[redacted]`. Values shorter than 4 characters are ignored. */
  secrets: string[];
  /**
   * Message texts replaced by `[redacted]`. A text of up to 64 characters is
   * replaced only where it appears as a whole word, so a short text such as
   * "e" does not mangle every word that contains it. A longer text is replaced
   * wherever it occurs. Each line of at least 8 characters of a multi-line
   * text is also replaced on its own, for a tail that starts inside the text.
   * Empty texts are ignored.
   */
  messageTexts: string[];
  /** Writes the full output even after a clean exit. */
  debug: boolean;
}

const REDACTED = '[redacted]';
const MIN_SECRET_LENGTH = 4;
/** Maximum length of a message text that is matched only as a whole word. Longer texts are matched anywhere. */
const MAX_WHOLE_WORD_LENGTH = 64;
/** Minimum length of a line of a multi-line message that is redacted on its own. */
const MIN_MESSAGE_LINE_LENGTH = 8;
/** Maximum length of a tail section in the file, in UTF-16 code units. */
const MAX_TAIL_LENGTH = 64 * 1024;
const LOG_FILE_PATTERN = /^container-.*\.log$/;
/** Bytes read from the start of an exit log to find its header lines. */
const HEADER_READ_BYTES = 8 * 1024;

/**
 * Classifies a container's exit from its code and Docker's `OOMKilled` flag.
 * A null code means the exit code could not be read.
 */
export function classifyExit(
  exitCode: number | null,
  oomKilled: boolean,
): { kind: ExitKind; meaning: string } {
  const oomNote = oomKilled ? ', and Docker reports that a process in it was killed for lack of memory' : '';
  if (exitCode === null) {
    return { kind: 'error', meaning: `exit code unknown${oomNote}` };
  }
  if (exitCode === 137 && oomKilled) {
    return { kind: 'oom', meaning: 'killed by the out-of-memory killer (exit code 137)' };
  }
  if (exitCode === 137) {
    return { kind: 'killed', meaning: 'killed by SIGKILL (exit code 137)' };
  }
  if (exitCode === 143) {
    return { kind: 'sigterm', meaning: `stopped by SIGTERM (exit code 143)${oomNote}` };
  }
  if (exitCode === 0) {
    return { kind: 'clean', meaning: `exited cleanly${oomNote}` };
  }
  return { kind: 'error', meaning: `exited with code ${exitCode}${oomNote}` };
}

/**
 * Renders the text of an exit log. Every secret in `options` is replaced by
 * `[redacted]` in every value written, tails included, and every message text
 * in the notes, stop steps and output. Header fields and mounts are names that
 * berth or the operator chose, so message texts are not looked for there. The
 * full stdout and stderr are written only when the exit is not clean or
 * `debug` is set.
 */
export function renderExitLog(record: ExitRecord, options: ExitLogOptions): string {
  const redact = makeRedactor(options);
  const redactSecrets = makeRedactor({ ...options, messageTexts: [] });
  const { kind, meaning } = classifyExit(record.exitCode, record.oomKilled);

  const sections = [
    renderHeader(record, meaning, redactSecrets),
    renderNotes(record, redact),
    renderMounts(record, redactSecrets),
    renderStopSteps(record, redact),
    // Redact before cutting, so a message or secret that the cut would split is still recognised.
    renderOutput('stderr', 'tail', tail(redact(record.stderrTail)), keepText),
    renderOutput('stdout', 'tail', tail(redact(record.stdoutTail)), keepText),
  ];
  if (kind !== 'clean' || options.debug) {
    sections.push(renderOutput('stderr', 'full', record.stderrFull, redact));
    sections.push(renderOutput('stdout', 'full', record.stdoutFull, redact));
  }
  return `${sections.filter((section) => section !== '').join('\n\n')}\n`;
}

/**
 * Writes an exit log to `groupLogsDir/container-<ended time>.log`, creating the
 * directory, then deletes all but the newest `keep` `container-*.log` files
 * there (newest by the time in the name). Returns the path written.
 *
 * A retry with the same record finds its own file and writes no second one.
 * When another record already took the name, the container name is appended.
 * A file that cannot be deleted is logged and left in place.
 *
 * @throws RangeError when `keep` is not a positive integer, and the file system
 *   error when the directory or file cannot be written.
 */
export function writeExitLog(
  groupLogsDir: string,
  record: ExitRecord,
  options: ExitLogOptions & { keep: number },
): string {
  if (!Number.isInteger(options.keep) || options.keep < 1) {
    throw new RangeError(`Invalid exit log count to keep: ${options.keep}. Use an integer of 1 or more.`);
  }

  const text = renderExitLog(record, options);
  fs.mkdirSync(groupLogsDir, { recursive: true });
  const filePath = writeUnique(groupLogsDir, record, text);
  logger.info(
    {
      sessionId: record.sessionId,
      agentGroupId: record.agentGroupId,
      containerName: record.containerName,
      filePath,
    },
    'exit log written',
  );

  pruneExitLogs(groupLogsDir, options.keep, path.basename(filePath));
  return filePath;
}

/**
 * Returns the path of the newest exit log in `groupLogsDir` whose header names
 * `containerName`, or null when there is none. Lets a retried caller that can
 * no longer read the container's output find the log it wrote before.
 */
export function findExitLog(groupLogsDir: string, containerName: string): string | null {
  let names: string[];
  try {
    names = fs.readdirSync(groupLogsDir);
  } catch (error) {
    if (isErrorCode(error, 'ENOENT')) {
      return null;
    }
    throw error;
  }

  const headerLine = `${'container:'.padEnd(13)}${containerName}\n`;
  const matches = names
    .filter((name) => LOG_FILE_PATTERN.test(name))
    .sort()
    .reverse()
    .map((name) => path.join(groupLogsDir, name))
    .filter((filePath) => readHead(filePath).includes(headerLine));
  return matches[0] ?? null;
}

/** Reads the first HEADER_READ_BYTES of a file, which cover an exit log's header. */
function readHead(filePath: string): string {
  const buffer = Buffer.alloc(HEADER_READ_BYTES);
  const fd = fs.openSync(filePath, 'r');
  try {
    const bytesRead = fs.readSync(fd, buffer, 0, HEADER_READ_BYTES, 0);
    return buffer.subarray(0, bytesRead).toString('utf8');
  } finally {
    fs.closeSync(fd);
  }
}

/** Bytes of an output stream: the last `maxBytes`, and the whole text while it stays under a larger cap. */
export class TailBuffer {
  private tailChunks: Buffer[] = [];
  private tailBytes = 0;
  private fullChunks: Buffer[] | null = [];
  private fullBytes = 0;

  /**
   * @param maxBytes size of the tail kept, in bytes.
   * @param maxFullBytes size above which the whole text is no longer kept, in bytes (default 4 MiB).
   */
  constructor(
    private readonly maxBytes: number,
    private readonly maxFullBytes: number = 4 * 1024 * 1024,
  ) {
    if (!Number.isInteger(maxBytes) || maxBytes < 1 || !Number.isInteger(maxFullBytes) || maxFullBytes < 1) {
      throw new RangeError(
        `Invalid TailBuffer sizes ${maxBytes} and ${maxFullBytes}: use positive integers of bytes.`,
      );
    }
  }

  push(chunk: string | Buffer): void {
    const bytes = typeof chunk === 'string' ? Buffer.from(chunk, 'utf8') : chunk;
    if (bytes.length === 0) {
      return;
    }
    this.appendFull(bytes);
    this.appendTail(bytes);
  }

  /** Returns the tail as text, starting at a whole UTF-8 character. */
  toString(): string {
    const bytes = Buffer.concat(this.tailChunks, this.tailBytes);
    const start = bytes.length > this.maxBytes ? bytes.length - this.maxBytes : 0;
    return bytes.subarray(skipContinuationBytes(bytes, start)).toString('utf8');
  }

  /** Returns the whole text, or null when it grew over the cap. */
  full(): string | null {
    if (this.fullChunks === null) {
      return null;
    }
    return Buffer.concat(this.fullChunks, this.fullBytes).toString('utf8');
  }

  private appendFull(bytes: Buffer): void {
    if (this.fullChunks === null) {
      return;
    }
    this.fullBytes += bytes.length;
    if (this.fullBytes > this.maxFullBytes) {
      this.fullChunks = null;
      return;
    }
    this.fullChunks.push(Buffer.from(bytes));
  }

  private appendTail(bytes: Buffer): void {
    // Copy so that the tail does not keep a large chunk's whole memory alive.
    const tailPart = bytes.length > this.maxBytes ? bytes.subarray(bytes.length - this.maxBytes) : bytes;
    this.tailChunks.push(Buffer.from(tailPart));
    this.tailBytes += tailPart.length;

    // Drop whole chunks from the front while the rest still covers maxBytes.
    let first = this.tailChunks[0];
    while (first !== undefined && this.tailBytes - first.length >= this.maxBytes) {
      this.tailChunks.shift();
      this.tailBytes -= first.length;
      first = this.tailChunks[0];
    }
  }
}

function renderHeader(record: ExitRecord, meaning: string, redact: (text: string) => string): string {
  const durationSeconds = ((record.endedAt - record.startedAt) / 1000).toFixed(3);
  const rows: Array<[string, string]> = [
    ['session', redact(record.sessionId)],
    ['agent group', redact(record.agentGroupId)],
    ['container', redact(record.containerName)],
    ['image', redact(record.image)],
    ['started', formatTimestamp(record.startedAt)],
    ['ended', formatTimestamp(record.endedAt)],
    ['duration', `${durationSeconds} s`],
    ['exit code', record.exitCode === null ? 'unknown' : String(record.exitCode)],
    ['meaning', meaning],
    ['stop reason', record.stopReason],
  ];
  const lines = rows.map(([label, value]) => `${`${label}:`.padEnd(13)}${value}`);
  return ['=== berth container exit ===', ...lines].join('\n');
}

function renderNotes(record: ExitRecord, redact: (text: string) => string): string {
  const notes = record.notes ?? [];
  if (notes.length === 0) {
    return '';
  }
  return ['=== notes ===', ...notes.map((note) => `  ${redact(note)}`)].join('\n');
}

function renderMounts(record: ExitRecord, redact: (text: string) => string): string {
  if (record.mounts === null) {
    return '=== mounts ===\n  (unknown)';
  }
  const lines = record.mounts.map(
    (mount) => `  ${redact(mount.source)} -> ${redact(mount.target)} (${mount.readonly ? 'ro' : 'rw'})`,
  );
  return ['=== mounts ===', ...(lines.length > 0 ? lines : ['  (none)'])].join('\n');
}

function renderStopSteps(record: ExitRecord, redact: (text: string) => string): string {
  const steps = record.stopSteps ?? [];
  const first = steps[0];
  if (first === undefined) {
    return '';
  }
  const lines = steps.map((step) => {
    const offsetSeconds = ((step.atMs - first.atMs) / 1000).toFixed(3);
    return `  ${formatTimestamp(step.atMs)} (+${offsetSeconds} s) ${redact(step.step)}: ${redact(step.outcome)}`;
  });
  return ['=== stop steps ===', ...lines].join('\n');
}

function renderOutput(
  stream: 'stdout' | 'stderr',
  part: 'tail' | 'full',
  text: string | undefined,
  redact: (text: string) => string,
): string {
  const heading = `=== ${stream} (${part}) ===`;
  if (text === undefined) {
    return `${heading}\n(not kept: the output was larger than the size cap)`;
  }
  if (text === '') {
    return `${heading}\n(empty)`;
  }
  const redacted = redact(text);
  return `${heading}\n${redacted.endsWith('\n') ? redacted.slice(0, -1) : redacted}`;
}

/** Returns the end of a tail, at most MAX_TAIL_LENGTH long, so a caller's oversized tail stays bounded. */
function tail(text: string): string {
  if (text.length <= MAX_TAIL_LENGTH) {
    return text;
  }
  return text.slice(text.length - MAX_TAIL_LENGTH);
}

/**
 * Builds a function that replaces every secret and message text, and also
 * their JSON-escaped forms (an agent often prints a message inside JSON).
 * Secrets are replaced wherever they occur, message texts of up to
 * MAX_WHOLE_WORD_LENGTH characters only as whole words.
 * Longer values are replaced first so that one containing another is removed whole.
 */
function makeRedactor(options: ExitLogOptions): (text: string) => string {
  const secrets = options.secrets.filter((secret) => secret.length >= MIN_SECRET_LENGTH);
  const messages = options.messageTexts.flatMap((message) => [
    message,
    ...message
      .split('\n')
      .map((line) => line.trim())
      .filter((line) => line.length >= MIN_MESSAGE_LINE_LENGTH && line !== message),
  ]);
  const replacers = [
    ...withEscapedForms(secrets).map((needle) => ({ needle, wholeWord: false })),
    ...withEscapedForms(messages).map((needle) => ({ needle, wholeWord: true })),
  ]
    .sort((a, b) => b.needle.length - a.needle.length)
    .map(({ needle, wholeWord }) => replacerFor(needle, wholeWord));

  return (text) => replacers.reduce((result, replace) => replace(result), text);
}

/**
 * Builds the replacement of one value. A long value is replaced wherever it
 * occurs, because a long text inside another word is no accident, and a
 * pattern of its length would be too large for a regular expression.
 */
function replacerFor(needle: string, wholeWord: boolean): (text: string) => string {
  if (!wholeWord || needle.length > MAX_WHOLE_WORD_LENGTH) {
    return (text) => text.split(needle).join(REDACTED);
  }
  const pattern = new RegExp(wholeWordPattern(needle), 'gu');
  return (text) => text.replace(pattern, REDACTED);
}

/** Returns each non-empty value and its JSON-escaped form, without repeats. */
function withEscapedForms(values: string[]): string[] {
  const forms = new Set<string>();
  for (const value of values) {
    forms.add(value);
    forms.add(JSON.stringify(value).slice(1, -1));
  }
  return [...forms].filter((form) => form.length > 0);
}

/** Matches `needle` unless a letter or digit continues it on a side where it starts or ends with one. */
function wholeWordPattern(needle: string): string {
  const wordChar = /[\p{L}\p{N}_]/u;
  const before = wordChar.test(needle[0] ?? '') ? '(?<![\\p{L}\\p{N}_])' : '';
  const after = wordChar.test(needle.at(-1) ?? '') ? '(?![\\p{L}\\p{N}_])' : '';
  return `${before}${escapeRegExp(needle)}${after}`;
}

/** Escapes the characters that have a meaning in a regular expression. */
function escapeRegExp(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

/** Leaves text as it is, for output that was redacted before it was cut. */
function keepText(text: string): string {
  return text;
}

/** Writes `text` under a name no other record uses. Returns the existing path when a retry wrote it already. */
function writeUnique(dir: string, record: ExitRecord, text: string): string {
  const stamp = formatTimestamp(record.endedAt).replace(/[:.]/g, '-');
  const container = record.containerName.replace(/[^A-Za-z0-9_.-]/g, '-');
  const candidates = [`container-${stamp}.log`, `container-${stamp}-${container}.log`];

  for (let attempt = 0; ; attempt++) {
    const name = candidates[attempt] ?? `container-${stamp}-${container}-${attempt - 1}.log`;
    const filePath = path.join(dir, name);
    try {
      fs.writeFileSync(filePath, text, { flag: 'wx', mode: 0o600 });
      return filePath;
    } catch (error) {
      if (!isErrorCode(error, 'EEXIST')) {
        throw error;
      }
    }
    if (fs.readFileSync(filePath, 'utf8') === text) {
      return filePath;
    }
  }
}

/** Deletes all but the newest `keep` exit logs, never the one just written. */
function pruneExitLogs(dir: string, keep: number, justWritten: string): void {
  const names = fs
    .readdirSync(dir)
    .filter((name) => LOG_FILE_PATTERN.test(name))
    .sort()
    .reverse();

  for (const name of names.slice(keep)) {
    if (name === justWritten) {
      continue;
    }
    try {
      fs.unlinkSync(path.join(dir, name));
    } catch (error) {
      if (!isErrorCode(error, 'ENOENT')) {
        logger.warn(
          { err: error, filePath: path.join(dir, name) },
          'exit log retention could not delete file',
        );
      }
    }
  }
}

function isErrorCode(error: unknown, code: string): boolean {
  return error instanceof Error && (error as NodeJS.ErrnoException).code === code;
}

/** Returns the first index at or after `start` that does not fall inside a UTF-8 character. */
function skipContinuationBytes(bytes: Buffer, start: number): number {
  let index = start;
  while (index < bytes.length && index < start + 3 && ((bytes[index] ?? 0) & 0xc0) === 0x80) {
    index++;
  }
  return index;
}
