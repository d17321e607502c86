import { describe, expect, it } from 'vitest';

import {
  MAX_OUTPUT_BLOCK_BYTES,
  OUTPUT_END_MARKER as END,
  OUTPUT_START_MARKER as START,
  OutputMarkerParser,
  type OutputBlock,
} from '../src/lifecycle/output-markers.js';

interface Collected {
  blocks: OutputBlock[];
  malformed: Array<{ message: string; text: string }>;
  texts: string[];
}

function collect(): { parser: OutputMarkerParser; seen: Collected } {
  const seen: Collected = { blocks: [], malformed: [], texts: [] };
  const parser = new OutputMarkerParser({
    onBlock: (block) => seen.blocks.push(block),
    onMalformed: (error, text) => seen.malformed.push({ message: error.message, text }),
    onText: (text) => seen.texts.push(text),
  });
  return { parser, seen };
}

function parseAll(...chunks: Array<string | Buffer>): Collected {
  const { parser, seen } = collect();
  for (const chunk of chunks) {
    parser.push(chunk);
  }
  parser.end();
  return seen;
}

function block(json: string): string {
  return `${START}\n${json}\n${END}\n`;
}

const FIXTURE = Buffer.from(
  [
    'agent starting\n',
    block('{"id":"m1","kind":"chat","content":{"text":"héllo 🌍 ✓"},"in_reply_to":"in-1"}'),
    'tool call done ✓\r\n',
    block('{"result":"v1 reply ☕"}'),
    block('{"id":"m3", "content": '),
    block('{"id":"m4","kind":"task","content":{"prompt":"again"}}'),
    'bye',
  ].join(''),
  'utf8',
);

const FIXTURE_EXPECTED: Collected = parseAll(FIXTURE);

describe('OutputMarkerParser', () => {
  it('fixture parses as expected in one chunk', () => {
    expect(FIXTURE_EXPECTED.blocks.map((b) => b.id)).toEqual(['m1', null, 'm4']);
    expect(FIXTURE_EXPECTED.malformed).toHaveLength(1);
    expect(FIXTURE_EXPECTED.texts).toEqual(['agent starting', 'tool call done ✓', 'bye']);
  });

  it('delivers a block in one chunk', () => {
    const seen = parseAll(block('{"id":"m1","kind":"chat","content":{"text":"hi"},"in_reply_to":"in-1"}'));

    expect(seen.blocks).toEqual([
      {
        id: 'm1',
        kind: 'chat',
        content: { text: 'hi' },
        inReplyTo: 'in-1',
        raw: { id: 'm1', kind: 'chat', content: { text: 'hi' }, in_reply_to: 'in-1' },
      },
    ]);
    expect(seen.malformed).toEqual([]);
  });

  it('defaults kind to chat', () => {
    const seen = parseAll(block('{"content":{"text":"hi"}}'));

    expect(seen.blocks[0]?.kind).toBe('chat');
    expect(seen.blocks[0]?.id).toBeNull();
    expect(seen.blocks[0]?.inReplyTo).toBeNull();
  });

  it('same result split at every byte', () => {
    for (let index = 0; index <= FIXTURE.length; index++) {
      const seen = parseAll(FIXTURE.subarray(0, index), FIXTURE.subarray(index));

      expect(seen, `split at byte ${index}`).toEqual(FIXTURE_EXPECTED);
    }
  });

  it('same result fed one byte at a time', () => {
    const chunks = [...FIXTURE].map((byte) => Buffer.from([byte]));

    expect(parseAll(...chunks)).toEqual(FIXTURE_EXPECTED);
  });

  it('same result fed as string pieces', () => {
    const text = FIXTURE.toString('utf8');
    for (let index = 0; index <= text.length; index += 7) {
      const seen = parseAll(text.slice(0, index), text.slice(index));

      expect(seen, `split at character ${index}`).toEqual(FIXTURE_EXPECTED);
    }
  });

  it('joins a multi-byte character split across chunks', () => {
    const bytes = Buffer.from(block('{"content":{"text":"🌍"}}'), 'utf8');
    const inside = bytes.indexOf(Buffer.from('🌍', 'utf8')) + 2;

    const seen = parseAll(bytes.subarray(0, inside), bytes.subarray(inside));

    expect(seen.blocks[0]?.content).toEqual({ text: '🌍' });
    expect(seen.malformed).toEqual([]);
  });

  it('reports a malformed block between good ones', () => {
    const seen = parseAll(
      block('{"id":"a","content":{"text":"one"}}'),
      block('{"id":"broken",'),
      block('{"id":"b","content":{"text":"two"}}'),
    );

    expect(seen.blocks.map((b) => b.id)).toEqual(['a', 'b']);
    expect(seen.malformed).toHaveLength(1);
    expect(seen.malformed[0]?.message).toMatch(/not valid JSON/);
    expect(seen.malformed[0]?.text).toContain('"broken"');
  });

  it('reports a JSON value that is not an object', () => {
    const seen = parseAll(block('["a"]'), block('"text"'), block('null'));

    expect(seen.blocks).toEqual([]);
    expect(seen.malformed.map((m) => m.message)).toEqual([
      'Output block is not a JSON object.',
      'Output block is not a JSON object.',
      'Output block is not a JSON object.',
    ]);
  });

  it('reports a field of the wrong type', () => {
    const seen = parseAll(block('{"id":5,"content":{"text":"x"}}'), block('{"content":"x"}'));

    expect(seen.blocks).toEqual([]);
    expect(seen.malformed[0]?.message).toMatch(/"id" must be a string/);
    expect(seen.malformed[1]?.message).toMatch(/"content" must be a JSON object/);
  });

  it('reports a block with neither content nor result', () => {
    const seen = parseAll(block('{"id":"m1"}'));

    expect(seen.blocks).toEqual([]);
    expect(seen.malformed[0]?.message).toMatch(/neither "content" nor "result"/);
  });

  it('maps a v1 result to content text', () => {
    const seen = parseAll(block('{"status":"success","result":"done","newSessionId":"s2"}'));

    expect(seen.blocks).toHaveLength(1);
    expect(seen.blocks[0]?.content).toEqual({ text: 'done' });
    expect(seen.blocks[0]?.raw).toEqual({ status: 'success', result: 'done', newSessionId: 's2' });
  });

  it('prefers content over result', () => {
    const seen = parseAll(block('{"content":{"text":"new"},"result":"old"}'));

    expect(seen.blocks[0]?.content).toEqual({ text: 'new' });
  });

  it('skips a null v1 result', () => {
    const seen = parseAll(block('{"status":"success","result":null}'));

    expect(seen.blocks).toEqual([]);
    expect(seen.malformed).toEqual([]);
  });

  it('discards an oversized block', () => {
    const big = `{"content":{"text":"${'x'.repeat(MAX_OUTPUT_BLOCK_BYTES)}"}}`;
    const { parser, seen } = collect();

    parser.push(`${START}\n`);
    for (let offset = 0; offset < big.length; offset += 65_536) {
      parser.push(big.slice(offset, offset + 65_536));
    }
    parser.push(`\n${END}\n`);
    parser.push(block('{"id":"after","content":{"text":"ok"}}'));
    parser.end();

    expect(seen.malformed).toHaveLength(1);
    expect(seen.malformed[0]?.message).toMatch(/larger than 1048576 bytes/);
    expect(seen.malformed[0]?.text.length).toBeLessThanOrEqual(1024);
    expect(seen.blocks.map((b) => b.id)).toEqual(['after']);
    expect(seen.texts).toEqual([]);
  });

  it('discards an oversized block in one chunk', () => {
    const big = `{"content":{"text":"${'x'.repeat(MAX_OUTPUT_BLOCK_BYTES)}"}}`;

    const seen = parseAll(block(big) + block('{"id":"after","content":{"text":"ok"}}'));

    expect(seen.malformed).toHaveLength(1);
    expect(seen.blocks.map((b) => b.id)).toEqual(['after']);
  });

  it('delivers a block of exactly the maximum size', () => {
    const frame = '{"content":{"text":""}}';
    const room = MAX_OUTPUT_BLOCK_BYTES - frame.length;
    const body = `{"content":{"text":"${'é'.repeat(Math.floor(room / 2))}${'a'.repeat(room % 2)}"}}`;
    expect(Buffer.byteLength(body)).toBe(MAX_OUTPUT_BLOCK_BYTES);

    const seen = parseAll(`${START}${body}${END}`);

    expect(seen.malformed).toEqual([]);
    expect(seen.blocks).toHaveLength(1);
  });

  it('reports an unterminated block at end', () => {
    const { parser, seen } = collect();

    parser.push(`${START}\n{"content":{"text":"cut off"}}\n`);
    expect(seen.malformed).toEqual([]);
    parser.end();

    expect(seen.blocks).toEqual([]);
    expect(seen.malformed).toHaveLength(1);
    expect(seen.malformed[0]?.message).toMatch(/no end marker/);
    expect(seen.malformed[0]?.text).toContain('cut off');
  });

  it('reports a block cut off by a new start marker', () => {
    const seen = parseAll(`${START}\n{"id":"lost"\n`, block('{"id":"next","content":{"text":"ok"}}'));

    expect(seen.malformed).toHaveLength(1);
    expect(seen.malformed[0]?.text).toContain('"lost"');
    expect(seen.blocks.map((b) => b.id)).toEqual(['next']);
  });

  it('passes text outside blocks line by line', () => {
    const seen = parseAll('first line\nsecond', ' line\r\n\n   \n', block('{"content":{}}'), 'last');

    expect(seen.texts).toEqual(['first line', 'second line', 'last']);
    expect(seen.blocks).toHaveLength(1);
  });

  it('accepts markers amid whitespace on one line', () => {
    const seen = parseAll(`  ${START}  {"id":"m1","content":{"text":"x"}}  ${END}  \n`);

    expect(seen.blocks.map((b) => b.id)).toEqual(['m1']);
    expect(seen.texts).toEqual([]);
  });

  it('passes text before a marker on its line', () => {
    const seen = parseAll(`log: ${START}{"content":{"text":"x"}}${END} trailing\n`);

    expect(seen.texts).toEqual(['log: ', ' trailing']);
    expect(seen.blocks).toHaveLength(1);
  });

  it('splits a very long line into pieces', () => {
    const long = 'y'.repeat(200_000);

    const seen = parseAll(long, '\n');

    expect(seen.texts.join('')).toBe(long);
    expect(seen.texts.length).toBeGreaterThan(1);
  });

  it('finds a marker at the end of a long line', () => {
    const long = 'y'.repeat(100_000);

    const seen = parseAll(long, START.slice(0, 5), START.slice(5), '{"content":{}}', END);

    expect(seen.texts.join('')).toBe(long);
    expect(seen.blocks).toHaveLength(1);
  });

  it('works without an onText handler', () => {
    const blocks: OutputBlock[] = [];
    const parser = new OutputMarkerParser({ onBlock: (b) => blocks.push(b), onMalformed: () => {} });

    parser.push(`noise\n${block('{"content":{}}')}more noise`);
    parser.end();

    expect(blocks).toHaveLength(1);
  });

  it('rejects push after end', () => {
    const { parser } = collect();
    parser.end();

    expect(() => parser.push('late')).toThrow(/after end/);
  });
});
