/** Line an agent prints on stdout before a JSON output block. */
export const OUTPUT_START_MARKER = '---NANOCLAW_OUTPUT_START---';
/** Line an agent prints on stdout after a JSON output block. */
export const OUTPUT_END_MARKER = '---NANOCLAW_OUTPUT_END---';
/** Maximum size of the text between two markers, in UTF-8 bytes. */
export const MAX_OUTPUT_BLOCK_BYTES = 1024 * 1024;

/** Maximum length of text outside blocks held back while waiting for a line end, in UTF-16 code units. */
const MAX_TEXT_LINE_LENGTH = 64 * 1024;
/** Characters kept at the end of the buffer because they may be the start of a split marker. */
const MARKER_OVERLAP = Math.max(OUTPUT_START_MARKER.length, OUTPUT_END_MARKER.length) - 1;
/** Length of the block text passed to onMalformed for an oversized block. */
const OVERSIZE_PREVIEW_LENGTH = 1024;

/** One deliverable message from an output block. */
export interface OutputBlock {
  id: string | null;
  /** `kind` of the block, `chat` when absent. */
  kind: string;
  /** `content`, or `{ text: result }` for a NanoClaw v1 block. */
  content: unknown;
  inReplyTo: string | null;
  /** The parsed JSON value as printed. */
  raw: unknown;
}

export interface OutputMarkerHandlers {
  onBlock(block: OutputBlock): void;
  /** Receives a block that was not delivered because it was invalid, oversized or unterminated. */
  onMalformed(error: Error, text: string): void;
  /** Receives each non-blank line printed outside blocks, without its line ending. */
  onText?(text: string): void;
}

type Mode = 'text' | 'block' | 'discard';

type BlockParse =
  { kind: 'block'; block: OutputBlock } | { kind: 'skip' } | { kind: 'error'; message: string };

/**
 * Streaming parser for output blocks an agent prints on stdout between
 * OUTPUT_START_MARKER and OUTPUT_END_MARKER.
 *
 * Chunks may split markers, JSON and multi-byte UTF-8 characters at any byte.
 * Markers are recognised anywhere in the stream, and whitespace around them is
 * ignored. A start marker inside an open block ends that block as malformed
 * and opens a new one. Invalid input is reported through `onMalformed` and
 * parsing goes on, so `push` and `end` throw only what a handler throws. Do not
 * split a UTF-8 sequence across a byte chunk and a string chunk.
 */
export class OutputMarkerParser {
  private readonly decoder = new TextDecoder('utf-8');
  private mode: Mode = 'text';
  private pending = '';
  /** UTF-8 size of `pending` while in block mode. */
  private pendingBytes = 0;
  /** Position in `pending` before which no marker (and, in text mode, no newline) can start. */
  private scanFrom = 0;
  private ended = false;

  constructor(private readonly handlers: OutputMarkerHandlers) {}

  /** Feeds the next chunk of stdout. Throws only when called after `end()`. */
  push(chunk: string | Uint8Array): void {
    if (this.ended) {
      throw new Error('OutputMarkerParser.push was called after end(): create a new parser for each stream.');
    }
    const text =
      typeof chunk === 'string'
        ? this.decoder.decode() + chunk
        : this.decoder.decode(chunk, { stream: true });
    this.consume(text);
  }

  /**
   * Ends the stream: emits the last line of text and reports a block still
   * open as malformed. Calling it again does nothing.
   */
  end(): void {
    if (this.ended) {
      return;
    }
    this.ended = true;
    this.consume(this.decoder.decode());

    const rest = this.pending;
    const mode = this.mode;
    this.pending = '';
    this.mode = 'text';
    if (mode === 'block') {
      this.handlers.onMalformed(
        new Error('Output block has no end marker: the output ended inside it.'),
        rest,
      );
    } else if (mode === 'text') {
      this.emitText(rest);
    }
  }

  private consume(text: string): void {
    if (text === '') {
      return;
    }
    this.pending += text;
    if (this.mode === 'block') {
      this.pendingBytes += utf8Length(text);
    }

    let progressed = true;
    while (progressed) {
      if (this.mode === 'text') {
        progressed = this.drainText();
      } else if (this.mode === 'block') {
        progressed = this.drainBlock();
      } else {
        progressed = this.drainDiscard();
      }
    }
  }

  /** Emits complete lines and opens a block at a start marker. Returns whether the mode changed. */
  private drainText(): boolean {
    const start = this.pending.indexOf(OUTPUT_START_MARKER, this.scanFrom);
    if (start !== -1) {
      const before = this.pending.slice(0, start);
      this.openBlock(this.pending.slice(start + OUTPUT_START_MARKER.length));
      this.emitText(before);
      return true;
    }

    let lines = '';
    const newline = lastIndexOfNewline(this.pending, this.scanFrom);
    if (newline !== -1) {
      lines = this.pending.slice(0, newline);
      this.pending = this.pending.slice(newline + 1);
    }

    // A very long line is emitted in pieces, keeping a possible marker prefix.
    if (this.pending.length > MAX_TEXT_LINE_LENGTH) {
      const cut = safeCut(this.pending, this.pending.length - MARKER_OVERLAP);
      lines = lines === '' ? this.pending.slice(0, cut) : `${lines}\n${this.pending.slice(0, cut)}`;
      this.pending = this.pending.slice(cut);
    }

    this.scanFrom = Math.max(0, this.pending.length - MARKER_OVERLAP);
    this.emitText(lines);
    return false;
  }

  /** Closes, restarts or discards the open block. Returns whether the mode or the block changed. */
  private drainBlock(): boolean {
    const end = this.pending.indexOf(OUTPUT_END_MARKER, this.scanFrom);
    const nextStart = this.pending.indexOf(OUTPUT_START_MARKER, this.scanFrom);

    if (nextStart !== -1 && (end === -1 || nextStart < end)) {
      const body = this.pending.slice(0, nextStart);
      this.openBlock(this.pending.slice(nextStart + OUTPUT_START_MARKER.length));
      this.handlers.onMalformed(
        new Error('Output block has no end marker: another start marker came first.'),
        body,
      );
      return true;
    }

    if (end !== -1) {
      const body = this.pending.slice(0, end);
      this.mode = 'text';
      this.pending = this.pending.slice(end + OUTPUT_END_MARKER.length);
      this.scanFrom = 0;
      this.deliver(body);
      return true;
    }

    // The buffer may end with part of the end marker, so allow for it here.
    // deliver() checks the exact size of a complete body.
    if (this.pendingBytes > MAX_OUTPUT_BLOCK_BYTES + MARKER_OVERLAP) {
      const preview = this.pending.slice(0, OVERSIZE_PREVIEW_LENGTH);
      this.mode = 'discard';
      this.pending = this.pending.slice(-MARKER_OVERLAP);
      this.handlers.onMalformed(oversizeError(), preview);
      return true;
    }

    this.scanFrom = Math.max(0, this.pending.length - MARKER_OVERLAP);
    return false;
  }

  /** Drops the rest of an oversized block until its end marker or the next start marker. */
  private drainDiscard(): boolean {
    const end = this.pending.indexOf(OUTPUT_END_MARKER);
    const nextStart = this.pending.indexOf(OUTPUT_START_MARKER);

    if (nextStart !== -1 && (end === -1 || nextStart < end)) {
      this.openBlock(this.pending.slice(nextStart + OUTPUT_START_MARKER.length));
      return true;
    }
    if (end !== -1) {
      this.mode = 'text';
      this.pending = this.pending.slice(end + OUTPUT_END_MARKER.length);
      this.scanFrom = 0;
      return true;
    }

    this.pending = this.pending.slice(-MARKER_OVERLAP);
    return false;
  }

  private openBlock(rest: string): void {
    this.mode = 'block';
    this.pending = rest;
    this.pendingBytes = utf8Length(rest);
    this.scanFrom = 0;
  }

  private deliver(body: string): void {
    if (utf8Length(body) > MAX_OUTPUT_BLOCK_BYTES) {
      this.handlers.onMalformed(oversizeError(), body.slice(0, OVERSIZE_PREVIEW_LENGTH));
      return;
    }

    let value: unknown;
    try {
      value = JSON.parse(body);
    } catch (error) {
      const reason = error instanceof Error ? error.message : String(error);
      this.handlers.onMalformed(
        new Error(`Output block is not valid JSON: ${reason}`, { cause: error }),
        body,
      );
      return;
    }

    const parsed = toOutputBlock(value);
    if (parsed.kind === 'error') {
      this.handlers.onMalformed(new Error(parsed.message), body);
    } else if (parsed.kind === 'block') {
      this.handlers.onBlock(parsed.block);
    }
  }

  private emitText(text: string): void {
    const onText = this.handlers.onText;
    if (!onText || text.trim() === '') {
      return;
    }
    for (const line of text.split('\n')) {
      const withoutReturn = line.endsWith('\r') ? line.slice(0, -1) : line;
      if (withoutReturn.trim() !== '') {
        onText(withoutReturn);
      }
    }
  }
}

/**
 * Converts a parsed block to an OutputBlock. A NanoClaw v1 block carries
 * `result` in place of `content`: a string becomes `{ text: result }`, and
 * `null` (v1's "no reply") is skipped.
 */
function toOutputBlock(value: unknown): BlockParse {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    return { kind: 'error', message: 'Output block is not a JSON object.' };
  }
  const fields = value as Record<string, unknown>;

  const problem =
    checkOptionalString(fields, 'id') ??
    checkOptionalString(fields, 'kind') ??
    checkOptionalString(fields, 'in_reply_to') ??
    checkOptionalString(fields, 'result') ??
    checkContent(fields.content);
  if (problem) {
    return { kind: 'error', message: problem };
  }

  let content: unknown = fields.content;
  if (content === undefined || content === null) {
    if (fields.result === null) {
      return { kind: 'skip' };
    }
    if (typeof fields.result !== 'string') {
      return { kind: 'error', message: 'Output block has neither "content" nor "result".' };
    }
    content = { text: fields.result };
  }

  return {
    kind: 'block',
    block: {
      id: (fields.id as string | null | undefined) ?? null,
      kind: (fields.kind as string | null | undefined) || 'chat',
      content,
      inReplyTo: (fields.in_reply_to as string | null | undefined) ?? null,
      raw: value,
    },
  };
}

/** Returns an error message unless the field is absent, null or a string. */
function checkOptionalString(fields: Record<string, unknown>, name: string): string | undefined {
  const value = fields[name];
  if (value === undefined || value === null || typeof value === 'string') {
    return undefined;
  }
  return `Output block field "${name}" must be a string, got ${describe(value)}.`;
}

function checkContent(content: unknown): string | undefined {
  if (content === undefined || content === null) {
    return undefined;
  }
  if (typeof content === 'object' && !Array.isArray(content)) {
    return undefined;
  }
  return `Output block field "content" must be a JSON object, got ${describe(content)}.`;
}

function describe(value: unknown): string {
  return Array.isArray(value) ? 'an array' : typeof value;
}

function oversizeError(): Error {
  return new Error(`Output block is larger than ${MAX_OUTPUT_BLOCK_BYTES} bytes and was discarded.`);
}

/** Returns the last index of `\n` at or after `from`, or -1. */
function lastIndexOfNewline(text: string, from: number): number {
  for (let index = text.length - 1; index >= from; index--) {
    if (text.charCodeAt(index) === 10) {
      return index;
    }
  }
  return -1;
}

/** Moves a cut position back by one when it would split a UTF-16 surrogate pair. */
function safeCut(text: string, position: number): number {
  const before = text.charCodeAt(position - 1);
  return before >= 0xd800 && before <= 0xdbff ? position - 1 : position;
}

/** Returns the UTF-8 size of a string in bytes, without allocating. */
function utf8Length(text: string): number {
  let bytes = 0;
  for (let index = 0; index < text.length; index++) {
    const code = text.charCodeAt(index);
    if (code < 0x80) {
      bytes += 1;
    } else if (code < 0x800) {
      bytes += 2;
    } else if (code >= 0xd800 && code <= 0xdbff && isLowSurrogate(text.charCodeAt(index + 1))) {
      bytes += 4;
      index++;
    } else {
      bytes += 3;
    }
  }
  return bytes;
}

function isLowSurrogate(code: number): boolean {
  return code >= 0xdc00 && code <= 0xdfff;
}
